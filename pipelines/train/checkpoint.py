"""What a run leaves to resume from: checkpoint layout, trainer state, RNG state, the EMA teacher's tensors, history.

A checkpoint (<output>/ray/train/step_XXXXXXXX) holds the DeepSpeed state of every rank (tag `ds`) plus
`trainer_state.json` (step, epoch, MLflow run id, loss history), `teacher.safetensors` (EMA teacher weights and
center buffers, gathered, so ZeRO-3 restores them exactly) and `rng_rank<r>.json` (torch, numpy and Python RNG
states).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from pipelines import storage
from pipelines.train.jobs import ema_masters, ema_parameters, teacher_masters
from pipelines.train.zero import Zero

RUN_NAME = "train"                     # Ray Train run directory under <output>/ray
TRAINER_STATE = "trainer_state.json"
TEACHER_STATE = "teacher.safetensors"
DS_TAG = "ds"
HISTORY_FILE = "history.jsonl"
STOP_FILE = "stopped.json"             # why the last run stopped early (a non-finite loss), for the driver


@dataclasses.dataclass
class TrainerState:
    step: int = 0                      # next step to run
    epoch: int = 0
    run_id: str | None = None
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def rng_state() -> dict:
    """Every generator a step draws from: torch's (CPU, and the current GPU's: drop-path on CUDA), numpy's,
    Python's."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(),
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def teacher_tensors(task: nn.Module, stage: int) -> dict[str, torch.Tensor]:
    """EMA teacher parameters (their float32 masters in 16-bit training) and every buffer, whole and on
    CPU (a collective under ZeRO-3)."""
    names = {id(p): n for n, p in task.named_parameters(remove_duplicate=False)}
    params = ema_parameters(task)
    with Zero(stage).whole(params):
        values = ema_masters(task) or [p.detach() for p in params]
        state = {names[id(p)]: v.float().cpu().clone() for p, v in zip(params, values, strict=True)}
    state |= {f"buffer.{n}": b.detach().float().cpu().clone() for n, b in task.named_buffers()}
    return state


def load_teacher_tensors(task: nn.Module, state: dict[str, torch.Tensor], stage: int) -> None:
    named = dict(task.named_parameters(remove_duplicate=False))
    params = [named[n] for n in state if not n.startswith("buffer.")]
    buffers = dict(task.named_buffers())
    with torch.no_grad():
        with Zero(stage).gathered(params):
            for name, value in state.items():
                if not name.startswith("buffer."):
                    named[name].data.copy_(value.to(named[name].dtype))
        names = {id(p): n for n, p in named.items()}
        for param, master in teacher_masters(task):
            master.copy_(state[names[id(param)]])
        for name, value in state.items():
            if name.startswith("buffer."):
                target = buffers[name[len("buffer."):]]
                target.copy_(value.to(target.dtype))


def latest_checkpoint(output: str) -> str | None:
    """URI of the newest complete checkpoint under <output>/ray/<run> (highest step), or None."""
    marks = storage.list_files(storage.join(output, "ray", RUN_NAME), suffixes=(TRAINER_STATE,))
    best, best_step = None, -1
    for mark in marks:
        directory = mark[: -len(TRAINER_STATE) - 1]
        step = int(storage.read_json(mark)["step"])
        if step > best_step:
            best, best_step = directory, step
    return best


def read_trainer_state(checkpoint_dir: str) -> TrainerState:
    raw = storage.read_json(storage.join(checkpoint_dir, TRAINER_STATE))
    return TrainerState(step=raw["step"], epoch=raw["epoch"], run_id=raw.get("run_id"), history=raw["history"])


def write_history(output: str, history: list[dict[str, float]]) -> None:
    storage.write_bytes(storage.join(output, HISTORY_FILE), "".join(json.dumps(r) + "\n" for r in history).encode())


def read_history(output: str) -> list[dict[str, float]]:
    uri = storage.join(output, HISTORY_FILE)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line]


@contextlib.contextmanager
def checkpoint_directory(checkpoint, rank: int) -> Iterator[Path]:
    """The checkpoint as a local directory: itself when local, else a download private to this rank.
    Ray's shared download (`Checkpoint.as_directory`) races when several ranks on one node read a
    remote checkpoint at once: one rank deletes the shared copy while another still waits for it."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    directory = Path(tempfile.mkdtemp(prefix=f"tipsv2-restore-rank{rank}-"))
    try:
        checkpoint.to_directory(str(directory))
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
