"""A producer thread's hand-off into a bounded queue, which ends when its consumer has left.

A blocking `put` into a full queue that nobody reads any more keeps the producer thread (and whatever it holds:
a Ray Data iterator, a vLLM engine's output stream) waiting until the process ends; `offer` gives up once the
consumer sets `stop`.
"""

from __future__ import annotations

import queue
import threading
from typing import Any


def offer(box: queue.Queue, item: Any, stop: threading.Event, every_s: float = 0.5) -> bool:
    """Put `item` once `box` has room; False, without putting it, once `stop` is set."""
    while not stop.is_set():
        try:
            box.put(item, timeout=every_s)
            return True
        except queue.Full:
            continue
    return False
