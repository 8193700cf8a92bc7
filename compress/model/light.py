"""The lightweight backbones' blocks of the reference tool (YOLOv5-Multibackbone-Compression).

GhostNet (GhostConv, GhostBottleneck), ShuffleNetV2 (ShuffleNetV2_InvertedResidual), MobileNetV3-Small
(conv_bn_hswish, MobileNetV3_InvertedResidual), EfficientNet-Lite (stem, MBConvBlock), PP-LCNet
(DepthSepConv) and their squeeze-excitation (SeBlock). Attribute names, layer order, biases and
activations follow the reference's modules, so its YAMLs build with its parameter counts and the state
dicts of its checkpoints load one to one. Unlike the reference, every inner width a pruned model may
change is a constructor argument (``se`` squeeze widths, ``hidden``/``expanded`` widths), defaulting to
the reference's, and so is every structure the reference derives from widths (``expand``, ``residual``:
pruning may make an input and an output width equal, which must not add a residual).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from .blocks import Conv, channel_shuffle


class SeBlock(nn.Module):
    """Squeeze-excitation: global average pool, 1x1 conv down to ``squeeze`` (ReLU), 1x1 conv up (Sigmoid),
    times the input. ``squeeze`` defaults to ``c // reduction`` (no rounding, as the reference)."""

    def __init__(self, in_channel, reduction=4, squeeze=None):
        super().__init__()
        c_ = in_channel // reduction if squeeze is None else squeeze
        self.Squeeze = nn.AdaptiveAvgPool2d(1)
        self.Excitation = nn.Sequential(OrderedDict([
            ("FC1", nn.Conv2d(in_channel, c_, 1)), ("ReLU", nn.ReLU()),
            ("FC2", nn.Conv2d(c_, in_channel, 1)), ("Sigmoid", nn.Sigmoid())]))

    def forward(self, x):
        return x * self.Excitation(self.Squeeze(x)).expand_as(x)


class GhostConv(nn.Module):
    """Ghost module: a 1x1 Conv to ``c_`` (= c2 // 2) channels and a cheap 3x3 depthwise Conv of those,
    concatenated (2 * c_ channels). ``k``, ``s``, ``g`` are accepted and ignored, as in the reference."""

    def __init__(self, c1, c2, k=1, s=1, g=1, act=True, c_=None):
        super().__init__()
        c_ = c2 // 2 if c_ is None else c_
        self.primary_conv = Conv(c1, c_, 1, 1, act=act)
        self.cheap_operation = Conv(c_, c_, 3, 1, 1, g=c_, act=act)

    def forward(self, x):
        y = self.primary_conv(x)
        return torch.cat([y, self.cheap_operation(y)], 1)


class GhostBottleneck(nn.Module):
    """GhostNet bottleneck: GhostConv to ``midc``, a 3x3 depthwise stride-2 Conv when ``s == 2``, an
    optional SeBlock, a linear GhostConv to ``c2``; plus the input, or its depthwise + 1x1 projection when
    the width or the stride changes. ``k`` is ignored (the depthwise conv is 3x3), as in the reference."""

    def __init__(self, c1, c2, midc, k=5, s=1, use_se=False, se=None, residual=None):
        super().__init__()
        if s not in (1, 2):
            raise ValueError(f"GhostBottleneck stride must be 1 or 2, got {s}")
        self.conv = nn.Sequential(
            GhostConv(c1, midc, 1, 1),
            Conv(midc, midc, 3, s=2, p=1, g=midc, act=False) if s == 2 else nn.Identity(),
            SeBlock(midc, squeeze=se) if use_se else nn.Sequential(),
            GhostConv(midc, c2, 1, 1, act=False))
        if (c1 == c2 and s == 1) if residual is None else residual:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(Conv(c1, c1, 3, s=s, p=1, g=c1, act=False), Conv(c1, c2, 1, 1, act=False))

    def forward(self, x):
        return self.conv(x) + self.shortcut(x)


class ShuffleNetV2_InvertedResidual(nn.Module):  # noqa: N801  (the reference's class name)
    """ShuffleNetV2 unit as the reference builds it (raw Conv2d/BN layers; the depthwise convs have a bias).

    stride 2: cat(branch1(x), branch2(x)); stride 1: the first half of x untouched, branch2 on the second
    half; then a 2-group channel shuffle. ``hidden`` is branch2's inner width (default ``oup // 2``).
    """

    def __init__(self, inp, oup, stride, hidden=None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleNetV2_InvertedResidual stride must be 1 or 2, got {stride}")
        bf = oup // 2
        if stride == 1 and inp != bf * 2:
            raise ValueError(f"ShuffleNetV2_InvertedResidual with stride 1 needs inp == oup, got {inp} -> {oup}")
        h = bf if hidden is None else hidden
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, bf, 1, 1, 0, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride == 2 else bf, h, 1, 1, 0, bias=False), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
            nn.Conv2d(h, h, 3, stride, 1, groups=h), nn.BatchNorm2d(h),
            nn.Conv2d(h, bf, 1, 1, 0, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class conv_bn_hswish(nn.Module):  # noqa: N801
    """MobileNetV3 stem: 3x3 Conv2d (stride ``stride``) + BN + Hardswish."""

    def __init__(self, c1, c2, stride):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class MobileNetV3_InvertedResidual(nn.Module):  # noqa: N801
    """MobileNetV3 inverted residual: [1x1 expand to ``hidden_dim``] -> depthwise k x k -> [SeBlock] ->
    1x1 project to ``oup``; Hardswish or ReLU; plus the input when stride 1 and inp == oup. Without
    expansion (by default when inp == hidden_dim) the depthwise conv runs on the input. ``se``: the SE
    squeeze width; ``expand``: whether there is an expansion conv (default ``inp != hidden_dim``)."""

    def __init__(self, inp, oup, hidden_dim, kernel_size, stride, use_se, use_hs, se=None, expand=None,
                 residual=None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MobileNetV3_InvertedResidual stride must be 1 or 2, got {stride}")
        expand = inp != hidden_dim if expand is None else expand
        self.identity = (stride == 1 and inp == oup) if residual is None else residual
        act = nn.Hardswish if use_hs else nn.ReLU
        dw = nn.Conv2d(hidden_dim, hidden_dim, kernel_size, stride, (kernel_size - 1) // 2, groups=hidden_dim,
                       bias=False)
        squeeze = SeBlock(hidden_dim, squeeze=se) if use_se else nn.Sequential()
        if not expand:
            self.conv = nn.Sequential(dw, nn.BatchNorm2d(hidden_dim), act(), squeeze,
                                      nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden_dim), act(),
                dw, nn.BatchNorm2d(hidden_dim), squeeze, act(),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.identity else y


class stem(nn.Module):  # noqa: N801
    """EfficientNet-Lite stem: 3x3 stride-2 Conv2d + BN + ReLU6."""

    def __init__(self, c1, c2, act="ReLU6"):
        super().__init__()
        if act != "ReLU6":
            raise ValueError(f"stem act must be 'ReLU6', got {act!r}")
        self.conv = nn.Conv2d(c1, c2, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class MBConvBlock(nn.Module):
    """EfficientNet-Lite MBConv: [1x1 expand to ``expanded`` (= inp * expand_ratio)] -> depthwise k x k ->
    [SeBlock] -> 1x1 project to ``final_oup``, ReLU6; plus the input when stride 1 and inp == final_oup.

    ``drop_connect_rate`` is recorded and never applied (the reference's forward never applies it either).
    """

    def __init__(self, inp, final_oup, k, s, expand_ratio, drop_connect_rate=0, has_se=False, expanded=None,
                 se=None, residual=None):
        super().__init__()
        self.input_filters, self.output_filters, self.stride = inp, final_oup, s
        self.expand_ratio, self.has_se, self.drop_connect_rate = expand_ratio, bool(has_se), drop_connect_rate
        self.residual = (s == 1 and inp == final_oup) if residual is None else residual
        oup = inp * expand_ratio if expanded is None else expanded
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(inp, oup, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(oup, momentum=0.01, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(oup, oup, k, stride=s, padding=(k - 1) // 2, groups=oup, bias=False)
        self._bn1 = nn.BatchNorm2d(oup, momentum=0.01, eps=1e-3)
        if self.has_se:
            self.se = SeBlock(oup, 4, squeeze=se)
        self._project_conv = nn.Conv2d(oup, final_oup, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(final_oup, momentum=0.01, eps=1e-3)
        self._relu = nn.ReLU6(inplace=True)

    def forward(self, x):
        identity = x
        if self.expand_ratio != 1:
            x = self._relu(self._bn0(self._expand_conv(x)))
        x = self._relu(self._bn1(self._depthwise_conv(x)))
        if self.has_se:
            x = self.se(x)
        x = self._bn2(self._project_conv(x))
        if self.residual:
            x = x + identity
        return x


class DepthSepConv(nn.Module):
    """PP-LCNet block: depthwise ``dw_size`` x ``dw_size`` + BN + Hardswish, [SeBlock (reduction 16)],
    1x1 Conv2d + BN + Hardswish. No residual."""

    def __init__(self, inp, oup, dw_size, stride, use_se, se=None):
        super().__init__()
        self.stride, self.inp, self.oup, self.dw_size = stride, inp, oup, dw_size
        self.dw_sp = nn.Sequential(
            nn.Conv2d(inp, inp, dw_size, stride, (dw_size - 1) // 2, groups=inp, bias=False), nn.BatchNorm2d(inp),
            nn.Hardswish(), SeBlock(inp, reduction=16, squeeze=se) if use_se else nn.Sequential(),
            nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.Hardswish())

    def forward(self, x):
        return self.dw_sp(x)
