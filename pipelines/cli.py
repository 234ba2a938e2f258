"""The command line every stage shares.

    python -m pipelines.<stage> --config NAME_OR_FILE [--set key.path=value ...] --output URI
    python -m pipelines.<stage> --config NAME_OR_FILE [--set ...] --print-config     # every key, resolved
    python -m pipelines.<stage> --config NAME_OR_FILE --list-keys                      # every --set key, its value

NAME is a preset of the stage; FILE is a JSON file merged over the stage's `default` preset. Each
`--set` goes through `tipsv2.config_tree.override`, so an unknown key fails with the valid ones.
A stage may add flags of its own (`StageFlags`, e.g. pipelines.evaluate's `--checkpoint`); each stage's
`main` is `stage_main(argv, PRESETS, run, ...)`: parse into a config, call the importable `run(cfg, output)`,
show the summary. Stages write the resolved config (`config.json`) and a `summary.json` next to their outputs.
With `stage=`, an `--output ROOT/<stage>` reads the stage's unset inputs from the run root (pipelines.layout).
Usage errors (a missing input or config file, an unknown key or URI scheme) exit 2 with one line naming
the value and what was expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from pipelines import layout, ray_cluster, storage, tracking_store
from pipelines.errors import UsageError
from tipsv2 import config_tree

Cfg = TypeVar("Cfg")
Summary = TypeVar("Summary")

CONFIG_FILE = "config.json"
TRACKED = ("ingest", "caption", "pretrain", "distill")   # stages that always open an MLflow run
SUMMARY_FILE = "summary.json"


def resolve_config(name_or_file: str, presets: dict[str, Callable[[], Cfg]], sets: list[str]) -> Cfg:
    """Preset by name, or a JSON file merged over the `default` preset; then the `--set` overrides."""
    if name_or_file in presets:
        cfg = presets[name_or_file]()
    elif name_or_file.endswith(".json") or os.path.sep in name_or_file or storage.is_remote(name_or_file):
        if "default" not in presets:
            raise ValueError(f"a config file needs a 'default' preset to merge over; presets: {sorted(presets)}")
        try:
            text = storage.read_bytes(name_or_file)
        except (OSError, FileNotFoundError):
            raise ValueError(f"--config {name_or_file!r}: no such file; expected a preset {sorted(presets)} "
                             "or an existing JSON file") from None
        try:
            loaded = json.loads(text)
        except ValueError as err:
            raise ValueError(f"--config {name_or_file!r} is not valid JSON ({err})") from None
        cfg = config_tree.merge(presets["default"](), loaded)
    else:
        raise ValueError(f"--config {name_or_file!r} is neither a preset {sorted(presets)} nor a .json file")
    for assignment in sets:
        cfg = config_tree.override(cfg, assignment)
    return cfg


class StageFlags(Protocol):
    """Flags a stage takes beside the shared ones, and how they change its resolved config."""

    def add_to(self, parser: argparse.ArgumentParser) -> None: ...

    def apply(self, cfg: Any, args: argparse.Namespace) -> Any:
        """The config with the flags applied (after `--config` and `--set`); ValueError: a usage error."""


def keys_epilog(presets: dict[str, Callable[[], Any]]) -> str | None:
    """The top-level config keys for `--help` (`--list-keys` prints every leaf)."""
    make = presets.get("default") or next(iter(presets.values()), None)
    try:
        cfg = make() if make is not None else None
    except Exception:  # noqa: BLE001 - help must never fail on a preset that needs an environment
        return None
    if cfg is None or not dataclasses.is_dataclass(cfg):
        return None
    tops = sorted({key.split(".")[0] + ("." if "." in key else "") for key in config_tree.leaf_keys(cfg)})
    return ("--set keys (top level; `--list-keys` prints every key with its value):\n  "
            + textwrap.fill(" ".join(tops), width=96, subsequent_indent="  "))


def parse_stage_args(argv: list[str] | None, presets: dict[str, Callable[[], Cfg]],
                     *, description: str | None = None, flags: StageFlags | None = None,
                     stage: str | None = None) -> tuple[Cfg, str]:
    """Parse the shared stage flags (and the stage's own `flags`); returns (resolved config, output URI).
    With `stage`, inputs left unset come from the run root (pipelines.layout.connect) and must exist."""
    parser = argparse.ArgumentParser(prog=f"python -m pipelines.{stage}" if stage else None,
                                     description=description, epilog=keys_epilog(presets),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help=f"preset {sorted(presets)} or a JSON file")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--output", help="output: a local path, s3://bucket/prefix or gs://bucket/prefix; "
                        "ROOT/<stage> reads the earlier stages' outputs under ROOT")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key, as JSON) and exit")
    parser.add_argument("--list-keys", action="store_true",
                        help="print every --set key with its resolved value and exit")
    if flags is not None:
        flags.add_to(parser)
    args = parser.parse_args(argv)
    output = storage.absolute(args.output) if args.output else None
    try:
        if output:
            storage.filesystem(output)   # an unsupported scheme fails here, naming it
            check_output(output)
        cfg = resolve_config(args.config, presets, args.sets)
        if flags is not None:
            cfg = flags.apply(cfg, args)
        if stage is not None:
            cfg = layout.connect(stage, cfg, output, check=not (args.print_config or args.list_keys))
        if output and not (args.print_config or args.list_keys):
            check_tracking(cfg, output, stage)   # refused or unreachable: exit 2
    except ValueError as err:
        parser.error(str(err))
    if args.print_config:
        print(json.dumps(config_tree.to_dict(cfg), indent=2))
        raise SystemExit(0)
    if args.list_keys:
        for key in config_tree.leaf_keys(cfg):
            print(f"{key} = {json.dumps(layout.get(cfg, key), default=str)}")
        raise SystemExit(0)
    if not output:
        parser.error("the following arguments are required: --output")
    return cfg, output


def check_output(output: str) -> None:
    """UsageError when a local `output` cannot be a directory: it, or the nearest part of it that exists, is a file."""
    if storage.is_remote(output):
        return
    path = Path(output)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output {output}: {existing} is a file, not a directory; expected a directory to write "
                         "into (it is created if missing)")


def check_tracking(cfg: Any, output: str, stage: str | None) -> None:
    """The stage's MLflow store: refused where a file store would lose runs (stages that always open a run),
    and an MLflow server that does not answer, before anything starts."""
    configured = getattr(getattr(cfg, "tracking", None), "uri", None)
    if stage in TRACKED:
        tracking_store.store_uri(configured, output)
    tracking_store.check_answers(configured or os.environ.get("MLFLOW_TRACKING_URI") or "")


def print_json(summary: Any, output: str) -> None:
    print(json.dumps(summary, indent=2))


def stage_main(argv: list[str] | None, presets: dict[str, Callable[[], Cfg]], run: Callable[[Cfg, str], Summary],
               *, description: str | None = None, flags: StageFlags | None = None,
               show: Callable[[Summary, str], None] | None = print_json, stage: str | None = None) -> Summary:
    """Every stage's `main`: parse the command line into a config, `run(cfg, output)`, show the summary
    (`show(summary, output)`; JSON by default, None: nothing) and return it. `stage` names the stage in
    the run root (pipelines.layout)."""
    cfg, output = parse_stage_args(argv, presets, description=description, flags=flags, stage=stage)
    prog = f"python -m pipelines.{stage}" if stage else os.path.basename(sys.argv[0])
    try:
        summary = run(cfg, output)
    except UsageError as err:   # wrong input found once the stage looked: one line, exit 2, as argparse does
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:   # Ctrl-C: say what is kept and how to go on, not a traceback; 130 as a shell does
        print(f"{prog}: interrupted; what was written to {output} is kept: run the same command again to go on "
              "(training resumes from its last checkpoint, captioning keeps every committed caption, a finished "
              "step is skipped)", file=sys.stderr)
        raise SystemExit(130) from None
    if show is not None:
        show(summary, output)
    return summary


def done_record(cfg: Any, **fields: Any) -> dict[str, Any]:
    """What a finished piece of work records, so that `done_before` can tell a rerun of it: its config
    (normalised as JSON stores it) and the result `fields`."""
    return {"config": json.loads(json.dumps(config_tree.to_dict(cfg))), **fields}


def done_before(record_uri: str, cfg: Any) -> dict[str, Any] | None:
    """The record at `record_uri` (a `done_record`, e.g. a stage's summary.json) when it was written for this
    exact config; None when there is none or another config wrote it. Every stage, and every step of the
    chain, skips its work this one way."""
    if not storage.exists(record_uri):
        return None
    record = storage.read_json(record_uri)
    return record if record.get("config") == done_record(cfg)["config"] else None


def write_resolved_config(output_uri: str, cfg: Any) -> None:
    storage.write_json(storage.join(output_uri, CONFIG_FILE), config_tree.to_dict(cfg))


def write_summary(output_uri: str, summary: dict[str, Any]) -> None:
    """summary.json: what was read and written (row counts, paths), metrics, run id, wall time (s)."""
    storage.write_json(storage.join(output_uri, SUMMARY_FILE), summary)


class Stopwatch:
    """Wall time in seconds since construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def init_ray(num_cpus: int = 0) -> None:
    """Join the cluster in RAY_ADDRESS, or the one `ray start` recorded, if it answers; else start a local Ray
    (pipelines.ray_cluster: a dead RAY_ADDRESS is a UsageError, a dead record is reported and passed over).

    `num_cpus` > 0 declares that many logical CPUs for a local Ray (vLLM's small stages need more
    slots than a 2-core machine has); it is ignored when joining an existing cluster.
    """
    import ray

    if ray.is_initialized():
        return
    address = ray_cluster.choose()
    if address is not None:
        ray.init(address=address)
    else:
        ray.init(address="local", **({"num_cpus": num_cpus} if num_cpus > 0 else {}))
