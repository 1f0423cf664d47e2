"""CIFAR networks used by the structured-pruning papers (32x32 inputs, 10 classes by default).

* ResNet-20/32/44/56/110 - He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016, Sec. 4.2: a 3x3 stem with 16 channels, three stages of n BasicBlocks with
  16/32/64 channels (depth = 6n + 2), global average pooling and one linear layer.
  The shortcut that changes width uses "option A" by default (parameter-free: subsample by 2
  and zero-pad the new channels, as in the paper's CIFAR experiments); ``shortcut='B'`` uses a
  1x1 conv + BN projection instead; ``resnet20b`` ... ``resnet110b`` are those models by name
  (for `prunelib train/run/sweep --model`; their baselines and results are files of their own).
* VGG-16/19 with BatchNorm - Simonyan & Zisserman, ICLR 2015, in the CIFAR form of Liu et al.,
  "Learning Efficient Convolutional Networks through Network Slimming", ICCV 2017: 3x3
  conv-BN-ReLU layers, five 2x2 max-pools (32x32 -> 1x1), then a single linear classifier.
* MobileNetV2 - Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
  CVPR 2018, with a CIFAR stem: the first conv and the first stride-2 stage use stride 1, so
  the 32x32 input reaches 4x4 before the 1280-channel head.

All models are torch.fx symbolically traceable (no data-dependent Python control flow).

Size for one 32x32 image (MACs = multiply-accumulates of conv and linear layers; BN, ReLU,
pooling and additions not counted), measured with forward hooks:

| model       | params    | MACs      |
|-------------|-----------|-----------|
| resnet20    | 0.270 M   |  40.6 M   |
| resnet32    | 0.464 M   |  68.9 M   |
| resnet44    | 0.659 M   |  97.2 M   |
| resnet56    | 0.853 M   | 125.5 M   |
| resnet110   | 1.728 M   | 252.9 M   |
| resnet20b   | 0.272 M   |  40.8 M   |
| resnet32b   | 0.467 M   |  69.1 M   |
| resnet44b   | 0.661 M   |  97.4 M   |
| resnet56b   | 0.856 M   | 125.7 M   |
| resnet110b  | 1.731 M   | 253.1 M   |
| vgg16       | 14.724 M  | 313.2 M   |
| vgg19       | 20.035 M  | 398.1 M   |
| mobilenetv2 | 2.237 M   |  88.0 M   |

(The ResNet-56 paper figures are 0.85 M parameters and 125 M MACs.)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ChannelPad", "CifarResNet", "VGG", "MobileNetV2", "get_model", "MODELS",
           "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16", "vgg19",
           "mobilenetv2"]


def _kaiming_init(model: nn.Module) -> None:
    """He (fan-out) init for convs, N(0, 0.01) for linears, BN gamma 1 / beta 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------
# ResNet for CIFAR
# ------------------------------------------------------------------------------------------
class ChannelPad(nn.Module):
    """Zero-pad the channel dim (dim 1) of an NCHW tensor: ``left`` channels before, ``right``
    after. No parameters.

    `prunelib.channel_groups` treats the padded positions as channels of their own (prunable,
    unlike a literal ``F.pad``), and `remove_channels` lowers ``left`` / ``right`` when they are
    removed.
    """

    def __init__(self, left: int, right: int) -> None:
        super().__init__()
        self.left, self.right = int(left), int(right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, self.left, self.right))

    def extra_repr(self) -> str:
        return f"left={self.left}, right={self.right}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or width-changing) shortcut, ReLU after the add.

    ``shortcut='A'``: when stride or width changes, the shortcut is ``x[:, :, ::2, ::2]``
    zero-padded by ``self.pad``, a `ChannelPad` with ``(planes - in_planes) // 2`` channels on
    each side (no parameters; pruning the padded channels narrows it).
    ``shortcut='B'``: a 1x1 conv (stride ``stride``) + BN projection in ``self.downsample``.
    """
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 shortcut: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_type = shortcut
        self.needs_shortcut = stride != 1 or in_planes != planes
        self.stride = stride
        self.downsample: nn.Module | None = None
        self.pad: ChannelPad | None = None
        if self.needs_shortcut and shortcut == "B":
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        elif self.needs_shortcut:
            if (planes - in_planes) % 2:
                raise ValueError(f"option-A shortcut needs an even width increase, "
                                 f"got {in_planes} -> {planes}")
            self.pad = ChannelPad((planes - in_planes) // 2, (planes - in_planes) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            sc = self.downsample(x)
        elif self.pad is not None:                              # option A
            sc = self.pad(x[:, :, ::self.stride, ::self.stride])
        else:
            sc = x
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016, Sec. 4.2): stem 16, stages 16/32/64 x n blocks.

    Args:
        depth: 20, 32, 44, 56, 110 or any 6n + 2.
        num_classes: output classes.
        shortcut: 'A' (zero-pad, default, the paper's CIFAR choice) or 'B' (1x1 conv + BN).
        width: base width (16 in the paper); stages use width, 2*width, 4*width.
    """

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A",
                 width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._stage(width, width, n, 1, shortcut)
        self.layer2 = self._stage(width, 2 * width, n, 2, shortcut)
        self.layer3 = self._stage(2 * width, 4 * width, n, 2, shortcut)
        self.fc = nn.Linear(4 * width, num_classes)
        _kaiming_init(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int, shortcut: str) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride, shortcut)]
        blocks += [BasicBlock(planes, planes, 1, shortcut) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(torch.flatten(x, 1))


def resnet20(num_classes: int = 10, **kw: Any) -> CifarResNet:
    """ResNet-20 (n=3)."""
    return CifarResNet(20, num_classes, **kw)


def resnet32(num_classes: int = 10, **kw: Any) -> CifarResNet:
    """ResNet-32 (n=5)."""
    return CifarResNet(32, num_classes, **kw)


def resnet44(num_classes: int = 10, **kw: Any) -> CifarResNet:
    """ResNet-44 (n=7)."""
    return CifarResNet(44, num_classes, **kw)


def resnet56(num_classes: int = 10, **kw: Any) -> CifarResNet:
    """ResNet-56 (n=9): 0.85 M parameters, 125 M MACs."""
    return CifarResNet(56, num_classes, **kw)


def resnet110(num_classes: int = 10, **kw: Any) -> CifarResNet:
    """ResNet-110 (n=18)."""
    return CifarResNet(110, num_classes, **kw)


# ------------------------------------------------------------------------------------------
# VGG with BN for CIFAR
# ------------------------------------------------------------------------------------------
VGG_CFG: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG with BN for CIFAR: ``cfg`` lists conv widths, ``'M'`` is a 2x2 max-pool.

    ``features`` is a flat nn.Sequential of Conv3x3(bias=False)-BN-ReLU and MaxPool layers;
    after five pools a 32x32 input is 1x1, then ``classifier`` = Linear(last width, classes)
    (the Network Slimming CIFAR form). A custom ``cfg`` (e.g. a pruned width list) is allowed.
    """

    def __init__(self, cfg: Sequence[int | str], num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            elif isinstance(v, int) and v > 0:
                layers += [nn.Conv2d(c_in, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c_in = v
            else:
                raise ValueError(f"VGG cfg entries must be positive ints or 'M', got {v!r}")
        self.cfg = list(cfg)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def vgg16(num_classes: int = 10, **kw: Any) -> VGG:
    """VGG-16 with BN (13 conv layers + 1 linear)."""
    return VGG(VGG_CFG["vgg16"], num_classes, **kw)


def vgg19(num_classes: int = 10, **kw: Any) -> VGG:
    """VGG-19 with BN (16 conv layers + 1 linear)."""
    return VGG(VGG_CFG["vgg19"], num_classes, **kw)


# ------------------------------------------------------------------------------------------
# MobileNetV2 for CIFAR
# ------------------------------------------------------------------------------------------
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when t=1) -> 3x3 depthwise -> 1x1 linear project.

    The identity shortcut is used when stride is 1 and input and output widths are equal.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_planes * expand
        self.use_res = stride == 1 and in_planes == planes
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, planes, 1, bias=False), nn.BatchNorm2d(planes)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res else out


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with a CIFAR stem.

    Settings (t expansion, c width, n blocks, s stride) as in the paper's Table 2, except the
    stem conv and the second stage use stride 1 (32x32 -> 4x4 instead of 224 -> 7). Dropout 0.2
    before the classifier only when ``dropout > 0``.
    """
    SETTINGS: list[tuple[int, int, int, int]] = [
        (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        c_in = int(32 * width_mult)
        last = max(1280, int(1280 * width_mult))
        layers: list[nn.Module] = [nn.Conv2d(3, c_in, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(c_in), nn.ReLU6(inplace=True)]
        for t, c, n, s in self.SETTINGS:
            c_out = int(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        layers += [nn.Conv2d(c_in, last, 1, bias=False), nn.BatchNorm2d(last),
                   nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(last, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(self.dropout(torch.flatten(x, 1)))


def mobilenetv2(num_classes: int = 10, **kw: Any) -> MobileNetV2:
    """MobileNetV2 with CIFAR stem."""
    return MobileNetV2(num_classes, **kw)


# ------------------------------------------------------------------------------------------
_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44, "resnet56": resnet56,
    "resnet110": resnet110, "vgg16": vgg16, "vgg19": vgg19, "mobilenetv2": mobilenetv2,
}
for _name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110"):    # option B by name
    _FACTORIES[_name + "b"] = functools.partial(_FACTORIES[_name], shortcut="B")
MODELS: list[str] = list(_FACTORIES)


def get_model(name: str, num_classes: int = 10, **kw: Any) -> nn.Module:
    """Build the CIFAR model called ``name`` (one of ``MODELS``, case-insensitive).

    Extra keywords go to the constructor (e.g. ``shortcut='B'`` for ResNets,
    ``width_mult`` / ``dropout`` for MobileNetV2).
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return _FACTORIES[key](num_classes=num_classes, **kw)
