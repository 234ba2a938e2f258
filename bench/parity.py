"""Measured parity of our model with the released-format reference (tests/reference_tips.py).

    .venv/bin/python -m bench.parity

Random weights in the released .npz layout, width 128, 3 blocks; relative error = max|ours - ref| /
max|ref| for CLS1, CLS2 and patches (float32 model vs float64 reference). Writes bench/results/parity.json.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import print_table, write_json
from tests.reference_tips import random_text_arrays, random_vision_arrays, reference_text, reference_vision
from tipsv2.models import load_official


def rel(ours: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(ours.detach().double().numpy() - ref).max() / np.abs(ref).max())


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text_arrays = random_text_arrays(rng, width=128, depth=2, mlp_dim=256, vocab=100)
        np.savez(Path(tmp) / "t.npz", **text_arrays)
        for ffn in ("mlp", "swiglu"):
            arrays = random_vision_arrays(rng, width=128, depth=3, mlp_dim=512, grid=4, swiglu=ffn == "swiglu")
            np.savez(Path(tmp) / f"{ffn}.npz", **arrays)
            model = load_official(Path(tmp) / f"{ffn}.npz", Path(tmp) / "t.npz")
            cases = {"native 56px": (rng.random((2, 3, 56, 56), dtype=np.float32), None),
                     "larger 112px": (rng.random((2, 3, 112, 112), dtype=np.float32), None),
                     "non-square 70x98": (rng.random((1, 3, 70, 98), dtype=np.float32), None),
                     "masked 75%": (rng.random((2, 3, 56, 56), dtype=np.float32), rng.random((2, 16)) < 0.75)}
            for case, (images, masks) in cases.items():
                with torch.no_grad():
                    ours = model.encode_image(torch.from_numpy(images), None if masks is None else torch.from_numpy(masks))
                ref = reference_vision(arrays, images, heads=2, masks=masks)
                rows.append({"ffn": ffn, "case": case, **{k: rel(getattr(ours, k), ref[k]) for k in ("cls1", "cls2", "patches")}})
        ids = rng.integers(2, 100, size=(4, 12))
        pads = np.zeros((4, 12), np.float32)
        for row, n in enumerate([12, 7, 3, 1]):
            ids[row, n:], pads[row, n:] = 0, 1
        with torch.no_grad():
            text = model.encode_text(torch.from_numpy(ids), torch.from_numpy(pads))
        rows.append({"ffn": "text", "case": "padded 12/7/3/1 tokens", "text": rel(text, reference_text(text_arrays, ids, pads, heads=2))})
    print_table(rows, ["ffn", "case", "cls1", "cls2", "patches", "text"])
    print(f"wrote {write_json('parity', {'rows': rows})}")


if __name__ == "__main__":
    main()
