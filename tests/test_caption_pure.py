"""Caption stage: pure functions against hand-computed cases, plus the template backend end to end on Ray
(resume, exactly once, recaption only the changed granularity, ground-truth captions, the watchdog)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import caption
from pipelines.caption import (PromptsConfig, Status, build_prompt, cut_repetition,
                               parse_caption, prompt_hash, repeat_fraction)
from tipsv2 import config_tree
from tipsv2.data import schema


# ---------------------------------------------------------------- prompts

def test_build_prompt_with_image_part_and_alt_text():
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    messages = build_prompt("short", "  a red bus ", part)
    assert messages == [{"role": "user", "content": [
        part, {"type": "text", "text": PromptsConfig().short.text + ' The image\'s alt-text is: "a red bus".'}]}]


def test_build_prompt_text_only_without_alt_text_uses_the_granularity_prompt():
    prompts = PromptsConfig()
    for g in schema.Granularity:
        assert build_prompt(g, None, None) == [{"role": "user", "content": prompts.get(g).text}]
        assert build_prompt(g, "   ", None) == [{"role": "user", "content": prompts.get(g).text}]


# ---------------------------------------------------------------- parsing and the quality gate

def test_cut_repetition_keeps_one_copy_of_a_looping_span():
    assert cut_repetition("a cat on a mat on a mat on a mat on a mat".split()) == "a cat on a mat".split()
    assert cut_repetition("red red red red".split()) == ["red"]
    assert cut_repetition("a b a b".split()) == "a b a b".split()          # twice is not a loop
    assert cut_repetition([]) == []


def test_repeat_fraction_matches_a_plain_count():
    words = "the cat and the cat and the dog".split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    repeats = sum(1 for i, g in enumerate(grams) if g in grams[:i])
    assert repeat_fraction(words, 3) == pytest.approx(repeats / len(grams))
    assert repeat_fraction(["one", "two"], 3) == 0.0


@pytest.mark.parametrize("text, expected, reason", [
    ('  "A dog runs on the beach."  ', "A dog runs on the beach.", None),
    ("a  dog\nruns", "a dog runs", None),
    ("", None, "empty"),
    ("   ", None, "empty"),
    ("dog", None, "too_short"),
    (" ".join(["word"] + [f"w{i}" for i in range(30)]), None, "too_long"),
    ("a dog a dog a dog a dog a dog barks", "a dog", None),   # loop cut first, then bounds
])
def test_parse_caption(text, expected, reason):
    got = parse_caption(text, min_words=2, max_words=20)
    assert got.text == expected
    assert (got.rejected_reason or "").split(":")[0] == (reason or "")


def test_parse_caption_rejects_repetitive_text_that_is_not_a_tight_loop():
    text = "a red car and a red car with a red car and a blue sky"
    assert parse_caption(text, min_words=1, max_words=50, max_repeat_fraction=0.2).rejected_reason.startswith(
        "repetitive")
    assert parse_caption(text, min_words=1, max_words=50, max_repeat_fraction=0.9).text == text


# ---------------------------------------------------------------- provenance and planning

def test_prompt_hash_changes_only_for_the_changed_granularity():
    base = caption.default()
    changed = config_tree.override(base, "prompts.medium.text=Say what you see.")
    assert prompt_hash(base, "short") == prompt_hash(changed, "short")
    assert prompt_hash(base, "long") == prompt_hash(changed, "long")
    assert prompt_hash(base, "medium") != prompt_hash(changed, "medium")
    hotter = config_tree.override(base, "sampling.temperature=0.9")
    assert all(prompt_hash(base, g) != prompt_hash(hotter, g) for g in schema.Granularity)


def test_todo_skips_done_retries_errors_and_redoes_changed_model():
    cfg = caption.default()
    ok = {g.value: caption.provenance(cfg, g, status=Status.OK) for g in schema.Granularity}
    assert caption.todo_of(cfg, {"provenance": ok}) == []
    assert caption.todo_of(cfg, {"provenance": {**ok, "long": caption.provenance(cfg, "long", status=Status.ERROR)}}) \
        == ["long"]
    assert caption.todo_of(cfg, {"provenance": {**ok, "short": caption.provenance(cfg, "short",
                                                                                  status=Status.REJECTED)}}) == []
    assert caption.todo_of(cfg, None) == ["short", "medium", "long"]
    other_model = config_tree.override(cfg, "engine.model_source=other/model")
    assert caption.todo_of(other_model, {"provenance": ok}) == ["short", "medium", "long"]


def test_one_request_prompt_regex_and_parse():
    import re

    prompts = PromptsConfig()
    messages = caption.build_request(["short", "long"], "a red bus", {"type": "image"}, prompts=prompts)
    image, text = messages[0]["content"]
    assert image == {"type": "image"} and prompts.short.text in text["text"] and prompts.long.text in text["text"]
    assert prompts.medium.text not in text["text"] and '"a red bus"' in text["text"]
    regex = caption.output_regex(["short", "long"], prompts)
    assert re.fullmatch(regex, '{"short": "a bus", "long": "a red bus on a street"}')
    assert not re.fullmatch(regex, '{"short": "a \\"bus\\"", "long": "x"}')          # no escapes: JSON as written
    assert not re.fullmatch(regex, '{"short": "' + "x" * (4 * 48 + 1) + '", "long": "x"}')
    assert caption.request_max_tokens(["short"], prompts) >= 4 * 48 + len('{"short": ""}')
    assert caption.parse_fields('{"short": "a bus", "long": "a red bus"}', ["short", "long"]) == {
        "short": "a bus", "long": "a red bus"}
    assert caption.parse_fields('{"short": "a bus", "long": "a red', ["short", "long"]) == {
        "short": "a bus", "long": None}                                                  # cut off: keep what closed
    assert caption.parse_fields("garbage", ["short"]) == {"short": None}
    assert caption.finish_caption(None, "", quality=caption.QualityConfig())[1] == Status.REJECTED
    assert caption.finish_caption("x", "boom", quality=caption.QualityConfig())[1:] == (Status.ERROR, "boom")


def test_presets_and_cli_overrides():
    assert caption.default().engine.accelerator_type and caption.default().engine.model_source
    assert caption.tiny().engine.device == caption.Device.CPU
    cfg, out = caption.cli.parse_stage_args(
        ["--config", "tiny", "--set", "engine.batch_size=3", "--set", "granularities=short,long", "--output", "o"],
        caption.PRESETS)
    assert (cfg.engine.batch_size, cfg.granularities, out) == (3, (schema.Granularity.SHORT,
                                                                    schema.Granularity.LONG), os.path.abspath("o"))
    with pytest.raises(ValueError, match="valid keys"):
        config_tree.override(cfg, "engine.batch=3")


# ---------------------------------------------------------------- the watchdog

def test_watchdog_fails_loudly_when_no_progress():
    def slow():
        yield 1
        time.sleep(5)
        yield 2

    watchdog = caption.WatchdogConfig(startup_timeout_s=2.0, progress_timeout_s=0.3)
    got = []
    start = time.perf_counter()
    with pytest.raises(caption.Stalled, match="no caption output for 0 s after 1 batches"):
        for item in caption.watched(slow(), watchdog):
            got.append(item)
    assert got == [1] and time.perf_counter() - start < 2.0


def test_after_a_stall_the_pump_thread_ends_and_closes_the_engine_stream():
    """The engine's stream resumes after the consumer gave up (Stalled) and then yields more than the queue
    holds: the pump must stop at its next hand-off and close the stream, not block forever holding it."""
    closed = threading.Event()

    def late():
        try:
            yield 0
            time.sleep(0.5)                 # longer than progress_timeout_s: the consumer raises Stalled
            yield from range(1, 100)        # more than the queue's 4: a blocking put would wait forever
        finally:
            closed.set()

    watchdog = caption.WatchdogConfig(startup_timeout_s=2.0, progress_timeout_s=0.2)
    with pytest.raises(caption.Stalled):
        list(caption.watched(late(), watchdog))
    assert closed.wait(5.0), "the engine stream was never closed"
    pumps = [t for t in threading.enumerate() if t.name == "caption-pump"]
    for t in pumps:
        t.join(5.0)
    assert not any(t.is_alive() for t in pumps)


def test_watchdog_passes_errors_and_items_through():
    def broken():
        yield "a"
        raise KeyError("engine died")

    with pytest.raises(KeyError, match="engine died"):
        list(caption.watched(broken(), caption.WatchdogConfig()))
    assert list(caption.watched(iter(range(5)), caption.WatchdogConfig())) == list(range(5))


# ---------------------------------------------------------------- template backend end to end

def _images_table(path: Path, n: int) -> list[str]:
    ids = [f"img{i:03d}" for i in range(n)]
    table = pa.table({"id": ids, "image": [b"x"] * n, "format": ["PNG"] * n, "width": [10 + i for i in range(n)],
                      "height": [20] * n, "alt_text": [f"thing number {i}" if i % 5 else None for i in range(n)],
                      "source": [f"/src/{i}.png" for i in ids], "sha256": ids}).cast(schema.IMAGES)
    (path / "images").mkdir(parents=True)
    pq.write_table(table.slice(0, n // 2), path / "images" / "a.parquet")
    pq.write_table(table.slice(n // 2), path / "images" / "b.parquet")
    return ids


def _captions(out: Path) -> list[dict]:
    rows = pq.read_table(out / "captions").to_pylist()
    for row in rows:
        row["provenance"] = json.loads(row["provenance"])
    return rows


@pytest.mark.slow   # three runs and their compactions: 172 s measured at load average 40-70 on 2 cores
def test_template_backend_resumes_and_recaptions_only_the_changed_granularity(ray_local, tmp_path):
    ids = _images_table(tmp_path / "in", 20)
    out = tmp_path / "out"
    cfg = dataclasses.replace(caption.template(), input=str(tmp_path / "in"), shard_rows=3)
    first = caption.run(cfg, str(out))
    rows = {r["id"]: r for r in _captions(out)}
    assert sorted(rows) == ids and first["written"]["rows"] == 20
    assert rows["img001"]["caption_short"] == "thing number 1"
    assert rows["img001"]["caption_medium"] == "A 11 by 20 pixel photo: thing number 1."
    # no alt-text: recorded as an error per granularity, the job goes on
    assert rows["img000"]["caption_short"] is None and rows["img000"]["provenance"]["short"]["status"] == "error"
    errors = pq.read_table(out / "errors").to_pylist()
    assert sorted({e["id"] for e in errors}) == [i for i in ids if int(i[3:]) % 5 == 0]
    assert len(errors) == 4 * 3 and all(e["stage"] == "caption" for e in errors)

    again = caption.run(cfg, str(out))       # errors are retried, the rest is skipped
    assert again["read"]["captions_to_do"] == 12 and again["read"]["already_captioned_ids"] == 16

    changed = config_tree.override(cfg, "template.medium=Medium: {alt_text}")
    third = caption.run(changed, str(out))
    assert third["read"]["captions_to_do"] == 20 + 8    # every medium, plus short/long still failing
    new = {r["id"]: r for r in _captions(out)}
    # one compacted file per input file (partition)
    assert len(_captions(out)) == 20 and len(list((out / "captions").rglob("*.parquet"))) == 2
    assert new["img001"]["caption_medium"] == "Medium: thing number 1"
    assert new["img001"]["provenance"]["short"] == rows["img001"]["provenance"]["short"]
    assert new["img001"]["provenance"]["medium"]["created_at"] > rows["img001"]["provenance"]["medium"]["created_at"]


def test_template_backend_ground_truth_parquet(ray_local, tmp_path):
    ids = _images_table(tmp_path / "in", 6)
    truth = pa.table({"id": ids[:5], "caption_short": [f"short {i}" for i in ids[:5]],
                      "caption_medium": [f"the medium caption of {i}" for i in ids[:5]],
                      "caption_long": [f"the long caption of {i} goes on" for i in ids[:5]]})
    pq.write_table(truth, tmp_path / "truth.parquet")
    cfg = config_tree.override(dataclasses.replace(caption.template(), input=str(tmp_path / "in")),
                               f"template.captions_path={tmp_path / 'truth.parquet'}")
    summary = caption.run(cfg, str(tmp_path / "out"))
    rows = {r["id"]: r for r in _captions(tmp_path / "out")}
    assert rows[ids[2]]["caption_long"] == f"the long caption of {ids[2]} goes on"
    assert rows[ids[5]]["caption_short"] is None and "no caption_short" in \
        rows[ids[5]]["provenance"]["short"]["detail"]
    assert summary["written"]["rows_by_status"]["short"] == {"ok": 5, "error": 1}
    assert rows[ids[0]]["provenance"]["short"]["model"] == str(tmp_path / "truth.parquet")


def test_compaction_merges_generations_latest_wins(tmp_path):
    cfg = dataclasses.replace(caption.template(), granularities=(schema.Granularity.SHORT,))
    prov = {"short": caption.provenance(cfg, "short", status=Status.OK)}
    pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / "in.parquet")
    out = str(tmp_path / "out")
    caption.commit(out, "in", 1, [{"id": "a", "caption_short": "old a", "provenance": prov},
                                  {"id": "b", "caption_short": "b", "provenance": prov},
                                  {"id": "gone", "caption_short": "g", "provenance": prov}], cfg.granularities)
    caption.commit(out, "in", 2, [{"id": "a", "caption_short": "new a", "provenance": prov}], cfg.granularities)
    item = {"partition": "in", "input_file": str(tmp_path / "in.parquet")}
    result = caption.compact_partition(item, output=out, generation=3, slots=cfg.granularities)
    files = list((tmp_path / "out" / "captions" / "in").glob("*.parquet"))
    assert [f.name for f in files] == [caption.part_name(3, "compacted")]
    table = pq.read_table(io.BytesIO(files[0].read_bytes()))
    assert table.to_pydict()["caption_short"] == ["new a", "b"]
    assert (result["rows"], result["missing"], result["stale_ids_dropped"]) == (2, 0, 1)
    pq.write_table(pa.table({"id": ["a", "b", "c"]}), tmp_path / "in.parquet")
    missing = caption.compact_partition(item, output=out, generation=4, slots=cfg.granularities)
    assert (missing["missing"], missing["missing_example"]) == (1, "c")
    assert len(list((tmp_path / "out" / "captions" / "in").glob("*.parquet"))) == 1    # left as it was


def test_cli_json_file_is_merged_over_the_default_preset(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"engine": {"concurrency": 3}, "prompts": {"short": {"max_tokens": 7}}}))
    cfg, _ = caption.cli.parse_stage_args(["--config", str(path), "--set", "shard_rows=5", "--output", "o"],
                                          caption.PRESETS)
    default = caption.default()
    assert (cfg.engine.concurrency, cfg.prompts.short.max_tokens, cfg.shard_rows) == (3, 7, 5)
    assert cfg.engine.model_source == default.engine.model_source and cfg.prompts.long == default.prompts.long
    with pytest.raises(SystemExit):
        caption.cli.parse_stage_args(["--config", "nope", "--output", "o"], caption.PRESETS)


def test_vllm_on_cpu_refuses_seeded_sampling_that_crashes_vllm_cpu():
    from pipelines.caption.backends import vllm_processor_config

    cfg = config_tree.override(config_tree.override(caption.tiny(), "engine.model_source=/m"),
                               "sampling.temperature=0.7")
    with pytest.raises(ValueError, match="per-request seed"):
        vllm_processor_config(cfg)
    config = vllm_processor_config(config_tree.override(cfg, "sampling.seed=-1"))
    bundle = config.placement_group_config["bundles"][0]
    assert bundle["CPU"] == 1.0 and not bundle.get("GPU") and config.should_continue_on_error


def test_pace_splits_the_start_up_from_the_steady_rate():
    clock = iter([100.0, 130.0, 132.0, 134.0, 136.0, 137.0])
    pace = caption.Pace(100, clock=lambda: next(clock))   # t = 100, 100 requests
    assert pace.metrics() == {}         # nothing arrived yet
    pace.arrived(8)                     # t = 130: the first batch, after the engine started (8 % done)
    pace.arrived(32)                    # t = 132: 40 %, the first arrival inside the 10-90 % window
    pace.arrived(32)                    # t = 134: 72 %
    pace.arrived(16)                    # t = 136: 88 %, the last arrival inside the window
    pace.arrived(12)                    # t = 137: 100 %, the drain
    assert pace.metrics() == {"first_output_s": 30.0, "steady_requests_per_s": 12.0}   # 48 rows in 4 s


def test_pace_has_no_steady_rate_without_two_arrivals_inside_the_window():
    clock = iter([0.0, 50.0, 51.0])
    pace = caption.Pace(64, clock=lambda: next(clock))
    pace.arrived(4)                     # 6 %: before the window
    pace.arrived(60)                    # 100 %: after it
    assert pace.metrics() == {"first_output_s": 50.0}
