"""Ingest on a real local Ray: every source kind, every bad-input kind, dedup, row groups, rerun, CLI.

Reference: a plain PIL loop over the same files (sha256, size, format) computed in the test.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import ingest
from pipelines.ingest import BadImage, Reason, decode_image
from pipelines.testing import sample_images
from tipsv2.data import schema

LIMITS = {"max_pixels": 89_478_485, "allowed_modes": ingest.RGB_CONVERTIBLE_MODES}


def _encode(array_or_image, fmt: str, **kwargs) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _good_images() -> dict[str, bytes]:
    pngs = sample_images(("astronaut", "chelsea", "coffee", "camera"))
    astronaut = Image.open(io.BytesIO(pngs["astronaut"])).convert("RGB")
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "a_astronaut.jpg": _encode(astronaut, "JPEG", quality=90),
        "b_chelsea.png": pngs["chelsea"],
        "c_coffee.webp": _encode(Image.open(io.BytesIO(pngs["coffee"])), "WEBP", quality=80),
        "d_camera.png": pngs["camera"],                 # mode L
        "e_anim.gif": gif.getvalue(),                   # first frame is red
    }


def _bad_images() -> dict[str, tuple[bytes, Reason]]:
    jpeg = _encode(Image.open(io.BytesIO(sample_images(("rocket",))["rocket"])), "JPEG")
    return {
        "x_empty.jpg": (b"", Reason.EMPTY_FILE),
        "x_text.png": (b"this is a text file, not a picture\n" * 20, Reason.NOT_AN_IMAGE),
        "x_truncated.jpg": (jpeg[: len(jpeg) // 2], Reason.TRUNCATED),
        "x_bomb.png": (_encode(Image.new("1", (10000, 9000)), "PNG"), Reason.DECOMPRESSION_BOMB),
        "x_sixteen_bit.png": (_encode(Image.new("I;16", (16, 16)), "PNG"), Reason.UNSUPPORTED_MODE),
    }


def _reference(data: bytes) -> dict:
    """Plain PIL loop: what ingest must record for a valid image."""
    with Image.open(io.BytesIO(data)) as im:
        sha = hashlib.sha256(data).hexdigest()
        return {"id": sha[:32], "sha256": sha, "width": im.width, "height": im.height, "format": im.format}


def _read(path: Path):
    return pq.read_table(path) if path.exists() else None


# ---------------------------------------------------------------- pure decode, one case per reason

@pytest.mark.parametrize("name", sorted(_bad_images()))
def test_decode_image_rejects_each_bad_kind(name):
    data, reason = _bad_images()[name]
    with pytest.raises(BadImage) as err:
        decode_image(data, **LIMITS)
    assert err.value.reason == reason, err.value.detail


def test_decode_image_accepts_good_images_and_reports_sizes():
    for name, data in _good_images().items():
        got = decode_image(data, **LIMITS)
        ref = _reference(data)
        assert (got.width, got.height, got.format) == (ref["width"], ref["height"], ref["format"]), name


def test_decode_image_bomb_limit_is_configurable():
    png = sample_images(("coffee",))["coffee"]   # 600 x 400
    decode_image(png, max_pixels=600 * 400, allowed_modes=ingest.RGB_CONVERTIBLE_MODES)
    with pytest.raises(BadImage) as err:
        decode_image(png, max_pixels=600 * 400 - 1, allowed_modes=ingest.RGB_CONVERTIBLE_MODES)
    assert err.value.reason == Reason.DECOMPRESSION_BOMB


# ---------------------------------------------------------------- directory source, end to end on Ray

@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for name, data in _good_images().items():
        (root / name).write_bytes(data)
    for name, (data, _) in _bad_images().items():
        (root / name).write_bytes(data)
    (root / "z_copy_of_chelsea.png").write_bytes(_good_images()["b_chelsea.png"])   # exact duplicate
    (root / "b_chelsea.txt").write_text("a cat on a sofa\n")
    (root / "a_astronaut.json").write_text(json.dumps({"alt_text": "an astronaut"}))
    (root / "README.md").write_text("not an image and not a sidecar: ignored")
    return root


def test_ingest_directory_writes_valid_rows_errors_and_drops_duplicates(ray_local, image_dir, tmp_path):
    out = tmp_path / "out"
    summary = ingest.run(ingest.IngestConfig(source=str(image_dir)), str(out))

    images = pq.read_table(out / "images")
    assert images.schema.equals(schema.IMAGES, check_metadata=False)
    good = _good_images()
    expected = {str(image_dir / name): _reference(data) for name, data in good.items()}
    got = {row["source"]: row for row in images.to_pylist()}
    assert set(got) == set(expected), "every valid image once; the later duplicate is dropped"
    for source, ref in expected.items():
        row = got[source]
        assert {k: row[k] for k in ref} == ref
        assert row["image"] == Path(source).read_bytes()
    assert got[str(image_dir / "b_chelsea.png")]["alt_text"] == "a cat on a sofa"
    assert got[str(image_dir / "a_astronaut.jpg")]["alt_text"] == "an astronaut"
    assert got[str(image_dir / "c_coffee.webp")]["alt_text"] is None

    errors = pq.read_table(out / "errors").to_pylist()
    assert {Path(e["source"]).name: e["reason"] for e in errors} == {
        name: reason.value for name, (_, reason) in _bad_images().items()}
    assert all(e["stage"] == "ingest" and e["detail"] for e in errors)

    assert summary["written"]["images"] == len(good) and summary["duplicates_dropped"] == 1
    assert summary["written"]["errors"] == len(_bad_images()) and summary["read"]["ignored_files"] == 1
    assert json.loads((out / "summary.json").read_text())["written"]["images"] == len(good)
    assert json.loads((out / "config.json").read_text())["source"] == str(image_dir)

    again = ingest.run(ingest.IngestConfig(source=str(image_dir)), str(out))
    assert again["skipped"] is True and pq.read_table(out / "images").num_rows == len(good)


def test_ingest_row_groups_are_sized_by_image_bytes(ray_local, image_dir, tmp_path):
    sizes = [len(d) for d in _good_images().values()]
    mean = sum(sizes) / len(sizes)
    cfg = ingest.IngestConfig(source=str(image_dir), row_group_bytes=int(2 * mean), file_bytes=int(100 * mean))
    ingest.run(cfg, str(tmp_path / "out"))
    files = sorted((tmp_path / "out" / "images").glob("*.parquet"))
    groups = [pq.ParquetFile(f).metadata.row_group(i).num_rows
              for f in files for i in range(pq.ParquetFile(f).metadata.num_row_groups)]
    assert sum(groups) == len(sizes)
    assert max(groups) <= 2, f"row groups of about 2 x mean image bytes hold at most 2 rows, got {groups}"


# ---------------------------------------------------------------- tar shards and manifests

def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_ingest_tar_shards_with_sidecars(ray_local, tmp_path):
    good = _good_images()
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "shard-000.tar", {"s0.jpg": good["a_astronaut.jpg"], "s0.txt": b"astronaut alt",
                                     "s1.png": good["b_chelsea.png"], "s1.json": b'{"caption": "cat alt"}'})
    _tar(shards / "shard-001.tar", {"s2.png": _bad_images()["x_text.png"][0],
                                     "s3.png": good["b_chelsea.png"], "s4.gif": good["e_anim.gif"]})
    (shards / "shard-002.tar").write_bytes(b"not a tar at all" * 40)
    summary = ingest.run(ingest.IngestConfig(source=str(shards)), str(tmp_path / "out"))
    rows = {r["source"].rsplit("/", 1)[1]: r for r in pq.read_table(tmp_path / "out" / "images").to_pylist()}
    assert set(rows) == {"shard-000.tar#s0.jpg", "shard-000.tar#s1.png", "shard-001.tar#s4.gif"}
    assert rows["shard-000.tar#s0.jpg"]["alt_text"] == "astronaut alt"
    assert rows["shard-000.tar#s1.png"]["alt_text"] == "cat alt"
    assert rows["shard-001.tar#s4.gif"]["sha256"] == _reference(good["e_anim.gif"])["sha256"]
    errors = {e["source"].rsplit("/", 1)[1]: e["reason"] for e in pq.read_table(tmp_path / "out" / "errors").to_pylist()}
    assert errors == {"shard-001.tar#s2.png": "not_an_image", "shard-002.tar": "unreadable"}
    assert summary["source_kind"] == "tar" and summary["duplicates_dropped"] == 1


def test_ingest_jsonl_manifest_relative_paths_and_missing_file(ray_local, tmp_path):
    good = _good_images()
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "one.png").write_bytes(good["b_chelsea.png"])
    (tmp_path / "imgs" / "two.jpg").write_bytes(good["a_astronaut.jpg"])
    lines = [{"path": "imgs/one.png", "alt_text": "cat"}, {"path": "imgs/two.jpg", "alt_text": None},
             {"path": "imgs/missing.jpg", "alt_text": "gone"}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = ingest.run(ingest.IngestConfig(source=str(manifest)), str(tmp_path / "out"))
    rows = {Path(r["source"]).name: r["alt_text"] for r in pq.read_table(tmp_path / "out" / "images").to_pylist()}
    assert rows == {"one.png": "cat", "two.jpg": None}
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert [(Path(e["source"]).name, e["reason"]) for e in errors] == [("missing.jpg", "unreadable")]
    assert summary["source_kind"] == "manifest"


def test_cli_sets_values_and_rejects_unknown_keys(ray_local, image_dir, tmp_path, capsys):
    summary = ingest.main(["--config", "tiny", "--set", f"source={image_dir}", "--set", "max_pixels=200000",
                           "--output", str(tmp_path / "out")])
    # over 200k pixels: the bomb, astronaut and camera (512 x 512), coffee (600 x 400) and the truncated
    # rocket (640 x 427, its header is intact); chelsea (451 x 300) and the gif stay
    assert summary["errors_by_reason"]["decompression_bomb"] == 5
    with pytest.raises(SystemExit):
        ingest.main(["--config", "tiny", "--set", "sauce=x", "--output", str(tmp_path / "o2")])
    assert "valid keys here" in capsys.readouterr().err
