"""Scratch tuning run for the outline family (issue 25, E8): the ibot_pp arm of `learning_outline` with overrides,
read by bench.learning.evaluate at given steps of one schedule. One thread."""
import argparse, json, time, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
from tipsv2 import config_tree
from tipsv2.configs import preset
from tipsv2.loop import build_pretrain_task, endless, fit, fit_tokenizer, synthetic_records, TowerDepths
from bench.learning import evaluate, PRIMARY

p = argparse.ArgumentParser()
p.add_argument("--name"); p.add_argument("--seed", type=int); p.add_argument("--steps", type=int, default=1000)
p.add_argument("--set", default="{}"); p.add_argument("--at", default="500,1000"); p.add_argument("--out")
a = p.parse_args()
over = json.loads(a.set)
cfg = config_tree.merge(preset("learning_outline"), over)
import dataclasses
cfg = dataclasses.replace(cfg, steps=a.steps, seed=a.seed)
records = synthetic_records(cfg.data.synthetic)
tmp = tempfile.mkdtemp()
tok = fit_tokenizer(records, cfg.data.tokenizer_vocab, Path(tmp) / "spm.model", max_len=cfg.task.model.text.max_len)
task = build_pretrain_task(cfg)
at = {int(x) for x in a.at.split(",")}
t0 = time.perf_counter()
def emit(step):
    m = evaluate(task.model, tok, cfg, probe=(step == a.steps))
    task.model.train()
    row = {"name": a.name, "set": over, "seed": a.seed, "step": step, "of": a.steps, "acc": m[PRIMARY],
           "chance": m["patch/chance"], "noise": m["patch/chance_noise"], "auroc": m["patch/auroc"],
           "r1": m.get("retrieval/i2t_r1"), "probe": m.get("linear_probe/miou"), "wall_s": time.perf_counter() - t0}
    print(json.dumps(row), flush=True)
    with open(a.out, "a") as f: f.write(json.dumps(row) + "\n")
def on_step(step, row):
    if step + 1 in at and step + 1 != a.steps: emit(step + 1)
stream = endless(records, data=cfg.data, seed=cfg.seed, patch_size=cfg.task.model.vision.patch_size, tokenizer=tok)
fit(task, stream=stream, optim=cfg.optim, steps=cfg.steps, depths=TowerDepths.of(cfg.task.model), on_step=on_step)
emit(a.steps)
