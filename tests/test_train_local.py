"""The single-process path (`--local`), the data order of pipelines/stream.py, and the FLOPs estimate."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import data
from pipelines import stream as rank_stream
from pipelines.distill import split_teacher
from pipelines.pretrain import split_local
from pipelines.train import read_history
from tipsv2.checkpoint import load_export
from tipsv2.flops import vision_flops
from tipsv2.loop import batches, epoch_order, train_local
from tipsv2.models.hf import load_hf
from tipsv2.models.official import load_official
from tipsv2.tokenizer import Tokenizer


@pytest.mark.parametrize("world,batch_size", [(1, 8), (2, 4), (3, 2)])
def test_rank_positions_cut_the_loop_order_into_rank_slices(world, batch_size):
    n, seed, epoch = 50, 3, 2
    order = epoch_order(n, seed=seed, epoch=epoch)
    size = world * batch_size
    for rank in range(world):
        positions = rank_stream.rank_positions(n, seed=seed, epoch=epoch, rank=rank, world=world, batch_size=batch_size,
                                        start_batch=1)
        expected = [p for k in range(1, n // size) for p in range(k * size + rank * batch_size,
                                                                     k * size + (rank + 1) * batch_size)]
        assert sorted(positions.values()) == expected
        assert all(order[p] == row for row, p in positions.items())


def test_sort_boundaries_split_evenly_and_never_leave_ray_to_sample():
    assert rank_stream.sort_boundaries(list(range(10)), rows_per_partition=4) == [3, 6]
    assert rank_stream.sort_boundaries(list(range(3)), rows_per_partition=4) == [1]
    assert rank_stream.sort_boundaries([], rows_per_partition=4) == [0]


def test_micro_batches_per_epoch_needs_one_global_batch():
    assert rank_stream.micro_batches_per_epoch(33, batch_size=4, world=2) == 4
    with pytest.raises(ValueError, match="at least batch_size x workers = 8 rows, got 7"):
        rank_stream.micro_batches_per_epoch(7, batch_size=4, world=2)


def test_cli_flags():
    assert split_local(["--config", "tiny", "--local"]) == (["--config", "tiny"], True)
    assert split_teacher(["--teacher", "a/b", "--teacher=c.npz"]) == ["--set", "teacher=a/b", "--set", "teacher=c.npz"]


def test_print_config_prints_every_resolved_key_and_needs_no_output(capsys):
    from pipelines import pretrain

    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--config", "vit_b14", "--set", "engine.workers=16", "--print-config"])
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["engine"]["workers"] == 16 and printed["engine"]["use_gpu"] is True
    assert printed["task"]["model"]["vision"]["width"] == 768 and printed["engine"]["bucket_size"] == 50_000_000
    from pipelines import cli
    _, output = cli.parse_stage_args(["--config", "tiny", "--output", "outputs/x"], {"tiny": lambda: None})
    assert output == str(Path.cwd() / "outputs" / "x")   # relative outputs mean the same in every process
    with pytest.raises(SystemExit) as exit_info:     # without --print-config, --output is required
        pretrain.main(["--config", "tiny"])
    assert exit_info.value.code == 2
    assert "--output" in capsys.readouterr().err


def test_vision_flops_estimate_matches_torch_flop_counter():
    """Linear layers and the patch convolution as counted by torch; attention added by hand (torch's
    counter does not see the CPU attention kernel): QK^T and AV, 2 x 2 x t^2 x d per block."""
    from torch.utils.flop_counter import FlopCounterMode

    from tipsv2.models import build_model
    model = build_model("tiny")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.encode_image(torch.rand(1, 3, 112, 112))
    cfg, tokens = model.cfg.vision, 64 + 2
    attention = cfg.depth * 4 * tokens ** 2 * cfg.width
    assert vision_flops(cfg, 112) == counter.get_total_flops() + attention


@pytest.mark.slow
def test_local_pretrain_is_tipsv2_loop_train_local_and_exports_every_format(train_local_reference, train_cfg):
    output, history = train_local_reference
    cfg = train_cfg("data.batch_size=8", "engine.workers=1")
    source = data.prepare_source(cfg.data, output)
    records = data.read_records(source)
    assert [r.id for r in records] == sorted(r.id for r in records) and len(records) == 32
    tokenizer = Tokenizer(f"{output}/tokenizer/spm.model", max_len=cfg.task.model.text.max_len)
    expected = train_local(cfg, records=records, tokenizer=tokenizer).history
    assert [r["loss/total"] for r in history] == [r["loss/total"] for r in expected]
    model, dino, patch = load_export(f"{output}/export")
    official = load_official(f"{output}/export/official_vision.npz", f"{output}/export/official_text.npz",
                             vision_heads=3, text_heads=3, max_len=32)   # the tiny model: 3 heads of 32
    images = torch.rand(2, 3, 112, 112)
    torch.testing.assert_close(official.encode_image(images).patches, model.encode_image(images).patches)
    hf = load_hf(f"{output}/export/hf")   # and as a transformers Tipsv2Model directory (tests/test_hf.py)
    assert all(torch.equal(hf.state_dict()[k], v) for k, v in model.state_dict().items())
    assert dino is not None and patch is not None
    summary = json.loads(open(f"{output}/summary.json").read())
    assert summary["complete"] and summary["steps"] == 4 and summary["mlflow_run_id"]
    assert (open(f"{output}/heatmaps/heatmap_0.png", "rb").read(8)) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_local_distill_from_the_exports_hf_directory(train_local_reference, tmp_path):
    """`--teacher hf:DIR` and `student_init=hf:DIR`: the export's transformers directory as teacher and init."""
    from pipelines import distill
    hf = f"hf:{train_local_reference[0]}/export/hf"
    output = str(tmp_path / "distill_hf")
    with pytest.warns(UserWarning, match="student initialised from pretrained weights"):
        result = distill.main(["--config", "tiny", "--teacher", hf, "--local", "--output", output,
                               "--set", f"student_init={hf}", "--set", "task.teacher_heads=random",
                               "--set", "steps=2", "--set", "data.synthetic.train_size=16",
                               "--set", "data.synthetic.val_size=2", "--set", "data.synthetic.test_size=2"])
    assert result["complete"] and all(np.isfinite(r["loss/patch"]) for r in read_history(output))
    student, hf_student = load_export(f"{output}/export")[0], load_hf(f"{output}/export/hf")
    assert (hf_student.cfg.vision, hf_student.cfg.text) == (student.cfg.vision, student.cfg.text)
    assert all(torch.equal(hf_student.state_dict()[k], v) for k, v in student.state_dict().items())


@pytest.mark.slow
def test_local_distill_runs_and_a_rerun_skips(train_local_reference, tmp_path):
    from pipelines import distill
    output = str(tmp_path / "student")   # not ROOT/distill: a run root would want ROOT/ingest (pipelines.layout)
    args = ["--config", "tiny", "--teacher", f"{train_local_reference[0]}/export", "--local", "--output", output,
            "--set", "steps=2", "--set", "data.synthetic.train_size=16", "--set", "data.synthetic.val_size=2",
            "--set", "data.synthetic.test_size=2"]
    first = distill.main(args)
    assert first["complete"] and len(read_history(output)) == 2
    # The pipeline's --local is tipsv2.distill_loop.distill_local on the same rows.
    from pipelines.train.config import distill_preset
    from tipsv2.distill_loop import distill_local
    from pipelines.cli import resolve_config
    cfg = resolve_config("tiny", {"tiny": lambda: distill_preset("tiny")}, [a for a in args[args.index("--set"):] if a != "--set"] +
                         [f"teacher={train_local_reference[0]}/export"])
    teacher, dino, patch = load_export(f"{train_local_reference[0]}/export")
    records = data.read_records(data.prepare_source(cfg.data, output))
    tokenizer = Tokenizer(f"{output}/tokenizer/spm.model", max_len=cfg.task.student.text.max_len)
    expected = distill_local(cfg, teacher=teacher, teacher_heads=(dino, patch), records=records, tokenizer=tokenizer)
    assert [r["loss/total"] for r in read_history(output)] == [r["loss/total"] for r in expected.history]
    assert all(np.isfinite(r["loss/patch"]) for r in read_history(output))
    assert distill.main(args)["wall_s"] == first["wall_s"]


def test_distill_without_a_teacher_fails_clearly(tmp_path, capsys):
    from pipelines import distill
    from pipelines.train import Job
    from pipelines.train.config import distill_preset
    with pytest.raises(SystemExit) as exited:   # a usage error (exit 2) from the command line, before training
        distill.main(["--config", "tiny", "--local", "--output", str(tmp_path), "--set", "steps=1",
                      "--set", "data.synthetic.train_size=16", "--set", "data.synthetic.val_size=2",
                      "--set", "data.synthetic.test_size=2"])
    assert exited.value.code == 2 and "distill needs `teacher`" in capsys.readouterr().err
    with pytest.raises(ValueError, match="distillation needs a teacher"):   # run() itself still refuses
        distill.run(Job.DISTILL, distill_preset("tiny"), str(tmp_path / "run"), local=True)


def split_parquet(uri: str, root: Path, *, files: int, row_group_rows: int) -> str:
    """The rows of the Parquet at `uri` again, shuffled, in `files` files of row groups of `row_group_rows`."""
    import pyarrow.parquet as pq

    table = pq.read_table(uri)
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    root.mkdir(parents=True)
    step = -(-table.num_rows // files)
    for k in range(files):
        pq.write_table(table.slice(k * step, step), root / f"part-{k}.parquet", row_group_size=row_group_rows)
    return str(root)


def test_parquet_pieces_are_every_row_group_once_and_read_back_every_wanted_row(train_local_reference, train_cfg,
                                                                               tmp_path):
    import pyarrow.parquet as pq

    output, _ = train_local_reference
    source = data.prepare_source(train_cfg().data, output)
    whole = pq.read_table(source.images, columns=["id", "image"])
    split = split_parquet(source.images, tmp_path / "split", files=3, row_group_rows=5)
    pieces = rank_stream.parquet_pieces(split)
    per_file = -(-whole.num_rows // 3)
    sizes = [per_file] * 2 + [whole.num_rows - 2 * per_file]
    assert len(pieces) == sum(-(-n // 5) for n in sizes)
    assert len({(p["path"], p["row_group"]) for p in pieces}) == len(pieces)
    assert rank_stream.parquet_pieces(str(tmp_path / "split" / "part-0.parquet")) == [p for p in pieces
                                                                              if p["path"].endswith("part-0.parquet")]
    ids = whole.column("id").to_pylist()
    wanted = {ids[i]: 100 + i for i in range(0, len(ids), 3)}
    import pyarrow as pa
    fs, _ = data.storage.filesystem(split)
    got = rank_stream._read_pieces(pa.Table.from_pylist(pieces), filesystem=fs, wanted=wanted)
    assert sorted(zip(got.column("id").to_pylist(), got.column("position").to_pylist())) == sorted(wanted.items())
    images = dict(zip(ids, whole.column("image").to_pylist()))
    assert all(images[i] == b for i, b in zip(got.column("id").to_pylist(), got.column("image").to_pylist()))
    with pytest.raises(ValueError, match="no Parquet at"):
        rank_stream.parquet_pieces(str(tmp_path / "nothing"))


def counting(closed: threading.Event, fail_after: int | None = None):
    """An endless producer of 0, 1, 2, ... (raising after `fail_after` items) that sets `closed` when it ends."""
    def produce():
        try:
            for i in itertools.count():
                if i == fail_after:
                    raise OSError("boom")
                yield i
        finally:
            closed.set()
    return produce


def test_an_epoch_feed_left_early_ends_its_thread_and_its_pipeline_at_once():
    """The worker stops reading at its last step with the queue full: close() must end the producer (and so
    the Ray Data execution) without waiting, not block on a queue nobody reads until its join gives up
    (before this test: 30 s at the end of every training run)."""
    closed = threading.Event()
    feed = rank_stream._EpochFeed(counting(closed))
    items = iter(feed)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    deadline = time.monotonic() + 10
    while not feed.queue.full() and time.monotonic() < deadline:   # the producer runs ahead until the queue fills
        time.sleep(0.01)
    assert feed.queue.full()
    feed.close(timeout_s=5)
    assert not feed.thread.is_alive() and closed.is_set()


def test_an_epoch_feed_read_to_the_end_gives_every_item_then_the_producers_error():
    closed = threading.Event()
    feed = rank_stream._EpochFeed(counting(closed, fail_after=2 * rank_stream.PREFETCH_BATCHES + 1))
    got = []
    with pytest.raises(RuntimeError, match="data pipeline failed: boom"):
        for item in feed:
            got.append(item)
    assert got == list(range(2 * rank_stream.PREFETCH_BATCHES + 1)) and closed.is_set()
    feed.close(timeout_s=5)
    assert not feed.thread.is_alive()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["one_file", "three_files_of_row_groups_of_5"])
def test_ray_data_rank_streams_concatenate_to_the_loop_batches(ray_local, train_local_reference, train_cfg, layout,
                                                               tmp_path):
    """Two ranks of 4 rows through Ray Data (read, select, sort, decode) == the loop's batches of 8, whatever
    the files and row groups of the image Parquet."""
    import dataclasses

    import ray

    output, _ = train_local_reference
    cfg = train_cfg()
    source = data.prepare_source(cfg.data, output)
    if layout != "one_file":
        source = dataclasses.replace(source, images=split_parquet(source.images, tmp_path / "split", files=3,
                                                                  row_group_rows=5))
    texts = data.read_texts(source)
    tokenizer = Tokenizer(f"{output}/tokenizer/spm.model", max_len=32)
    spec = rank_stream.StreamSpec(batch_size=4, seed=cfg.seed, crops=cfg.data.crops, captions=cfg.data.captions,
                           masking=cfg.data.masking, patch_size=14)
    ref, ids = ray.put(texts), texts.column("id").to_pylist()
    ranks = []
    for rank in range(2):   # from the second global batch, as a resumed run would
        stream = rank_stream.RankStream(source, ids=ids, texts_ref=ref, spec=spec, tokenizer=tokenizer, rank=rank, world=2,
                                 start_micro=1)
        ranks.append([next(stream) for _ in range(2)])
        stream.close()
    records = data.read_records(source, texts)
    expected = list(batches(records, data=dataclasses.replace(cfg.data, batch_size=8), seed=cfg.seed, patch_size=14,
                            tokenizer=tokenizer, epoch=0))[1:3]
    for k, want in enumerate(expected):
        (e0, b0), (e1, b1) = ranks[0][k], ranks[1][k]
        assert e0 == e1 == 0 and b0.ids + b1.ids == want.ids
        torch.testing.assert_close(torch.cat([b0.global_crop, b1.global_crop]), want.global_crop)
        torch.testing.assert_close(torch.cat([b0.local_crops, b1.local_crops]), want.local_crops)
        assert torch.equal(torch.cat([b0.masks, b1.masks]), want.masks)
        assert torch.equal(torch.cat([b0.syn_ids, b1.syn_ids]), want.syn_ids)


def test_read_texts_left_joins_captions_by_id_and_rejects_repeated_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tipsv2.data.schema import IMAGES
    rows = [{"id": i, "image": b"x", "format": "PNG", "width": 1, "height": 1, "alt_text": f"alt {i}",
             "source": "s", "sha256": i} for i in ("b", "a", "c")]
    (tmp_path / "images").mkdir()
    (tmp_path / "captions").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES), tmp_path / "images" / "part.parquet")
    pq.write_table(pa.table({"id": ["c", "a"], "caption_long": ["long c", "long a"], "provenance": ["{}", "{}"]}),
                   tmp_path / "captions" / "part.parquet")
    texts = data.read_texts(data.Source(images=str(tmp_path / "images"), captions=str(tmp_path / "captions")))
    assert texts.to_pylist() == [
        {"id": "a", "alt_text": "alt a", "caption_short": None, "caption_medium": None, "caption_long": "long a"},
        {"id": "b", "alt_text": "alt b", "caption_short": None, "caption_medium": None, "caption_long": None},
        {"id": "c", "alt_text": "alt c", "caption_short": None, "caption_medium": None, "caption_long": "long c"}]
    pq.write_table(pa.table({"id": ["a"], "caption_long": ["again"]}), tmp_path / "captions" / "more.parquet")
    with pytest.raises(ValueError, match="repeats ids"):
        data.read_texts(data.Source(images=str(tmp_path / "images"), captions=str(tmp_path / "captions")))


def test_live_tensor_mb_counts_each_storage_once_and_gradients_made_in_cpp():
    from pipelines.train import live_tensor_mb

    before = live_tensor_mb()
    block = torch.zeros(1024, 1024)                      # 4 MiB
    views = [block[:10], block.view(-1)]                 # views share the storage: counted once
    assert live_tensor_mb() - before == pytest.approx(4.0, abs=0.05)
    layer = torch.nn.Linear(1024, 1024, bias=False)      # 4 MiB of weight
    layer(torch.ones(1, 1024)).sum().backward()          # autograd's 4 MiB .grad has no Python object yet
    without = live_tensor_mb()
    with_grads = live_tensor_mb(layer.parameters())
    assert with_grads - before == pytest.approx(12.0, abs=0.1)
    assert without <= with_grads
    del views


def test_progress_prints_a_bar_every_interval_and_at_the_end():
    from pipelines.train import Progress

    now, lines = [0.0], []
    bar = Progress("pretrain", total=8, done=2, every_s=10.0, clock=lambda: now[0], emit=lines.append)
    for t in (4.0, 8.0, 12.0, 16.0, 20.0, 24.0):   # 6 steps, one every 4 s (2 done before a resume)
        now[0] = t
        bar.update(loss=1.5)
    assert lines == [
        "[pretrain] |###############.........| 5/8 steps, 0.25 step/s, 12 s elapsed, eta 12 s, loss 1.5",
        "[pretrain] |########################| 8/8 steps, 0.25 step/s, 24 s elapsed, eta 0 s, loss 1.5",
    ]


def test_bf16_checkpoints_hold_the_ema_masters_and_a_restore_puts_them_back(train_cfg):
    """16-bit training keeps the EMA on float32 masters: the checkpoint's teacher state is theirs (not the
    rounded bf16 teacher), and loading it restores masters and teacher alike."""
    from pipelines.train import Job, ema_masters, ema_parameters, load_teacher_tensors, teacher_tensors

    def bf16_task():
        task = Job.PRETRAIN.train.build_task(train_cfg())
        for p in task.parameters():          # as DeepSpeed casts a bf16 module: parameters only
            p.data = p.data.to(torch.bfloat16)
        task.keep_ema_masters()
        return task

    task = bf16_task()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for master in ema_masters(task):
            master.copy_(torch.randn(master.shape, generator=gen))   # values bf16 cannot hold
    state = teacher_tensors(task, stage=0)
    names = {id(p): n for n, p in task.named_parameters(remove_duplicate=False)}
    teacher = ema_parameters(task)
    assert len(teacher) == len(ema_masters(task)) > 0
    for param, master in zip(teacher, ema_masters(task)):
        assert torch.equal(state[names[id(param)]], master)
    restored = bf16_task()
    load_teacher_tensors(restored, state, stage=0)
    for param, master, saved in zip(ema_parameters(restored), ema_masters(restored), ema_masters(task)):
        assert torch.equal(master, saved)
        assert param.dtype == torch.bfloat16 and torch.equal(param, saved.to(torch.bfloat16))
