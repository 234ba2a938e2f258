"""The shared training engine of pretraining and distillation: Ray Train TorchTrainer x DeepSpeed ZeRO.

`pipelines.pretrain` and `pipelines.distill` are thin entry points over `run(job, cfg, output)`:

    driver   config.json, data (synthetic Parquet if none), tokenizer, MLflow run, TorchTrainer.fit
    worker   TIPSv2Task / DistillTask -> deepspeed.initialize (ZeRO 0-3, fp32/bf16/fp16, accumulation,
             clipping, torch AdamW on tipsv2.optim.param_groups with the LR schedule set every step)
             -> steps over stream.RankStream -> DeepSpeed checkpoints from every rank into Ray Train's
             storage (<output>/ray/train/step_XXXXXXXX) -> export on rank 0 (<output>/export/)

One file per concern; imports run driver -> worker -> the rest -> tipsv2:

    driver.py      run: resume or skip, config, data, tokenizer, MLflow run, TorchTrainer.fit, summary
    local.py       --local: tipsv2.loop's loops in this process, exported as rank 0 does
    worker.py      Worker (one Ray Train rank: engine, steps, checkpoints, export) and train_worker
    accumulate.py  one optimiser step over its micro-batches, the contrastive loss over all of them (GradCache)
    zero.py        every DeepSpeed fact: its config, `Zero` (what the stage means), masters, 0.19 patches
    checkpoint.py  checkpoint layout, trainer and RNG state, EMA teacher tensors, history
    jobs.py        Job and its TrainJob (PretrainJob, DistillJob: build_task, train_local, export_parts,
                   teacher_vision), Plan, the Faults hook, load_teacher, the EMA teacher's tensors
    config.py      the job roots (recipe + engine + tracking), EngineConfig, the presets' engines
    export.py      <output>/export and heatmaps
    perf.py        Progress, live_tensor_mb, peak_rss_mb

Checkpoints hold the DeepSpeed state of every rank plus `trainer_state.json` (step, epoch, MLflow run id,
loss history), `teacher.safetensors` (EMA teacher weights and center buffers, gathered, so ZeRO-3
restores them exactly) and `rng_rank<r>.json` (torch, numpy and Python RNG states). A worker restarted by
`FailureConfig(max_failures)` resumes from `ray.train.get_checkpoint()`; rerunning the same command after
the driver died resumes from the latest checkpoint found under the output. A run that reached its last
step is skipped.

A non-finite loss term on any rank stops every rank before the step is applied: the run ends with
`NonFiniteLoss` naming the step and the terms, and the last checkpoint is the last good state.

Metrics (rank 0 only, one MLflow run per job through pipelines.tracking): every loss term averaged over
ranks, lr, temperature, EMA momentum, images/s and an MFU estimate (analytic FLOPs / peak FLOP/s: a
table for known GPUs, a timed matmul on CPU, or TIPSV2_PEAK_FLOPS). Artifacts: config, the exported
model, patch-text similarity heatmaps of a few validation images.

Test-only fault injection is one hook object, `run(..., faults=InjectedFaults(...))`, or from the driver's
environment: TIPSV2_FAIL_AT_STEP=k makes the last rank exit hard once at step k; TIPSV2_NAN_AT_STEP=k makes
the loss of step k NaN. The worker calls the hook at the start of every step and on its losses.
"""

from pipelines.train.checkpoint import (DS_TAG, HISTORY_FILE, RUN_NAME, STOP_FILE, TEACHER_STATE, TRAINER_STATE,
                                        TrainerState, latest_checkpoint, load_teacher_tensors, read_history,
                                        read_trainer_state, teacher_tensors)
from pipelines.train.driver import prepare_tokenizer, rank_request, run
from pipelines.train.export import EXPORT_DIR, HF_DIR
from pipelines.train.config import (DISTILL_PRESETS, PRESETS, DistillJobConfig, EngineConfig, JobConfig,
                                    PretrainJobConfig, distill_preset, preset)
from pipelines.train.jobs import (Faults, InjectedFaults, Job, NoFaults, Plan, TrainJob, ema_masters, ema_parameters,
                                  load_teacher, local_copy)
from pipelines.train.perf import Progress, live_tensor_mb
from pipelines.train.worker import Worker

__all__ = ["DISTILL_PRESETS", "DS_TAG", "EXPORT_DIR", "HF_DIR", "HISTORY_FILE", "PRESETS", "RUN_NAME", "STOP_FILE",
           "TEACHER_STATE", "TRAINER_STATE", "DistillJobConfig", "EngineConfig", "Faults", "InjectedFaults", "Job",
           "JobConfig", "NoFaults", "Plan", "PretrainJobConfig", "Progress", "TrainJob", "TrainerState", "Worker",
           "distill_preset", "ema_masters", "ema_parameters", "preset", "latest_checkpoint", "live_tensor_mb", "load_teacher", "load_teacher_tensors", "local_copy",
           "prepare_tokenizer", "rank_request", "read_history", "read_trainer_state", "run", "teacher_tensors"]
