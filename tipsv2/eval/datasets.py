"""Evaluation dataset adapters over any pyarrow filesystem (local or S3; the pipelines make the filesystem).

Each adapter checks its layout when constructed (ValueError naming the missing path), knows its class
names, and yields (PIL RGB image, target) items:

| adapter                | layout under root                                          | target                    |
|------------------------|------------------------------------------------------------|---------------------------|
| ImageFolder            | <class>/*.jpg|jpeg|png                                     | class index (int)         |
| CocoCaptions           | annotations/captions_<split>.json, <image_dir>/<file_name>, | list of captions          |
|                        | optional split file of image ids (one per line)            |                           |
| Ade20k                 | images/<split>/*.jpg, annotations/<split>/*.png            | (H, W) uint8, 255 ignore  |
| VocSegmentation        | JPEGImages/*.jpg, <label_dir>/*.png (palette),             | (H, W) uint8, 255 ignore  |
|                        | ImageSets/<split_dir>/<split>.txt                          |                           |
| NyuDepth               | <split>/rgb/*.png|jpg, <split>/depth/*.png (uint16 mm)     | (H, W) float32 m,         |
|                        | or <split>/depth/*.npy (float m)                           | 0 = no depth              |
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from tipsv2.eval.metrics import IGNORE_INDEX

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)
PASCAL_CONTEXT_59_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "potted plant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tv monitor", "wall",
    "water", "window", "wood",
)


# ---------------------------------------------------------------- filesystem helpers


def _join(*parts: str) -> str:
    return posixpath.join(*[p.rstrip("/") if i == 0 else p.strip("/") for i, p in enumerate(parts)])


def _require(fs: pafs.FileSystem, path: str, kind: pafs.FileType, what: str) -> None:
    info = fs.get_file_info(path)
    if info.type is not kind:
        found = "nothing" if info.type is pafs.FileType.NotFound else f"a {info.type.name.lower()}"
        raise ValueError(f"{what}: expected a {'directory' if kind is pafs.FileType.Directory else 'file'} "
                         f"at {path!r}, found {found}")


def _list(fs: pafs.FileSystem, directory: str, suffixes: Sequence[str], what: str) -> list[str]:
    """Sorted file paths directly under `directory` with one of `suffixes` (case-insensitive)."""
    _require(fs, directory, pafs.FileType.Directory, what)
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=False))
    return sorted(i.path for i in infos if i.type is pafs.FileType.File and i.path.lower().endswith(tuple(suffixes)))


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_file(path) as f:
        return f.read()


def _image(fs: pafs.FileSystem, path: str) -> Image.Image:
    return Image.open(io.BytesIO(_read(fs, path))).convert("RGB")


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _pair_by_stem(images: list[str], targets: list[str], what: str) -> list[tuple[str, str]]:
    by_stem = {_stem(t): t for t in targets}
    missing = [p for p in images if _stem(p) not in by_stem]
    if missing:
        raise ValueError(f"{what}: {len(missing)} image(s) have no target file, first {missing[0]!r}")
    return [(p, by_stem[_stem(p)]) for p in images]


class EvalDataset:
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[Image.Image, object]]:
        return (self[i] for i in range(len(self)))

    def limit(self, count: int | None) -> "EvalDataset":
        """The first `count` items only (all when None): for quick evaluations."""
        if count is not None:
            self._items = self._items[:count]
        return self


# ---------------------------------------------------------------- adapters


class ImageFolder(EvalDataset):
    """ImageNet style: root/<class>/*.jpg|png; classes are the sorted folder names."""

    def __init__(self, fs: pafs.FileSystem, root: str, *, class_names: Sequence[str] | None = None) -> None:
        self.fs = fs
        _require(fs, root, pafs.FileType.Directory, "ImageFolder root")
        folders = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.type is pafs.FileType.Directory)
        if not folders:
            raise ValueError(f"ImageFolder: no class folders under {root!r} (expected root/<class>/*.jpg)")
        # Folder names are often ids (n01440764); readable names may be passed in the same sorted order.
        names = tuple(class_names) if class_names is not None else tuple(posixpath.basename(f) for f in folders)
        if len(names) != len(folders):
            raise ValueError(f"ImageFolder: {len(names)} class names for {len(folders)} folders under {root!r}")
        self.class_names = names
        self._items = [(path, label) for label, folder in enumerate(folders)
                       for path in _list(fs, folder, IMAGE_SUFFIXES, "ImageFolder class")]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self._items[index]
        return _image(self.fs, path), label


class CocoCaptions(EvalDataset):
    """COCO captions: annotations/captions_<split>.json ({images: [{id, file_name}], annotations:
    [{image_id, caption}]}), images under `image_dir`, and optionally a split file of image ids
    (one per line, e.g. the Karpathy test split) selecting and ordering the images."""

    def __init__(self, fs: pafs.FileSystem, root: str, *, split: str = "val2017", image_dir: str | None = None,
                 split_file: str | None = None) -> None:
        self.fs = fs
        annotation_path = _join(root, "annotations", f"captions_{split}.json")
        _require(fs, annotation_path, pafs.FileType.File, "COCO captions annotation")
        data = json.loads(_read(fs, annotation_path))
        if not {"images", "annotations"} <= set(data):
            raise ValueError(f"{annotation_path!r}: expected keys 'images' and 'annotations', got {sorted(data)}")
        self.image_dir = _join(root, image_dir or split)
        _require(fs, self.image_dir, pafs.FileType.Directory, "COCO image directory")
        files = {img["id"]: img["file_name"] for img in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        ids = sorted(captions)
        if split_file is not None:
            split_path = _join(root, split_file)
            _require(fs, split_path, pafs.FileType.File, "COCO split file")
            ids = [int(line) for line in _read(fs, split_path).decode().split() if line.strip()]
        unknown = [i for i in ids if i not in files or i not in captions]
        if unknown:
            raise ValueError(f"COCO: image id {unknown[0]} has no image entry or no caption in {annotation_path!r}")
        self._items = [(files[i], captions[i]) for i in ids]

    def __getitem__(self, index: int) -> tuple[Image.Image, list[str]]:
        file_name, captions = self._items[index]
        return _image(self.fs, _join(self.image_dir, file_name)), list(captions)


def _label_png(fs: pafs.FileSystem, path: str) -> np.ndarray:
    """Label indices of a PNG (palette or grey), (H, W) uint8: palette images give indices, not colours."""
    image = Image.open(io.BytesIO(_read(fs, path)))
    if image.mode not in ("P", "L"):
        raise ValueError(f"label image {path!r} has mode {image.mode}; expected a palette (P) or grey (L) PNG")
    return np.array(image, dtype=np.uint8)


class Ade20k(EvalDataset):
    """ADEChallengeData2016: images/<split>/*.jpg + annotations/<split>/*.png. Label 0 (other) becomes
    the ignore index 255; classes 1..150 become 0..149."""

    class_names = ADE20K_CLASSES

    def __init__(self, fs: pafs.FileSystem, root: str, *, split: str = "validation") -> None:
        self.fs = fs
        images = _list(fs, _join(root, "images", split), (".jpg", ".jpeg"), "ADE20K images")
        labels = _list(fs, _join(root, "annotations", split), (".png",), "ADE20K annotations")
        self._items = _pair_by_stem(images, labels, "ADE20K")

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, label_path = self._items[index]
        raw = _label_png(self.fs, label_path).astype(np.int16)
        label = np.where(raw == 0, IGNORE_INDEX, raw - 1).astype(np.uint8)
        return _image(self.fs, image_path), label


class VocSegmentation(EvalDataset):
    """Pascal VOC layout: JPEGImages/<id>.jpg, <label_dir>/<id>.png (palette indices, 255 = ignore),
    ImageSets/<split_dir>/<split>.txt listing ids. reduce_zero_label maps 0 to 255 and k to k - 1
    (Pascal Context 59, whose label 0 is 'background' and is not evaluated)."""

    def __init__(self, fs: pafs.FileSystem, root: str, *, split: str = "val", class_names: Sequence[str] = VOC_CLASSES,
                 label_dir: str = "SegmentationClass", split_dir: str = "Segmentation",
                 reduce_zero_label: bool = False) -> None:
        self.fs = fs
        self.class_names = tuple(class_names)
        self.reduce_zero_label = reduce_zero_label
        split_path = _join(root, "ImageSets", split_dir, f"{split}.txt")
        _require(fs, split_path, pafs.FileType.File, "VOC split file")
        image_dir, self.label_dir = _join(root, "JPEGImages"), _join(root, label_dir)
        _require(fs, image_dir, pafs.FileType.Directory, "VOC images")
        _require(fs, self.label_dir, pafs.FileType.Directory, "VOC labels")
        ids = [line.strip() for line in _read(fs, split_path).decode().splitlines() if line.strip()]
        self._items = [(_join(image_dir, f"{i}.jpg"), _join(self.label_dir, f"{i}.png")) for i in ids]
        for _, label_path in self._items[:1]:
            _require(fs, label_path, pafs.FileType.File, "VOC label listed in the split file")

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, label_path = self._items[index]
        label = _label_png(self.fs, label_path)
        if self.reduce_zero_label:
            raw = label.astype(np.int16)
            label = np.where((raw == 0) | (raw == IGNORE_INDEX), IGNORE_INDEX, raw - 1).astype(np.uint8)
        return _image(self.fs, image_path), label


def pascal_voc(fs: pafs.FileSystem, root: str, *, split: str = "val") -> VocSegmentation:
    """VOC2012 segmentation, 21 classes including background."""
    return VocSegmentation(fs, root, split=split)


def pascal_context(fs: pafs.FileSystem, root: str, *, split: str = "val") -> VocSegmentation:
    """Pascal Context 59 (mmsegmentation layout: SegmentationClassContext, ImageSets/SegmentationContext)."""
    return VocSegmentation(fs, root, split=split, class_names=PASCAL_CONTEXT_59_CLASSES,
                           label_dir="SegmentationClassContext", split_dir="SegmentationContext",
                           reduce_zero_label=True)


class NyuDepth(EvalDataset):
    """NYUv2 depth: <split>/rgb/<id>.png|jpg and <split>/depth/<id>.png (uint16 millimetres) or <id>.npy
    (float metres). Target: (H, W) float32 metres, 0 where no depth was measured."""

    class_names = ()

    def __init__(self, fs: pafs.FileSystem, root: str, *, split: str = "test") -> None:
        self.fs = fs
        images = _list(fs, _join(root, split, "rgb"), IMAGE_SUFFIXES, "NYUv2 rgb")
        depths = _list(fs, _join(root, split, "depth"), (".png", ".npy"), "NYUv2 depth")
        self._items = _pair_by_stem(images, depths, "NYUv2")

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, depth_path = self._items[index]
        data = _read(self.fs, depth_path)
        if depth_path.endswith(".npy"):
            depth = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
        else:
            raw = np.array(Image.open(io.BytesIO(data)))
            if raw.dtype not in (np.uint16, np.int32):
                raise ValueError(f"depth PNG {depth_path!r} has dtype {raw.dtype}; expected 16-bit millimetres")
            depth = raw.astype(np.float32) / 1000.0
        return _image(self.fs, image_path), depth
