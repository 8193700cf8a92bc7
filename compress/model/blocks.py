"""YOLOv5 building blocks with explicit channel counts.

Attribute names follow ultralytics ``models/common.py`` (``conv``, ``bn``, ``cv1``, ``m.0.cv2`` ...) so that
state_dict keys match ultralytics checkpoints one to one. Unlike ultralytics, every inner width is a
constructor argument, so a pruned block (say a C3 whose bottlenecks are narrower than its cv1) is
expressible; the defaults reproduce ultralytics' widths.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def autopad(k, p=None, d=1):
    """Padding that keeps the spatial size for stride 1 ('same'), as ultralytics computes it."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


class Conv(nn.Module):
    """Conv2d + BatchNorm2d + activation (SiLU by default, ``act=False`` for none, or a module)."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        if act is True:
            self.act = nn.SiLU()
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """cv1 (1x1, c1->c_) then cv2 (3x3, c_->c2), plus the input when ``shortcut`` and c1 == c2."""

    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5, c_=None):
        super().__init__()
        c_ = int(c2 * e) if c_ is None else c_
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with 3 convs: cv3(cat(m(cv1(x)), cv2(x))).

    ``c_cv1``/``c_cv2`` are the output widths of cv1 and cv2 and ``m_ch`` a list of (hidden, out) widths,
    one per bottleneck; all default to ultralytics' ``int(c2 * e)``.
    """

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5, c_cv1=None, c_cv2=None, m_ch=None):
        super().__init__()
        c_ = int(c2 * e)
        c_cv1 = c_ if c_cv1 is None else c_cv1
        c_cv2 = c_ if c_cv2 is None else c_cv2
        m_ch = [(c_cv1, c_cv1)] * n if m_ch is None else [tuple(x) for x in m_ch]
        self.cv1 = Conv(c1, c_cv1, 1, 1)
        self.cv2 = Conv(c1, c_cv2, 1, 1)
        blocks, cin = [], c_cv1
        for hidden, out in m_ch:
            blocks.append(Bottleneck(cin, out, shortcut, g, c_=hidden))
            cin = out
        self.m = nn.Sequential(*blocks)
        self.cv3 = Conv(cin + c_cv2, c2, 1)

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: cv1, three chained k x k max-pools, concat of the four, cv2."""

    def __init__(self, c1, c2, k=5, c_=None):
        super().__init__()
        c_ = c1 // 2 if c_ is None else c_
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class SPP(nn.Module):
    """Spatial pyramid pooling (YOLOv3-SPP): cv1, parallel max-pools of sizes ``k``, concat, cv2."""

    def __init__(self, c1, c2, k=(5, 9, 13), c_=None):
        super().__init__()
        c_ = c1 // 2 if c_ is None else c_
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class Focus(nn.Module):
    """Space-to-depth (4 pixel phases stacked on channels) followed by a Conv."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x):
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension``."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return torch.cat(x, self.d)


class Conv_maxpool(nn.Module):
    """ShuffleNetV2 stem: Conv 3x3 stride 2 + BN + ReLU, then MaxPool 3x3 stride 2 (stride 4 in all)."""

    def __init__(self, c1, c2):
        super().__init__()
        self.conv = Conv(c1, c2, 3, 2, act=nn.ReLU())
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.maxpool(self.conv(x))


def channel_shuffle(x, groups: int = 2):
    """Interleave the channels of ``groups`` equal groups (ShuffleNet's channel shuffle)."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 inverted-residual block.

    stride 2: cat(branch1(x), branch2(x)) with branch1 = depthwise 3x3 s2 + pointwise, and
    branch2 = pointwise -> depthwise 3x3 s2 -> pointwise; stride 1: ``x.chunk(2)``, branch2 on the second
    half, cat with the untouched first half. Both end with a 2-group channel shuffle. ``hidden`` is the
    width inside branch2 (prunable); the branch outputs are each ``c2 // 2``.
    """

    def __init__(self, c1, c2, stride=1, hidden=None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleBlock stride must be 1 or 2, got {stride}")
        if c2 % 2:
            raise ValueError(f"ShuffleBlock output channels must be even, got {c2}")
        self.stride = stride
        half = c2 // 2
        if stride == 1 and c1 != c2:
            raise ValueError(f"ShuffleBlock with stride 1 needs c1 == c2, got {c1} -> {c2}")
        hidden = half if hidden is None else hidden
        b2_in = c1 if stride == 2 else c1 // 2
        if stride == 2:
            self.branch1 = nn.Sequential(
                Conv(c1, c1, 3, 2, g=c1, act=False),
                Conv(c1, half, 1, 1, act=nn.ReLU()),
            )
        self.branch2 = nn.Sequential(
            Conv(b2_in, hidden, 1, 1, act=nn.ReLU()),
            Conv(hidden, hidden, 3, stride, g=hidden, act=False),
            Conv(hidden, half, 1, 1, act=nn.ReLU()),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class Detect(nn.Module):
    """YOLOv5 detection head: one 1x1 conv per level giving ``na * (5 + nc)`` channels.

    ``anchors`` (buffer, shape nl x na x 2) is stored in grid units, i.e. pixels divided by the level
    stride, as ultralytics stores it. Train mode returns the raw per-level outputs, each of shape
    (bs, na, ny, nx, 5 + nc); eval mode returns ``(decoded, raw)`` where ``decoded`` is
    (bs, na * cells, 5 + nc) with xywh in input pixels and sigmoid scores.
    """

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.stride = torch.zeros(self.nl)  # set by the model builder

    def forward(self, x):
        z = []
        x = list(x)
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                grid, anchor_grid = self._make_grid(nx, ny, i, x[i].dtype, x[i].device)
                xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + grid) * float(self.stride[i])
                wh = (wh * 2) ** 2 * anchor_grid
                z.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * nx * ny, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    def _make_grid(self, nx, ny, i, dtype, device):
        shape = 1, self.na, ny, nx, 2
        y = torch.arange(ny, device=device, dtype=dtype)
        x = torch.arange(nx, device=device, dtype=dtype)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape).to(dtype)
        return grid, anchor_grid

    def initialize_biases(self, cf=None):
        """Prior biases for objectness (8 objects per 640 image) and classes, as ultralytics does."""
        for mi, s in zip(self.m, self.stride):
            b = mi.bias.view(self.na, -1)
            b.data[:, 4] += math.log(8 / (640 / float(s)) ** 2)
            b.data[:, 5:5 + self.nc] += (
                math.log(0.6 / (self.nc - 0.99999)) if cf is None else torch.log(cf / cf.sum())
            )
            mi.bias = nn.Parameter(b.view(-1), requires_grad=True)
