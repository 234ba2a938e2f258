"""Dataset adapters on tiny fixtures written in each real layout, read through pyarrow's LocalFileSystem."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from tipsv2.eval import datasets

FS = pafs.LocalFileSystem()


def save_rgb(path, colour, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def save_palette(path, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])   # colours differ from indices
    image.save(path)


def test_image_folder(tmp_path):
    save_rgb(tmp_path / "n02" / "b.png", (0, 255, 0))
    save_rgb(tmp_path / "n01" / "a.jpg", (255, 0, 0))
    save_rgb(tmp_path / "n01" / "c.JPEG", (250, 0, 0))
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    data = datasets.ImageFolder(FS, str(tmp_path))
    assert data.class_names == ("n01", "n02") and len(data) == 3
    labels = [label for _, label in data]
    assert labels == [0, 0, 1]
    image, _ = data[2]
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (0, 255, 0)
    named = datasets.ImageFolder(FS, str(tmp_path), class_names=["tench", "goldfish"])
    assert named.class_names == ("tench", "goldfish") and len(named.limit(1)) == 1
    with pytest.raises(ValueError, match=r"expected a directory at '.*/missing', found nothing"):
        datasets.ImageFolder(FS, str(tmp_path / "missing"))


def write_coco(root, *, with_split=True):
    save_rgb(root / "val2017" / "000001.jpg", (10, 20, 30))
    save_rgb(root / "val2017" / "000002.jpg", (40, 50, 60))
    annotations = {
        "images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a cat. "}, {"image_id": 2, "caption": "a dog"},
                        {"image_id": 1, "caption": "a small cat"}],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(annotations))
    if with_split:
        (root / "test_ids.txt").write_text("2\n1\n")


def test_coco_captions_with_split_file(tmp_path):
    write_coco(tmp_path)
    data = datasets.CocoCaptions(FS, str(tmp_path), split="val2017", split_file="test_ids.txt")
    items = list(data)
    assert [captions for _, captions in items] == [["a dog"], ["a cat.", "a small cat"]]
    assert items[0][0].getpixel((0, 0)) == pytest.approx((40, 50, 60), abs=3)   # JPEG
    assert len(datasets.CocoCaptions(FS, str(tmp_path))) == 2
    (tmp_path / "bad_ids.txt").write_text("3\n")
    with pytest.raises(ValueError, match="image id 3"):
        datasets.CocoCaptions(FS, str(tmp_path), split_file="bad_ids.txt")
    with pytest.raises(ValueError, match=r"captions_train2017\.json"):
        datasets.CocoCaptions(FS, str(tmp_path), split="train2017")


def test_ade20k_remaps_labels(tmp_path):
    label = np.array([[0, 1, 150], [2, 0, 75]], np.uint8)
    annotations = _mkdir(tmp_path / "annotations" / "validation")
    for stem in ("ADE_val_1", "ADE_val_2"):
        save_rgb(tmp_path / "images" / "validation" / f"{stem}.jpg", (1, 2, 3), size=(3, 2))
        Image.fromarray(label).save(annotations / f"{stem}.png")
    data = datasets.Ade20k(FS, str(tmp_path))
    assert len(data) == 2 and len(data.class_names) == 150 and data.class_names[0] == "wall"
    _, target = data[0]
    assert target.dtype == np.uint8
    np.testing.assert_array_equal(target, [[255, 0, 149], [1, 255, 74]])
    (tmp_path / "annotations" / "validation" / "ADE_val_2.png").unlink()
    with pytest.raises(ValueError, match="ADE_val_2.jpg"):
        datasets.Ade20k(FS, str(tmp_path))
    with pytest.raises(ValueError, match=r"images/training"):
        datasets.Ade20k(FS, str(tmp_path), split="training")


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_voc(root, label_dir, split_dir, label):
    save_rgb(root / "JPEGImages" / "2007_000001.jpg", (9, 9, 9), size=(3, 2))
    save_palette(root / label_dir / "2007_000001.png", label)
    _mkdir(root / "ImageSets" / split_dir)
    (root / "ImageSets" / split_dir / "val.txt").write_text("2007_000001\n")


def test_pascal_voc_reads_palette_indices(tmp_path):
    write_voc(tmp_path, "SegmentationClass", "Segmentation", np.array([[0, 15, 255], [20, 1, 0]]))
    data = datasets.pascal_voc(FS, str(tmp_path))
    assert len(data) == 1 and len(data.class_names) == 21 and data.class_names[15] == "person"
    image, target = data[0]
    assert image.size == (3, 2)
    np.testing.assert_array_equal(target, [[0, 15, 255], [20, 1, 0]])
    with pytest.raises(ValueError, match=r"ImageSets/Segmentation/train\.txt"):
        datasets.pascal_voc(FS, str(tmp_path), split="train")


def test_pascal_context_reduces_zero_label(tmp_path):
    write_voc(tmp_path, "SegmentationClassContext", "SegmentationContext", np.array([[0, 1, 59], [255, 30, 0]]))
    data = datasets.pascal_context(FS, str(tmp_path))
    assert len(data.class_names) == 59 and data.class_names[0] == "aeroplane"
    np.testing.assert_array_equal(data[0][1], [[255, 0, 58], [255, 29, 255]])
    (tmp_path / "SegmentationClassContext" / "2007_000001.png").unlink()
    with pytest.raises(ValueError, match=r"2007_000001\.png"):
        datasets.pascal_context(FS, str(tmp_path))


def test_nyu_depth_png_millimetres_and_npy_metres(tmp_path):
    save_rgb(tmp_path / "test" / "rgb" / "0001.png", (5, 5, 5), size=(3, 2))
    save_rgb(tmp_path / "test" / "rgb" / "0002.jpg", (5, 5, 5), size=(3, 2))
    _mkdir(tmp_path / "test" / "depth")
    millimetres = np.array([[0, 1000, 2500], [65535, 10, 300]], np.uint16)
    Image.fromarray(millimetres).save(tmp_path / "test" / "depth" / "0001.png")
    metres = np.array([[0.0, 1.5, 2.0], [3.0, 4.0, 9.5]], np.float32)
    np.save(tmp_path / "test" / "depth" / "0002.npy", metres)
    data = datasets.NyuDepth(FS, str(tmp_path))
    (_, first), (_, second) = list(data)
    assert first.dtype == np.float32 and second.dtype == np.float32
    np.testing.assert_allclose(first, millimetres.astype(np.float32) / 1000)
    np.testing.assert_array_equal(second, metres)
    with pytest.raises(ValueError, match=r"train/rgb"):
        datasets.NyuDepth(FS, str(tmp_path), split="train")
