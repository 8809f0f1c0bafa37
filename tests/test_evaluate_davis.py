"""`evaluate davis`: known answers on synthetic alignments and a tiny DAVIS-format tree.

The tree's frames are one picture repeated with one annotation, so the identity baseline
(frame 0's mask copied) is exactly right; the model's own figures are only bounded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from jlad_client.coords import pixels_to_normalised
from jlad_client.warp import identity_grid
from PIL import Image

from model_export.checkpoint import save_checkpoint
from model_export.evaluate import main
from model_export.evaluation.davis import PROPAGATING, pearson, propagate_both
from model_export.model import JLAD, ModelConfig

SEQUENCES = ("blob-a", "blob-b")


def write_davis(root: Path, frames: int = 3, size: tuple[int, int] = (48, 64)) -> None:
    """A DAVIS-2016-format tree: per sequence `frames` copies of one smooth texture (JPEG)
    and of one 0/255 annotation (PNG)."""
    height, width = size
    for n, name in enumerate(SEQUENCES):
        coarse = np.random.default_rng(n).integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        mask = np.zeros((height, width), np.uint8)
        mask[10:34, 12 + 8 * n : 40 + 8 * n] = 255
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True, exist_ok=True)
        for i in range(frames):
            image.save(root / "JPEGImages" / "480p" / name / f"{i:05d}.jpg", quality=95)
            Image.fromarray(mask).save(root / "Annotations" / "480p" / name / f"{i:05d}.png")


def test_pearson_known_answers() -> None:
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # a constant reliability says nothing


def _identity_alignment(h: int, w: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The align head's outputs for "every cell matches itself" on an h x w grid."""
    mapping = pixels_to_normalised(identity_grid(h, w), (h, w)).transpose(2, 0, 1)
    return mapping.astype(np.float32), np.full((h, w), confidence, np.float32)


def test_identity_alignments_carry_the_annotation_unchanged() -> None:
    annotation = np.zeros((24, 40), np.uint8)
    annotation[5:15, 8:30] = 255
    steps = [_identity_alignment(6, 10, 0.9)] * 3
    results = propagate_both(annotation, steps, steps, annotation.shape)
    assert set(results) == {"anchor", "chain", "identity"}
    for mode, (masks, reliabilities) in results.items():
        assert len(masks) == 3, mode
        for mask in masks:
            np.testing.assert_array_equal(mask, annotation)
        assert reliabilities == [1.0, 1.0, 1.0], mode
    # Unsure matches (0.3 < 0.5): anchor mode reports no reliable pixel and drops the
    # annotation's boundary ring (8 x 20 left); chain mode's first step is that same warp,
    # its second erodes the ring again (6 x 18), and agrees with the direct warp by 108 / 160.
    unsure = [_identity_alignment(6, 10, 0.3)] * 2
    results = propagate_both(annotation, unsure, unsure, annotation.shape)
    assert results["anchor"][1] == [0.0, 0.0]
    assert [np.count_nonzero(m) for m in results["anchor"][0]] == [8 * 20, 8 * 20]
    assert [np.count_nonzero(m) for m in results["chain"][0]] == [8 * 20, 6 * 18]
    assert results["chain"][1] == [1.0, pytest.approx(108 / 160)]


def test_colour_modes_snap_a_shifted_boundary_back_onto_the_object() -> None:
    """Frames of a red object on blue, the alignment off by one cell to the right: the
    plain modes carry the shift, the `_colour` modes put the boundary back on the colour
    edge (within the one-cell band)."""
    annotation = np.zeros((24, 40), np.uint8)
    annotation[:, :20] = 1
    frame = np.zeros((24, 40, 3), np.uint8)
    frame[:, :20] = (210, 20, 20)
    frame[:, 20:] = (20, 30, 200)
    mapping, confidence = _identity_alignment(6, 10, 0.9)
    mapping[0] -= 2 / 10  # every cell matched one cell (4 px) to its left
    steps = [(mapping, confidence)] * 2
    results = propagate_both(annotation, steps, steps, annotation.shape, frames=[frame] * 3)
    assert set(results) == {"anchor", "chain", "anchor_colour", "chain_colour", "identity"}
    for mode in ("anchor", "chain"):
        assert all(m[:, 20:24].all() for m in results[mode][0]), mode  # shifted right
    for mode in ("anchor_colour", "chain_colour"):
        for mask in results[mode][0]:
            np.testing.assert_array_equal(mask != 0, annotation != 0)
    assert results["anchor_colour"][1] == results["anchor"][1]


@pytest.fixture(scope="module")
def davis_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`data/davis2016-sample` and `checkpoints/objects` (untrained 64 x 64 model, real
    backbone weights)."""
    root = tmp_path_factory.mktemp("davis")
    write_davis(root / "data" / "davis2016-sample")
    torch.manual_seed(0)
    save_checkpoint(
        root / "checkpoints" / "objects",
        JLAD(ModelConfig(input_size=(64, 64))),
        {"description": "test"},
    )
    return root


def test_evaluate_davis_end_to_end(davis_tree: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    out, docs = tmp_path / "eval", tmp_path / "docs"
    reports = main(
        [
            "davis",
            "--checkpoints",
            str(davis_tree / "checkpoints"),
            "--data",
            str(davis_tree / "data"),  # the folder holding davis2016-sample/
            "--out",
            str(out),
            "--figures",
            "2",
        ]
    )
    report = json.loads((out / "davis.json").read_text())
    assert report["methods"]["chain"]["J"] == reports["davis"]["methods"]["chain"]["J"]
    assert sorted(report["sequences"]) == list(SEQUENCES)
    assert report["methods"]["identity"]["J"] == 1.0  # the annotation never moves
    for name in SEQUENCES:
        record = report["sequences"][name]
        assert record["frames"] == 3
        assert record["identity"]["per_frame_J"] == [1.0, 1.0]
        for mode in PROPAGATING:
            assert len(record[mode]["per_frame_J"]) == 2
            assert all(0 <= v <= 1 for v in record[mode]["per_frame_J"])
            assert all(0 <= v <= 1 for v in record[mode]["per_frame_reliability"])
        # Frame 1's previous frame is the annotated one: chain and anchor give the same mask.
        assert record["chain"]["per_frame_J"][0] == record["anchor"]["per_frame_J"][0]
        assert (out / "davis" / f"davis_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert not docs.exists()
