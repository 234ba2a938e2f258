"""pipelines.lineage on small Parquet sets: the digest follows the rows, not the files; the provenance
summary; the resume check's fail and warn paths; a stage's output logged as an MLflow dataset on a real
`mlflow server` (the session's). The resumed training run is tests/test_registry.py."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import lineage
from pipelines.lineage import CaptionSetChanged, Kind, check_resume, describe
from tipsv2.configs import CaptionChange
from tipsv2.data.schema import captions_schema


def provenance(model: str, prompt: str, when: str) -> str:
    entry = {"backend": "vllm", "model": model, "prompt_hash": prompt, "sampling": {"temperature": 0.2},
             "status": "ok", "detail": "", "created_at": when}
    return json.dumps({"short": entry, "medium": entry | {"prompt_hash": prompt + "m"}}, sort_keys=True)


def captions(ids: list[str], short: list[str | None], models: list[str]) -> pa.Table:
    return pa.table({"id": ids, "caption_short": short, "caption_medium": [f"m {i}" for i in ids],
                     "caption_long": [None] * len(ids),
                     "provenance": [provenance(m, "p1", f"2026-12-0{k}T00:00:00") for k, m in enumerate(models)]},
                    schema=captions_schema())


def write(directory, *tables: pa.Table) -> str:
    directory.mkdir(parents=True)
    for index, table in enumerate(tables):
        pq.write_table(table, directory / f"part-{index:05d}.parquet")
    return str(directory)


def test_digest_follows_the_rows_not_the_files(tmp_path):
    table = captions(["b", "a", "c"], ["two", "one", None], ["m1", "m1", "m2"])
    one = describe(write(tmp_path / "one", table), Kind.CAPTIONS)
    split = describe(write(tmp_path / "split", table.slice(2), table.slice(0, 2)), Kind.CAPTIONS)
    assert one.digest == split.digest and len(one.digest) == 16
    assert (one.rows, len(one.files), len(split.files)) == (3, 1, 2)
    assert one.schema == "captions" and one.schema_version == "1"
    edited = captions(["b", "a", "c"], ["two", "one!", None], ["m1", "m1", "m2"])
    empty_not_null = captions(["b", "a", "c"], ["two", "one", ""], ["m1", "m1", "m2"])
    assert describe(write(tmp_path / "edited", edited), Kind.CAPTIONS).digest != one.digest
    assert describe(write(tmp_path / "empty", empty_not_null), Kind.CAPTIONS).digest != one.digest
    # Provenance (a new created_at, another model) is summarised, not digested: the captions are the same.
    remodelled = captions(["b", "a", "c"], ["two", "one", None], ["m3", "m3", "m3"])
    assert describe(write(tmp_path / "remodelled", remodelled), Kind.CAPTIONS).digest == one.digest


def test_provenance_summary_counts_rows_per_granularity_model_and_prompt(tmp_path):
    found = describe(write(tmp_path / "c", captions(["a", "b", "c"], ["x", "y", "z"], ["m1", "m1", "m2"])),
                     Kind.CAPTIONS)
    summary = {(p["granularity"], p["model"], p["prompt_hash"]): p["rows"] for p in found.provenance}
    assert summary == {("medium", "m1", "p1m"): 2, ("medium", "m2", "p1m"): 1, ("short", "m1", "p1"): 2,
                       ("short", "m2", "p1"): 1}
    assert all(p["backend"] == "vllm" and p["sampling"] == {"temperature": 0.2} for p in found.provenance)
    profile = found.profile()
    assert profile["rows"] == 3 and profile["num_files"] == 1 and profile["files"][0]["rows"] == 3


def test_the_trainer_reads_each_set_once_for_its_digest_and_its_texts(tmp_path, monkeypatch):
    from pipelines import data
    from tipsv2.data.synthetic import Split, SyntheticConfig, write_parquet

    root = tmp_path / "synthetic"
    write_parquet(str(root), SyntheticConfig(train_size=6, val_size=2, test_size=2), splits=(Split.TRAIN,))
    source = data.Source(images=str(root / "train" / "images"), captions=str(root / "train" / "ground_truth"))
    expected_texts, expected_sets = data.read_texts(source), lineage.describe_source(source)

    reads = []   # a spy on pyarrow's readers: counts calls, changes nothing
    for module, name in ((data.pq, "read_table"), (lineage.pads, "dataset")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: reads.append(_name) or _real(*a, **k))
    datasets, read = lineage.read_source(source)
    assert reads == ["dataset", "dataset"]   # one dataset (one read) per set
    texts = data.read_texts(source, read)
    assert reads == ["dataset", "dataset"]   # the texts came from those tables: nothing read again
    assert texts.equals(expected_texts)
    assert [d.digest for d in datasets] == [d.digest for d in expected_sets]   # the digests as recorded before


def test_bad_input_names_the_value(tmp_path):
    with pytest.raises(ValueError, match="no captions Parquet at '.*missing'"):
        describe(str(tmp_path / "missing"), Kind.CAPTIONS)
    path = write(tmp_path / "noid", pa.table({"key": ["a"]}))
    with pytest.raises(ValueError, match=r"has no id column; found \['key'\]"):
        describe(path, Kind.CAPTIONS)


def test_resume_check_fails_or_warns_by_policy(tmp_path):
    output = str(tmp_path / "run")
    before = describe(write(tmp_path / "c1", captions(["a"], ["x"], ["m"])), Kind.CAPTIONS)
    after = describe(write(tmp_path / "c2", captions(["a"], ["y"], ["m"])), Kind.CAPTIONS)
    assert check_resume(output, [before], policy=CaptionChange.FAIL, resuming=False) is None
    assert check_resume(output, [before], policy=CaptionChange.FAIL, resuming=True) is None   # unchanged
    with pytest.raises(CaptionSetChanged, match=f"started on digest {before.digest}.*finds digest {after.digest}"):
        check_resume(output, [after], policy=CaptionChange.FAIL, resuming=True)
    with pytest.warns(UserWarning, match=f"{before.digest}.*{after.digest}"):
        note = check_resume(output, [after], policy=CaptionChange.WARN, resuming=True)
    assert before.digest in note
    recorded = json.loads((tmp_path / "run" / lineage.LINEAGE_FILE).read_text())
    assert recorded["captions"]["digest"] == after.digest and recorded["previous_captions"]["digest"] == before.digest
    # A fresh run (no checkpoint to resume) starts on whatever captions it finds.
    assert check_resume(output, [before], policy=CaptionChange.FAIL, resuming=False) is None


def test_stage_output_logged_as_dataset(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import MlflowSink

    _, uri = mlflow_server
    output = tmp_path / "caption"
    path = write(output / "captions", captions(["a", "b"], ["x", "y"], ["m1", "m2"]))
    sink = MlflowSink(uri=uri, experiment="lineage-output", run_name="caption")   # the stage's own run
    lineage.log_output(sink, Kind.CAPTIONS, path)
    sink.close()
    run = MlflowClient(uri).get_run(sink.run_id)
    (item,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in item.tags}["mlflow.data.context"] == lineage.OUTPUT
    assert item.dataset.name == "captions" and item.dataset.digest == describe(path, Kind.CAPTIONS).digest
    assert item.dataset.source_type == "local" and path in item.dataset.source
    profile = json.loads(item.dataset.profile)
    assert profile["rows"] == 2 and {p["model"] for p in profile["provenance"]} == {"m1", "m2"}
    assert lineage.caption_digest(run) == item.dataset.digest
