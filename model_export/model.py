"""The joint model: features once per image, both heads on top.

image (B, 3, H, W) in [0, 1]
  -> backbone W_F (ImageNet trunk, frozen or     backbone_features (B, C0, h, w)
                  its upper blocks trained)
  -> adapter (trainable part of W_F)             features (B, C, h, w), unit length
  -> W_D: landmarks(features)                    heatmaps, points, confidence
  -> W_A, W_C: align(source, target features)   mapping, log_sigma, confidence
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.alignment import SemanticAligner
from model_export.backbones import IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite, build_backbone
from model_export.landmarks import LandmarkDetector, mirror_average
from model_export.similarity import l2_normalise
from model_export.zoom import crop_window, heatmaps_to_frame, points_to_frame, zoom_window


@dataclass
class ModelConfig:
    """Everything that fixes the architecture (saved with every checkpoint)."""

    backbone: str = "efficientnet_lite0"
    hypercolumn: bool = True
    input_size: tuple[int, int] = (256, 256)
    feature_dim: int = 128
    num_landmarks: int = 10
    selfsim_radius: int = 3
    landmark_uses_features: bool = True
    head_width: int = 128
    backbone_weights: str | None = None
    # Neighbourhood consensus on the cross-similarity before W_A (similarity.py).
    consensus: bool = True
    # Rounds of filter + mutual step in that consensus (similarity.neighbourhood_consensus).
    consensus_rounds: int = 1
    # The neighbourhood motion prior on the base field (alignment.SemanticAligner): window
    # in cells (0: off, odd) and the Gaussian's sigma in cells. Holds no weights.
    motion_prior_kernel: int = 0
    motion_prior_sigma: float = 0.75
    # The backbone blocks forming the hypercolumn (None: the backbone's default taps). A
    # stride-4 first tap (Lite0 block 2) doubles the grid's resolution.
    taps: tuple[int, ...] | None = None
    # Cost knobs (defaults = the first committed models): the adapter's residual MLP, the
    # width of W_A/W_C (0: head_width) and a 1x1 reduction before W_D's 3x3 convolutions.
    adapter_refine: bool = True
    align_width: int = 0
    landmark_reduce: bool = False
    selfsim_dim: int = 0  # W_D's self-similarity on a learned projection (0: the features)
    # W_D's heatmaps at inference are softmax(a * logits) (a = this; training always uses 1):
    # a > 1 moves each soft-argmax from the map's mean towards its mode. Holds no weights,
    # so it can be set on a trained checkpoint (README, "objects" landmarks).
    heatmap_sharpness: float = 1.0
    # Coarse-to-fine landmarks at inference (zoom.py): 0 = one W_D pass; f > 0 = a second
    # pass on a crop around the first pass's points, f x their bounding box. Holds no
    # weights, so it can be set on a trained checkpoint (README, "faces" landmarks).
    landmark_zoom: float = 0.0
    # Mirror test-time augmentation of the last landmark pass (landmarks.mirror_average): W_D
    # also runs on the left-right mirror of its input, and landmark k is averaged with
    # landmark `landmark_mirror[k]` of the mirror image, mirrored back (k's left-right
    # counterpart: the pairing is a property of the trained W_D, found on training images by
    # `python -m model_export.mirror_pairs`). None = off. Holds no weights.
    landmark_mirror: tuple[int, ...] | None = None
    # Train the backbone blocks after the first hypercolumn tap (EfficientNet-Lite only), as
    # the paper updates W_F. They are stored in the checkpoint; the blocks up to the first
    # tap stay frozen (ImageNet), and training caches that tap's output instead of the
    # hypercolumn. Their BatchNorm statistics stay frozen too.
    train_upper_backbone: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "input_size" in known:
            known["input_size"] = tuple(known["input_size"])
        for key in ("taps", "landmark_mirror"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)

    def __post_init__(self) -> None:
        mirror = self.landmark_mirror
        if mirror is not None and sorted(mirror) != list(range(self.num_landmarks)):
            raise ValueError(
                f"landmark_mirror must be a permutation of 0..{self.num_landmarks - 1}, "
                f"got {list(mirror)}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["input_size"] = list(self.input_size)
        for key in ("taps", "landmark_mirror"):
            value = getattr(self, key)
            out[key] = list(value) if value is not None else None
        return out

    @property
    def landmarks_read_image(self) -> bool:
        """Whether the served landmarks need the image besides its features: a zoomed
        second pass crops it, a mirror pass flips it."""
        return bool(self.landmark_zoom) or self.landmark_mirror is not None


class FeatureAdapter(nn.Module):
    """Trainable part of W_F: a gain per backbone depth, a 1x1 projection and a
    zero-initialised residual MLP.

    The gains (log scale, start at 0) let training decide how much each depth of a
    hypercolumn counts in the cosine similarity. The projection starts as the identity when
    `cout == cin` and orthogonal otherwise (cosine similarities roughly preserved), so the
    untrained model matches like the frozen backbone does.
    """

    def __init__(
        self, cin: int, cout: int, groups: tuple[int, ...] | None = None, refine: bool = True
    ) -> None:
        super().__init__()
        groups = groups or (cin,)
        if sum(groups) != cin:
            raise ValueError(f"channel groups {groups} do not add up to {cin}")
        self.log_gains = nn.Parameter(torch.zeros(len(groups)))
        # (groups, cin) one-hot: gains -> per-channel scale as a matrix product (exports
        # as MatMul, unlike repeat_interleave).
        membership = torch.zeros(len(groups), cin)
        start = 0
        for g, size in enumerate(groups):
            membership[g, start : start + size] = 1.0
            start += size
        self.register_buffer("membership", membership, persistent=False)
        self.project = nn.Conv2d(cin, cout, 1, bias=False)
        if cin == cout:
            nn.init.eye_(self.project.weight[:, :, 0, 0])
        else:
            nn.init.orthogonal_(self.project.weight)
        # Without `refine` the adapter is a per-depth gain and one linear projection: the
        # residual MLP cost about as much as the trunk (2 x C^2 per cell at stride 8).
        self.refine: nn.Module | None = None
        if refine:
            mlp = nn.Sequential(
                nn.Conv2d(cout, cout, 1), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 1)
            )
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)
            self.refine = mlp

    def gains(self) -> Tensor:
        """The weight of each depth, (groups,)."""
        return self.log_gains.exp()

    def channel_scale(self) -> Tensor:
        """Each input channel's depth gain, (1, cin, 1, 1)."""
        return (self.gains() @ self.membership).view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(x * self.channel_scale())
        if self.refine is not None:
            y = y + self.refine(y)
        return l2_normalise(y)

    @property
    def scale_invariant(self) -> bool:
        """Whether forward(c * x) == forward(x) for every positive per-cell factor c (up to
        the eps of the final normalisation): true without the residual MLP, whose biases
        and ReLU are not homogeneous."""
        return self.refine is None

    def folded_forward(self, x: Tensor) -> Tensor:
        """`forward` with the per-depth gains folded into the projection's weights: one
        1x1 convolution and the normalisation, no pass over the input for the scale (the
        exported graph then holds the folded weights as one constant)."""
        if not self.scale_invariant:
            raise ValueError("the residual MLP is not folded; call forward")
        return l2_normalise(F.conv2d(x, self.project.weight * self.channel_scale()))


class JLAD(nn.Module):
    """Joint semantic alignment and landmark detection (Jeon et al., ICCV 2019)."""

    def __init__(self, config: ModelConfig, *, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(
            config.backbone,
            weights=config.backbone_weights,
            pretrained=pretrained,
            hypercolumn=config.hypercolumn,
            taps=config.taps,
        )
        self.backbone.requires_grad_(False)
        self._trained_backbone: tuple[str, ...] = ()
        if config.train_upper_backbone:
            if not isinstance(self.backbone, EfficientNetLite):
                raise ValueError("train_upper_backbone needs an EfficientNet-Lite backbone")
            self._trained_backbone = tuple(
                "backbone." + p for p in self.backbone.upper_parameter_prefixes()
            )
            for name, parameter in self.named_parameters():
                if name.startswith(self._trained_backbone):
                    parameter.requires_grad_(True)
        h, w = config.input_size
        if h % 32 or w % 32:
            raise ValueError(f"input size {h}x{w} must be a multiple of 32")
        self.grid_size = (h // self.backbone.stride, w // self.backbone.stride)
        self.adapter = FeatureAdapter(
            self.backbone.out_channels,
            config.feature_dim,
            self.backbone.channel_groups,
            refine=config.adapter_refine,
        )
        self.detector = LandmarkDetector(
            config.feature_dim,
            config.num_landmarks,
            config.selfsim_radius,
            config.head_width,
            config.landmark_uses_features,
            reduce=config.landmark_reduce,
            selfsim_dim=config.selfsim_dim,
            sharpness=config.heatmap_sharpness,
        )
        self.aligner = SemanticAligner(
            self.grid_size,
            config.align_width or config.head_width,
            consensus=config.consensus,
            consensus_rounds=config.consensus_rounds,
            motion_prior_kernel=config.motion_prior_kernel,
            motion_prior_sigma=config.motion_prior_sigma,
        )
        # Frozen from the start: a module is built in training mode, and BatchNorm would
        # otherwise use batch statistics (and drift its running ones) in the first
        # forward passes, e.g. when training caches the backbone's features.
        self.backbone.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> JLAD:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm keeps its ImageNet statistics
        return self

    def imagenet_normalised(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> the trunk's input (ImageNet mean and std)."""
        return (image - self.mean) / self.std

    def backbone_features(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> frozen backbone features (B, C0, h, w), unit length."""
        return l2_normalise(self.backbone(self.imagenet_normalised(image)))

    def adapt(self, backbone_features: Tensor) -> Tensor:
        """Backbone features (B, C0, h, w) -> the model's features (B, C, h, w)."""
        return self.adapter(backbone_features)

    def cacheable_features(self, image: Tensor) -> Tensor:
        """What training may compute once per image and cache: the frozen part's output.

        The backbone features, or with `train_upper_backbone` the first tap's output.
        """
        if not self._trained_backbone:
            return self.backbone_features(image)
        assert isinstance(self.backbone, EfficientNetLite)
        return self.backbone.lower(self.imagenet_normalised(image))

    def features_from_cache(self, cached: Tensor) -> Tensor:
        """`cacheable_features` output -> the model's features (B, C, h, w)."""
        if not self._trained_backbone:
            return self.adapt(cached)
        assert isinstance(self.backbone, EfficientNetLite)
        return self.adapt(l2_normalise(self.backbone.upper(cached)))

    def features(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> features (B, C, h, w), each cell unit length:
        `adapt(backbone_features(image))`, the values training caches and adapts.

        Computed in fewer passes when the adapter is scale invariant (no residual MLP): what
        follows the backbone's normalisation is then a positive per-cell factor away from
        the adapter's own (a linear projection, then l2_normalise), so that normalisation is
        skipped and the gains are folded into the projection (`FeatureAdapter.
        folded_forward`). The same values to the normalisations' eps (~1e-6); three passes
        fewer over the hypercolumn, ~2.3 ms of a 40-70 ms batch of 8 in ONNX Runtime (2-core
        Xeon, fp32 and int8).
        """
        if not self.adapter.scale_invariant:
            return self.adapt(self.backbone_features(image))
        return self.adapter.folded_forward(self.backbone(self.imagenet_normalised(image)))

    def landmarks(self, features: Tensor) -> dict[str, Tensor]:
        """W_D: heatmaps (B, K, h, w), points (B, K, 2) normalised (x, y), confidence (B, K)."""
        return dict(self.detector(features))

    def detect_landmarks(self, image: Tensor, features: Tensor) -> dict[str, Tensor]:
        """The served landmarks of images (B, 3, H, W) whose `features` are given: W_D on
        them, then with `landmark_zoom` W_D again on the crop around those points, mapped
        back to the frame (zoom.py); with `landmark_mirror` the last pass is averaged with
        its run on the mirrored input. Same keys as `landmarks`; `confidence` is the last
        pass's (peak mass within 1.5 of its own cells)."""
        first = self.landmarks(features)
        if not self.config.landmark_zoom:
            return self._mirror_averaged(first, image)
        crop, centre, half = self.landmark_window(image, first["points"])
        second = self._mirror_averaged(self.landmarks(self.features(crop)), crop)
        return {
            "heatmaps": heatmaps_to_frame(second["heatmaps"], centre, half, self.grid_size),
            "points": points_to_frame(second["points"], centre, half),
            "confidence": second["confidence"],
        }

    def last_landmark_input(self, image: Tensor) -> Tensor:
        """What the last landmark pass of `detect_landmarks` runs W_D on: the image, or with
        `landmark_zoom` the crop around the first pass's points."""
        if not self.config.landmark_zoom:
            return image
        return self.landmark_window(image, self.landmarks(self.features(image))["points"])[0]

    def _mirror_averaged(self, out: dict[str, Tensor], image: Tensor) -> dict[str, Tensor]:
        """`out` (W_D on `image`) averaged with W_D on the image's mirror, when
        `landmark_mirror` is set."""
        if self.config.landmark_mirror is None:
            return out
        mirrored = self.landmarks(self.features(image.flip(-1)))
        return mirror_average(out, mirrored, self.config.landmark_mirror)

    def landmark_window(self, image: Tensor, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What the second landmark pass sees: the crop of `landmark_zoom` x the bounding box
        of `points` (B, K, 2), resampled to the input size, with its window (centre (B, 2),
        half-side (B,); zoom.py)."""
        centre, half = zoom_window(points, self.config.landmark_zoom)
        return crop_window(image, centre, half), centre, half

    def align(self, source: Tensor, target: Tensor) -> dict[str, Tensor]:
        """W_A, W_C: mapping (B, 2, h, w), log_sigma (B, 1, h, w), confidence (B, 1, h, w)."""
        return dict(self.aligner(source, target))

    def trainable_state(self) -> dict[str, Tensor]:
        """The parameters a checkpoint stores: everything but the frozen backbone (the
        trained upper blocks included)."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not k.startswith("backbone.") or k.startswith(self._trained_backbone)
        }
