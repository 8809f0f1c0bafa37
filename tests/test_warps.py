"""Synthetic pairs: the warp's ground truth must be exact."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from model_export.geometry import cell_centres, warp_by_mapping
from model_export.warps import (
    WarpConfig,
    apply_affine,
    fit_inside,
    invert_affine,
    make_synthetic_pair,
    random_affine,
    random_views,
    random_warp_field,
    tps_transform,
    view_pair_mapping,
    warp_feature_pair,
)

NO_WARP = WarpConfig(
    scale=0,
    rotation=0,
    shear=0,
    translation=0,
    tps_jitter=0,
    brightness=0,
    contrast=0,
    saturation=0,
)


def test_tps_interpolates_its_control_points() -> None:
    g = torch.Generator().manual_seed(0)
    control = torch.rand(2, 9, 2, generator=g) * 2 - 1
    displaced = control + 0.1 * torch.randn(2, 9, 2, generator=g)
    torch.testing.assert_close(
        tps_transform(control, control, displaced), displaced, atol=1e-4, rtol=1e-4
    )


def test_zero_strength_warp_is_identity() -> None:
    field = random_warp_field(2, 8, 12, NO_WARP)
    expected = cell_centres(8, 12)[None].expand(2, -1, -1, -1)
    torch.testing.assert_close(field, expected, atol=1e-5, rtol=0)


def test_pair_ground_truth_reads_the_right_pixels() -> None:
    g = torch.Generator().manual_seed(1)
    # a smooth image, so bilinear reads agree closely
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    img = torch.stack([xs, ys, xs * ys])[None].repeat(3, 1, 1, 1)
    cfg = WarpConfig(brightness=0, contrast=0, saturation=0)
    pair = make_synthetic_pair(img, (8, 8), cfg, g)
    assert pair.source.shape == img.shape and pair.mapping.shape == (3, 2, 8, 8)
    # the source pixel q shows the target at field(q)
    again = F.grid_sample(pair.target, pair.field, align_corners=False)
    inside = (pair.field.abs() < 0.95).all(-1)[:, None].expand_as(again)
    torch.testing.assert_close(again[inside], pair.source[inside])
    assert 0.5 < float(pair.valid.mean()) <= 1.0
    assert float((pair.mapping - cell_centres(8, 8).permute(2, 0, 1)).abs().mean()) > 0.01


def test_feature_pair_keeps_unit_norm_and_known_mapping() -> None:
    f = F.normalize(torch.randn(2, 16, 8, 8), dim=1)
    pair = warp_feature_pair(f, WarpConfig(), torch.Generator().manual_seed(2))
    norms = pair.source.norm(dim=1)
    assert bool(((norms - 1).abs() < 1e-3)[pair.valid[:, 0] > 0].all())
    assert pair.mapping.shape == (2, 2, 8, 8)


def _smooth_images(batch: int, size: int = 64) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([xs, ys, xs * ys])[None].repeat(batch, 1, 1, 1)


def test_invert_affine_known_answer_and_round_trip() -> None:
    # x' = 2x + 1, y' = 3y - 1  ->  x = (x' - 1) / 2, y = (y' + 1) / 3
    a = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 3.0, -1.0]]])
    expected = torch.tensor([[[0.5, 0.0, -0.5], [0.0, 1 / 3, 1 / 3]]])
    torch.testing.assert_close(invert_affine(a), expected)
    b = random_affine(4, WarpConfig(), torch.Generator().manual_seed(3))
    pts = torch.rand(4, 5, 2) * 2 - 1
    torch.testing.assert_close(apply_affine(invert_affine(b), apply_affine(b, pts)), pts)


def test_moving_target_pair_ground_truth_reads_the_right_pixels() -> None:
    cfg = WarpConfig(brightness=0, contrast=0, saturation=0, warp_target=True, translation=0.3)
    img = _smooth_images(3)
    pair = make_synthetic_pair(img, (64, 64), cfg, torch.Generator().manual_seed(4))
    assert not torch.equal(pair.target, img)  # the target moved too
    again = warp_by_mapping(pair.target, pair.mapping)
    inside = (pair.valid > 0) & (pair.mapping.abs() < 0.95).all(1, keepdim=True)
    err = (again - pair.source).abs()[inside.expand_as(again)]
    assert float(err.mean()) < 0.01
    assert 0.3 < float(pair.valid.mean()) < 1.0


def test_views_start_with_the_image_and_their_pair_mapping_is_exact() -> None:
    cfg = WarpConfig(
        scale=0.5, rotation=0.5, translation=0.3, brightness=0, contrast=0, saturation=0
    )
    img = _smooth_images(2)
    views, affines = random_views(img, 3, cfg, torch.Generator().manual_seed(5))
    assert views.shape == (2, 3, 3, 64, 64) and affines.shape == (2, 3, 2, 3)
    torch.testing.assert_close(views[:, 0], img)
    for s, t in ((1, 2), (2, 0), (0, 1)):
        mapping, valid = view_pair_mapping(affines[:, s], affines[:, t], (64, 64))
        assert mapping.shape == (2, 2, 64, 64) and valid.shape == (2, 1, 64, 64)
        again = warp_by_mapping(views[:, t], mapping)
        inside = (valid > 0) & (mapping.abs() < 0.95).all(1, keepdim=True)
        assert float(inside.float().mean()) > 0.1
        err = (again - views[:, s]).abs()[inside.expand_as(again)]
        assert float(err.mean()) < 0.01
    same, valid = view_pair_mapping(affines[:, 1], affines[:, 1], (8, 8))
    torch.testing.assert_close(
        same, cell_centres(8, 8).permute(2, 0, 1)[None].expand(2, -1, -1, -1)
    )


def test_inside_views_are_crops_of_the_image() -> None:
    cfg = WarpConfig(scale=0.6, rotation=0.52, shear=0.1, translation=0.3, inside=True)
    affine = fit_inside(random_affine(64, cfg, torch.Generator().manual_seed(6)))
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    landed = apply_affine(affine, corners.expand(64, 4, 2))
    assert float(landed.abs().max()) <= 1.0 + 1e-5  # every view pixel shows the image
    zoom = torch.linalg.det(affine[:, :, :2]).abs().sqrt()
    assert float(zoom.max()) <= 1.0 + 1e-5 and float(zoom.min()) < 0.7  # crops, some tight
    assert float(affine[:, :, 2].abs().max()) > 0.05  # and off-centre
    # Without `inside` the same draws leave empty borders in most views.
    free = random_affine(64, cfg, torch.Generator().manual_seed(6))
    assert (
        float(
            (apply_affine(free, corners.expand(64, 4, 2)).abs() > 1).any(-1).any(-1).float().mean()
        )
        > 0.5
    )
    img = _smooth_images(2) + 0.1
    views, _ = random_views(
        img,
        3,
        replace(cfg, brightness=0, contrast=0, saturation=0),
        torch.Generator().manual_seed(7),
    )
    assert float(views.amin(dim=(2, 3, 4)).min()) > 0.05  # no black (zero-padded) pixels
