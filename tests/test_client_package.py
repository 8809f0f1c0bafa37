"""The client installs on its own (numpy, Pillow, httpx, tqdm only) and decodes answers.

The wheel test builds `client/` the way `pip install ./client` does and reads its metadata;
the import test runs the client in a fresh interpreter where torch, onnxruntime and the
service cannot be imported, proving client apps never pull them in.
"""

from __future__ import annotations

import base64
import email.parser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from jlad_client.images import (
    encode_image,
    encode_mask,
    list_frames,
    mask_to_png,
    read_mask,
)
from jlad_client.results import (
    decode_array,
    decode_mask_png,
    encode_array,
    parse_correspondence,
    parse_landmarks,
    parse_propagation,
)
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DEPS = {"numpy", "pillow", "httpx", "tqdm"}


def test_wheel_depends_on_the_light_stack_only(tmp_path: Path) -> None:
    source = tmp_path / "client"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(source),
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("jlad_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(meta_name).decode())
        entry_points = archive.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    requires = {
        r.split(">")[0].split("=")[0].split(";")[0].strip().lower()
        for r in metadata.get_all("Requires-Dist") or []
    }
    assert requires == CLIENT_DEPS
    assert metadata["Name"] == "jlad-client"
    assert "jlad = jlad_client.cli:main" in entry_points
    assert {n.split("/")[0] for n in names} == {
        "jlad_client",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    assert "jlad_client/py.typed" in names


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "onnxruntime", "service", "model_export", "fastapi"}:
            raise ImportError(f"client must not import {name}")
        return None
sys.meta_path.insert(0, Block())
import jlad_client, jlad_client.cli, jlad_client.sequence
from jlad_client import JladClient, AsyncJladClient, propagate_mask
assert jlad_client.cli.build_parser().parse_args(["models"]).command == "models"
print("ok")
"""


def test_client_imports_without_torch_onnxruntime_or_service() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT / "client"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_encoded_arrays_round_trip(dtype: str) -> None:
    array = np.random.default_rng(1).normal(size=(3, 4, 2)).astype(dtype)
    encoded = encode_array(array)
    assert encoded["shape"] == [3, 4, 2] and encoded["dtype"] == dtype
    np.testing.assert_array_equal(decode_array(encoded), array)


def test_decode_array_reads_little_endian_bytes() -> None:
    data = base64.b64encode(np.array([1.0, 2.0], "<f4").tobytes()).decode()
    out = decode_array({"shape": [2], "dtype": "float32", "data": data})
    np.testing.assert_array_equal(out, [1.0, 2.0])
    assert out.dtype == np.float32 and out.dtype.isnative
    with pytest.raises(ValueError):
        decode_array({"shape": [3], "dtype": "float32", "data": data})
    with pytest.raises(ValueError):
        decode_array({"shape": [2], "dtype": "float32", "data": "not base64!"})


def test_parse_correspondence_and_backward_field() -> None:
    flow = np.zeros((2, 3, 2), np.float32)
    flow[..., 0] = 1.5
    body = {
        "model": {"name": "objects", "version": "1"},
        "source_size": {"width": 3, "height": 2},
        "target_size": {"width": 3, "height": 2},
        "sampling": "target",
        "resolution": {"width": 3, "height": 2},
        "direction": "target->source",
        "flow": encode_array(flow),
        "confidence": encode_array(np.full((2, 3), 0.75, np.float32)),
        "matches": [{"source": [1, 1], "target": [2.5, 1], "confidence": 0.9}],
        "timings_ms": {"total_ms": 3.0},
    }
    result = parse_correspondence(body, "target")
    assert result.flow.shape == (2, 3, 2) and result.confidence.shape == (2, 3)
    assert result.matches[0].target == (2.5, 1.0)
    np.testing.assert_allclose(result.backward_field()[1, 2], [3.5, 1.0])
    body["direction"] = "source->target"
    with pytest.raises(ValueError):
        parse_correspondence(body).backward_field()


def test_parse_landmarks_orders_by_index() -> None:
    body = {
        "model": {"name": "faces", "version": "1"},
        "image_size": {"width": 80, "height": 80},
        "landmarks": [
            {"index": 1, "x": 30.0, "y": 40.0, "confidence": 0.5},
            {"index": 0, "x": 10.0, "y": 20.0, "confidence": 0.9},
        ],
        "timings_ms": {},
    }
    result = parse_landmarks(body)
    np.testing.assert_allclose(result.points, [[10, 20], [30, 40]])
    np.testing.assert_allclose(result.confidence, [0.9, 0.5])


def test_parse_propagation_keeps_labels() -> None:
    mask = np.zeros((4, 5), np.uint8)
    mask[1:3, 1:4] = 7
    body = {
        "model": {"name": "objects", "version": "1"},
        "source_size": {"width": 5, "height": 4},
        "masks": [
            {
                "index": 0,
                "size": {"width": 5, "height": 4},
                "mask": base64.b64encode(mask_to_png(mask)).decode(),
                "labels": [0, 7],
                "reliable_fraction": 0.8,
            },
        ],
        "timings_ms": {},
    }
    result = parse_propagation(body)
    np.testing.assert_array_equal(result.masks[0], mask)
    assert result.reliable_fraction == [0.8]


def test_masks_survive_png_round_trips(tmp_path: Path) -> None:
    wide = np.array([[0, 300], [65535, 2]], np.int32)
    np.testing.assert_array_equal(decode_mask_png(mask_to_png(wide)), wide)
    small = np.array([[0, 3], [255, 1]], np.uint8)
    np.testing.assert_array_equal(read_mask(mask_to_png(small)), small)
    # Palette PNGs are read as their indices (label values), not as colours.
    palette_path = tmp_path / "p.png"
    image = Image.fromarray(small, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [9] * (252 * 3))
    image.save(palette_path)
    np.testing.assert_array_equal(read_mask(palette_path), small)
    assert encode_mask(palette_path).content == palette_path.read_bytes()
    with pytest.raises(ValueError):
        mask_to_png(np.array([[-1, 0]], np.int32))
    colour = Image.fromarray(np.dstack([small, small * 0, small]), mode="RGB")
    with pytest.raises(ValueError):
        read_mask(colour)


def test_image_encoding_and_frame_order(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    encoded = encode_image(rgb, "x")
    assert encoded.content_type == "image/png" and encoded.filename == "x.png"
    for name in ["f10.png", "f2.png", "f1.jpg", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_frames(tmp_path)] == ["f1.jpg", "f2.png", "f10.png"]
    with pytest.raises(TypeError):
        encode_image(rgb.astype(np.float32))
