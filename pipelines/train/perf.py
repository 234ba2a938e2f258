"""Performance probes: a progress bar for logs, and the memory a worker holds (live tensors, peak RSS)."""

from __future__ import annotations

import time
from typing import Callable

import torch


class Progress:
    """A one-line progress bar printed every `every_s` seconds and at the end: it reads the same on a
    terminal, through Ray's log forwarding and in `ray job logs` (no carriage returns)."""

    WIDTH = 24

    def __init__(self, name: str, *, total: int, done: int = 0, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None) -> None:
        self.name, self.total, self.done, self.every_s = name, total, done, every_s
        self.clock, self.emit = clock, emit or (lambda line: print(line, flush=True))
        self.start = self.last = clock()
        self.first = done

    def update(self, *, loss: float, steps: int = 1) -> None:
        self.done += steps
        now = self.clock()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self.emit(self.line(now, loss))

    def line(self, now: float, loss: float) -> str:
        filled = self.WIDTH * self.done // max(self.total, 1)
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"[{self.name}] |{'#' * filled}{'.' * (self.WIDTH - filled)}| {self.done}/{self.total} steps, "
                f"{rate:.2f} step/s, {now - self.start:.0f} s elapsed, eta {eta:.0f} s, loss {loss:.4g}")


def live_tensor_mb(parameters=()) -> float:
    """MiB held by every live tensor storage of this process (weights, gradients, optimizer state and
    ZeRO's flat buffers, each storage counted once): what ZeRO's sharding shrinks, unlike the RSS peak,
    which also holds freed allocator pages and library code. Gradients that autograd made in C++ have no
    Python object for the walk to find, so the parameters' `.grad` are counted explicitly."""
    import gc
    import warnings

    storages: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for p in parameters:
        if p.grad is not None:
            count(p.grad)
    with warnings.catch_warnings():   # isinstance() on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    count(obj)
            except (RuntimeError, ReferenceError):   # tensors without storage (sparse, freed weakrefs)
                continue
    storages.pop(0, None)   # empty storages
    return sum(storages.values()) / 2 ** 20


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB), Linux."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
