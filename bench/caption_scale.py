"""Driver memory and per-task arguments of the caption stage at 10^4, 10^5 and 10^6 images (template backend).

    python -m bench.caption --parts scale [--scale-rows 10000 100000 1000000]

Each size runs in a fresh driver process joined to one Ray cluster, on an images table of tiny rows (no
image bytes: the template backend reads only metadata) in files of `ROWS_PER_FILE` rows, first from
scratch and then again (the resume: every id is skipped by the partitioned anti-join). Measured in the
driver: peak RSS (getrusage) before and after the stage, so the growth is the stage's; and the pickled
size of every Ray task's arguments (the config, the output URI, the generation: what each task gets).
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

ROWS_PER_FILE = 10_000   # images per input Parquet file: partitions = rows / 10^4


def write_input(root: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tipsv2.data import schema

    (root / "images").mkdir(parents=True, exist_ok=True)
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        ids = [f"{i:032x}" for i in range(start, start + n)]
        table = pa.table({"id": ids, "image": [b""] * n, "format": ["PNG"] * n, "width": [1] * n,
                          "height": [1] * n, "alt_text": [f"thing {i}" for i in range(start, start + n)],
                          "source": ids, "sha256": ids})
        pq.write_table(table.cast(schema.IMAGES), root / "images" / f"part-{start // ROWS_PER_FILE:05d}.parquet")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: kB


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def task_argument_bytes(cfg, output: str) -> dict[str, int]:
    """Pickled size of what each Ray task of the stage is handed besides its block."""
    import cloudpickle

    from pipelines import caption

    slots = caption.slots_of(cfg)
    plan = {"cfg": cfg, "output": output, "images_root": output, "slots": slots}
    write = {"cfg": cfg, "output": output, "generation": time.time_ns(), "slots": slots}
    compact = {"output": output, "generation": time.time_ns(), "slots": slots}
    return {name: len(cloudpickle.dumps(kwargs, protocol=pickle.HIGHEST_PROTOCOL))
            for name, kwargs in (("plan_block", plan), ("write_block", write), ("compact_partition", compact))}


def child(rows: int, work: str) -> None:
    """One size in this process (a driver joined to RAY_ADDRESS): prints one JSON line."""
    import dataclasses

    import ray

    from pipelines import caption

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    cfg = dataclasses.replace(caption.template(), input=str(Path(work) / "in"))
    before, current_before = peak_rss_mb(), rss_mb()
    start = time.perf_counter()
    first = caption.run(cfg, str(Path(work) / "out"))
    first_s, after_first = time.perf_counter() - start, peak_rss_mb()
    start = time.perf_counter()
    again = caption.run(cfg, str(Path(work) / "out"))
    resume_s = time.perf_counter() - start
    assert first["written"]["rows"] == rows and again["read"]["already_captioned_ids"] == rows, (first, again)
    print(json.dumps({"rows": rows, "input_files": -(-rows // ROWS_PER_FILE),
                      "driver_peak_rss_mb_before": round(before, 1), "driver_peak_rss_mb_after_run": round(after_first, 1),
                      "driver_peak_rss_mb_after_resume": round(peak_rss_mb(), 1),
                      "driver_rss_growth_mb": round(peak_rss_mb() - before, 1),
                      "driver_current_rss_mb_before_after": [round(current_before, 1), round(rss_mb(), 1)],
                      "task_argument_bytes": task_argument_bytes(cfg, str(Path(work) / "out")),
                      "run_s": round(first_s, 1), "resume_s": round(resume_s, 1),
                      "images_per_s": round(rows / first_s, 1), "output_files": first["written"]["files"],
                      "load_average": os.getloadavg()}))


def bench_scale(work: Path, sizes: list[int]) -> list[dict]:
    import ray

    address = ray.get_runtime_context().gcs_address
    out = []
    for rows in sizes:
        root = work / f"scale_{rows}"
        write_input(root / "in", rows)
        proc = subprocess.run([sys.executable, "-m", "bench.caption_scale", str(rows), str(root)],
                              env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True,
                              timeout=3600)
        if proc.returncode:
            raise RuntimeError(f"scale run of {rows} rows failed:\n{proc.stderr[-3000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(out[-1], flush=True)
    return out


if __name__ == "__main__":
    child(int(sys.argv[1]), sys.argv[2])
