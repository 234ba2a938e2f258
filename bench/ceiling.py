"""How far the miniature's vision tower gets with the answer key: supervised patch labels as a ceiling.

    .venv/bin/python -m bench.ceiling --family shape --seeds 1000 1001 --steps 3000   # about 20 min, 2 processes
    .venv/bin/python -m bench.ceiling --family colour --seeds 1000 --steps 300         # the easy case, 1 min

`bench.learning` asks whether the recipe's weak signals (captions, self-distillation) teach each patch
token the class of the object it lies on. This bench gives the tower the class itself: the family's
preset's vision tower, from random init, with a linear head on its final patch tokens, trained with
cross-entropy on each patch's majority label (background included) of the same 1024 training scenes, at
the preset's batch, learning rate, warm-up and cosine schedule, horizontal flips as augmentation. Its
foreground patch accuracy (argmax over the object classes, the test scenes of `bench.learning`) at step k
of the schedule bounds what a zero-shot readout of a recipe trained for k steps can be expected to reach:
the recipe sees less information per step than the labels (approximately: it is not a theorem, the recipe
also has text and more crops per image).

Writes bench/results/ceiling_<family>.json and .md: one row per (seed, step), chance and the 2x bar of
issue 25 beside them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from bench.common import RESULTS, machine
from bench.learning import PRESET, Family, rendered
from tipsv2.configs import preset
from tipsv2.data import synthetic
from tipsv2.eval.features import to_tensor
from tipsv2.eval.patch_text import BACKGROUND, chance, patch_labels
from tipsv2.models.model import build_model
from tipsv2.optim import learning_rate

BAR = 2.0   # issue 25: the TIPSv2 arm at >= 2x chance on shape scenes


def split_tensors(scenes_cfg: synthetic.SyntheticConfig, split: synthetic.Split, patch_size: int
                  ) -> tuple[Tensor, Tensor]:
    """(N, 3, H, W) images in [0, 1] and (N, h * w) majority patch labels of a split's scenes."""
    scenes = rendered(scenes_cfg, split, scenes_cfg.split_size(split))
    images = torch.stack([to_tensor(s.image) for s in scenes])
    labels = torch.from_numpy(np.stack([patch_labels(s.mask, patch_size) for s in scenes])).long()
    return images, labels


def foreground_accuracy(logits: Tensor, labels: Tensor) -> float:
    """logits (N, C + 1) over background and the C classes, labels (N,): the accuracy on foreground patches of
    the best object class (background is never predicted), as bench.learning's primary metric scores."""
    foreground = labels != BACKGROUND
    predicted = logits[foreground][:, 1:].argmax(dim=1) + 1
    return float((predicted == labels[foreground]).double().mean())


def flip(images: Tensor, labels: Tensor, which: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Mirror the images (and their patch labels, a grid x grid raster) where `which` (B,) is true."""
    mirrored = labels.view(-1, grid, grid).flip(-1).reshape(labels.shape)
    return (torch.where(which[:, None, None, None], images.flip(-1), images),
            torch.where(which[:, None], mirrored, labels))


def supervised(family: Family, seed: int, steps: int, points: Sequence[int]) -> list[dict[str, Any]]:
    """Train the preset's vision tower and a linear head on patch labels; a row at each step in `points`."""
    cfg = preset(PRESET[family])
    scenes_cfg, vision_cfg = cfg.data.synthetic, cfg.task.model.vision
    torch.manual_seed(seed)
    vision = build_model(cfg.task.model).vision
    classes = len(synthetic.class_names(scenes_cfg)) + 1
    head = torch.nn.Linear(vision_cfg.width, classes)
    optimizer = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    train_x, train_y = split_tensors(scenes_cfg, synthetic.Split.TRAIN, vision_cfg.patch_size)
    test_x, test_y = split_tensors(scenes_cfg, synthetic.Split.TEST, vision_cfg.patch_size)
    grid, batch = scenes_cfg.image_size // vision_cfg.patch_size, cfg.data.batch_size
    rng = torch.Generator().manual_seed(seed)
    rows, start = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps=steps, cfg=cfg.optim)
        pick = torch.randint(len(train_x), (batch,), generator=rng)
        images, labels = flip(train_x[pick], train_y[pick], torch.rand(batch, generator=rng) < 0.5, grid)
        vision.train()
        loss = torch.nn.functional.cross_entropy(head(vision(images).patches).reshape(-1, classes), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step + 1 in points:
            vision.eval()
            with torch.no_grad():
                logits = torch.cat([head(vision(test_x[i:i + 64]).patches) for i in range(0, len(test_x), 64)])
            rows.append({"family": family.value, "seed": seed, "step": step + 1, "steps": steps,
                         "loss": float(loss.detach()), "accuracy": foreground_accuracy(logits.reshape(-1, classes),
                                                                                        test_y.reshape(-1)),
                         "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
    return rows


def foreground_chance(family: Family) -> float:
    """bench.learning's chance: the most frequent class's share of the test scenes' foreground patches."""
    cfg = preset(PRESET[family])
    scenes_cfg = cfg.data.synthetic
    _, labels = split_tensors(scenes_cfg, synthetic.Split.TEST, cfg.task.model.vision.patch_size)
    foreground = labels[labels != BACKGROUND].numpy() - 1
    return chance(foreground, len(synthetic.class_names(scenes_cfg)))["majority"]


def _job(args: tuple[Family, int, int, tuple[int, ...]]) -> list[dict[str, Any]]:
    return supervised(*args)


def markdown(payload: dict[str, Any]) -> str:
    bar = BAR * payload["chance"]
    lines = [f"Supervised ceiling, {payload['family']} scenes (preset `{PRESET[Family(payload['family'])]}`): the "
             f"preset's vision tower and a linear head trained on patch labels (bench/ceiling.py). Chance "
             f"{payload['chance']:.3f}; issue 25's bar (2x chance) {bar:.3f}. Wall time "
             f"{payload['wall_s'] / 60:.1f} min, {payload['processes']} process(es) of one thread.", "",
             "| seed | step k of n | foreground patch accuracy | / chance | clears 2x | train s |", "|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        lines.append(f"| {r['seed']} | {r['step']} of {r['steps']} | {r['accuracy']:.3f} | "
                     f"{r['accuracy'] / payload['chance']:.2f} | {'yes' if r['accuracy'] >= bar else 'no'} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=[f.value for f in Family], default=Family.SHAPE.value)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--points", type=int, nargs="+", help="steps to evaluate at (default: 150, 300, 1000, "
                                                             "2000 and the last, those within --steps)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    family = Family(args.family)
    points = tuple(sorted(set(args.points or [p for p in (150, 300, 1000, 2000) if p < args.steps] + [args.steps])))
    if any(p < 1 or p > args.steps for p in points):
        raise SystemExit(f"--points must lie in [1, --steps = {args.steps}], got {points}")
    wall, work = time.perf_counter(), [(family, seed, args.steps, points) for seed in args.seeds]
    processes = min(2, len(work))
    with multiprocessing.get_context("spawn").Pool(processes, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        rows = [row for rows in pool.map(_job, work) for row in rows]
    payload = {"family": family.value, "chance": foreground_chance(family), "bar_factor": BAR, "rows": rows,
               "wall_s": time.perf_counter() - wall, "processes": processes, "machine": machine()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ceiling_{family.value}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"ceiling_{family.value}.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
