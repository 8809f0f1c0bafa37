"""Turning uploaded bytes into arrays the models take, safely.

Decoding enforces the pixel limit from the header before any pixel is decompressed (the
decompression-bomb guard), applies EXIF orientation, and converts every colour mode the
service accepts (1, L, P, RGB, RGBA, LA, PA, CMYK, YCbCr, 16-bit and float greyscale) to
8-bit RGB. Everything here is synchronous and CPU-bound: the routes call it on a worker
thread, never on the event loop. Bad input raises `Problem`s with their own kinds.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from service.problems import (
    CORRUPT_IMAGE,
    IMAGE_TOO_LARGE,
    IMAGE_TOO_SMALL,
    INVALID_MASK,
    UNSUPPORTED_IMAGE,
    VALIDATION_ERROR,
    Problem,
)

log = logging.getLogger(__name__)

RGB8 = NDArray[np.uint8]
CHW8 = NDArray[np.uint8]  # (3, H, W) or (N, 3, H, W) model pixels

# Errors Pillow raises while decoding damaged data (it is not consistent about which).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


# Leading bytes of the formats people upload, to tell "damaged JPEG" from "not an image".
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
}


def sniff_format(data: bytes) -> str | None:
    """The image format `data` claims to be by its first bytes, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((fmt for sig, fmt in _SIGNATURES.items() if data.startswith(sig)), None)


@dataclass(frozen=True)
class ImageLimits:
    """Size limits every decoded image must meet."""

    max_pixels: int
    min_side: int


@dataclass
class Mask:
    """A label mask: `labels` (H, W) uint8 or uint16; `palette` kept for 'P' masks."""

    labels: NDArray[Any]
    palette: list[int] | None = None


def decode_base64(text: str, field: str) -> bytes:
    """Bytes of a base64 string (standard alphabet, optional `data:...;base64,` prefix)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise Problem(
            VALIDATION_ERROR,
            f"field '{field}' is not valid base64 (standard alphabet, padded)",
            extra={"errors": [{"loc": [field], "msg": "invalid base64"}]},
        ) from None


def _open_checked(data: bytes, limits: ImageLimits, what: str) -> Image.Image:
    """Open `data` (header only), check its size against `limits`, then decode the pixels."""
    if not data:
        raise Problem(CORRUPT_IMAGE, f"{what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the guard; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise Problem(
            IMAGE_TOO_LARGE, f"{what} declares far more pixels than allowed (decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        claimed = sniff_format(data)
        if claimed is not None:
            raise Problem(
                CORRUPT_IMAGE, f"{what} starts like a {claimed} file but its header is damaged"
            ) from None
        raise Problem(
            UNSUPPORTED_IMAGE,
            f"{what} is not an image format the service can read (PNG, JPEG, WebP, TIFF, BMP, GIF)",
        ) from None
    except _DECODE_ERRORS as exc:
        raise Problem(CORRUPT_IMAGE, f"{what} has a damaged header: {exc}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise Problem(
            IMAGE_TOO_LARGE,
            f"{what} is {width}x{height} = {width * height} pixels; the limit is "
            f"{limits.max_pixels}",
            extra={"width": width, "height": height, "max_pixels": limits.max_pixels},
        )
    if min(width, height) < limits.min_side:
        raise Problem(
            IMAGE_TOO_SMALL,
            f"{what} is {width}x{height}; each side must be at least {limits.min_side} pixels",
        )
    try:
        image.load()
    except Image.DecompressionBombError:
        raise Problem(IMAGE_TOO_LARGE, f"{what} decompresses to too much data") from None
    except _DECODE_ERRORS as exc:
        raise Problem(CORRUPT_IMAGE, f"{what} cannot be decoded: {exc}") from None
    return _apply_exif_orientation(image)


_EXIF_ORIENTATION = 0x0112


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        # exif_transpose copies the whole image even when there is nothing to turn
        # (most uploads): look at the tag first.
        if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return image
        oriented = ImageOps.exif_transpose(image)
    except Exception:  # a damaged EXIF block should not cost the user the image
        log.warning("ignoring unreadable EXIF orientation", exc_info=True)
        return image
    return oriented if oriented is not None else image


def _grey_to_rgb(grey: NDArray[np.floating]) -> RGB8:
    grey8 = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey8[..., None], 3, axis=-1)


def _to_rgb8(image: Image.Image, what: str) -> RGB8:
    """(H, W, 3) uint8 RGB from any supported mode; alpha is composited over white."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit greyscale (PNG, TIFF): scale the full 0..65535 range to 0..255.
        return _grey_to_rgb(np.asarray(image, np.float64) / 257.0)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        return _grey_to_rgb(values * scale)
    try:
        if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        if mode == "RGB":  # convert() would copy it
            return np.asarray(image, np.uint8)
        return np.asarray(image.convert("RGB"), np.uint8)
    except ValueError:
        raise Problem(UNSUPPORTED_IMAGE, f"{what}: colour mode {mode} is not supported") from None


def decode_image(data: bytes, limits: ImageLimits, what: str = "image") -> RGB8:
    """Decode an uploaded image into (H, W, 3) uint8 RGB, upright per its EXIF orientation."""
    image = _open_checked(data, limits, what)
    return _to_rgb8(image, what)


def decode_mask(data: bytes, limits: ImageLimits, what: str = "mask") -> Mask:
    """Decode a label mask, keeping label values: (H, W) uint8 or uint16.

    Accepted: 1-bit, 8-bit greyscale, palette (indices are the labels, the palette is kept),
    16-bit greyscale, and RGB whose three channels are equal.
    """
    image = _open_checked(data, limits, what)
    mode = image.mode
    if mode == "P":
        palette = image.getpalette()
        return Mask(np.asarray(image, np.uint8).copy(), palette)
    if mode in {"1", "L"}:
        return Mask(np.asarray(image.convert("L"), np.uint8).copy())
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise Problem(INVALID_MASK, f"{what}: labels must lie in 0..65535")
        return Mask(values.astype(np.uint16))
    if mode == "RGB":
        rgb = np.asarray(image, np.uint8)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return Mask(rgb[..., 0].copy())
    raise Problem(
        INVALID_MASK,
        f"{what} has colour mode {mode}; a mask must hold one label per pixel (PNG in mode "
        "L, P, 1 or 16-bit greyscale)",
    )


def encode_mask_png(mask: Mask) -> bytes:
    """PNG bytes of a label mask, in the mode it came in (palette restored for 'P')."""
    image = Image.fromarray(np.ascontiguousarray(mask.labels))
    if mask.palette is not None and mask.labels.dtype == np.uint8:
        image.putpalette(mask.palette)  # turns the 'L' image into 'P'
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_model_pixels(rgb: RGB8, height: int, width: int, out: CHW8 | None = None) -> CHW8:
    """(3, height, width) uint8: `rgb` (H, W, 3) resized bilinearly, channels first; written
    into `out` when given (a slot of a request's batch: no stacking copy afterwards).

    The model sees the whole image squashed to its fixed input size; normalised coordinates
    then map back to the original image by its own width and height. The graphs take these
    values / 255 (`model_input`), which the inference engine computes for a whole batch:
    until then an image is a quarter of the bytes, and through the Redis queue it travels as
    it is (the API used to divide, and the queue to check the division was exact and undo
    it: a third of the API's CPU per request with the null model).
    """
    if rgb.shape[:2] != (height, width):
        image = Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)
        rgb = np.asarray(image)
    if out is None:
        out = np.empty((3, height, width), np.uint8)
    np.copyto(out, rgb.transpose(2, 0, 1))
    return out


def model_input(
    pixels: NDArray[np.uint8], out: NDArray[np.float32] | None = None
) -> NDArray[np.float32]:
    """What the graphs take (docs/CONTRACT.md): `pixels` / 255 as float32 in [0, 1], written
    into `out` when given; one pass, no float64 or channels-last float copy."""
    result: NDArray[np.float32] = np.divide(pixels, np.float32(255.0), out=out, dtype=np.float32)
    return result
