"""The run root (pipelines.layout) and the stage command line's usage errors (pipelines.cli): each stage's
`--output ROOT/<stage>` reads the earlier stages' outputs under ROOT; a missing input, config file or URI
scheme is one line naming the value and what was expected, exit 2, before any Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import caption, cli, distill, evaluate, ingest, layout, pretrain
from tipsv2.configs import distill_preset, preset

ROOT_DIR = Path(__file__).resolve().parents[1]


def usage_error(main, argv: list[str], capsys) -> str:
    """The one-line error of `main(argv)`, which must exit 2 (argparse's usage error)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def make(root: Path, *parts: str) -> Path:
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_run_root_is_the_parent_of_an_output_named_after_the_stage():
    assert layout.run_root("caption", "/r/run1/caption") == "/r/run1"
    assert layout.run_root("caption", "s3://b/runs/x/caption/") == "s3://b/runs/x"
    assert layout.run_root("caption", "gs://b/caption") == "gs://b"
    assert layout.run_root("caption", "s3://caption") is None          # a bucket, not a run root
    assert layout.run_root("caption", "/r/run1/captions") is None
    assert layout.run_root("pretrain", "/r/run1/caption") is None
    assert layout.run_root("pretrain", None) is None


def test_pretrain_and_distill_read_the_run_root(tmp_path):
    make(tmp_path, "ingest", "images"), make(tmp_path, "caption", "captions")
    cfg = layout.connect("pretrain", preset("tiny"), str(tmp_path / "pretrain"))
    assert cfg.data.images == str(tmp_path / "ingest" / "images")
    assert cfg.data.captions_uri == str(tmp_path / "caption" / "captions")
    assert cfg.data.tokenizer is None                                  # pretrain trains its own

    with pytest.raises(layout.MissingInput, match=r"pipelines\.pretrain .*--output .*/pretrain` first"):
        layout.connect("distill", distill_preset("tiny"), str(tmp_path / "distill"))
    make(tmp_path, "pretrain", "export"), make(tmp_path, "pretrain", "tokenizer")
    (tmp_path / "pretrain" / "tokenizer" / "spm.model").write_bytes(b"x")
    cfg = layout.connect("distill", distill_preset("tiny"), str(tmp_path / "distill"))
    assert (cfg.teacher, cfg.data.tokenizer) == (str(tmp_path / "pretrain" / "export"),
                                                 str(tmp_path / "pretrain" / "tokenizer" / "spm.model"))
    assert cfg.data.images == str(tmp_path / "ingest" / "images")

    # The tokenizer pretrain was given (its config.json names it) is the one distill and evaluate use.
    (tmp_path / "pretrain" / "config.json").write_text(json.dumps({"data": {"tokenizer": str(tmp_path / "t.model")}}))
    (tmp_path / "t.model").write_bytes(b"x")
    make(tmp_path, "distill", "export")
    cfg = layout.connect("evaluate", evaluate.default(), str(tmp_path / "evaluate"))
    assert (cfg.checkpoint, cfg.tokenizer) == (str(tmp_path / "distill" / "export"), str(tmp_path / "t.model"))


def test_explicit_inputs_win_and_other_outputs_are_not_run_roots(tmp_path):
    make(tmp_path, "pretrain", "export"), make(tmp_path, "mine")
    cfg = layout.connect("distill", distill_preset("tiny").__class__(teacher=str(tmp_path / "mine")),
                         str(tmp_path / "distill"), check=False)
    assert cfg.teacher == str(tmp_path / "mine") and cfg.data.tokenizer is None   # follows the teacher: unset
    cfg = layout.connect("pretrain", preset("tiny"), str(tmp_path / "elsewhere"))
    assert cfg.data.images is None                                                # synthetic scenes, as before


def test_stage_mains_name_the_stage_to_run_first(tmp_path, capsys):
    line = usage_error(caption.main, ["--config", "template", "--output", str(tmp_path / "caption")], capsys)
    assert f"`input` is not set and {tmp_path / 'ingest'} does not exist" in line
    assert f"python -m pipelines.ingest ... --output {tmp_path / 'ingest'}` first" in line
    line = usage_error(pretrain.main, ["--config", "tiny", "--output", str(tmp_path / "pretrain")], capsys)
    assert "`data.images` is not set" in line and "pipelines.ingest" in line
    make(tmp_path, "ingest", "images")
    line = usage_error(pretrain.main, ["--config", "tiny", "--output", str(tmp_path / "pretrain")], capsys)
    assert "`data.captions_uri` is not set" in line and "pipelines.caption" in line
    line = usage_error(evaluate.main, ["--output", str(tmp_path / "evaluate")], capsys)
    assert "pipelines.distill" in line
    line = usage_error(distill.main, ["--config", "tiny", "--output", str(tmp_path / "d")], capsys)
    assert line.endswith("distill needs `teacher`: --set teacher=URI (a local path, s3:// or gs:// URI), "
                         "or --output ROOT/distill under a run root holding ROOT/pretrain")


def test_print_config_shows_the_inputs_the_run_root_gives(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        caption.main(["--config", "template", "--output", str(tmp_path / "caption"), "--print-config"])
    assert exited.value.code == 0
    assert json.loads(capsys.readouterr().out)["input"] == str(tmp_path / "ingest")


def test_usage_errors_are_one_line_naming_the_value(tmp_path, capsys):
    line = usage_error(ingest.main, ["--output", str(tmp_path / "ingest")], capsys)
    assert "ingest needs `source`: --set source=URI" in line
    line = usage_error(ingest.main, ["--set", f"source={tmp_path / 'nope'}", "--output", str(tmp_path / "o")], capsys)
    assert f"source='{tmp_path / 'nope'}'" in line and "does not exist" in line
    line = usage_error(caption.main, ["--set", "input=", "--output", str(tmp_path / "o")], capsys)
    assert "caption needs `input`" in line
    line = usage_error(caption.main, ["--config", str(tmp_path / "x.json"), "--output", str(tmp_path / "o")], capsys)
    assert f"--config '{tmp_path / 'x.json'}': no such file" in line and "'template'" in line
    (tmp_path / "bad.json").write_text("{not json")
    line = usage_error(caption.main, ["--config", str(tmp_path / "bad.json"), "--output", "o"], capsys)
    assert "is not valid JSON" in line
    line = usage_error(ingest.main, ["--set", "source=ftp://h/images", "--output", str(tmp_path / "o")], capsys)
    assert "unsupported URI scheme in 'ftp://h/images'" in line
    line = usage_error(ingest.main, ["--set", "source=/tmp", "--output", "hdfs://n/x"], capsys)
    assert "unsupported URI scheme in 'hdfs://n/x'" in line
    line = usage_error(pretrain.main, ["--set", f"data.images={tmp_path / 'none'}", "--output", str(tmp_path / "o")],
                       capsys)
    assert f"data.images='{tmp_path / 'none'}'" in line


def test_list_keys_prints_every_set_key_with_its_value(capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--config", "tiny", "--list-keys", "--set", "steps=7"])
    lines = capsys.readouterr().out.splitlines()
    assert "steps = 7" in lines and "data.images = null" in lines and "engine.zero_stage = 2" in lines
    assert len(lines) > 50


def test_help_keeps_the_example_commands_on_their_lines_and_lists_the_keys():
    done = subprocess.run([sys.executable, "-m", "pipelines.pretrain", "--help"], cwd=ROOT_DIR, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("usage: python -m pipelines.pretrain")
    assert any(line.strip().startswith("python -m pipelines.pretrain --config tiny --output outputs/tiny --local")
               for line in lines)
    keys = lines[lines.index("--set keys (top level; `--list-keys` prints every key with its value):") + 1].split()
    assert {"data.", "engine.", "steps", "tracking."} <= set(keys)


def test_help_epilog_tolerates_presets_without_a_dataclass():
    assert cli.keys_epilog({"default": lambda: None}) is None


@pytest.mark.slow
def test_the_per_stage_commands_chain_with_nothing_but_output(ray_local, tmp_path, monkeypatch, capsys):
    """cluster/README.md's order (ingest, caption, pretrain, distill, evaluate), each given only `--output
    ROOT/<stage>` (and its preset): every stage finds its input under ROOT; the model is trained and evaluated."""
    from dataclasses import replace

    from pipelines import run_all
    from tipsv2.data.synthetic import SyntheticConfig

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    source = run_all.write_source(replace(run_all.SourceConfig(), skimage_samples=False,
                                          synthetic=SyntheticConfig(train_size=24, val_size=4, test_size=4)),
                                  str(tmp_path / "source"))["images"]
    root = tmp_path / "run"
    small = ["--set", "steps=2", "--set", "log_every=1", "--set", "data.batch_size=4", "--local"]
    ingest.main(["--set", f"source={source}", "--output", str(root / "ingest")])
    caption.main(["--config", "template", "--output", str(root / "caption")])
    pretrain.main(["--config", "tiny", *small, "--output", str(root / "pretrain")])
    distill.main(["--config", "tiny", *small, "--output", str(root / "distill")])
    result = evaluate.main(["--suite", "tiny", "--output", str(root / "evaluate")])
    capsys.readouterr()
    read = json.loads((root / "pretrain" / "summary.json").read_text())["read"]
    assert (read["images"], read["captions"]) == (str(root / "ingest" / "images"), str(root / "caption" / "captions"))
    distilled = json.loads((root / "distill" / "config.json").read_text())
    assert distilled["teacher"] == str(root / "pretrain" / "export")
    assert distilled["data"]["tokenizer"] == str(root / "pretrain" / "tokenizer" / "spm.model")
    assert json.loads((root / "evaluate" / "config.json").read_text())["checkpoint"] == str(root / "distill" / "export")
    assert result["metrics"] and (root / "distill" / "export" / "model.safetensors").is_file()
