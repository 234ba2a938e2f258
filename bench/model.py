"""Forward+backward throughput of the vision tower and its achieved FLOP/s vs a matmul peak.

    .venv/bin/python -m bench.model                      # S/14 and B/14, batch 8 and 32, 224 px (~3 min on 2 cores)
    .venv/bin/python -m bench.model --models tiny --batches 8 --steps 2

FLOPs are counted by torch's FlopCounterMode on one real forward+backward step (matmuls, convolutions,
attention), cross-checked against the analytic count. The peak is a 2048^2 float32 matmul timed in
the same run, so the fraction is comparable across machines. Writes bench/results/model.json.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import machine, matmul_peak_flops, print_table, time_it, write_json
from tipsv2.models import build_model, model_config


def analytic_forward_flops(name: str, image_size: int) -> float:
    """2 * multiply-adds of one forward pass of the vision tower for one image."""
    cfg = model_config(name).vision
    n = (image_size // cfg.patch_size) ** 2
    t, d = n + 2, cfg.width
    hidden = cfg.mlp_dim if cfg.ffn.value == "mlp" else 3 * ((int(cfg.mlp_dim * 2 / 3) + 7) // 8 * 8)
    per_block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * t * d * hidden * (2 if cfg.ffn.value == "mlp" else 1)
    return 2 * n * 3 * cfg.patch_size ** 2 * d + cfg.depth * per_block


def measure(name: str, batch: int, image_size: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(model_config(name, image_size=image_size)).vision.train()
    images = torch.rand(batch, 3, image_size, image_size)

    def step():
        model.zero_grad(set_to_none=True)
        feats = model(images)
        (feats.cls1.sum() + feats.cls2.sum() + feats.patches.mean()).backward()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    seconds = time_it(step, warmup=1, repeats=steps)
    return {"model": name, "batch": batch, "px": image_size, "step_s": seconds, "images_per_s": batch / seconds,
            "gflop_per_step": flops / 1e9, "analytic_gflop_per_step": 3 * batch * analytic_forward_flops(name, image_size) / 1e9,
            "achieved_gflops": flops / seconds / 1e9}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_s14", "vit_b14"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median)")
    args = parser.parse_args(argv)
    peak = matmul_peak_flops()
    rows = [measure(m, b, args.px, args.steps) for m in args.models for b in args.batches]
    for row in rows:
        row["fraction_of_peak"] = row["achieved_gflops"] * 1e9 / peak
    print(f"float32 matmul peak (2048^2): {peak / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads")
    print_table(rows, ["model", "batch", "px", "step_s", "images_per_s", "gflop_per_step", "achieved_gflops",
                       "fraction_of_peak"])
    path = write_json("model", {"machine": machine(), "matmul_peak_gflops": peak / 1e9, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
