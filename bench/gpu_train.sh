#!/usr/bin/env bash
# MFU of TIPSv2 pretraining for B/14 and L/14 in bf16 on one GPU, through the real engine
# (Ray Train + DeepSpeed ZeRO-2, Ray Data feeding synthetic scenes). Under 8 minutes end to end.
#
#     bash bench/gpu_train.sh                 # writes bench/results/gpu_train.json and prints a table
#     STEPS=40 BATCH_B=64 BATCH_L=32 bash bench/gpu_train.sh
#     DEVICE=cpu MODELS="tiny:8" STEPS=4 SCENES=64 WARMUP=1 RESULT=/tmp/x.json bash bench/gpu_train.sh   # smoke test
#
# MFU = analytic training FLOPs per image (tipsv2/flops.py: flops_per_example) x images/s / peak bf16
# FLOP/s of the device (tipsv2/flops.py: GPU_PEAK_FLOPS by device name, or TIPSV2_PEAK_FLOPS).
# Reported: the median over steps after the first WARMUP (start-up, compilation, the first Ray Data
# execution), so data-loader stalls at epoch boundaries show up only as a lower mean, printed beside it.
# DEVICE=cpu runs the same commands on CPU, in bf16 too (DeepSpeed's CPU accelerator takes it), for
# tests/test_bench_scripts.py: the script itself, its config keys, the bf16 engine path and the report, on
# a machine without a GPU. PRECISION=fp32 (or fp16, GPU only) changes the precision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-gpu}
PRECISION=${PRECISION:-bf16}
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-8}
BATCH_B=${BATCH_B:-64}
BATCH_L=${BATCH_L:-32}
MODELS=${MODELS:-"vit_b14:$BATCH_B vit_l14:$BATCH_L"}   # PRESET:BATCH ...
SCENES=${SCENES:-448}               # synthetic training scenes (the CPU smoke test needs fewer)
PER_MODEL_S=${PER_MODEL_S:-210}     # hard cap per model, so both fit in 8 minutes
OUT=${OUT:-$(mktemp -d /tmp/tipsv2-gpu-bench.XXXXXX)}
RESULT=${RESULT:-bench/results/gpu_train.json}
export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false

if [ "$DEVICE" = gpu ]; then
  ENGINE=(--set engine.use_gpu=true --set engine.precision="$PRECISION")
  "$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/gpu_train.sh needs a CUDA GPU (DEVICE=cpu for a smoke test)"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
elif [ "$DEVICE" = cpu ]; then
  ENGINE=(--set engine.use_gpu=false --set engine.precision="$PRECISION")
else
  echo "DEVICE must be gpu or cpu, got '$DEVICE'" >&2; exit 2
fi

run_model() {  # preset batch
  local name=$1 batch=$2
  # 448 synthetic scenes at 224 px by default: 7 steps per epoch at batch 64, so epochs turn over during the run.
  timeout "$PER_MODEL_S" "$PY" -m pipelines.pretrain --config "$name" --output "$OUT/$name" \
    --set steps="$STEPS" --set log_every=5 --set engine.workers=1 "${ENGINE[@]}" \
    --set engine.zero_stage=2 --set engine.checkpoint_every=100000 \
    --set data.batch_size="$batch" --set data.synthetic.image_size=224 --set data.synthetic.train_size="$SCENES" \
    --set data.synthetic.val_size=4 --set data.synthetic.test_size=4 --set data.tokenizer_vocab=512 \
    --set optim.warmup_steps=5 > "$OUT/$name.log" 2>&1 || { echo "$name failed or timed out; tail of its log:"; tail -30 "$OUT/$name.log"; }
}

NAMES=()
for spec in $MODELS; do
  run_model "${spec%%:*}" "${spec##*:}"
  NAMES+=("${spec%%:*}")
done

OUT="$OUT" WARMUP="$WARMUP" RESULT="$RESULT" NAMES="${NAMES[*]}" DEVICE="$DEVICE" PRECISION="$PRECISION" "$PY" - <<'PY'
import json, os, statistics
from pathlib import Path
from bench.common import machine, print_table
out, warmup = os.environ["OUT"], int(os.environ["WARMUP"])
rows = []
for name in os.environ["NAMES"].split():
    path = f"{out}/{name}/history.jsonl"
    if not os.path.exists(path):
        rows.append({"model": name, "status": "no history (see log)"}); continue
    history = [json.loads(line) for line in open(path)][warmup:]
    if not history:
        rows.append({"model": name, "status": "too few steps"}); continue
    rows.append({"model": name, "status": "ok", "steps": len(history),
                 "mfu_median": statistics.median(r["mfu"] for r in history),
                 "mfu_mean": statistics.mean(r["mfu"] for r in history),
                 "images_per_s_median": statistics.median(r["images_per_s"] for r in history),
                 "gpu_peak_gb": max(r.get("memory/gpu_peak_mb", 0) for r in history) / 1024,
                 "loss_first": history[0]["loss/total"], "loss_last": history[-1]["loss/total"]})
print_table(rows, ["model", "status", "steps", "mfu_median", "mfu_mean", "images_per_s_median", "gpu_peak_gb"])
result = Path(os.environ["RESULT"])
result.parent.mkdir(parents=True, exist_ok=True)
import torch
device = torch.cuda.get_device_name(0) if os.environ["DEVICE"] == "gpu" else "cpu"
result.write_text(json.dumps({"machine": machine(), "device": device, "precision": os.environ["PRECISION"],
                              "rows": rows, "output": out}, indent=2) + "\n")
print("wrote", result)
PY
