"""Bad input as a user meets it (issue 22): each case ends in one line naming the value and what was expected,
exit status 2, no traceback; and before Ray starts wherever the input can be checked then. A dead Ray cluster
never hangs a stage (pipelines.ray_cluster)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import evaluate, ingest, pretrain, ray_cluster
from pipelines.errors import UsageError
from pipelines.testing import free_port
from tests.test_layout import usage_error

ROOT = Path(__file__).resolve().parents[1]


def ray_started() -> bool:
    import ray

    return ray.is_initialized()


# ---------------------------------------------------------------- item 4: each case, one line, exit 2


def test_evaluate_on_a_directory_that_is_not_an_export(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    line = usage_error(evaluate.main, ["--checkpoint", str(tmp_path / "notes"), "--suite", "tiny",
                                       "--output", str(tmp_path / "ev")], capsys)
    assert f"checkpoint='{tmp_path / 'notes'}' is not a model: no model.safetensors" in line
    assert "hf:DIR" in line and "VISION.npz" in line
    hf = tmp_path / "hf"   # a transformers directory passed without its prefix
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"x")
    (hf / "config.json").write_text('{"model_type": "tipsv2"}')
    line = usage_error(evaluate.main, ["--checkpoint", str(hf), "--suite", "tiny", "--output", str(tmp_path / "e")],
                       capsys)
    assert f"is a Hugging Face directory: pass it as hf:{hf}" in line
    line = usage_error(evaluate.main, ["--checkpoint", f"hf:{tmp_path / 'notes'}", "--suite", "tiny",
                                       "--output", str(tmp_path / "e")], capsys)
    assert "no config.json or model.safetensors" in line


def test_training_on_a_file_that_is_not_parquet(tmp_path, capsys):
    bad = tmp_path / "images.parquet"
    bad.write_bytes(b"hello")
    line = usage_error(pretrain.main, ["--config", "tiny", "--set", f"data.images={bad}", "--output",
                                       str(tmp_path / "pt")], capsys)
    assert f"{bad} is not a Parquet file" in line and "remove or replace that file" in line


def test_one_corrupt_file_among_good_ones_is_named(tmp_path, capsys):
    """A training set is read whole (its digest covers every row): a corrupt file stops the run, naming it."""
    images = tmp_path / "images"
    images.mkdir()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), images / "part-0.parquet")
    (images / "part-1.parquet").write_bytes(b"PAR1 truncated")
    line = usage_error(pretrain.main, ["--config", "tiny", "--set", f"data.images={images}", "--output",
                                       str(tmp_path / "pt")], capsys)
    assert f"{images / 'part-1.parquet'} is not a Parquet file" in line
    assert "part-0" not in line


def test_a_tracking_server_that_does_not_answer(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    clock = time.perf_counter()
    line = usage_error(ingest.main, ["--set", f"source={tmp_path}", "--set", f"tracking.uri={uri}",
                                     "--output", str(tmp_path / "in")], capsys)
    assert f"MLflow tracking URI {uri} does not answer" in line and "mlflow server" in line
    assert "leave tracking.uri and MLFLOW_TRACKING_URI unset" in line
    assert time.perf_counter() - clock < 15


def test_ingest_of_an_empty_directory_fails_before_ray_starts(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not an image")
    was_running = ray_started()
    line = usage_error(ingest.main, ["--set", f"source={empty}", "--output", str(tmp_path / "in")], capsys)
    assert f"source='{empty}': no images, tar shards or manifest rows found there (1 other files)" in line
    assert ray_started() == was_running   # the listing came first: no Ray was started for nothing


def test_output_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    line = usage_error(ingest.main, ["--set", f"source={tmp_path}", "--output", str(tmp_path / "afile" / "out")],
                       capsys)
    assert f"--output {tmp_path / 'afile' / 'out'}: {tmp_path / 'afile'} is a file, not a directory" in line
    line = usage_error(ingest.main, ["--set", f"source={tmp_path}", "--output", str(tmp_path / "afile")], capsys)
    assert "is a file, not a directory" in line


def test_a_usage_error_found_while_running_exits_2_with_one_line(capsys):
    from pipelines import cli

    def run(cfg, output):
        raise UsageError("value 'x': expected 'y'")

    with pytest.raises(SystemExit) as exited:
        cli.stage_main(["--output", "/tmp/o"], {"default": lambda: None}, run)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().endswith(": error: value 'x': expected 'y'")


# ---------------------------------------------------------------- a dead cluster: which one a stage joins


def closed_address() -> str:
    return f"127.0.0.1:{free_port()}"   # bound, released: nothing listens there


@pytest.fixture
def ray_env(tmp_path, monkeypatch):
    """RAY_ADDRESS unset and Ray's temp dir (where `ray start` records its cluster) under tmp_path."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    return tmp_path


def record(temp_dir: Path, address: str) -> Path:
    (temp_dir / "ray").mkdir(exist_ok=True)
    path = temp_dir / "ray" / "ray_current_cluster"
    path.write_text(address + "\n")
    return path


def test_nothing_recorded_starts_a_local_ray(ray_env):
    assert ray_cluster.choose() is None


def test_a_dead_record_is_reported_and_passed_over(ray_env):
    address = closed_address()
    path = record(ray_env, address)
    said = []
    assert ray_cluster.choose(warn=said.append) is None
    assert len(said) == 1 and address in said[0] and str(path) in said[0] and "starting a local Ray" in said[0]


def test_a_live_record_is_joined(ray_env):
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        record(ray_env, address)
        assert ray_cluster.choose(warn=pytest.fail) == address


def test_a_dead_ray_address_is_a_usage_error(ray_env, monkeypatch):
    address = closed_address()
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(UsageError, match=f"RAY_ADDRESS={address}: no Ray cluster answers there"):
        ray_cluster.choose()
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(UsageError, match="RAY_ADDRESS=auto: no running Ray cluster is recorded"):
        ray_cluster.choose()
    record(ray_env, address)
    with pytest.raises(UsageError, match=f"the recorded cluster {address}"):
        ray_cluster.choose()
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_cluster.choose() is None


def test_ray_addresses_parse_or_fail_naming_the_value():
    assert ray_cluster.host_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert ray_cluster.host_port("ray://head:10001") == ("head", 10001)
    assert ray_cluster.host_port("[::1]:6379") == ("::1", 6379)
    with pytest.raises(UsageError, match="Ray address 'head': expected HOST:PORT"):
        ray_cluster.host_port("head")


def ingest_process(tmp_path: Path, env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    source = tmp_path / "src"
    source.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(source / f"{i}.png")
    clock = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipelines.ingest", "--set", f"source={source}",
                           "--output", str(tmp_path / "ingest")], cwd=ROOT, env=os.environ | env,
                          capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - clock


def test_a_stage_exits_2_within_30_s_on_a_dead_ray_address(tmp_path):
    address = closed_address()
    done, seconds = ingest_process(tmp_path, {"RAY_ADDRESS": address}, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"python -m pipelines.ingest: error: RAY_ADDRESS={address}")
    assert "Traceback" not in done.stderr
    assert seconds < 30


@pytest.mark.slow
def test_a_stage_on_a_machine_with_a_dead_record_runs_on_a_local_ray(tmp_path):
    """What `ray start` left behind when its machine restarted: a bare ray.init() retried it for 213 s."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))   # short: Ray's socket paths must fit in 107 bytes
    address = closed_address()
    record(temp_dir, address)
    try:
        done, seconds = ingest_process(tmp_path, {"RAY_TMPDIR": str(temp_dir)}, timeout=180)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"({address}) does not answer; starting a local Ray" in done.stdout + done.stderr
    assert (tmp_path / "ingest" / "summary.json").is_file()
    assert seconds < 60


# ---------------------------------------------------------------- item 5: --help keeps each example on its lines


def test_every_program_docstring_keeps_its_example_commands_on_their_lines():
    """A backslash at a line's end in a plain docstring joins the lines (`--help` printed one long line with a run
    of spaces where a break was meant); the docstrings are raw, so `--help` shows the shell's continuation."""
    import ast
    import importlib
    import pkgutil

    import pipelines

    continued = 0
    for info in pkgutil.walk_packages(pipelines.__path__, "pipelines."):
        module = importlib.import_module(info.name)
        source = Path(module.__file__).read_text()
        node = ast.parse(source).body[0] if source.strip() else None
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            continue
        doc_lines = set((module.__doc__ or "").splitlines())
        for line in source.splitlines()[node.lineno - 1:node.end_lineno]:
            if line.endswith("\\"):
                continued += 1
                assert line.strip().removeprefix('r"""') in {d.strip() for d in doc_lines}, f"{info.name}: {line!r}"
    assert continued >= 8   # the example commands of compare, distill, evaluate, plan, pretrain, caption


def test_plan_help_shows_the_second_example_on_two_lines():
    done = subprocess.run([sys.executable, "-m", "pipelines.plan", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("usage: python -m pipelines.plan")
    second = next(i for i, line in enumerate(lines) if "--config vit_l14" in line)
    assert lines[second].rstrip().endswith("--stage pretrain \\")
    assert lines[second + 1].strip() == "--set engine.zero_stage=3 --set assume.mfu=0.35 --json"


# ---------------------------------------------------------------- what else a user hits: captions that cannot train


def write_sets(tmp_path: Path, *, image_ids, alt_texts, caption_ids=None, captions=None):
    from pipelines.data import Source

    images = tmp_path / "images.parquet"
    pq.write_table(pa.table({"id": image_ids, "image": [b"x"] * len(image_ids),
                             "alt_text": pa.array(alt_texts, pa.string())}), images)
    if caption_ids is None:
        return Source(images=str(images), captions=None)
    uri = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"id": caption_ids, "caption_short": pa.array(captions, pa.string())}), uri)
    return Source(images=str(images), captions=str(uri))


def test_caption_ids_that_match_no_image_are_refused(tmp_path):
    from pipelines.data import read_texts

    source = write_sets(tmp_path, image_ids=["a", "b"], alt_texts=["x", "y"], caption_ids=["A", "B"],
                        captions=["c1", "c2"])
    with pytest.raises(UsageError, match=r"\(2 rows\) shares no id with image Parquet .*caption ids such as 'A', "
                                         r"image ids such as 'a'"):
        read_texts(source)
    partial = write_sets(tmp_path, image_ids=["a", "b"], alt_texts=["x", "y"], caption_ids=["a", "B"],
                         captions=["c1", "c2"])
    assert read_texts(partial).column("caption_short").to_pylist() == ["c1", None]   # a partial match trains


def test_empty_captions_on_every_row_are_refused(tmp_path):
    from pipelines.data import read_texts

    source = write_sets(tmp_path, image_ids=["a", "b"], alt_texts=["x", "y"], caption_ids=["a", "b"],
                        captions=["", "  "])
    with pytest.raises(UsageError, match="every caption of the 2 images it names is empty"):
        read_texts(source)
    nothing = write_sets(tmp_path, image_ids=["a", "b"], alt_texts=[None, " "])
    with pytest.raises(UsageError, match="has an alt-text or a caption"):
        read_texts(nothing)


def test_a_caption_set_of_other_images_stops_pretrain_in_one_line(tmp_path, capsys):
    source = write_sets(tmp_path, image_ids=["a", "b"], alt_texts=["x", "y"], caption_ids=["A", "B"],
                        captions=["c1", "c2"])
    line = usage_error(pretrain.main, ["--config", "tiny", "--set", f"data.images={source.images}", "--set",
                                       f"data.captions_uri={source.captions}", "--output", str(tmp_path / "pt")], capsys)
    assert "shares no id with image Parquet" in line


def test_ctrl_c_says_what_is_kept_and_how_to_go_on(capsys):
    from pipelines import cli

    def run(cfg, output):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        cli.stage_main(["--output", "/tmp/o"], {"default": lambda: None}, run)
    assert exited.value.code == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted; what was written to /tmp/o is kept" in err
    assert "run the same command again" in err


def test_a_sqlite_store_keeps_its_artifacts_beside_its_output_or_its_database(tmp_path):
    """Never MLflow's default ./mlruns of the working directory (runs' exports scattered into a repository)."""
    from pipelines.tracking import artifact_location

    db = tmp_path / "db" / "mlflow.db"
    assert artifact_location(f"sqlite:///{db}", str(tmp_path / "out")) == (tmp_path / "out" / "mlartifacts").as_uri()
    assert artifact_location(f"sqlite:///{db}", "s3://bucket/run") == (tmp_path / "db" / "mlartifacts").as_uri()
    assert artifact_location(f"sqlite:///{db}", None) == (tmp_path / "db" / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000", str(tmp_path)) is None   # the server decides
