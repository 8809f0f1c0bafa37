"""Contracts of the coarse-to-fine landmark pass (model_export/zoom.py): shapes, known
answers, gradients, and the model's `detect_landmarks` with and without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_export.geometry import cell_centres
from model_export.landmarks import mirror_average, mirror_pairs, soft_argmax
from model_export.model import JLAD, ModelConfig
from model_export.zoom import (
    ZOOM_MAX_HALF,
    ZOOM_MIN_HALF,
    crop_window,
    heatmaps_to_frame,
    points_to_frame,
    zoom_window,
)

torch.set_num_threads(2)


def test_zoom_window_is_the_scaled_bounding_box_square() -> None:
    points = torch.tensor([[[-0.5, -0.2], [0.1, 0.4], [-0.3, 0.0]]])
    centre, half = zoom_window(points, 1.5)
    torch.testing.assert_close(centre, torch.tensor([[-0.2, 0.1]]))
    # the longer side is 0.6 (both are): half-side 0.3, times 1.5
    torch.testing.assert_close(half, torch.tensor([0.45]))


def test_zoom_window_is_clamped_to_a_sensible_magnification() -> None:
    together = torch.zeros(1, 4, 2)
    spread = torch.tensor([[[-1.0, -1.0], [1.0, 1.0]]])
    assert float(zoom_window(together, 2.0)[1]) == ZOOM_MIN_HALF
    assert float(zoom_window(spread, 2.0)[1]) == ZOOM_MAX_HALF


def test_crop_of_the_whole_frame_is_the_image() -> None:
    images = torch.rand(2, 3, 8, 12)
    crops = crop_window(images, torch.zeros(2, 2), torch.ones(2))
    torch.testing.assert_close(crops, images)


def test_crop_of_a_ramp_is_the_ramp_of_the_window() -> None:
    h, w = 16, 16
    ramp = cell_centres(h, w)[..., 0][None, None]  # the value is the normalised x
    centre, half = torch.tensor([[0.25, -0.1]]), torch.tensor([0.5])
    crop = crop_window(ramp, centre, half)
    expected = 0.25 + 0.5 * cell_centres(h, w)[..., 0]
    torch.testing.assert_close(crop[0, 0], expected, atol=1e-5, rtol=0)


def test_points_come_back_to_where_the_crop_saw_them() -> None:
    # a bright pixel at a known frame position: in the crop it sits at (p - c) / half
    p = torch.tensor([[[0.3, -0.2]]])
    centre, half = torch.tensor([[0.2, -0.1]]), torch.tensor([0.4])
    in_crop = (p - centre[:, None]) / half[:, None, None]
    torch.testing.assert_close(points_to_frame(in_crop, centre, half), p)


def test_heatmaps_to_frame_keep_the_mass_and_the_soft_argmax() -> None:
    gh, gw = 16, 16
    centre, half = torch.tensor([[0.1, -0.2]]), torch.tensor([0.5])
    # a smooth blob in the window's coordinates (wide enough to be sampled on both grids)
    grid = cell_centres(gh, gw)
    target = torch.tensor([0.2, -0.3])
    blob = torch.exp(-((grid - target) ** 2).sum(-1) / (2 * 0.2**2))
    window = (blob / blob.sum())[None, None]
    frame = heatmaps_to_frame(window, centre, half, (gh, gw))
    assert frame.shape == (1, 1, gh, gw)
    torch.testing.assert_close(frame.sum(dim=(-2, -1)), torch.ones(1, 1))
    expected = points_to_frame(soft_argmax(window), centre, half)
    torch.testing.assert_close(soft_argmax(frame), expected, atol=0.02, rtol=0)


def test_crop_and_points_carry_gradients_to_the_window() -> None:
    images = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    centre = torch.tensor([[0.1, -0.05]], dtype=torch.float64, requires_grad=True)
    half = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, s: crop_window(images, c, s), (centre, half))
    points = torch.rand(1, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c, s: points_to_frame(points, c, s), (centre, half))


def _model(zoom: float) -> JLAD:
    torch.manual_seed(0)
    config = ModelConfig(
        input_size=(64, 64), feature_dim=16, head_width=16, num_landmarks=4, landmark_zoom=zoom
    )
    return JLAD(config, pretrained=False).eval()


def test_detect_landmarks_without_zoom_is_one_pass() -> None:
    model = _model(0.0)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f = model.features(images)
        one, served = model.landmarks(f), model.detect_landmarks(images, f)
    for key in ("heatmaps", "points", "confidence"):
        torch.testing.assert_close(served[key], one[key])


@pytest.mark.parametrize("zoom", [1.2, 2.0])
def test_detect_landmarks_with_zoom_is_the_second_pass_on_the_crop(zoom: float) -> None:
    model = _model(zoom)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f = model.features(images)
        served = model.detect_landmarks(images, f)
        first = model.landmarks(f)["points"]
        centre, half = zoom_window(first, zoom)
        crop_points = model.landmarks(model.features(crop_window(images, centre, half)))
    h, w = model.grid_size
    assert served["heatmaps"].shape == (2, 4, h, w) and served["points"].shape == (2, 4, 2)
    torch.testing.assert_close(served["heatmaps"].sum(dim=(-2, -1)), torch.ones(2, 4))
    torch.testing.assert_close(
        served["points"], points_to_frame(crop_points["points"], centre, half)
    )
    torch.testing.assert_close(served["confidence"], crop_points["confidence"])
    assert ModelConfig.from_dict(model.config.to_dict()).landmark_zoom == zoom


def test_mirror_average_known_answer() -> None:
    """Landmark k is averaged with landmark pairs[k] of the mirror run, mirrored back
    (x -> -x); heatmaps are flipped back and still sum to one."""
    points = torch.tensor([[[-0.5, 0.1], [0.4, 0.2], [0.0, -0.3]]])
    mirrored_points = torch.tensor([[[0.3, 0.2], [0.6, 0.1], [0.2, -0.3]]])
    heat = torch.softmax(torch.randn(1, 3, 5 * 5), -1).reshape(1, 3, 5, 5)
    heat_m = torch.softmax(torch.randn(1, 3, 5 * 5), -1).reshape(1, 3, 5, 5)
    out = mirror_average(
        {"heatmaps": heat, "points": points, "confidence": torch.tensor([[0.2, 0.4, 0.6]])},
        {
            "heatmaps": heat_m,
            "points": mirrored_points,
            "confidence": torch.tensor([[1.0, 0.0, 0.5]]),
        },
        [1, 0, 2],
    )
    expected = torch.tensor([[[-0.55, 0.1], [0.05, 0.2], [-0.1, -0.3]]])
    torch.testing.assert_close(out["points"], expected)
    torch.testing.assert_close(out["confidence"], torch.tensor([[0.1, 0.7, 0.55]]))
    torch.testing.assert_close(out["heatmaps"][0, 0], (heat[0, 0] + heat_m[0, 1].flip(-1)) / 2)
    torch.testing.assert_close(out["heatmaps"].sum(dim=(-2, -1)), torch.ones(1, 3))


def test_mirror_pairs_recovers_a_known_pairing() -> None:
    """Points whose mirror run is a known shuffle (plus noise) give back that shuffle."""
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(50, 6, 2, generator=gen) * 2 - 1
    pairs = [3, 2, 1, 0, 5, 4]
    inverse = [pairs.index(j) for j in range(6)]
    mirrored = points[:, inverse] * torch.tensor([-1.0, 1.0])
    mirrored = mirrored + 0.02 * torch.randn(mirrored.shape, generator=gen)
    found, distance = mirror_pairs(points, mirrored)
    assert found == pairs
    assert distance.shape == (6,) and bool((distance < 0.05).all())


def test_mirrored_landmarks_follow_a_mirrored_image() -> None:
    """With `landmark_mirror` (an involution) the served landmarks are mirror-equivariant by
    construction: those of the mirror image are the image's, mirrored and re-paired, whatever
    the weights. Without it a random W_D is not."""
    images = torch.rand(2, 3, 64, 64)
    pairs = (1, 0, 3, 2)
    for mirror, equivariant in [(pairs, True), (None, False)]:
        model = _model(0.0)
        model.config.landmark_mirror = mirror
        with torch.no_grad():
            out = model.detect_landmarks(images, model.features(images))
            flipped = images.flip(-1)
            out_m = model.detect_landmarks(flipped, model.features(flipped))
        back = out_m["points"][:, list(pairs)] * torch.tensor([-1.0, 1.0])
        assert torch.allclose(back, out["points"], atol=1e-5) == equivariant


def test_landmark_mirror_must_pair_every_landmark() -> None:
    with pytest.raises(ValueError, match="permutation"):
        ModelConfig(num_landmarks=3, landmark_mirror=(0, 0, 1))
    config = ModelConfig(num_landmarks=3, landmark_mirror=(2, 1, 0))
    assert ModelConfig.from_dict(config.to_dict()).landmark_mirror == (2, 1, 0)
    assert config.landmarks_read_image and not ModelConfig().landmarks_read_image


def test_mirror_pairs_cli_writes_a_pairing_the_checkpoint_then_serves(tmp_path: Path) -> None:
    """`python -m model_export.mirror_pairs --write` on a checkpoint and a folder of images
    stores a permutation of the K landmarks in config.json; the checkpoint then loads with
    it and serves mirror-averaged landmarks."""
    from PIL import Image
    from skimage import data as skdata

    from model_export.checkpoint import load_model, save_checkpoint
    from model_export.mirror_pairs import main

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.png")
    model = _model(1.3)
    save_checkpoint(tmp_path / "ckpt", model, {"seed": 0})
    main(
        ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(folder), "--images", "3", "--write"]
    )
    served, _ = load_model(tmp_path / "ckpt", pretrained_backbone=False)
    pairs = served.config.landmark_mirror
    assert pairs is not None and sorted(pairs) == [0, 1, 2, 3]
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = served.detect_landmarks(images, served.features(images))
    assert out["points"].shape == (1, 4, 2) and bool(out["points"].abs().le(1).all())
