"""Reading and decoding one ingest work item (an image file or a tar shard) in a Ray task: bytes in, rows out.

A row is valid (id, image bytes, format, size, alt-text, sha256) or an error (reason, detail); `key` orders
rows as the source does (shard order << TAR_MEMBER_BITS | member order), so that dedup keeps the first.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import posixpath
import tarfile
import warnings
from typing import Any, Iterator

from pipelines import storage
from tipsv2.data.schema import image_id

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
SIDECAR_SUFFIXES = (".txt", ".json")
ALT_TEXT_KEYS = ("alt_text", "caption", "text")
TAR_MEMBER_BITS = 24  # sort key = shard order << 24 | member order (up to 16M samples per shard)


class Reason(str, enum.Enum):
    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    DECOMPRESSION_BOMB = "decompression_bomb"
    UNSUPPORTED_MODE = "unsupported_mode"
    UNREADABLE = "unreadable"


# Modes that convert to RGB without silently clipping values (16-bit and float images would).
RGB_CONVERTIBLE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "La", "CMYK", "YCbCr")


class BadImage(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decoded:
    format: str
    width: int   # pixels
    height: int  # pixels


def decode_image(data: bytes, *, max_pixels: int, allowed_modes: tuple[str, ...]) -> Decoded:
    """Verify, fully load and convert to RGB; raise BadImage(reason, detail) on any failure."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage(Reason.EMPTY_FILE, "0 bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height, fmt, mode = im.width, im.height, im.format, im.mode
                if width * height > max_pixels:
                    raise BadImage(Reason.DECOMPRESSION_BOMB,
                                   f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
                im.verify()
            if mode not in allowed_modes:
                raise BadImage(Reason.UNSUPPORTED_MODE, f"mode {mode!r} not in allowed_modes {list(allowed_modes)}")
            with Image.open(io.BytesIO(data)) as im:
                im.seek(0)  # first frame of animations
                im.load()
                rgb = im.convert("RGB")
                rgb.getpixel((0, 0))
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise BadImage(Reason.DECOMPRESSION_BOMB, str(err)) from None
        except UnidentifiedImageError as err:
            raise BadImage(Reason.NOT_AN_IMAGE, str(err)) from None
        except (OSError, SyntaxError, EOFError) as err:
            raise BadImage(Reason.TRUNCATED, f"{type(err).__name__}: {err}") from None
        except ValueError as err:
            raise BadImage(Reason.UNSUPPORTED_MODE, f"mode {mode!r}: {err}") from None
    return Decoded(format=str(fmt), width=int(width), height=int(height))


# ---------------------------------------------------------------- one work item -> rows

def _alt_text_from_sidecar(name: str, data: bytes) -> str | None:
    text = data.decode("utf-8", errors="replace")
    if name.lower().endswith(".json"):
        obj = json.loads(text)
        for key in ALT_TEXT_KEYS:
            if isinstance(obj, dict) and isinstance(obj.get(key), str):
                return obj[key].strip()
        return None
    return text.strip() or None


def _tar_samples(data: bytes) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(member name, image bytes, alt-text) for each image in a webdataset-style tar shard, in order."""
    groups: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            key = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
            group = groups.setdefault(key, {"image": None, "alt": None, "name": None})
            payload = tar.extractfile(member).read()
            if base.lower().endswith(IMAGE_SUFFIXES) and group["name"] is None:
                group["image"], group["name"] = payload, member.name
            elif base.lower().endswith(SIDECAR_SUFFIXES):
                group["alt"] = _alt_text_from_sidecar(base, payload)
    for group in groups.values():
        if group["name"] is not None:
            yield group["name"], group["image"], group["alt"]


class Decoder:
    """flat_map function: one work item (a file or a tar shard) -> rows, valid or error."""

    def __init__(self, *, max_pixels: int, allowed_modes: tuple[str, ...]):
        self.max_pixels, self.allowed_modes = max_pixels, allowed_modes

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            data = storage.read_bytes(item["source"])
        except Exception as err:  # a missing object, a permission or network error: record, go on
            return [self._error(item["source"], item["order"] << TAR_MEMBER_BITS, Reason.UNREADABLE,
                                f"{type(err).__name__}: {err}")]
        if not item["tar"]:
            alt = item["alt_text"]
            if item["sidecar"]:
                alt = self._read_sidecar(item["sidecar"], alt)
            return [self._row(item["source"], item["order"] << TAR_MEMBER_BITS, data, alt)]
        try:
            samples = list(_tar_samples(data))
        except (tarfile.TarError, EOFError, OSError) as err:
            return [self._error(item["source"], item["order"] << TAR_MEMBER_BITS, Reason.UNREADABLE,
                                f"bad tar shard: {type(err).__name__}: {err}")]
        return [self._row(f"{item['source']}#{name}", (item["order"] << TAR_MEMBER_BITS) + i, payload, alt)
                for i, (name, payload, alt) in enumerate(samples)]

    @staticmethod
    def _read_sidecar(uri: str, fallback: str | None) -> str | None:
        try:
            return _alt_text_from_sidecar(uri, storage.read_bytes(uri))
        except (OSError, ValueError):
            return fallback

    def _row(self, source: str, key: int, data: bytes, alt: str | None) -> dict[str, Any]:
        try:
            decoded = decode_image(data, max_pixels=self.max_pixels, allowed_modes=self.allowed_modes)
        except BadImage as bad:
            return self._error(source, key, bad.reason, bad.detail)
        sha = hashlib.sha256(data).hexdigest()
        return {"id": image_id(sha), "image": data, "format": decoded.format, "width": decoded.width,
                "height": decoded.height, "alt_text": alt, "source": source, "sha256": sha, "key": key,
                "nbytes": len(data), "reason": "", "detail": ""}

    @staticmethod
    def _error(source: str, key: int, reason: Reason, detail: str) -> dict[str, Any]:
        return {"id": None, "image": b"", "format": "", "width": 0, "height": 0, "alt_text": None,
                "source": source, "sha256": "", "key": key, "nbytes": 0, "reason": reason.value,
                "detail": detail}
