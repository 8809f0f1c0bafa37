"""Synthetic training pairs: random affine + thin-plate-spline warps with colour jitter.

A pair is (source, target, mapping, valid): `target` is the original image, `source` is the
target resampled through a random backward warp G, so that source pixel q shows target point
G(q). The true correspondence field source -> target is therefore G itself, given exactly,
in the normalised convention of docs/CONTRACT.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from model_export.geometry import cell_centres


@dataclass(frozen=True)
class WarpConfig:
    """Strength of the random warps (normalised units) and of the colour jitter."""

    scale: float = 0.15  # log-uniform zoom range
    rotation: float = 0.25  # radians
    shear: float = 0.1
    translation: float = 0.15
    tps_jitter: float = 0.08  # control-point displacement
    tps_grid: int = 3
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    flip: bool = False
    # Also move the target: a random affine (zoom, rotation, shear, translation; no flip, no
    # TPS so that it inverts exactly) of the image, so that neither image of a pair is the
    # canonical framing: both are off-centre, zoomed or cut in turn.
    warp_target: bool = False
    # Views only (`random_affine_view`): every view pixel shows image content, i.e. the view
    # is a rotated crop of the image (zoom <= 1, shrunk and shifted until its corners are
    # inside). Views with empty borders let W_D follow the view's frame instead of the object:
    # points placed relative to the content's edges move exactly with any warp (eq. 7 is
    # satisfied) and sit at one fixed template on real pictures, which have no such edges.
    inside: bool = False


def random_affine(batch: int, cfg: WarpConfig, generator: torch.Generator | None = None) -> Tensor:
    """(B, 2, 3) random affine maps of normalised coordinates, centred on identity."""

    def uniform(lo: float, hi: float) -> Tensor:
        return torch.rand(batch, generator=generator) * (hi - lo) + lo

    zoom = torch.exp(uniform(-cfg.scale, cfg.scale))
    angle = uniform(-cfg.rotation, cfg.rotation)
    shear = uniform(-cfg.shear, cfg.shear)
    tx, ty = uniform(-cfg.translation, cfg.translation), uniform(-cfg.translation, cfg.translation)
    cos, sin = torch.cos(angle), torch.sin(angle)
    a = torch.stack(
        [
            torch.stack([cos * zoom, -sin * zoom + shear, tx], -1),
            torch.stack([sin * zoom, cos * zoom, ty], -1),
        ],
        dim=1,
    )
    if cfg.flip:
        flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
        a[:, :, 0] = a[:, :, 0] * flip[:, None]
    return a


def fit_inside(affine: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Shrink and shift (B, 2, 3) maps of view -> image coordinates so that the whole view
    [-1, 1]^2 lands inside the image: the linear part is scaled down until the corners'
    extent is at most 1, and the translation is drawn uniformly from what then fits (the
    maps' own translations are replaced)."""
    b = affine.shape[0]
    corners = affine.new_tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]])
    linear = affine[:, :, :2]
    extent = (corners @ linear.transpose(1, 2)).abs().amax(dim=1)  # (B, 2): half-size in x, y
    shrink = extent.amax(dim=1).clamp_min(1.0)
    linear = linear / shrink[:, None, None]
    room = (1.0 - extent / shrink[:, None]).clamp_min(0.0)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1).to(affine) * room
    return torch.cat([linear, shift[:, :, None]], dim=2)


def _tps_kernel(d2: Tensor) -> Tensor:
    # U(r) = r^2 log r^2, with U(0) = 0.
    return d2 * torch.log(d2.clamp_min(1e-12))


def tps_transform(points: Tensor, control: Tensor, displaced: Tensor) -> Tensor:
    """Thin-plate spline through `control` -> `displaced`, evaluated at `points`.

    points (B, N, 2); control, displaced (B, M, 2). Returns (B, N, 2).
    """
    b, m, _ = control.shape
    kernel = _tps_kernel((control[:, :, None] - control[:, None]).pow(2).sum(-1))
    ones = control.new_ones(b, m, 1)
    p = torch.cat([ones, control], -1)  # (B, M, 3)
    system = control.new_zeros(b, m + 3, m + 3)
    system[:, :m, :m] = kernel
    system[:, :m, m:] = p
    system[:, m:, :m] = p.transpose(1, 2)
    rhs = torch.cat([displaced, control.new_zeros(b, 3, 2)], 1)
    coeffs = torch.linalg.solve(system, rhs)  # (B, M + 3, 2)
    u = _tps_kernel((points[:, :, None] - control[:, None]).pow(2).sum(-1))  # (B, N, M)
    affine = torch.cat([points.new_ones(b, points.shape[1], 1), points], -1)
    return u @ coeffs[:, :m] + affine @ coeffs[:, m:]


def invert_affine(affine: Tensor) -> Tensor:
    """(B, 2, 3) affine maps -> their inverses, (B, 2, 3)."""
    linear = torch.linalg.inv(affine[:, :, :2])
    return torch.cat([linear, -(linear @ affine[:, :, 2:])], dim=2)


def apply_affine(affine: Tensor, points: Tensor) -> Tensor:
    """Apply (B, 2, 3) affine maps to points (B, ..., 2)."""
    b = points.shape[0]
    flat = points.reshape(b, -1, 2)
    moved = flat @ affine[:, :, :2].transpose(1, 2) + affine[:, None, :, 2]
    return moved.reshape(points.shape)


def random_warp_field(
    batch: int, height: int, width: int, cfg: WarpConfig, generator: torch.Generator | None = None
) -> Tensor:
    """(B, H, W, 2) random backward field G: normalised (x, y) each pixel reads from."""
    grid = cell_centres(height, width).reshape(1, -1, 2).expand(batch, -1, -1)
    affine = random_affine(batch, cfg, generator)
    n = cfg.tps_grid
    lin = torch.linspace(-0.8, 0.8, n)
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    control = torch.stack([gx, gy], -1).reshape(1, -1, 2).expand(batch, -1, -1)
    jitter = (torch.rand(batch, n * n, 2, generator=generator) * 2 - 1) * cfg.tps_jitter
    bent = tps_transform(grid, control, control + jitter)
    warped = bent @ affine[:, :, :2].transpose(1, 2) + affine[:, None, :, 2]
    return warped.reshape(batch, height, width, 2)


def colour_jitter(
    image: Tensor, cfg: WarpConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Random brightness, contrast and saturation of (B, 3, H, W) images in [0, 1]."""
    b = image.shape[0]

    def factor(strength: float) -> Tensor:
        return 1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * strength

    out = image * factor(cfg.brightness)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factor(cfg.contrast) + mean
    grey = out.mean(dim=1, keepdim=True)
    out = (out - grey) * factor(cfg.saturation) + grey
    return out.clamp(0, 1)


def downsample_field(field: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """Average a per-pixel field (B, H, W, 2) over cells -> (B, 2, h, w)."""
    return F.adaptive_avg_pool2d(field.permute(0, 3, 1, 2), grid_size)


@dataclass
class SyntheticPair:
    """A synthetic pair and its exact ground truth.

    source, target (B, 3, H, W); field (B, H, W, 2) per source pixel; `mapping` (B, 2, h, w)
    and `valid` (B, 1, h, w) per source cell of the model's grid.
    """

    source: Tensor
    target: Tensor
    field: Tensor
    mapping: Tensor
    valid: Tensor


def make_synthetic_pair(
    target: Tensor,
    grid_size: tuple[int, int],
    cfg: WarpConfig | None = None,
    generator: torch.Generator | None = None,
) -> SyntheticPair:
    """Warp a batch of images (B, 3, H, W) in [0, 1] into a pair with its true field."""
    cfg = cfg or WarpConfig()
    b, _, h, w = target.shape
    field = random_warp_field(b, h, w, cfg, generator)
    source = F.grid_sample(
        target, field, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    source = colour_jitter(source, cfg, generator)
    inside_image = (field.abs() < 1).all(dim=-1, keepdim=True).permute(0, 3, 1, 2)
    if cfg.warp_target:
        # target pixel p shows image point A(p); source pixel q shows G(q), which the target
        # shows at A^-1(G(q)): exact, since A is affine.
        target, affine = random_affine_view(target, cfg, generator)
        field = apply_affine(invert_affine(affine), field)
    mapping = downsample_field(field, grid_size)
    # Valid: the source cell shows image content and its match lies inside the target.
    shows_image = F.adaptive_avg_pool2d(inside_image.to(target.dtype), grid_size) > 0.5
    valid = ((mapping.abs() < 1).all(dim=1, keepdim=True) & shows_image).to(target.dtype)
    return SyntheticPair(source, target, field, mapping, valid)


def warp_feature_pair(
    features: Tensor, cfg: WarpConfig | None = None, generator: torch.Generator | None = None
) -> SyntheticPair:
    """The same synthetic warp applied to cached backbone feature maps (B, C, h, w) rather
    than images: a cheap stand-in for CPU pre-training (features of a warped image are only
    approximately warped features). `source`/`target` hold features here."""
    cfg = cfg or WarpConfig()
    b, _, h, w = features.shape
    field = random_warp_field(b, h, w, cfg, generator)
    source = F.grid_sample(
        features, field, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    source = source / (source.norm(dim=1, keepdim=True) + 1e-6)
    mapping = field.permute(0, 3, 1, 2)
    valid = (mapping.abs() < 1).all(dim=1, keepdim=True).to(features.dtype)
    return SyntheticPair(source, features, field, mapping, valid)


def random_affine_view(
    images: Tensor, cfg: WarpConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """A random affine view of each image (B, 3, H, W), colour-jittered, and its map (B, 2, 3):
    view pixel p shows image point A(p) (no flip and no TPS, so that A inverts exactly).
    With `cfg.inside` the view is a crop of the image (`fit_inside`)."""
    b, _, h, w = images.shape
    affine = random_affine(b, replace(cfg, flip=False), generator)
    if cfg.inside:
        affine = fit_inside(affine, generator)
    grid = cell_centres(h, w, like=images).expand(b, h, w, 2)
    view = F.grid_sample(
        images, apply_affine(affine, grid), padding_mode="zeros", align_corners=False
    )
    return colour_jitter(view, cfg, generator), affine


def random_views(
    images: Tensor, views: int, cfg: WarpConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """`views` random affine views of each image, (B, V, 3, H, W), with their maps (B, V, 2, 3)
    (view pixel p shows image point A(p)). View 0 is the image itself (identity map).

    Views of one image make synthetic pairs with an exact mapping (`view_pair_mapping`), so
    their frozen-backbone features can be computed once and reused for any pair of them: the
    CPU training's stand-in for warping images on the fly.
    """
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(len(images), 1, 2, 3)
    affines = [identity]
    out = [images[:, None]]
    for _ in range(views - 1):
        view, affine = random_affine_view(images, cfg, generator)
        out.append(view[:, None])
        affines.append(affine[:, None])
    return torch.cat(out, dim=1), torch.cat(affines, dim=1)


def view_pair_mapping(
    source_affine: Tensor, target_affine: Tensor, grid_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """The exact source -> target mapping (B, 2, h, w) between two views of the same images
    (maps (B, 2, 3) as `random_views` returns them) and its validity (B, 1, h, w): the source
    cell shows image content and its match lies inside the target view."""
    h, w = grid_size
    b = source_affine.shape[0]
    cells = cell_centres(h, w, like=source_affine).expand(b, h, w, 2)
    in_image = apply_affine(source_affine, cells)
    mapping = apply_affine(invert_affine(target_affine), in_image).permute(0, 3, 1, 2)
    inside = (in_image.abs() < 1).all(dim=-1)[:, None] & (mapping.abs() < 1).all(
        dim=1, keepdim=True
    )
    return mapping, inside.to(mapping.dtype)
