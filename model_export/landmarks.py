"""W_D: the landmark detection network.

Self-similarity volume (eq. 1) -> K heatmaps (softmax over space) -> soft-argmax points.
Choice (MODEL.md allows replacing choices): besides the self-similarity volume, which
describes local shape, W_D also sees the cell's own (adapted) feature vector, so that it can
tell apart parts of similar local shape (two eyes vs. two wheels); `use_features=False`
gives the paper's pure self-similarity input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from model_export.geometry import cell_centres
from model_export.similarity import l2_normalise, self_similarity


def spatial_softmax(logits: Tensor) -> Tensor:
    """Softmax over the spatial axes of (B, K, h, w): each map sums to one."""
    b, k, h, w = logits.shape
    return torch.softmax(logits.reshape(b, k, h * w), dim=-1).reshape(b, k, h, w)


def _grid_size(heatmaps: Tensor, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    # Modules pass their grid size as Python ints so that the exported graph holds constant
    # coordinate grids instead of float casts of traced shapes (which the fp16 converter
    # mistypes). The input resolution is fixed per export anyway; the batch axis stays free.
    if grid_size is not None:
        return grid_size
    h, w = heatmaps.shape[-2:]
    return int(h), int(w)


def soft_argmax(heatmaps: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
    """Expected normalised (x, y) of each heatmap: (B, K, h, w) -> (B, K, 2)."""
    h, w = _grid_size(heatmaps, grid_size)
    grid = cell_centres(h, w, like=heatmaps).reshape(h * w, 2)
    # A MatMul rather than einsum("bkhw,hwc->bkc"): ONNX Runtime's CPU Einsum transposes.
    return torch.matmul(heatmaps.flatten(2), grid)


def peak_mass(
    heatmaps: Tensor,
    points: Tensor,
    radius_cells: float = 1.5,
    grid_size: tuple[int, int] | None = None,
) -> Tensor:
    """Confidence of each landmark: the heatmap mass within `radius_cells` cells of its
    soft-argmax point, in [0, 1]. A peaked map scores near one, a spread one near zero.

    heatmaps (B, K, h, w), points (B, K, 2) -> (B, K).
    """
    h, w = _grid_size(heatmaps, grid_size)
    grid = cell_centres(h, w, like=heatmaps)
    dx = (grid[..., 0][None, None] - points[..., 0, None, None]) * (w / 2)
    dy = (grid[..., 1][None, None] - points[..., 1, None, None]) * (h / 2)
    # where() rather than a bool->float cast: the fp16 converter mistypes such casts.
    near = torch.where(dx * dx + dy * dy <= radius_cells**2, heatmaps, torch.zeros_like(heatmaps))
    return near.sum(dim=(-2, -1)).clamp(0.0, 1.0)


class LandmarkDetector(nn.Module):
    """W_D: features (B, C, h, w) -> heatmaps (B, K, h, w), points (B, K, 2), confidence (B, K)."""

    def __init__(
        self,
        feature_channels: int,
        num_landmarks: int = 10,
        radius: int = 3,
        width: int = 128,
        use_features: bool = True,
        reduce: bool = False,
        selfsim_dim: int = 0,
        sharpness: float = 1.0,
    ) -> None:
        super().__init__()
        if sharpness <= 0:
            raise ValueError(f"heatmap sharpness must be > 0, got {sharpness}")
        self.radius = radius
        self.sharpness = sharpness
        self.use_features = use_features
        # `selfsim_dim`: eq. 1's self-similarity on a learned projection of the features to
        # this many channels (0: on the features themselves). Its (2r+1)^2 shifted products
        # over all C channels were most of W_D's training time (forward and backward).
        self.selfsim_project: nn.Module | None = None
        if selfsim_dim:
            self.selfsim_project = nn.Conv2d(feature_channels, selfsim_dim, 1, bias=False)
        cin = (2 * radius + 1) ** 2 + (feature_channels if use_features else 0)
        # `reduce`: a 1x1 convolution to `width` channels first. The 3x3 convolution over the
        # (2r+1)^2 + C input channels cost ~9x as much and made W_D dearer than the trunk.
        first = nn.Conv2d(cin, width, 1) if reduce else nn.Conv2d(cin, width, 3, padding=1)
        self.body = nn.Sequential(
            first,
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=4, dilation=4),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(width, num_landmarks, 1)
        self.num_landmarks = num_landmarks

    def _first_layer(self, volume: Tensor, features: Tensor) -> Tensor:
        """The body's first convolution of the volume concatenated with the features (when
        `use_features`), written as the sum of its two halves: the concatenation would make
        an int8 graph dequantize the features and quantize them again (4.7 of the int8
        landmark graph's 17 ms at batch 8)."""
        first = self.body[0]
        assert isinstance(first, nn.Conv2d)
        n = (2 * self.radius + 1) ** 2  # a Python int: the export folds the weight slices
        out = F.conv2d(volume, first.weight[:, :n], first.bias, padding=first.padding)
        if self.use_features:
            out = out + F.conv2d(features, first.weight[:, n:], padding=first.padding)
        return out

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        shape = features
        if self.selfsim_project is not None:
            shape = l2_normalise(self.selfsim_project(features))
        volume = self_similarity(shape.permute(0, 2, 3, 1), self.radius)
        logits = self.head(self.body[1:](self._first_layer(volume, features)))
        if not self.training and self.sharpness != 1.0:
            # Inference only: eq. 4 at a small weight (configs say why) leaves broad maps,
            # whose mean is pulled towards the object's middle; training keeps the maps the
            # losses were written for.
            logits = logits * self.sharpness
        heatmaps = spatial_softmax(logits)
        points = soft_argmax(heatmaps)
        return {"heatmaps": heatmaps, "points": points, "confidence": peak_mass(heatmaps, points)}


def mirror_average(
    out: dict[str, Tensor], mirrored: dict[str, Tensor], pairs: Sequence[int]
) -> dict[str, Tensor]:
    """W_D's output on images averaged with its output on their left-right mirrors.

    `pairs[k]` is landmark k's counterpart: landmark `pairs[k]` of the mirror image sits
    where landmark k of the image does, mirrored (x -> -x in normalised coordinates, whose
    pixel centres are symmetric about 0). Points and confidences are the means of the two
    estimates; heatmaps the mean of the maps (the mirrored ones flipped back), so each still
    sums to one. Why: the two runs see different pixels under the same cells and their
    errors partly cancel (a test-time augmentation the exported graph holds)."""
    order = torch.as_tensor(list(pairs), device=out["points"].device)
    sign = out["points"].new_tensor([-1.0, 1.0])
    return {
        "heatmaps": (out["heatmaps"] + mirrored["heatmaps"][:, order].flip(-1)) / 2,
        "points": (out["points"] + mirrored["points"][:, order] * sign) / 2,
        "confidence": (out["confidence"] + mirrored["confidence"][:, order]) / 2,
    }


def mirror_pairs(points: Tensor, mirrored_points: Tensor) -> tuple[list[int], Tensor]:
    """The counterpart of each landmark (for `mirror_average`) from W_D's points on N images
    (N, K, 2) and on their mirrors (N, K, 2, as W_D placed them on the mirror images): the
    assignment k -> j that minimises the summed mean distance between landmark k and the
    mirrored-back landmark j (Hungarian algorithm), and each pair's mean distance (K,)."""
    back = mirrored_points * points.new_tensor([-1.0, 1.0])
    distance = (points[:, :, None, :] - back[:, None, :, :]).norm(dim=-1).mean(dim=0)  # (K, K)
    rows, cols = linear_sum_assignment(distance.double().numpy())
    pairs = [int(c) for _, c in sorted(zip(rows, cols, strict=True))]
    return pairs, distance[torch.arange(len(pairs)), torch.as_tensor(pairs)]
