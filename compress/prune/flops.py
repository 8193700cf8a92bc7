"""FLOPs and params of a pruned architecture from its group channel counts alone (no model build).

Counts follow thop as :func:`compress.model.profile.profile` uses it: a conv costs
``out_elems * (c_in / groups) * k * k`` MACs (thop does not count the bias), an affine BatchNorm
``4 * elems`` (thop's 2 x elems, doubled when affine), an nn.Upsample ``out_elems`` (nearest), a global
average pool ``(in_elems + 1)`` per channel, activations, max-pools, products and concats nothing;
GFLOPs = 2 x MACs / 1e9.
Params are ``numel`` of every parameter (conv weights and biases, BN weight and bias).

Every conv's output and input widths are linear in the group counts, so the cost is a quadratic form
that :class:`CostModel` precomputes as small matrices: one evaluation is two mat-vec products.
"""
from __future__ import annotations

import numpy as np

from .walk import walk


class CostModel:
    """Precomputed cost coefficients of one architecture at one image size.

    Get one with ``groups.cost_model(imgsz)``. Methods take *counts*: a dict ``{group name: kept count}``
    (groups not named keep all channels; a plan's index tensors are accepted too) or a numpy vector
    indexed like ``groups.groups`` (see :meth:`vector`).
    """

    def __init__(self, cg, hw):
        self.cg, self.hw = cg, tuple(hw)
        # the walk at this image size gives every conv's output size; records are joined by conv name
        sizes = walk(cg.cfg, self.hw)
        conv_hw = {r.prefix: r.hw_out for r in sizes.convs}
        op_cost = {u.name: u.ops for u in sizes.channel_ops}
        G = len(cg.groups)
        self.index = {g.name: g.index for g in cg.groups}
        self.full = np.array([g.size for g in cg.groups], dtype=np.float64)
        n = len(cg.convs)
        self.a_out, self.b_out = np.zeros((n, G)), np.zeros(n)
        self.a_in, self.b_in = np.zeros((n, G)), np.zeros(n)
        hw_out = np.zeros(n)
        self.kk, self.bias, self.bn = np.zeros(n), np.zeros(n), np.zeros(n)
        self.conv_layer = np.zeros(n, dtype=np.int64)
        for j, r in enumerate(cg.convs):
            hw_out[j] = conv_hw[r.prefix]
            self.kk[j], self.bias[j], self.bn[j] = r.kk, float(r.bias is not None), float(r.bn is not None)
            self.conv_layer[j] = r.layer
            if r.out:
                for g in r.out:
                    self.a_out[j, g] += 1
            else:
                self.b_out[j] = r.c_out
            if r.kind in ("conv", "tied", "detect"):  # c_in / groups (groups == 1) follows the input layout
                for g in r.inp:
                    self.a_in[j, g] += 1
            else:  # depthwise: 1 input channel per group; fixed grouped conv: constant
                self.b_in[j] = 1 if r.kind == "dw" else r.c_in // r.groups
        self.mac_w = hw_out * self.kk          # x c_out x c_in/g
        self.bn_w = 4 * hw_out * self.bn       # x c_out (thop: 2 x elems, doubled for affine BN)
        self.a_up = np.zeros((len(cg.channel_ops), G))
        self.up_w = np.zeros(len(cg.channel_ops))
        self.up_layer = np.zeros(len(cg.channel_ops), dtype=np.int64)
        for j, u in enumerate(cg.channel_ops):  # ops linear in the channels: upsampling, global pooling
            for g in u.layout:
                self.a_up[j, g] += 1
            self.up_w[j] = op_cost[u.name]
            self.up_layer[j] = u.layer
        self.n_layers = len(cg.layer_out)

    def vector(self, counts) -> np.ndarray:
        """Counts as a float vector over all groups (full size where ``counts`` does not name a group)."""
        if isinstance(counts, np.ndarray):
            return counts.astype(np.float64, copy=False)
        x = self.full.copy()
        for name, c in (counts or {}).items():
            x[self.index[name]] = c if isinstance(c, (int, float, np.integer)) else len(c)
        return x

    def _terms(self, x):
        c_out = self.a_out @ x + self.b_out
        c_in = self.a_in @ x + self.b_in
        return c_out, c_in

    def macs(self, counts=None) -> float:
        """Total MACs (thop convention)."""
        x = self.vector(counts)
        c_out, c_in = self._terms(x)
        return float(self.mac_w @ (c_out * c_in) + self.bn_w @ c_out + self.up_w @ (self.a_up @ x))

    def macs_batch(self, X) -> np.ndarray:
        """MACs of many full count vectors at once (rows of a (B, groups) array), as :meth:`macs`."""
        X = np.asarray(X, dtype=np.float64)
        c_out = X @ self.a_out.T + self.b_out
        c_in = X @ self.a_in.T + self.b_in
        return (c_out * c_in) @ self.mac_w + c_out @ self.bn_w + (X @ self.a_up.T) @ self.up_w

    def gflops(self, counts=None) -> float:
        """GFLOPs = 2 x MACs / 1e9, as :func:`compress.model.profile.profile` reports."""
        return 2 * self.macs(counts) / 1e9

    def params(self, counts=None) -> int:
        """Number of parameters of the pruned model."""
        c_out, c_in = self._terms(self.vector(counts))
        return int(round(float(self.kk @ (c_out * c_in) + (self.bias + 2 * self.bn) @ c_out)))

    def per_layer(self, counts=None) -> dict:
        """Per-layer arrays (one entry per YAML row): ``gflops``, ``params`` and ``channels`` (the sum of
        the output channels of the layer's convs)."""
        x = self.vector(counts)
        c_out, c_in = self._terms(x)
        macs = self.mac_w * c_out * c_in + self.bn_w * c_out
        prm = self.kk * c_out * c_in + (self.bias + 2 * self.bn) * c_out
        lm = np.bincount(self.conv_layer, macs, self.n_layers)
        lm += np.bincount(self.up_layer, self.up_w * (self.a_up @ x), self.n_layers)
        return {
            "gflops": 2 * lm / 1e9,
            "params": np.rint(np.bincount(self.conv_layer, prm, self.n_layers)).astype(np.int64),
            "channels": np.rint(np.bincount(self.conv_layer, c_out, self.n_layers)).astype(np.int64),
        }
