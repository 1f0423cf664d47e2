"""Channel analysis guarantees: every op of the built-in table, checked numerically.

The rule: a channel whose producers are zeroed stays exactly 0, in the same position, through an
op, or the op freezes the channels it touches (or channel_groups refuses it). For every entry of
`BUILTIN_OPS` / `BUILTIN_MODULE_OPS` there is a case below (a test fails when an entry has none):
a tiny model conv `a` (and conv `b`) -> op -> flatten -> Linear, on which we check
  1. the traced graph really contains the entry (the case exercises it),
  2. the table's claim, numerically: zero-safe kinds map an exactly-zero channel to exactly 0 at
     its position, move ops only move values, unsafe / freeze ops really give f(0) != 0 / inf,
  3. what channel_groups does with `a`'s channels (prunable or frozen), and on every accepted
     model the zero-then-remove invariant (random subsets of every group zeroed, then removed:
     same output).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import prunelib as pl
from prunelib.graph import BUILTIN_MODULE_OPS, BUILTIN_OPS, _LeafTracer

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
C0 = 2                                            # the channel zeroed in the numeric checks


@dataclass
class Case:
    f: Callable[..., torch.Tensor]                # f(net, y, w): y = a(x), w = b(x), (2, 8, 8, 8)
    keep: bool                                    # a's channels stay prunable (else frozen)
    module: nn.Module | None = None               # the module the case calls as net.m


def mod(m: nn.Module, f: Callable, keep: bool = True) -> Case:
    return Case(f, keep, m)


class OpNet(nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.f = case.f
        if case.module is not None:
            self.m = case.module
        self.eval()
        with torch.no_grad():
            n = torch.flatten(self.body(X), 1).shape[1]
        self.head = nn.Linear(n, 4)

    def body(self, x):
        return self.f(self, self.a(x), self.b(x))

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1).float())


def _u(y):                                        # y.unbind(2) stacked back (length is static)
    parts = y.unbind(2)
    return torch.stack([parts[i] for i in range(8)], 2)


def _chunk(y):
    c = y.chunk(2, 1)
    return torch.cat([c[1], c[0]], 1)


def _split(y):
    s = y.split(4, 2)
    return torch.cat([s[1], s[0]], 2)


def _tsplit(y):
    s = torch.tensor_split(y, 2, 1)
    return torch.cat([s[1], s[0]], 1)


def _seq(y):
    return y.flatten(2).transpose(1, 2)          # (N, 64, 8): channels last


ZERO_FN = {
    "relu": lambda s, y, w: F.relu(y), "relu_": lambda s, y, w: torch.relu_(y.clone()),
    "relu6": lambda s, y, w: F.relu6(y), "leaky_relu": lambda s, y, w: F.leaky_relu(y, 0.1),
    "leaky_relu_": lambda s, y, w: F.leaky_relu_(y.clone()), "gelu": lambda s, y, w: F.gelu(y),
    "silu": lambda s, y, w: F.silu(y), "mish": lambda s, y, w: F.mish(y),
    "hardswish": lambda s, y, w: F.hardswish(y), "elu": lambda s, y, w: F.elu(y),
    "selu": lambda s, y, w: F.selu(y), "celu": lambda s, y, w: F.celu(y),
    "tanh": lambda s, y, w: torch.tanh(y), "hardtanh": lambda s, y, w: F.hardtanh(y),
    "hardtanh_": lambda s, y, w: F.hardtanh_(y.clone()),
    "softsign": lambda s, y, w: F.softsign(y),
    "dropout": lambda s, y, w: F.dropout(y, 0.5, training=False),
    "dropout1d": lambda s, y, w: F.dropout1d(y.flatten(2), 0.5, training=False),
    "dropout2d": lambda s, y, w: F.dropout2d(y, 0.5, training=False),
    "dropout3d": lambda s, y, w: F.dropout3d(y.unsqueeze(2), 0.5, training=False),
    "alpha_dropout": lambda s, y, w: F.alpha_dropout(y, 0.5, training=False),
    "feature_alpha_dropout": lambda s, y, w: F.feature_alpha_dropout(y, 0.5, training=False),
    "neg": lambda s, y, w: -y, "abs": lambda s, y, w: torch.abs(y),
    "clone": lambda s, y, w: y.clone(), "contiguous": lambda s, y, w: y.contiguous(),
    "detach": lambda s, y, w: y.detach(), "float": lambda s, y, w: y.double().float(),
    "double": lambda s, y, w: y.double(), "half": lambda s, y, w: y.half(),
    "bfloat16": lambda s, y, w: y.bfloat16(), "to": lambda s, y, w: y.to(torch.float64),
    "type": lambda s, y, w: y.type(torch.float64), "type_as": lambda s, y, w: y.type_as(w),
    "sin": lambda s, y, w: torch.sin(y), "tanhshrink": lambda s, y, w: F.tanhshrink(y),
    "softshrink": lambda s, y, w: F.softshrink(y, 0.1),
    "hardshrink": lambda s, y, w: F.hardshrink(y, 0.1), "erf": lambda s, y, w: torch.erf(y),
    "sqrt": lambda s, y, w: torch.sqrt(F.relu(y)),
}
CASES: dict[str, Case] = {k: Case(f, True) for k, f in ZERO_FN.items()}
# torchvision fx-wraps stochastic_depth for calls from its own module (StochasticDepth.forward)
CASES["stochastic_depth"] = Case(lambda s, y, w: s.m(y), True,
                                 torchvision.ops.StochasticDepth(0.5, "row"))
CASES.update({
    # unsafe: f(0) != 0 reaches the head, so a's channels are frozen
    "sigmoid": Case(lambda s, y, w: torch.sigmoid(y), False),
    "hardsigmoid": Case(lambda s, y, w: F.hardsigmoid(y), False),
    "softplus": Case(lambda s, y, w: F.softplus(y), False),
    "exp": Case(lambda s, y, w: torch.exp(y), False),
    "cos": Case(lambda s, y, w: torch.cos(y), False),
    "log_sigmoid": Case(lambda s, y, w: F.logsigmoid(y), False),
    # freeze: f(0) is inf, so even a gate y * f(w) (0 * inf = nan) must not prune
    "reciprocal": Case(lambda s, y, w: y * torch.reciprocal(w), False),
    "rsqrt": Case(lambda s, y, w: y * torch.rsqrt(w.abs()), False),
    "log": Case(lambda s, y, w: y * torch.log(w.abs()), False),
    # move
    "view": Case(lambda s, y, w: y.view(y.size(0), y.size(1), 64), True),
    "reshape": Case(lambda s, y, w: y.reshape(2, 4, -1, 64), True),
    "permute": Case(lambda s, y, w: y.permute(0, 2, 3, 1), True),
    "transpose": Case(lambda s, y, w: y.transpose(1, 3), True),
    "t": Case(lambda s, y, w: y.flatten(1).t().t(), True),
    "flatten": Case(lambda s, y, w: torch.flatten(y, 2), True),
    "unflatten": Case(lambda s, y, w: y.unflatten(1, (2, -1)), True),
    "squeeze": Case(lambda s, y, w: y.unsqueeze(2).squeeze(2), True),
    "unsqueeze": Case(lambda s, y, w: y.unsqueeze(-1), True),
    "expand": Case(lambda s, y, w: y[:, :, :1].expand(-1, -1, 8, -1), True),
    "expand_as": Case(lambda s, y, w: y[:, :, :1].expand_as(w), True),
    "repeat": Case(lambda s, y, w: y.repeat(1, 2, 1, 1), True),
    "getitem": Case(lambda s, y, w: y[:, :, 1:, ::2], True),
    "cat": Case(lambda s, y, w: torch.cat([y, w], 1), True),
    "concat": Case(lambda s, y, w: torch.concat([w, y], 1), True),
    "concatenate": Case(lambda s, y, w: torch.concatenate([y, w], 2), True),
    "stack": Case(lambda s, y, w: torch.stack([y, w], 1), True),
    "chunk": Case(lambda s, y, w: _chunk(y), True),
    "split": Case(lambda s, y, w: _split(y), True),
    "tensor_split": Case(lambda s, y, w: _tsplit(y), True),
    "unbind": Case(lambda s, y, w: _u(y), True),
    "narrow": Case(lambda s, y, w: y.narrow(2, 1, 4), True),
    "select": Case(lambda s, y, w: y.select(3, 0), True),
    "index_select": Case(lambda s, y, w: torch.index_select(y, 2, torch.tensor([3, 1])), True),
    "flip": Case(lambda s, y, w: torch.flip(y, (1,)), True),
    "roll": Case(lambda s, y, w: torch.roll(y, 1, 1), False),
    "pixel_shuffle": Case(lambda s, y, w: F.pixel_shuffle(y, 2), True),
    "pixel_unshuffle": Case(lambda s, y, w: F.pixel_unshuffle(y, 2), True),
    "channel_shuffle": Case(lambda s, y, w: F.channel_shuffle(y, 2), True),
    "native_channel_shuffle": Case(lambda s, y, w: F.native_channel_shuffle(y, 4), True),
    "movedim": Case(lambda s, y, w: torch.movedim(y, 1, 3), True),
    "swapaxes": Case(lambda s, y, w: torch.swapaxes(y, 1, 2), True),
    "pad": Case(lambda s, y, w: F.pad(y, (1, 1, 2, 0)), True),
    "reshape_as": Case(lambda s, y, w: y.permute(0, 2, 3, 1).reshape_as(w.permute(0, 2, 3, 1)),
                       True),
    "view_as": Case(lambda s, y, w: y.view_as(w), True),
    # chan: pooling / resampling of the trailing spatial dims
    "max_pool1d": Case(lambda s, y, w: F.max_pool1d(y.flatten(2), 2), True),
    "max_pool2d": Case(lambda s, y, w: F.max_pool2d(y, 2), True),
    "max_pool3d": Case(lambda s, y, w: F.max_pool3d(y.unsqueeze(2), (1, 2, 2)), True),
    "avg_pool1d": Case(lambda s, y, w: F.avg_pool1d(y.flatten(2), 2), True),
    "avg_pool2d": Case(lambda s, y, w: F.avg_pool2d(y, 3, 1, 1), True),
    "avg_pool3d": Case(lambda s, y, w: F.avg_pool3d(y.unsqueeze(2), (1, 2, 2)), True),
    "adaptive_avg_pool1d": Case(lambda s, y, w: F.adaptive_avg_pool1d(y.flatten(2), 3), True),
    "adaptive_avg_pool2d": Case(lambda s, y, w: F.adaptive_avg_pool2d(y, 3), True),
    "adaptive_avg_pool3d": Case(lambda s, y, w: F.adaptive_avg_pool3d(y.unsqueeze(2), 2), True),
    "adaptive_max_pool1d": Case(lambda s, y, w: F.adaptive_max_pool1d(y.flatten(2), 3), True),
    "adaptive_max_pool2d": Case(lambda s, y, w: F.adaptive_max_pool2d(y, 3), True),
    "adaptive_max_pool3d": Case(lambda s, y, w: F.adaptive_max_pool3d(y.unsqueeze(2), 2), True),
    "lp_pool2d": Case(lambda s, y, w: F.lp_pool2d(F.relu(y), 2, 2), True),
    "interpolate": Case(lambda s, y, w: F.interpolate(y, scale_factor=1.5, mode="bilinear"),
                        True),
    # binary: coupled with w; a zeroed divisor gives inf / nan, so division freezes
    "add": Case(lambda s, y, w: y + w, True),
    "sub": Case(lambda s, y, w: y - w, True),
    "mul": Case(lambda s, y, w: y * w, True),
    "truediv": Case(lambda s, y, w: y / w, False),
    "div": Case(lambda s, y, w: torch.div(y, w), False),
    "add_": Case(lambda s, y, w: y.clone().add_(w), True),
    "mul_": Case(lambda s, y, w: y.clone().mul_(w), True),
    "sub_": Case(lambda s, y, w: y.clone().sub_(w), True),
    "div_": Case(lambda s, y, w: y.clone().div_(w), False),
    "rsub": Case(lambda s, y, w: torch.rsub(y, w), True),
    "maximum": Case(lambda s, y, w: torch.maximum(y, w), True),
    "minimum": Case(lambda s, y, w: torch.minimum(y, w), True),
    # reduce over the spatial dims: f(0) = 0 per channel; logsumexp(0) = log(n) != 0
    "mean": Case(lambda s, y, w: y.mean((2, 3)), True),
    "sum": Case(lambda s, y, w: torch.sum(y, 3, keepdim=True), True),
    "amax": Case(lambda s, y, w: y.amax(2), True),
    "amin": Case(lambda s, y, w: torch.amin(y, (2, 3)), True),
    "std": Case(lambda s, y, w: y.std((2, 3)), True),
    "var": Case(lambda s, y, w: torch.var(y, 3, keepdim=True), True),
    "logsumexp": Case(lambda s, y, w: torch.logsumexp(y, (2, 3)), False),
    # mix: channels are combined, so the inputs are frozen
    "matmul": Case(lambda s, y, w: y.flatten(2) @ w.flatten(2).transpose(1, 2), False),
    "bmm": Case(lambda s, y, w: torch.bmm(y.flatten(2), w.flatten(2).transpose(1, 2)), False),
    "mm": Case(lambda s, y, w: torch.mm(y.flatten(1), w.flatten(1).t()), False),
    "einsum": Case(lambda s, y, w: torch.einsum("nchw,ndhw->ncd", y, w), False),
    "softmax": Case(lambda s, y, w: torch.softmax(y, 1), False),
    "log_softmax": Case(lambda s, y, w: F.log_softmax(y, 1), False),
    "layer_norm": Case(lambda s, y, w: F.layer_norm(y.permute(0, 2, 3, 1), (8,)), False),
    "group_norm": Case(lambda s, y, w: F.group_norm(y, 2), False),
    "local_response_norm": Case(lambda s, y, w: F.local_response_norm(y, 2), False),
    "scaled_dot_product_attention": Case(
        lambda s, y, w: F.scaled_dot_product_attention(_seq(y), _seq(w), _seq(w)), False),
    "baddbmm": Case(lambda s, y, w: torch.baddbmm(torch.zeros(2, 8, 8), y.flatten(2),
                                                  w.flatten(2).transpose(1, 2)), False),
    "addmm": Case(lambda s, y, w: torch.addmm(torch.zeros(2, 2), y.flatten(1),
                                              w.flatten(1).t()), False),
    "norm": Case(lambda s, y, w: y.norm(dim=1), False),
    # weighted: functional forms on a module's own parameters / buffers, sliced like the module
    "conv1d": mod(nn.Conv1d(8, 6, 3), lambda s, y, w: F.conv1d(y.flatten(2), s.m.weight,
                                                                s.m.bias)),
    "conv2d": mod(nn.Conv2d(8, 8, 3, padding=1),
                  lambda s, y, w: F.conv2d(y, s.m.weight, s.m.bias, 1, 1)),
    "conv3d": mod(nn.Conv3d(8, 4, 1, bias=False),
                  lambda s, y, w: F.conv3d(y.unsqueeze(2), s.m.weight)),
    "linear": mod(nn.Linear(8, 5), lambda s, y, w: F.linear(_seq(y), s.m.weight, s.m.bias)),
    "batch_norm": mod(nn.BatchNorm2d(8), lambda s, y, w: F.batch_norm(
        y, s.m.running_mean, s.m.running_var, s.m.weight, s.m.bias, False, 0.1, 1e-5)),
    "instance_norm": mod(nn.InstanceNorm2d(8, affine=True), lambda s, y, w: F.instance_norm(
        y, weight=s.m.weight, bias=s.m.bias)),
    # meta: sizes only
    "size": Case(lambda s, y, w: y.reshape(y.size(0), -1), True),
    "dim": Case(lambda s, y, w: y.flatten(y.dim() - 2), True),
    "numel": Case(lambda s, y, w: y.reshape(2, y.numel() // 2), True),
    "getattr": Case(lambda s, y, w: y.reshape(y.shape[0], -1), True),
})
MODULE_CASES: dict[type, Case] = {
    t: mod(t(), lambda s, y, w: s.m(y)) for t in (
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.ELU,
        nn.SELU, nn.CELU, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.Identity, nn.Dropout,
        nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Softshrink, nn.Hardshrink)}
MODULE_CASES.update({
    nn.Dropout1d: mod(nn.Dropout1d(), lambda s, y, w: s.m(y.flatten(2))),
    nn.Dropout3d: mod(nn.Dropout3d(), lambda s, y, w: s.m(y.unsqueeze(2))),
    nn.Sigmoid: mod(nn.Sigmoid(), lambda s, y, w: s.m(y), keep=False),
    nn.Hardsigmoid: mod(nn.Hardsigmoid(), lambda s, y, w: s.m(y), keep=False),
    nn.Softplus: mod(nn.Softplus(), lambda s, y, w: s.m(y), keep=False),
    nn.MaxPool1d: mod(nn.MaxPool1d(2), lambda s, y, w: s.m(y.flatten(2))),
    nn.MaxPool2d: mod(nn.MaxPool2d(2), lambda s, y, w: s.m(y)),
    nn.MaxPool3d: mod(nn.MaxPool3d((1, 2, 2)), lambda s, y, w: s.m(y.unsqueeze(2))),
    nn.AvgPool1d: mod(nn.AvgPool1d(2), lambda s, y, w: s.m(y.flatten(2))),
    nn.AvgPool2d: mod(nn.AvgPool2d(2), lambda s, y, w: s.m(y)),
    nn.AvgPool3d: mod(nn.AvgPool3d((1, 2, 2)), lambda s, y, w: s.m(y.unsqueeze(2))),
    nn.AdaptiveAvgPool1d: mod(nn.AdaptiveAvgPool1d(3), lambda s, y, w: s.m(y.flatten(2))),
    nn.AdaptiveAvgPool2d: mod(nn.AdaptiveAvgPool2d(1), lambda s, y, w: s.m(y)),
    nn.AdaptiveAvgPool3d: mod(nn.AdaptiveAvgPool3d(2), lambda s, y, w: s.m(y.unsqueeze(2))),
    nn.AdaptiveMaxPool1d: mod(nn.AdaptiveMaxPool1d(3), lambda s, y, w: s.m(y.flatten(2))),
    nn.AdaptiveMaxPool2d: mod(nn.AdaptiveMaxPool2d(2), lambda s, y, w: s.m(y)),
    nn.AdaptiveMaxPool3d: mod(nn.AdaptiveMaxPool3d(2), lambda s, y, w: s.m(y.unsqueeze(2))),
    nn.LPPool2d: mod(nn.LPPool2d(2, 2), lambda s, y, w: s.m(F.relu(y))),
    nn.Upsample: mod(nn.Upsample(scale_factor=2), lambda s, y, w: s.m(y)),
    nn.UpsamplingNearest2d: mod(nn.UpsamplingNearest2d(scale_factor=2), lambda s, y, w: s.m(y)),
    nn.UpsamplingBilinear2d: mod(nn.UpsamplingBilinear2d(scale_factor=2),
                                 lambda s, y, w: s.m(y)),
    nn.ReflectionPad2d: mod(nn.ReflectionPad2d((1, 2, 0, 1)), lambda s, y, w: s.m(y)),
    nn.ReplicationPad2d: mod(nn.ReplicationPad2d(1), lambda s, y, w: s.m(y)),
    nn.ZeroPad2d: mod(nn.ZeroPad2d(1), lambda s, y, w: s.m(y)),
    nn.ConstantPad2d: mod(nn.ConstantPad2d((1, 0, 2, 1), 0.0), lambda s, y, w: s.m(y)),
    nn.Flatten: mod(nn.Flatten(2), lambda s, y, w: s.m(y)),
    nn.Unflatten: mod(nn.Unflatten(2, (2, 4)), lambda s, y, w: s.m(y)),
    nn.PixelShuffle: mod(nn.PixelShuffle(2), lambda s, y, w: s.m(y)),
    nn.PixelUnshuffle: mod(nn.PixelUnshuffle(2), lambda s, y, w: s.m(y)),
    nn.ChannelShuffle: mod(nn.ChannelShuffle(2), lambda s, y, w: s.m(y)),
    nn.LayerNorm: mod(nn.LayerNorm(8), lambda s, y, w: s.m(y.permute(0, 2, 3, 1)), keep=False),
    nn.GroupNorm: mod(nn.GroupNorm(2, 8), lambda s, y, w: s.m(y), keep=False),
    nn.LocalResponseNorm: mod(nn.LocalResponseNorm(2), lambda s, y, w: s.m(y), keep=False),
    nn.Softmax: mod(nn.Softmax(1), lambda s, y, w: s.m(y), keep=False),
    nn.LogSoftmax: mod(nn.LogSoftmax(1), lambda s, y, w: s.m(y), keep=False),
    nn.MultiheadAttention: mod(nn.MultiheadAttention(8, 2, batch_first=True),
                               lambda s, y, w: s.m(_seq(y), _seq(w), _seq(w))[0], keep=False),
})
# further cases of an entry (name:variant): other arguments that change the outcome
VARIANTS: dict[str, Case] = {
    "hardtanh:min_above_0": Case(lambda s, y, w: F.hardtanh(y, 0.5, 1.0), False),
    "hardtanh:max_below_0": Case(lambda s, y, w: F.hardtanh(y, -1.0, -0.5), False),
    "truediv:by_constant": Case(lambda s, y, w: y / 2.0, True),
    "mul:by_constant_tensor": Case(lambda s, y, w: y * torch.ones(1, 8, 1, 1), False),
    "mul:by_opaque_result": Case(lambda s, y, w: y * torch.softmax(w, 1), False),
    "getattr:mT": Case(lambda s, y, w: y.flatten(2).mT, True),
    "getitem:channel_slice": Case(lambda s, y, w: y[:, 1:], False),
    "getitem:channel_index_tensor": Case(lambda s, y, w: y[:, torch.tensor([0, 2, 1])], False),
    "getitem:bool_mask": Case(
        lambda s, y, w: y[torch.ones(2, 8, 8, 8, dtype=torch.bool)].reshape(2, -1), False),
    "view:literal_channel_size": Case(lambda s, y, w: y.view(2, 8, 64), False),
    "reshape:literal_merge": Case(lambda s, y, w: y.reshape(2, 512), False),
    "expand:literal_channel_size": Case(lambda s, y, w: y.expand(2, 8, 8, 8), False),
    "stack:couples_the_inputs": Case(lambda s, y, w: torch.stack([y, w], 2), True),
    "getitem:batch_index_tensor": Case(lambda s, y, w: y[torch.tensor([1, 0])], True),
    "index_select:channels": Case(lambda s, y, w: torch.index_select(y, 1, torch.tensor([1, 0])),
                                  False),
    "roll:spatial": Case(lambda s, y, w: torch.roll(y, 2, 3), True),
    "roll:flattened": Case(lambda s, y, w: torch.roll(y, 3), False),
    "unflatten:literal_channel_sizes": Case(lambda s, y, w: y.unflatten(1, (2, 4)), False),
    "pad:channels_then_added": Case(lambda s, y, w: F.pad(y, (0, 0, 0, 0, 1, 1))[:, 1:9] + w,
                                    False),
    "pad:channel_crop": Case(lambda s, y, w: F.pad(y, (0, 0, 0, 0, -1, 0)), False),
    "pad:value_1": Case(lambda s, y, w: F.pad(y, (1, 1), value=1.0), False),
    "pad:reflect_channels_last": Case(
        lambda s, y, w: F.pad(y.permute(0, 2, 3, 1).flatten(1, 2), (1, 1), mode="reflect"), False),
    "pad:spatial_then_added": Case(lambda s, y, w: F.pad(y, (1, 1)) + F.pad(w, (1, 1)), True),
    "split:channels": Case(lambda s, y, w: y.split(4, 1)[0], False),
    "chunk:odd_blocks": Case(lambda s, y, w: y.chunk(3, 1)[0], False),
    "tensor_split:indices": Case(lambda s, y, w: torch.tensor_split(y, [3], 1)[1], False),
    "mean:channels": Case(lambda s, y, w: y.mean(1), False),
    "std:unbiased_positional": Case(lambda s, y, w: y.std(True).expand(2, 1), False),
    "logsumexp:channels": Case(lambda s, y, w: torch.logsumexp(y, 1), False),
    "max_pool1d:channels_last": Case(lambda s, y, w: F.max_pool1d(_seq(y), 2), False),
    "max_pool3d:over_channels": Case(lambda s, y, w: F.max_pool3d(y, (2, 1, 1)), False),
    "add:other_keyword": Case(lambda s, y, w: torch.add(y, other=w), True),
    "getitem:full_literal_slice": Case(lambda s, y, w: y[:, :8], True),     # stays everything
    "softmax:gate_over_a_spatial_dim": Case(lambda s, y, w: y * torch.softmax(w, 2), True),
    "sum:stacked_branches": Case(lambda s, y, w: torch.stack([y, w], 1).sum(1), True),
    "reshape_as:another_shape": Case(lambda s, y, w: y.reshape_as(w.flatten(1)), False),
    "linear:literal_weight": Case(lambda s, y, w: F.linear(_seq(y), torch.ones(3, 8)), False),
    "conv2d:computed_weight": mod(nn.Conv2d(8, 4, 1), lambda s, y, w: F.conv2d(
        y, s.m.weight * 2, s.m.bias), keep=False),
    "conv2d:grouped": mod(nn.Conv2d(8, 8, 1, groups=2), lambda s, y, w: F.conv2d(
        y, s.m.weight, s.m.bias, groups=2)),
    "conv2d:depthwise_literal_groups": mod(nn.Conv2d(8, 8, 3, groups=8), lambda s, y, w: F.conv2d(
        y, s.m.weight, s.m.bias, groups=8), keep=False),
    "batch_norm:no_affine": mod(nn.BatchNorm2d(8, affine=False), lambda s, y, w: F.batch_norm(
        y, s.m.running_mean, s.m.running_var), keep=False),
    "batch_norm:literal_weight": mod(nn.BatchNorm2d(8), lambda s, y, w: F.batch_norm(
        y, s.m.running_mean, s.m.running_var, torch.ones(8)), keep=False),
}


def _entry(name: str) -> str:
    return name.split(":")[0]


def _fn_name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", None)
    return None


def _in_group(groups, module: str) -> bool:
    return any(m.module == module for g in groups for m in g.by_role("out"))


def check_zero_then_remove(net: nn.Module, x: torch.Tensor = X, must_remove: bool = True,
                           seeds=(0, 1, 2)) -> None:
    """Zero a random subset of every group, remove it: the output is unchanged (and, where
    `must_remove`, zeroing did change it, so the removed channels mattered)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in seeds:
            model = copy.deepcopy(net).eval()
            groups = pl.channel_groups(model, x)
            gen = torch.Generator().manual_seed(seed)
            keep = {}
            for g in groups:
                if g.size < 2:
                    continue
                perm = torch.randperm(g.size, generator=gen)
                k = int(torch.randint(1, g.size, (1,), generator=gen))
                keep[g.index] = perm[:k]
            assert keep or not must_remove, "nothing to remove"
            if not keep:
                return
            with torch.no_grad():
                y0 = model(x)
                for i, k in keep.items():
                    gone = torch.ones(groups[i].size, dtype=torch.bool)
                    gone[k] = False
                    groups[i].zero_(torch.nonzero(gone).flatten())
                y1 = model(x)
                small = pl.remove_channels(model, groups, keep).eval()
                y2 = small(x)
            assert not must_remove or not torch.allclose(y0, y1), "zeroing changed nothing"
            assert pl.count(small, x)[1] < pl.count(model, x)[1]
            assert torch.allclose(y1, y2, atol=1e-5, rtol=1e-4), (seed, (y1 - y2).abs().max())


def check_claim(kind: str, name: str, case: Case) -> None:
    """The table's claim for one entry, numerically, on the op itself (not the analysis)."""
    net = OpNet(case)
    gen = torch.Generator().manual_seed(1)
    y, w = torch.randn(2, 8, 8, 8, generator=gen) + 0.1, torch.randn(2, 8, 8, 8, generator=gen)
    y0, w0 = y.clone(), w.clone()
    y0[:, C0] = 0
    w0[:, C0] = 0
    with torch.no_grad():
        if kind in ("zero", "chan", "reduce"):       # a zeroed channel stays 0 at its position
            out = case.f(net, y0, w).double()
            assert torch.equal(out[:, C0], torch.zeros_like(out[:, C0])), name
            assert out.abs().amax() > 0, name
        elif kind == "unsafe":                        # f(0) is finite and not 0
            out = case.f(net, y0, w)
            assert torch.isfinite(out[:, C0]).all() and (out[:, C0] != 0).any(), name
        elif kind == "freeze":                        # f(0) is not finite
            assert not torch.isfinite(case.f(net, y, w0)[:, C0]).all(), name
        elif kind == "reduce_unsafe":
            assert (case.f(net, y0, w)[:, C0] != 0).all(), name
        elif kind == "binary":                       # both operands zeroed at C0
            out = case.f(net, y0.clone(), w0.clone())
            if name in ("truediv", "div", "div_"):
                assert torch.isnan(out[:, C0]).all(), name          # 0 / 0
                out = case.f(net, y0.clone(), w.clone())             # 0 / w
            assert torch.equal(out[:, C0], torch.zeros_like(out[:, C0])), name
        elif kind == "move":                          # values only move; zeros stay in place
            yv = torch.arange(1.0, 1 + y.numel()).reshape(y.shape)
            wv = yv + y.numel()
            out = case.f(net, yv, wv).double()
            src = torch.cat([yv.reshape(-1), wv.reshape(-1), torch.zeros(1)]).double()
            assert torch.isin(out, src).all(), name
            yz = yv.clone()
            yz[:, C0] = 0
            gone = torch.isin(out, yv[:, C0].reshape(-1).double())
            assert torch.equal(case.f(net, yz, wv).double(), out.masked_fill(gone, 0)), name
        elif kind == "meta":                          # returns sizes, not tensors
            seen = []
            gm = fx.GraphModule(net, _LeafTracer().trace(net))

            class Spy(fx.Interpreter):
                def run_node(self, n):
                    r = super().run_node(n)
                    if _fn_name(n) == name:
                        seen.append(r)
                    return r
            Spy(gm).run(X)
            assert seen and not any(isinstance(r, torch.Tensor) for r in seen), name
        elif kind == "weighted":                     # zeroing the module's producer params
            net = copy.deepcopy(net)                  # of channel C0 zeroes that output
            for p in (net.m.weight, getattr(net.m, "bias", None)):
                if p is not None:
                    p[C0] = 0
            out = case.f(net, y, w)
            out = out.movedim(-1, 1) if name == "linear" else out
            assert torch.equal(out[:, C0], torch.zeros_like(out[:, C0])), name
            assert out.abs().amax() > 0, name
        else:
            assert kind == "mix", kind                # inputs frozen: checked by the caller


def test_every_table_entry_has_a_case():
    """Adding an op to the table without a case here fails this test."""
    assert set(BUILTIN_OPS) == set(CASES), (set(BUILTIN_OPS) ^ set(CASES))
    assert set(BUILTIN_MODULE_OPS) == set(MODULE_CASES), \
        set(BUILTIN_MODULE_OPS) ^ set(MODULE_CASES)
    assert {_entry(v) for v in VARIANTS} <= set(BUILTIN_OPS)


def test_the_built_in_tables_are_read_only():
    with pytest.raises(TypeError):
        BUILTIN_OPS["roll"] = "zero"                              # type: ignore[index]
    with pytest.raises(ValueError, match="built in as 'move'"):
        pl.register_op("roll", "zero")


@pytest.mark.parametrize("name", sorted(CASES) + sorted(VARIANTS))
def test_function_op(name):
    case = CASES.get(name) or VARIANTS[name]
    net = OpNet(case)
    gm = fx.GraphModule(net, _LeafTracer().trace(net))
    assert _entry(name) in {_fn_name(n) for n in gm.graph.nodes}, "the case misses its op"
    if name in CASES:
        check_claim(BUILTIN_OPS[name], name, case)
    groups = pl.channel_groups(net, X)
    assert _in_group(groups, "a") == case.keep
    check_zero_then_remove(net, must_remove=case.keep)


@pytest.mark.filterwarnings("ignore:modules not used")      # MultiheadAttention's out_proj
@pytest.mark.parametrize("t", list(MODULE_CASES), ids=lambda t: t.__name__)
def test_module_op(t):
    case = MODULE_CASES[t]
    net = OpNet(case)
    assert type(net.m) is t
    check_claim(BUILTIN_MODULE_OPS[t], t.__name__, case)
    groups = pl.channel_groups(net, X)
    assert _in_group(groups, "a") == case.keep
    check_zero_then_remove(net, must_remove=case.keep)


class Branches(nn.Module):
    """roll / logsumexp / softmax over channels next to a plain, prunable branch."""

    def __init__(self):
        super().__init__()
        self.r, self.l, self.s, self.p = (nn.Conv2d(3, 8, 3, padding=1) for _ in range(4))
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(3 * 8 + 1, 5, 1)

    def forward(self, x):
        r = torch.roll(self.r(x), 1, 1)                      # literal shift along channels
        lse = torch.logsumexp(self.l(x), 1, keepdim=True)    # reduction over channels
        sm = torch.softmax(self.s(x), 1)                     # normalization over channels
        return self.head(torch.cat([r, lse, sm, F.relu(self.bn(self.p(x)))], 1))


def test_roll_logsumexp_softmax_over_channels_are_frozen_and_the_rest_stays_exact():
    gen = torch.Generator().manual_seed(0)
    model = Branches().eval()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(8, generator=gen))
        model.bn.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    x = torch.randn(2, 3, 8, 8)
    groups = pl.channel_groups(model, x)
    outs = {m.module for g in groups for m in g.by_role("out")}
    assert outs == {"p"}                   # r, l, s frozen (not in any group); p prunable
    (g,) = groups
    assert g.size == 8 and {m.module for m in g.by_role("affine")} == {"bn"}
    check_zero_then_remove(model, x)


@pytest.mark.parametrize("op", ["gather", "take_along_dim"])
def test_gather_over_channels_is_refused_naming_the_node(op):
    class Gather(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y, idx = self.a(x), torch.zeros(2, 8, 4, 4, dtype=torch.long)
            return self.b(torch.gather(y, 1, idx) if op == "gather" else
                          torch.take_along_dim(y, idx, 1))

    with pytest.raises(pl.UnsupportedOpError, match=rf"{op!r} \(node '{op}'\).*register_op"):
        pl.channel_groups(Gather(), torch.randn(2, 3, 4, 4))


def test_literal_tensors_built_in_forward_are_constants_and_not_left_on_the_model():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):               # fx stores the literal as an attribute of the root
            return self.b(self.a(x) * torch.arange(1.0, 9.0).reshape(1, 8, 1, 1))

    model = Scale()
    before = set(vars(model))
    assert pl.channel_groups(model, torch.randn(2, 3, 4, 4)) == []   # fixed size 8: frozen
    assert set(vars(model)) == before


def test_a_registered_op_is_used_and_built_ins_cannot_be_redeclared():
    class Twice(nn.Module):
        def forward(self, x):
            return x * 2

    class UsesTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.t, self.b = nn.Conv2d(3, 8, 1), Twice(), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(self.t(self.a(x)))

    pl.register_op(Twice, "unsafe")          # declared (wrongly, but conservatively) unsafe
    assert pl.channel_groups(UsesTwice(), torch.randn(2, 3, 4, 4)) == []
    pl.register_op(Twice, "zero")
    (g,) = pl.channel_groups(UsesTwice(), torch.randn(2, 3, 4, 4))
    assert g.size == 8
    with pytest.raises(ValueError, match="'Softmax' is built in as 'mix'"):
        pl.register_op(nn.Softmax, "zero")
    with pytest.raises(ValueError, match="unknown op kind 'reduce'"):
        pl.register_op("cummax", "reduce")


def test_dropout_in_training_keeps_zeros_but_alpha_dropout_freezes():
    y = torch.randn(2, 8, 8, 8)
    y[:, C0] = 0
    for f in (lambda t: F.dropout(t, 0.5, True), lambda t: F.dropout2d(t, 0.5, True),
              lambda t: nn.Dropout(0.5).train()(t)):
        assert torch.equal(f(y)[:, C0], torch.zeros(2, 8, 8))
    assert (F.alpha_dropout(y, 0.5, True)[:, C0] != 0).any()     # why it freezes in training
    for m in (nn.AlphaDropout(0.5), nn.FeatureAlphaDropout(0.5)):
        net = OpNet(Case(lambda s, y, w: s.m(y), True, m)).train()
        net.head.eval()
        assert not _in_group(pl.channel_groups(net, X), "a")
        assert _in_group(pl.channel_groups(net.eval(), X), "a")


def test_batch_of_one_works_and_unbatched_or_empty_inputs_are_refused():
    model = torchvision.models.resnet18(num_classes=10).eval()
    one = pl.channel_groups(model, torch.randn(1, 3, 32, 32))
    two = pl.channel_groups(model, torch.randn(2, 3, 32, 32))
    assert [(g.size, len(g.members)) for g in one] == [(g.size, len(g.members)) for g in two]
    with pytest.raises(ValueError, match=r"'conv1' \(Conv2d\) received an unbatched 3-D input "
                                         r"of shape \(3, 32, 32\).*unsqueeze\(0\)"):
        pl.channel_groups(model, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 3, 32, 32\)\)"):
        pl.channel_groups(model, torch.randn(0, 3, 32, 32))
    for nothing in ((), None, "x.png"):
        with pytest.raises(ValueError, match="example_inputs holds no tensor"):
            pl.channel_groups(model, nothing)
    lin = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0' \(Linear\) received an unbatched 1-D"):
        pl.channel_groups(lin, torch.randn(6))
    assert [g.size for g in pl.channel_groups(lin, torch.randn(1, 6))] == [4]
