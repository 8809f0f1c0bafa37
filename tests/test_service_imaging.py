"""Decoding uploads: colour modes, orientation, limits, damaged files, masks."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.imaging import (
    ImageLimits,
    Mask,
    decode_base64,
    decode_image,
    decode_mask,
    encode_mask_png,
    model_input,
    to_model_pixels,
)
from service.problems import Problem
from tests.service_support import encode, png_declaring

LIMITS = ImageLimits(max_pixels=4_000_000, min_side=8)


def gradient(height: int = 40, width: int = 60) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 4, ys * 6, (xs + ys) * 2], axis=-1).astype(np.uint8)


def noise(height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def kind_of(exc: pytest.ExceptionInfo[Problem]) -> str:
    return exc.value.kind.slug


def test_rgb_png_round_trips_exactly() -> None:
    img = gradient()
    assert np.array_equal(decode_image(encode(img), LIMITS), img)


def test_greyscale_becomes_three_equal_channels() -> None:
    grey = gradient()[..., 0]
    out = decode_image(encode(grey), LIMITS)
    assert out.shape == (*grey.shape, 3)
    assert all(np.array_equal(out[..., c], grey) for c in range(3))


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits() -> None:
    values = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)
    out = decode_image(encode(values), LIMITS)
    expected = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    assert out.dtype == np.uint8
    assert np.array_equal(out[..., 0], expected)


def test_rgba_is_composited_over_white() -> None:
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :10, 3] = 255  # left half opaque red, right half transparent
    out = decode_image(encode(rgba), LIMITS)
    assert (out[:, :10] == [255, 0, 0]).all()
    assert (out[:, 10:] == [255, 255, 255]).all()


def test_palette_image_is_expanded() -> None:
    img = Image.fromarray(gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    out = decode_image(encode(np.asarray(img.convert("RGB"))), LIMITS)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    assert np.array_equal(decode_image(buffer.getvalue(), LIMITS), out)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk = Image.fromarray(gradient()).convert("CMYK")
    buffer = io.BytesIO()
    cmyk.save(buffer, format="JPEG", quality=95)
    out = decode_image(buffer.getvalue(), LIMITS)
    assert out.shape == (40, 60, 3)
    assert np.abs(out.astype(int) - gradient().astype(int)).mean() < 12


def test_exif_orientation_is_applied() -> None:
    img = gradient(20, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buffer.getvalue(), LIMITS)
    assert out.shape == (50, 20, 3)  # height and width swapped


def test_too_many_pixels_is_refused_before_decoding() -> None:
    with pytest.raises(Problem) as exc:
        decode_image(png_declaring(20000, 20000), LIMITS)
    assert kind_of(exc) == "image-too-large"
    assert exc.value.kind.status == 413


def test_decompression_bomb_is_refused() -> None:
    bomb = encode(np.zeros((3000, 3000), np.uint8))  # 9 Mpx in a few kB
    assert len(bomb) < 100_000
    with pytest.raises(Problem) as exc:
        decode_image(bomb, LIMITS)
    assert kind_of(exc) == "image-too-large"


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"", "corrupt-image"),
        (b"hello, this is text and not an image", "unsupported-image"),
        (encode(noise())[:2000], "corrupt-image"),
        (encode(noise(), "JPEG")[:2000], "corrupt-image"),
        (encode(np.zeros((1, 1, 3), np.uint8)), "image-too-small"),
        (encode(np.zeros((4, 400, 3), np.uint8)), "image-too-small"),
    ],
    ids=["empty", "text", "truncated-png", "truncated-jpeg", "1x1", "4px-high"],
)
def test_bad_bytes_raise_their_problem(payload: bytes, kind: str) -> None:
    with pytest.raises(Problem) as exc:
        decode_image(payload, LIMITS)
    assert kind_of(exc) == kind


def test_corrupt_png_data_is_a_corrupt_image() -> None:
    good = bytearray(encode(gradient()))
    idat = good.index(b"IDAT")
    good[idat + 10 : idat + 40] = b"\xff" * 30
    with pytest.raises(Problem) as exc:
        decode_image(bytes(good), LIMITS)
    assert kind_of(exc) == "corrupt-image"


def test_base64_accepts_data_urls_and_refuses_garbage() -> None:
    payload = b"\x89PNG some bytes"
    text = base64.b64encode(payload).decode()
    assert decode_base64(text, "image") == payload
    assert decode_base64("data:image/png;base64," + text, "image") == payload
    with pytest.raises(Problem) as exc:
        decode_base64("not base64 at all!", "image")
    assert kind_of(exc) == "validation-error"


def test_model_pixels_are_the_resized_image_channels_first() -> None:
    rgb = gradient()
    same_size = to_model_pixels(rgb, 40, 60)
    assert same_size.dtype == np.uint8 and same_size.shape == (3, 40, 60)
    assert np.array_equal(same_size, rgb.transpose(2, 0, 1))
    slot = np.zeros((2, 3, 32, 48), np.uint8)
    out = to_model_pixels(rgb, 32, 48, out=slot[1])
    assert out.base is slot and np.array_equal(slot[1], out) and not slot[0].any()
    resized = Image.fromarray(rgb).resize((48, 32), Image.Resampling.BILINEAR)
    assert np.array_equal(out, np.asarray(resized).transpose(2, 0, 1))


def test_model_input_is_pixels_over_255_in_float32() -> None:
    pixels = np.array([[[[0, 51, 255]]] * 3], np.uint8)  # (1, 3, 1, 3)
    out = model_input(pixels)
    assert out.dtype == np.float32 and out.shape == pixels.shape
    np.testing.assert_array_equal(out[0, :, 0], np.float32([[0.0, 0.2, 1.0]] * 3))
    # the same floats as the division in float64 rounded once
    rgb = noise()
    assert np.array_equal(model_input(rgb), (rgb / 255.0).astype(np.float32))


def test_masks_keep_label_values_in_every_mode() -> None:
    labels = np.zeros((30, 40), np.uint8)
    labels[5:15, 5:20] = 3
    labels[20:, 25:] = 200
    palette = Image.fromarray(labels, mode="L").convert("P")
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    from_palette = decode_mask(buffer.getvalue(), LIMITS)
    assert np.array_equal(from_palette.labels, labels)
    assert from_palette.palette is not None
    assert np.array_equal(decode_mask(encode(labels), LIMITS).labels, labels)
    wide = labels.astype(np.uint16) * 300
    assert np.array_equal(decode_mask(encode(wide), LIMITS).labels, wide)


def test_colour_mask_is_refused() -> None:
    with pytest.raises(Problem) as exc:
        decode_mask(encode(gradient()), LIMITS)
    assert kind_of(exc) == "invalid-mask"


def test_mask_png_round_trip_keeps_mode_and_palette() -> None:
    labels = np.array([[0, 1, 2], [7, 7, 0], [1, 2, 3]], np.uint8).repeat(4, 0).repeat(4, 1)
    palette = [v for i in range(256) for v in (i, i, 255 - i)]
    decoded = decode_mask(encode_mask_png(Mask(labels, palette)), LIMITS)
    assert np.array_equal(decoded.labels, labels)
    assert decoded.palette is not None and decoded.palette[:9] == palette[:9]
    wide = labels.astype(np.uint16) * 1000
    assert np.array_equal(decode_mask(encode_mask_png(Mask(wide)), LIMITS).labels, wide)
