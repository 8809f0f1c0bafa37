"""Reading and encoding the images and label masks that travel to and from the service.

Images are sent as the caller's own file bytes when given a path or bytes (no re-encoding:
the service applies EXIF orientation and converts modes itself); numpy arrays and Pillow
images are encoded losslessly as PNG. Masks are integer label maps (H, W) stored as 8-bit
PNG (16-bit when a label exceeds 255); palette PNGs are read as their indices, so label
values survive a round trip unchanged.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from jlad_client.viz import to_png

ImageInput: TypeAlias = str | os.PathLike[str] | bytes | NDArray[np.generic] | Image.Image
"""An image given as a file path, encoded file bytes, an (H, W[, C]) uint8 array, or a
Pillow image."""

MaskInput: TypeAlias = str | os.PathLike[str] | bytes | NDArray[np.generic] | Image.Image
"""A label mask given as a PNG path, PNG bytes, an (H, W) integer array, or a Pillow image."""


@dataclass(frozen=True)
class EncodedFile:
    """A file ready for a multipart upload (or base64 JSON)."""

    filename: str
    content: bytes
    content_type: str


def _content_type(content: bytes) -> str:
    if content.startswith(b"\x89PNG"):
        return "image/png"
    if content.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if content[:4] in (b"RIFF",) and content[8:12] == b"WEBP":
        return "image/webp"
    if content[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if content[:2] == b"BM":
        return "image/bmp"
    if content[:3] == b"GIF":
        return "image/gif"
    return "application/octet-stream"


def encode_image(image: ImageInput, name: str = "image") -> EncodedFile:
    """Bytes to upload for an image: a path's or bytes' content as it is, arrays and Pillow
    images as PNG."""
    if isinstance(image, bytes):
        return EncodedFile(f"{name}", image, _content_type(image))
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        content = path.read_bytes()
        return EncodedFile(path.name, content, _content_type(content))
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return EncodedFile(f"{name}.png", buffer.getvalue(), "image/png")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W[, C]), got {array.dtype}")
    return EncodedFile(f"{name}.png", to_png(array.astype(np.uint8, copy=False)), "image/png")


def mask_to_png(mask: NDArray[np.generic]) -> bytes:
    """Encode an (H, W) label map as a grayscale PNG (8-bit, or 16-bit above 255)."""
    labels = np.asarray(mask)
    if labels.ndim != 2:
        raise ValueError(f"a mask must have shape (H, W), got {labels.shape}")
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"a mask must hold integer labels, got dtype {labels.dtype}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 65535):
        raise ValueError("mask labels must lie in [0, 65535] to be stored as PNG")
    if labels.size and int(labels.max()) > 255:
        buffer = io.BytesIO()
        Image.fromarray(labels.astype(np.uint16)).save(buffer, format="PNG")
        return buffer.getvalue()
    return to_png(labels.astype(np.uint8))


def mask_from_image(image: Image.Image) -> NDArray[np.integer]:
    """(H, W) labels of a mask image: palette indices for `P`, values for grayscale,
    0/1 for bilevel; an RGB(A) mask must be gray (all channels equal)."""
    if image.mode == "P":
        return np.asarray(image, np.uint8)
    if image.mode == "1":
        return np.asarray(image, np.uint8)
    if image.mode in ("L", "I;16", "I;16B", "I;16L"):
        return np.asarray(image)
    if image.mode == "I":
        return np.asarray(image, np.int32)
    if image.mode == "LA":
        return np.asarray(image.getchannel("L"))
    rgb = np.asarray(image.convert("RGB"))
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return rgb[..., 0].copy()
    raise ValueError(
        f"a colour ({image.mode}) mask is ambiguous: save labels as a grayscale or palette PNG"
    )


def read_mask(mask: MaskInput) -> NDArray[np.integer]:
    """(H, W) integer labels from a path, PNG bytes, an array or a Pillow image."""
    if isinstance(mask, Image.Image):
        return mask_from_image(mask)
    if isinstance(mask, bytes):
        with Image.open(io.BytesIO(mask)) as image:
            return mask_from_image(image)
    if isinstance(mask, str | os.PathLike):
        with Image.open(mask) as image:
            return mask_from_image(image)
    labels = np.asarray(mask)
    if labels.dtype == np.bool_:
        return labels.astype(np.uint8)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"a mask array must be (H, W) integers, got {labels.shape} {labels.dtype}")
    integer_labels: NDArray[np.integer] = labels.astype(labels.dtype, copy=False)
    return integer_labels


def encode_mask(mask: MaskInput, name: str = "mask") -> EncodedFile:
    """PNG bytes to upload for a mask; PNG files are sent as they are."""
    if isinstance(mask, bytes) and mask.startswith(b"\x89PNG"):
        return EncodedFile(f"{name}.png", mask, "image/png")
    if isinstance(mask, str | os.PathLike) and Path(mask).suffix.lower() == ".png":
        return EncodedFile(Path(mask).name, Path(mask).read_bytes(), "image/png")
    return EncodedFile(f"{name}.png", mask_to_png(read_mask(mask)), "image/png")


def read_rgb(image: ImageInput) -> NDArray[np.uint8]:
    """(H, W, 3) uint8 RGB of an image input, EXIF orientation applied."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, bytes | str | os.PathLike):
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        with Image.open(source) as opened:
            return np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return np.ascontiguousarray(array[..., :3].astype(np.uint8, copy=False))


def image_size(image: ImageInput) -> tuple[int, int]:
    """(width, height) of an image input, after EXIF orientation."""
    rgb = read_rgb(image)
    return rgb.shape[1], rgb.shape[0]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_frames(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files of a folder in natural order (`frame2` before `frame10`)."""

    def natural_key(path: Path) -> list[object]:
        return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]

    files = [p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=natural_key)
