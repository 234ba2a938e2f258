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
from typing import Sequence

import numpy as np
import torch

from bench.results.outline_tuning import append, train_and_read
from tipsv2.configs import preset
from tipsv2.data import synthetic
from tipsv2.eval.features import class_embeddings, model_image_encoder, model_text_encoder
from tipsv2.eval.patch_text import BACKGROUND, PatchTextConfig, chance, patch_cosines, patch_labels
from tipsv2.tokenizer import Tokenizer


def cosines_and_labels(encode_image, class_text: torch.Tensor, scenes: Sequence[synthetic.Scene], *, dense: bool
                       ) -> tuple[torch.Tensor, np.ndarray]:
    """(N, C) patch-text cosines of every patch of `scenes`, and (N,) their labels."""
    cfg = PatchTextConfig(dense=dense)
    cosines = [patch_cosines(encode_image, class_text, s.image, cfg) for s in scenes]
    labels = [patch_labels(np.asarray(s.mask), cfg.patch_size) for s in scenes]
    return torch.cat(cosines), np.concatenate(labels)


def readings(cosine: torch.Tensor, label: np.ndarray) -> dict[str, float]:
    """Accuracy over foreground patches, the most-predicted class's share, and the accuracy once each class's
    mean cosine over all patches is subtracted; chance as the bench defines it (`patch_text.chance`)."""
    fg = torch.from_numpy(label != BACKGROUND)
    truth = torch.from_numpy(label)[fg] - 1
    predicted = cosine[fg].argmax(dim=1)
    centred = (cosine - cosine.mean(dim=0, keepdim=True))[fg].argmax(dim=1)
    share = torch.bincount(predicted, minlength=cosine.shape[1]).max().item() / len(predicted)
    return {"acc": float((predicted == truth).double().mean()), "top_share": share,
            "centred_acc": float((centred == truth).double().mean()),
            "chance": max(chance(truth.numpy(), cosine.shape[1]).values())}


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
    test = [synthetic.make_scene(scenes_cfg, synthetic.Split.TEST, i) for i in range(2 * n)]   # the bench's, then n others
    bench_scenes, other_scenes = test[:n], test[n:]
    templates = PatchTextConfig().templates
    start = time.perf_counter()

    def read(model: torch.nn.Module, tokenizer: Tokenizer, step: int) -> None:
        encode_image = model_image_encoder(model)
        class_text = class_embeddings(model_text_encoder(model, tokenizer), synthetic.class_names(scenes_cfg), templates)

        def reading(scenes: Sequence[synthetic.Scene], *, dense: bool) -> dict[str, float]:
            return readings(*cosines_and_labels(encode_image, class_text, scenes, dense=dense))

        bench, other = reading(bench_scenes, dense=True), reading(other_scenes, dense=True)
        final = reading(bench_scenes, dense=False)
        append({"seed": args.seed, "step": step, "of": args.steps, "a": bench["acc"], "b": other["acc"],
                "c": bench["top_share"], "d": bench["centred_acc"], "e": final["acc"],
                "chance": bench["chance"], "chance_b": other["chance"], "wall_s": time.perf_counter() - start}, args.out)

    train_and_read(cfg, at={int(x) for x in args.at.split(",")}, read=read)


if __name__ == "__main__":
    main()
