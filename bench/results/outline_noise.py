"""The scratch run behind E9 (learning_shape_exploration.md; issue 25 item 2): where the outline family's seed
noise comes from. The ibot_pp arm of `learning_outline`, unchanged, one schedule of `--steps`, read at the steps
of `--at` five ways (E9's a-e): the bench readout on the bench's test scenes and on as many other test scenes,
the share of the most-predicted class, the readout with each class's mean cosine subtracted (label-free; a
diagnostic), and final tokens instead of value tokens. One thread; one JSON row per reading, printed and appended
to `--out`.

    PYTHONPATH=. python bench/results/outline_noise.py --seed 1002 --out bench/results/outline_noise.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from bench.results.outline_tuning import append, train_and_read
from tipsv2.configs import preset
from tipsv2.data import synthetic
from tipsv2.eval.features import class_embeddings, model_image_encoder, model_text_encoder
from tipsv2.eval.patch_text import BACKGROUND, PatchTextConfig, patch_cosines, patch_labels
from tipsv2.tokenizer import Tokenizer


def cosines_and_labels(model, tokenizer, scenes_cfg, indices: range, *, dense: bool) -> tuple[torch.Tensor, np.ndarray]:
    """(N, C) patch-text cosines of every patch of the test scenes at `indices`, and (N,) their labels."""
    cfg = PatchTextConfig(dense=dense)
    names = synthetic.class_names(scenes_cfg)
    class_text = class_embeddings(model_text_encoder(model, tokenizer), names, cfg.templates)
    encode_image = model_image_encoder(model)
    cosines, labels = [], []
    for i in indices:
        scene = synthetic.make_scene(scenes_cfg, synthetic.Split.TEST, i)
        cosines.append(patch_cosines(encode_image, class_text, scene.image, cfg))
        labels.append(patch_labels(np.asarray(scene.mask), cfg.patch_size))
    return torch.cat(cosines), np.concatenate(labels)


def readings(cosine: torch.Tensor, label: np.ndarray) -> dict[str, float]:
    """Accuracy over foreground patches, the most-predicted class's share, and the accuracy once each class's
    mean cosine over all patches is subtracted."""
    fg = torch.from_numpy(label != BACKGROUND)
    truth = torch.from_numpy(label)[fg] - 1
    predicted = cosine[fg].argmax(dim=1)
    centred = (cosine - cosine.mean(dim=0, keepdim=True))[fg].argmax(dim=1)
    share = torch.bincount(predicted, minlength=cosine.shape[1]).max().item() / len(predicted)
    counts = torch.bincount(truth, minlength=cosine.shape[1])
    return {"acc": float((predicted == truth).double().mean()), "top_share": share,
            "centred_acc": float((centred == truth).double().mean()), "chance": counts.max().item() / len(truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--at", default="800,900,1000", help="the steps to read, comma-separated")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = dataclasses.replace(preset("learning_outline"), steps=args.steps, seed=args.seed)
    scenes_cfg = cfg.data.synthetic
    n = scenes_cfg.test_size
    start = time.perf_counter()

    def read(model: torch.nn.Module, tokenizer: Tokenizer, step: int) -> None:
        def reading(indices: range, *, dense: bool) -> dict[str, float]:
            return readings(*cosines_and_labels(model, tokenizer, scenes_cfg, indices, dense=dense))

        bench, other = reading(range(n), dense=True), reading(range(n, 2 * n), dense=True)
        final = reading(range(n), dense=False)
        append({"seed": args.seed, "step": step, "of": args.steps, "a": bench["acc"], "b": other["acc"],
                "c": bench["top_share"], "d": bench["centred_acc"], "e": final["acc"],
                "chance": bench["chance"], "chance_b": other["chance"], "wall_s": time.perf_counter() - start}, args.out)

    train_and_read(cfg, at={int(x) for x in args.at.split(",")}, read=read)


if __name__ == "__main__":
    main()
