"""Which Ray cluster a stage joins, decided before Ray starts, so that a cluster that does not answer never
hangs a stage (a bare `ray.init()` retried a dead GCS for over 200 s; issue 22).

- `RAY_ADDRESS` set (a GCS `host:port`, `ray://host:port` or `auto`): joined if it answers within a few
  seconds; else `UsageError` naming the address and the fix (the stage exits 2).
- unset: the cluster the last `ray start` on this machine recorded (`ray_current_cluster` in Ray's temp dir),
  which a bare `ray.init()` joins. Joined if it answers; a dead record is reported in one line and a local
  Ray is started instead.
- nothing recorded: a local Ray.

The check is one TCP connection to the GCS port: a refused or silent port means no cluster there.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from pipelines.errors import UsageError

CONNECT_S = 5.0      # per connection attempt
ATTEMPTS = 3         # a cluster that is starting gets a few seconds more; at most about 17 s in all
FIX = ("start the cluster (`ray start --head`, or `ray up cluster/aws.yaml`), point RAY_ADDRESS at one that "
       "runs, or unset RAY_ADDRESS to start a local Ray")


def record_file() -> Path:
    """Where `ray start` records the cluster a bare `ray.init()` joins: Ray's temp dir (RAY_TMPDIR, else TMPDIR,
    else /tmp; then `ray/`), file `ray_current_cluster`; Ray's own rule, ray._common.utils."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(root) / "ray" / "ray_current_cluster"


def recorded() -> str | None:
    """The GCS address recorded by the last `ray start` on this machine, if any."""
    path = record_file()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def host_port(address: str) -> tuple[str, int]:
    """(host, port) of a Ray address: `host:port`, `ray://host:port`, `[v6]:port`; UsageError otherwise."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(f"Ray address {address!r}: expected HOST:PORT (the GCS, port 6379 by default) or "
                         "ray://HOST:PORT")
    return host.strip("[]"), int(port)


def answers(address: str, *, connect_s: float = CONNECT_S, attempts: int = ATTEMPTS) -> bool:
    """Whether something listens at the address's host and port (a GCS that runs)."""
    host, port = host_port(address)
    for attempt in range(attempts):
        try:
            socket.create_connection((host, port), timeout=connect_s).close()
            return True
        except OSError:
            if attempt + 1 < attempts:
                time.sleep(1.0)
    return False


def choose(*, warn=print) -> str | None:
    """The address `ray.init` should join, or None to start a local Ray (see the module docstring)."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env == "local":
        return None
    if env and env != "auto":
        if not answers(env):
            raise UsageError(f"RAY_ADDRESS={env}: no Ray cluster answers there; {FIX}")
        return env
    address = recorded()
    if address is None:
        if env == "auto":
            raise UsageError(f"RAY_ADDRESS=auto: no running Ray cluster is recorded in {record_file()}; {FIX}")
        return None
    if answers(address):
        return address
    if env == "auto":
        raise UsageError(f"RAY_ADDRESS=auto: the recorded cluster {address} ({record_file()}) does not answer; {FIX}")
    warn(f"Ray: the cluster recorded in {record_file()} ({address}) does not answer; starting a local Ray "
         "(remove that file, or `ray stop`, to stop seeing this)")
    return None
