"""Kill the caption driver mid-way (SIGKILL), rerun, and check every id is there exactly once.

The job runs as `python -m pipelines.caption` in a subprocess joined to the session's Ray cluster, with
the hf backend on a tiny PaliGemma (real images through a real model). It is killed as soon as its
first output file is committed (by a Ray worker); the rerun must skip exactly the committed ids and do the
rest.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import caption
from pipelines.testing import start_stage
from tipsv2 import config_tree
from tipsv2.data import schema

N_IMAGES = 60


def _write_noise_images(root) -> list[str]:
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(N_IMAGES):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    table = pa.table({"id": [s[:32] for s in shas], "image": blobs, "format": ["PNG"] * N_IMAGES,
                      "width": [32] * N_IMAGES, "height": [32] * N_IMAGES, "alt_text": [None] * N_IMAGES,
                      "source": [f"noise/{i}.png" for i in range(N_IMAGES)], "sha256": shas})
    (root / "images").mkdir(parents=True)
    pq.write_table(table.cast(schema.IMAGES), root / "images" / "part.parquet")
    return [s[:32] for s in shas]


def _committed_ids(out) -> list[str]:
    files = sorted((out / "captions").rglob("part-*.parquet")) if (out / "captions").exists() else []
    return [i for f in files for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]


@pytest.mark.slow
def test_sigkill_mid_way_then_rerun_gives_every_id_exactly_once(ray_local, tiny_paligemma, tmp_path):
    ids = _write_noise_images(tmp_path / "in")
    out = tmp_path / "out"
    sets = [f"engine.model_source={tiny_paligemma}", f"input={tmp_path / 'in'}", "shard_rows=4",
            "engine.batch_size=2"]
    proc = start_stage("caption", "hf", out, sets, ray_local.get_runtime_context().gcs_address)
    deadline = time.monotonic() + 240
    while not _committed_ids(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Workers write the files: a write in flight when the driver died may still land (atomically) while Ray
    # tears the dead job's workers down; what counts is the state the rerun finds.
    time.sleep(3)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    before = _committed_ids(out)
    assert 0 < len(before) < N_IMAGES, (f"the kill should land mid-way; {len(before)} of {N_IMAGES} were done; "
                                        f"driver stderr: {proc.stderr.read().decode()[-3000:]}")
    assert len(before) == len(set(before)) and set(before) <= set(ids)

    cfg = caption.hf()
    for assignment in sets:
        cfg = config_tree.override(cfg, assignment)
    summary = caption.run(cfg, str(out))
    after = _committed_ids(out)
    print(f"\nkill test: {len(before)} of {N_IMAGES} ids committed before SIGKILL; rerun skipped "
          f"{summary['read']['already_captioned_ids']} and captioned {summary['written']['rows_this_run']}; "
          f"final {len(after)} rows, {len(set(after))} distinct, {len(set(ids) - set(after))} missing")
    assert summary["read"]["already_captioned_ids"] == len(before)
    assert summary["written"]["rows_this_run"] == N_IMAGES - len(before)
    assert sorted(after) == sorted(ids), "every input id exactly once, none lost"
