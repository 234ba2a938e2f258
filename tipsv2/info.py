"""Parameter counts of the pretraining task: what is trained and what is stored, per teacher mode.

    python -m tipsv2.info --model vit_b14

"trained" = parameters the optimiser updates (student towers, heads, temperature); "stored" = every
parameter held during training (trained + the teacher's EMA copies). Head-only EMA (TIPSv2) keeps EMA
copies of the heads only; full EMA (TIPS/DINO) also keeps a copy of the image encoder (the teacher
never sees text, so the text tower has no EMA copy).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from tipsv2.configs import preset
from tipsv2.task import TeacherMode, TIPSv2Task


def count(task: TIPSv2Task) -> dict[str, int]:
    unique = {id(p): p for p in task.parameters()}.values()
    trained = sum(p.numel() for p in unique if p.requires_grad)
    stored = sum(p.numel() for p in unique)
    vision = sum(p.numel() for p in task.model.vision.parameters())
    text = sum(p.numel() for p in task.model.text.parameters())
    return {"trained": trained, "stored": stored, "teacher_only": stored - trained, "student_vision": vision,
            "student_text": text}


def report(name: str) -> dict:
    cfg = preset(name).task
    out: dict = {"model": name}
    for mode in TeacherMode:
        with torch.device("meta"):
            task = TIPSv2Task(replace(cfg, teacher=replace(cfg.teacher, mode=mode)))
        out[mode.value] = count(task)
    head, full = out[TeacherMode.HEAD_ONLY_EMA.value], out[TeacherMode.FULL_EMA.value]
    out["stored_reduction_head_only_vs_full"] = 1 - head["stored"] / full["stored"]
    # The paper's figure, if its full-EMA teacher also kept a copy of the text tower:
    out["stored_reduction_if_full_ema_copied_text"] = 1 - head["stored"] / (full["stored"] + head["student_text"])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_b14", help="a preset name (tiny, vit_s14, vit_b14, ...)")
    args = parser.parse_args(argv)
    print(json.dumps(report(args.model), indent=2))


if __name__ == "__main__":
    main()
