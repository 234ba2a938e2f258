"""Synthetic scenes: coloured shapes on textured backgrounds, with exact ground truth.

Every scene comes with a semantic mask, a depth map from layer order, captions at three granularities
(short / medium / long, see tipsv2.data.schema.Granularity) and a noisy alt-text. Scenes are
deterministic per (seed, split, index), so a split can be re-rendered anywhere without storing it.
They feed the CPU demo end to end (ingest -> caption -> pretrain -> evaluate) and the `synthetic`
evaluation suite (zero-shot classification / segmentation, retrieval, probes).

    python -c "from tipsv2.data import synthetic as s; s.write_parquet('/tmp/syn', s.SyntheticConfig())"
writes /tmp/syn/<split>/images/part-00000.parquet (schema IMAGES) and
/tmp/syn/<split>/ground_truth/part-00000.parquet (ground_truth_schema()) for train, val and test, and
/tmp/syn/scenes.json, the config (`read_config`: whether mask labels are shapes or colours)
(about 10 s for the default 768 scenes of 112 px on one core).
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tipsv2 import config_tree
from tipsv2.data import schema
from tipsv2.data.schema import ROW_GROUP_BYTES, Granularity, caption_column, image_id


class Shape(str, enum.Enum):
    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"
    STAR = "star"
    CROSS = "cross"
    RING = "ring"


class Colour(str, enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"
    YELLOW = "yellow"
    PURPLE = "purple"
    ORANGE = "orange"
    WHITE = "white"


class Size(str, enum.Enum):
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"


class Texture(str, enum.Enum):
    STRIPES = "stripes"
    CHECKS = "checks"
    NOISE = "noise"
    GRADIENT = "gradient"


class Label(str, enum.Enum):
    """What the mask's labels (and the zero-shot classes) name."""
    SHAPE = "shape"    # label i + 1 = shapes[i]: a property of the whole outline, not readable from one patch
    COLOUR = "colour"  # label i + 1 = colours[i]: readable from any patch of the object


class Texts(str, enum.Enum):
    """What a scene's captions and alt-text say."""
    SCENE = "scene"    # captions describe the scene (sizes, colours, shapes, places, background); alt-text: noisy tags
    LABELS = "labels"  # every caption and the alt-text name only the visible objects' labels, largest first


class Split(str, enum.Enum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


RGB: dict[Colour, tuple[int, int, int]] = {
    Colour.RED: (220, 30, 30),
    Colour.GREEN: (30, 190, 50),
    Colour.BLUE: (30, 60, 230),
    Colour.YELLOW: (240, 220, 30),
    Colour.PURPLE: (140, 40, 190),
    Colour.ORANGE: (250, 140, 20),
    Colour.WHITE: (250, 250, 250),
}
# Bounding diameter of an object as a fraction of the image side.
SIZE_FRACTION: dict[Size, float] = {Size.SMALL: 0.2, Size.MEDIUM: 0.3, Size.LARGE: 0.42}
TEXTURE_WORD: dict[Texture, str] = {
    Texture.STRIPES: "striped", Texture.CHECKS: "checkered", Texture.NOISE: "noisy", Texture.GRADIENT: "gradient",
}
_SPLIT_CODE = {Split.TRAIN: 0, Split.VAL: 1, Split.TEST: 2}
SCENES_FILE = "scenes.json"   # beside the splits written by write_parquet: the SyntheticConfig that rendered them


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    image_size: int = 112                      # px, square images
    shapes: tuple[Shape, ...] = tuple(Shape)   # categories; mask label of shapes[i] is i + 1
    colours: tuple[Colour, ...] = tuple(Colour)
    sizes: tuple[Size, ...] = tuple(Size)
    textures: tuple[Texture, ...] = tuple(Texture)
    label: Label = Label.SHAPE                 # what mask labels name (Label.COLOUR: a patch can see its class)
    texts: Texts = Texts.SCENE                 # Texts.LABELS: texts name the labels alone ("a star and a ring")
    size_scale: float = 1.0                    # multiplies SIZE_FRACTION (1.6: large objects span ~5 patches at 112 px)
    min_objects: int = 1
    max_objects: int = 4
    min_visible_fraction: float = 0.3          # objects occluded beyond this are removed from the scene
    alt_text_noise: float = 0.3                # probability that a tag is wrong (category or colour) or missing
    background_depth: float = 10.0             # m (synthetic units), the farthest layer
    layer_step: float = 2.0                    # m closer per drawn layer
    seed: int = 0
    train_size: int = 512
    val_size: int = 128
    test_size: int = 128

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 px, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        for name in ("shapes", "colours", "sizes", "textures"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes must be distinct, got {self.shapes}")
        if len(set(self.colours)) != len(self.colours):
            raise ValueError(f"colours must be distinct, got {self.colours}")
        if not 0.1 <= self.size_scale <= 2.0 / max(SIZE_FRACTION[s] for s in self.sizes):
            raise ValueError(f"size_scale must be in [0.1, {2.0 / max(SIZE_FRACTION[s] for s in self.sizes):.2f}] "
                             f"(objects no wider than the image), got {self.size_scale}")
        if not 0.0 <= self.alt_text_noise <= 1.0:
            raise ValueError(f"alt_text_noise must be in [0, 1], got {self.alt_text_noise}")
        if self.background_depth <= self.layer_step * self.max_objects:
            raise ValueError(f"background_depth {self.background_depth} must exceed layer_step * max_objects "
                             f"= {self.layer_step * self.max_objects} so that every layer has positive depth")

    def split_size(self, split: Split | str) -> int:
        return {Split.TRAIN: self.train_size, Split.VAL: self.val_size, Split.TEST: self.test_size}[Split(split)]


@dataclass(frozen=True, kw_only=True)
class SceneObject:
    category: Shape
    colour: Colour
    size: Size
    center: tuple[float, float]   # (x, y) px of the drawn shape
    rotation: float               # rad
    layer: int                    # draw order, 0 = first drawn (farthest object)
    visible_pixels: int

    def name(self) -> str:
        return f"{self.colour.value} {self.category.value}"

    def to_json(self) -> dict:
        return {"category": self.category.value, "colour": self.colour.value, "size": self.size.value,
                "center": list(self.center), "rotation": self.rotation, "layer": self.layer,
                "visible_pixels": self.visible_pixels}


@dataclass(frozen=True, kw_only=True)
class Scene:
    image: Image.Image            # RGB, (image_size, image_size)
    mask: np.ndarray              # (H, W) uint8: 0 background, i + 1 for class_names(cfg)[i]
    depth: np.ndarray             # (H, W) float32, m; background farthest
    objects: tuple[SceneObject, ...]   # draw order, only objects that stayed visible
    texture: Texture
    captions: dict[str, str]      # Granularity value -> caption
    alt_text: str | None


def class_names(cfg: SyntheticConfig = SyntheticConfig()) -> tuple[str, ...]:
    """Class names for labels 1..C of the mask (label 0 is the background): shapes, or colours."""
    return tuple(c.value for c in (cfg.colours if cfg.label == Label.COLOUR else cfg.shapes))


def object_radius(cfg: SyntheticConfig, size: Size) -> float:
    """Half the bounding diameter of an object, in px."""
    return SIZE_FRACTION[size] * cfg.size_scale * cfg.image_size / 2


def scene_rng(cfg: SyntheticConfig, split: Split | str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, _SPLIT_CODE[Split(split)], index]))


def make_scene(cfg: SyntheticConfig, split: Split | str, index: int) -> Scene:
    """The scene at (cfg.seed, split, index): identical on every call and machine."""
    return render_scene(scene_rng(cfg, split, index), cfg)


# ---------------------------------------------------------------- drawing


def _polygon(center: tuple[float, float], radius: float, rotation: float, points: Sequence[tuple[float, float]]
             ) -> list[tuple[float, float]]:
    """Unit-polygon `points` (x, y in [-1, 1]) scaled by `radius` px, rotated and moved to `center`."""
    c, s = math.cos(rotation), math.sin(rotation)
    return [(center[0] + radius * (c * x - s * y), center[1] + radius * (s * x + c * y)) for x, y in points]


def _unit_outline(shape: Shape) -> list[tuple[float, float]]:
    if shape is Shape.SQUARE:
        h = 1 / math.sqrt(2)   # a square inscribed in the bounding circle
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape is Shape.TRIANGLE:
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape is Shape.STAR:
        return [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape is Shape.CROSS:
        a, b = 0.3, 0.95   # half arm width, arm length
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                (-b, -a), (-a, -a)]
    raise ValueError(f"shape {shape} has no polygon outline")


def shape_mask(shape: Shape, center: tuple[float, float], radius: float, rotation: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of one shape (no antialiasing, so image and mask agree exactly)."""
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = center
    if shape in (Shape.CIRCLE, Shape.RING):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
        if shape is Shape.RING:
            inner = 0.55 * radius
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        draw.polygon(_polygon(center, radius, rotation, _unit_outline(shape)), fill=1)
    return np.array(canvas, dtype=bool)


def _muted_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3) float background colours: greyish, so that the object colours stand out."""
    grey = rng.uniform(50, 170, size=(n, 1))
    return np.clip(grey + rng.uniform(-25, 25, size=(n, 3)), 0, 255)


def render_background(rng: np.random.Generator, texture: Texture, size: int) -> np.ndarray:
    """(size, size, 3) float RGB in [0, 255]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a, b = _muted_colours(rng, 2)
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)   # px along a random direction
    if texture is Texture.STRIPES:
        period = rng.uniform(8, 24)                          # px
        t = (np.floor(along / (period / 2)) % 2)[..., None]
    elif texture is Texture.CHECKS:
        cell = rng.integers(6, 20)                           # px
        t = ((xx // cell + yy // cell) % 2)[..., None]
    elif texture is Texture.GRADIENT:
        t = ((along - along.min()) / max(float(np.ptp(along)), 1e-6))[..., None]
    elif texture is Texture.NOISE:
        coarse = rng.uniform(0, 255, size=(6, 6)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32) / 255
        t = np.clip(smooth + rng.normal(0, 0.08, size=(size, size)), 0, 1)[..., None]
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {[t.value for t in Texture]}")
    return a * (1 - t) + b * t


def _sample_object(rng: np.random.Generator, cfg: SyntheticConfig, layer: int) -> dict:
    size = cfg.sizes[rng.integers(len(cfg.sizes))]
    radius = object_radius(cfg, size)
    return {
        "category": cfg.shapes[rng.integers(len(cfg.shapes))],
        "colour": cfg.colours[rng.integers(len(cfg.colours))],
        "size": size,
        "center": (float(rng.uniform(radius, cfg.image_size - radius)),
                   float(rng.uniform(radius, cfg.image_size - radius))),
        "rotation": float(rng.uniform(0, 2 * math.pi)),
        "layer": layer,
    }


def _full_masks(cfg: SyntheticConfig, drafts: list[dict]) -> list[np.ndarray]:
    """Each object's whole shape, (H, W) bool, before any occlusion."""
    n = cfg.image_size
    return [shape_mask(d["category"], d["center"], object_radius(cfg, d["size"]), d["rotation"], n) for d in drafts]


def _compose(cfg: SyntheticConfig, background: np.ndarray, drafts: list[dict], full: list[np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Draw `drafts` (whole shapes `full`) in order over `background`; later objects cover earlier ones.

    Returns image (H, W, 3) float, label mask (H, W) uint8, depth (H, W) float32 and each object's
    visible pixels (H, W) bool.
    """
    n = cfg.image_size
    image = background.copy()
    labels = np.zeros((n, n), np.uint8)
    depth = np.full((n, n), cfg.background_depth, np.float32)
    owner = np.full((n, n), -1, np.int64)
    for k, (d, shape) in enumerate(zip(drafts, full)):
        image[shape] = RGB[d["colour"]]
        labels[shape] = (cfg.colours.index(d["colour"]) if cfg.label == Label.COLOUR
                         else cfg.shapes.index(d["category"])) + 1
        depth[shape] = cfg.background_depth - cfg.layer_step * (k + 1)
        owner[shape] = k
    return image, labels, depth, [owner == k for k in range(len(drafts))]


def render_scene(rng: np.random.Generator, cfg: SyntheticConfig) -> Scene:
    """Render one scene from `rng`: objects min..max_objects, drawn in order, mostly hidden ones dropped."""
    texture = cfg.textures[rng.integers(len(cfg.textures))]
    background = render_background(rng, texture, cfg.image_size)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    drafts = [_sample_object(rng, cfg, k) for k in range(count)]
    full = _full_masks(cfg, drafts)
    while True:
        image, labels, depth, visible = _compose(cfg, background, drafts, full)
        fractions = [v.sum() / max(f.sum(), 1) for v, f in zip(visible, full)]
        worst = int(np.argmin(fractions))
        if fractions[worst] >= cfg.min_visible_fraction or len(drafts) == 1:
            break
        drafts.pop(worst)   # mostly hidden: remove it so that captions never mention an invisible object
        full.pop(worst)
    objects = tuple(SceneObject(category=d["category"], colour=d["colour"], size=d["size"], center=d["center"],
                                rotation=d["rotation"], layer=k, visible_pixels=int(v.sum()))
                    for k, (d, v) in enumerate(zip(drafts, visible)))
    # (front, back) layer pairs whose whole shapes intersect: front covers part of back.
    overlaps = {(j, i) for i in range(len(full)) for j in range(i + 1, len(full)) if (full[i] & full[j]).any()}
    return Scene(
        image=Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB"),
        mask=labels,
        depth=depth,
        objects=objects,
        texture=texture,
        **scene_texts(rng, cfg, objects, texture, overlaps),
    )


def scene_texts(rng: np.random.Generator, cfg: SyntheticConfig, objects: Sequence[SceneObject], texture: Texture,
                overlaps: set[tuple[int, int]]) -> dict:
    """The `captions` (one per granularity) and `alt_text` of a scene, as `cfg.texts` says."""
    if cfg.texts is Texts.LABELS:
        text = labels_caption(objects, cfg.label)
        return {"captions": {g.value: text for g in (Granularity.SHORT, Granularity.MEDIUM, Granularity.LONG)},
                "alt_text": text}
    return {"captions": {Granularity.SHORT.value: short_caption(objects),
                         Granularity.MEDIUM.value: medium_caption(objects, texture),
                         Granularity.LONG.value: long_caption(objects, texture, cfg.image_size, overlaps)},
            "alt_text": alt_text(rng, cfg, objects)}


# ---------------------------------------------------------------- text


def _by_visible_area(objects: Sequence[SceneObject]) -> list[SceneObject]:
    return sorted(objects, key=lambda o: (-o.visible_pixels, o.layer))


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def labels_caption(objects: Sequence[SceneObject], label: Label) -> str:
    """The objects' labels alone, largest visible first: 'a star and a ring' (Label.COLOUR: 'a red and a blue')."""
    words = [o.colour.value if label == Label.COLOUR else o.category.value for o in _by_visible_area(objects)]
    return _join([f"{_article(w)} {w}" for w in words])


def short_caption(objects: Sequence[SceneObject]) -> str:
    """The main object (largest visible area): 'a red circle'."""
    name = _by_visible_area(objects)[0].name()
    return f"{_article(name)} {name}"


def medium_caption(objects: Sequence[SceneObject], texture: Texture) -> str:
    """Every object with size and colour, and the background: 'a large red circle and a small blue square on
    a striped background'."""
    parts = [f"{_article(o.size.value)} {o.size.value} {o.name()}" for o in _by_visible_area(objects)]
    return f"{_join(parts)} on a {TEXTURE_WORD[texture]} background"


def _place(center: tuple[float, float], size: int) -> str:
    """Where in the image a centre (x, y) px lies, on a 3 x 3 grid: 'in the top left', 'on the right'."""
    col = ("left", "centre", "right")[min(int(3 * center[0] / size), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * center[1] / size), 2)]
    if (row, col) == ("middle", "centre"):
        return "in the centre"
    if col == "centre":
        return f"at the {row}"
    if row == "middle":
        return f"on the {col}"
    return f"in the {row} {col}"


def _relation(a: SceneObject, b: SceneObject, size: int) -> str | None:
    """Where a is relative to b, from the shape centres ('left of and above'); None when too close."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    words = []
    if abs(dx) > 0.1 * size:
        words.append("left of" if dx < 0 else "right of")
    if abs(dy) > 0.1 * size:
        words.append("above" if dy < 0 else "below")
    return " and ".join(words) or None


def long_caption(objects: Sequence[SceneObject], texture: Texture, size: int,
                 overlaps: set[tuple[int, int]] = frozenset()) -> str:
    """The whole scene: count, background, each object with its place, pairwise relations, occlusions."""
    ordered = _by_visible_area(objects)
    noun = "shape" if len(ordered) == 1 else "shapes"
    sentences = [f"A {TEXTURE_WORD[texture]} background with {len(ordered)} {noun}."]
    for o in ordered:
        article = _article(o.size.value).capitalize()
        sentences.append(f"{article} {o.size.value} {o.name()} is {_place(o.center, size)}.")
    for a, b in zip(ordered[1:], ordered[:-1]):
        rel = _relation(a, b, size)
        if rel:
            sentences.append(f"The {a.name()} is {rel} the {b.name()}.")
    by_layer = {o.layer: o for o in objects}
    for front, back in sorted(overlaps):
        if front in by_layer and back in by_layer:
            sentences.append(f"The {by_layer[front].name()} is in front of the {by_layer[back].name()}.")
    return " ".join(sentences)


def alt_text(rng: np.random.Generator, cfg: SyntheticConfig, objects: Sequence[SceneObject]) -> str | None:
    """Noisy tags, one per object; each tag with probability cfg.alt_text_noise is missing, has a wrong
    colour or a wrong category. None when every tag went missing."""
    tags = []
    for o in objects:
        colour, category = o.colour, o.category
        if rng.random() < cfg.alt_text_noise:
            kind = rng.integers(3)
            if kind == 0:
                continue
            if kind == 1 and len(cfg.colours) > 1:
                others = [c for c in cfg.colours if c is not colour]
                colour = others[rng.integers(len(others))]
            if kind == 2 and len(cfg.shapes) > 1:
                others = [s for s in cfg.shapes if s is not category]
                category = others[rng.integers(len(others))]
        tags.append(f"{colour.value} {category.value}")
    return ", ".join(tags) or None


# ---------------------------------------------------------------- Parquet

def ground_truth_schema() -> pa.Schema:
    """The GROUND_TRUTH file's schema. Parquet code imports pyarrow where it runs (here and below), so
    importing tipsv2 needs no pyarrow (bench/gpu_step.py runs where only torch is installed)."""
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.string(), nullable=False),            # the image id in the IMAGES file
        pa.field("mask", pa.binary(), nullable=False),          # PNG, mode L: 0 background, i + 1 = class_names(cfg)[i]
        pa.field("depth", pa.binary(), nullable=False),         # np.save of (H, W) float32, m
        *[pa.field(caption_column(g), pa.string(), nullable=False) for g in Granularity],
        pa.field("background", pa.string(), nullable=False),    # Texture value
        pa.field("objects", pa.string(), nullable=False),       # JSON list of SceneObject.to_json()
    ], metadata={"tipsv2.schema": "synthetic_ground_truth", "tipsv2.schema_version": "1"})


def encode_png(array_or_image: np.ndarray | Image.Image) -> bytes:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def scene_rows(scene: Scene, split: Split | str, index: int) -> tuple[dict, dict]:
    """One IMAGES row and one GROUND_TRUTH row for `scene`."""
    png = encode_png(scene.image)
    digest = hashlib.sha256(png).hexdigest()
    scene_id = image_id(digest)
    image_row = {"id": scene_id, "image": png, "format": "PNG", "width": scene.image.width,
                 "height": scene.image.height, "alt_text": scene.alt_text,
                 "source": f"synthetic://{Split(split).value}/{index}", "sha256": digest}
    truth_row = {"id": scene_id, "mask": encode_png(scene.mask), "depth": encode_npy(scene.depth),
                 **{caption_column(g): scene.captions[g.value] for g in Granularity},
                 "background": scene.texture.value,
                 "objects": json.dumps([o.to_json() for o in scene.objects])}
    return image_row, truth_row


def _rows_per_group(cfg: SyntheticConfig) -> int:
    """Scenes per Parquet row group: about ROW_GROUP_BYTES of images (3 bytes a pixel bounds the PNG)."""
    return max(1, ROW_GROUP_BYTES // (3 * cfg.image_size ** 2))


def _write_split(fs: pafs.FileSystem, paths: dict[str, str], cfg: SyntheticConfig, split: Split) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    size, group = cfg.split_size(split), _rows_per_group(cfg)
    images_schema, truth_schema = schema.IMAGES, ground_truth_schema()
    with fs.open_output_stream(paths["images"]) as images_out, \
            fs.open_output_stream(paths["ground_truth"]) as truth_out, \
            pq.ParquetWriter(images_out, images_schema) as images, \
            pq.ParquetWriter(truth_out, truth_schema) as truth:
        for start in range(0, size, group):   # one row group in memory at a time
            rows = [scene_rows(make_scene(cfg, split, i), split, i) for i in range(start, min(start + group, size))]
            images.write_table(pa.Table.from_pylist([r[0] for r in rows], schema=images_schema))
            truth.write_table(pa.Table.from_pylist([r[1] for r in rows], schema=truth_schema))


def write_parquet(out_dir: str, cfg: SyntheticConfig = SyntheticConfig(), *,
                  filesystem: pafs.FileSystem | None = None,
                  splits: Sequence[Split | str] = tuple(Split)) -> dict[str, dict]:
    """Render every split and write `<out_dir>/<split>/images/part-00000.parquet` (IMAGES) and
    `<out_dir>/<split>/ground_truth/part-00000.parquet` (GROUND_TRUTH). Returns {split: {rows, paths}}."""
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    root = out_dir.rstrip("/")
    written = {}
    for split in map(Split, splits):
        paths = {kind: f"{root}/{split.value}/{kind}/part-00000.parquet" for kind in ("images", "ground_truth")}
        for path in paths.values():
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        _write_split(fs, paths, cfg, split)
        written[split.value] = {"rows": cfg.split_size(split), "paths": paths}
    # The masks' labels mean shapes or colours: readers (the synthetic evaluation suite) learn which from here.
    with fs.open_output_stream(f"{root}/{SCENES_FILE}") as out:
        out.write(json.dumps(config_tree.to_dict(cfg), indent=2).encode())
    return written


def read_config(root: str, *, filesystem: pafs.FileSystem | None = None) -> SyntheticConfig | None:
    """The config `write_parquet` rendered the scenes under `root` with; None for data written without one."""
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    path = f"{root.rstrip('/')}/{SCENES_FILE}"
    if fs.get_file_info(path).type is not pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return config_tree.from_dict(SyntheticConfig, json.loads(stream.read()))


@dataclass(frozen=True, kw_only=True)
class SceneRecord:
    """A scene read back from Parquet (what the evaluators need; no PIL state shared with the writer)."""
    id: str
    image: Image.Image
    mask: np.ndarray                 # (H, W) uint8
    depth: np.ndarray                # (H, W) float32, m
    captions: dict[str, str]         # Granularity value -> caption
    alt_text: str | None
    objects: tuple[dict, ...]        # SceneObject.to_json() dicts


def read_split(root: str, split: Split | str, *, filesystem: pafs.FileSystem | None = None) -> Iterator[SceneRecord]:
    """Scenes of one split written by `write_parquet`, joined by id, in file order."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs = filesystem or pafs.LocalFileSystem()
    base = f"{root.rstrip('/')}/{Split(split).value}"
    tables = {}
    for kind in ("images", "ground_truth"):
        path = f"{base}/{kind}"
        if fs.get_file_info(path).type is not pafs.FileType.Directory:
            raise ValueError(f"synthetic split {Split(split).value!r}: missing directory {path!r} "
                             f"(expected the layout written by write_parquet)")
        tables[kind] = pq.read_table(path, filesystem=fs)
    truth = {row["id"]: row for row in tables["ground_truth"].to_pylist()}
    for row in tables["images"].to_pylist():
        if row["id"] not in truth:
            raise ValueError(f"image id {row['id']!r} in {base}/images has no ground-truth row in {base}/ground_truth")
        gt = truth[row["id"]]
        yield SceneRecord(
            id=row["id"],
            image=Image.open(io.BytesIO(row["image"])).convert("RGB"),
            mask=np.array(Image.open(io.BytesIO(gt["mask"]))),
            depth=decode_npy(gt["depth"]),
            captions={g.value: gt[caption_column(g)] for g in Granularity},
            alt_text=row["alt_text"],
            objects=tuple(json.loads(gt["objects"])),
        )


def scene_record(cfg: SyntheticConfig, split: Split | str, index: int) -> SceneRecord:
    """The same record `read_split` would return, rendered in memory (no files)."""
    scene = make_scene(cfg, split, index)
    image_row, _ = scene_rows(scene, split, index)
    return SceneRecord(id=image_row["id"], image=scene.image, mask=scene.mask, depth=scene.depth,
                       captions=dict(scene.captions), alt_text=scene.alt_text,
                       objects=tuple(o.to_json() for o in scene.objects))


def main_category(record: SceneRecord | Scene, label: Label = Label.SHAPE) -> str:
    """The largest visible object's class (its shape, or its colour under Label.COLOUR): the zero-shot
    classification label of a scene, one of `class_names(cfg)`."""
    objects = [o if isinstance(o, dict) else o.to_json() for o in record.objects]
    largest = sorted(objects, key=lambda o: (-o["visible_pixels"], o["layer"]))[0]
    return largest["colour"] if label == Label.COLOUR else largest["category"]

