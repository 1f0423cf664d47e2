"""Two function-preserving repairs of a pruned BatchNorm network, used by the protocol.

recalibrate_bn(model, batches, n)
    Re-estimate every BatchNorm's running mean and variance from `n` training batches (train
    mode, no gradient, cumulative average: momentum=None), then restore the model's mode and
    momenta. No weight changes. Removal changes what each BN sees (a channel set to its constant,
    a neighbour's output rescaled); stale statistics then misnormalize every later layer. The
    protocol's 'recalibrated' accuracy tells stale statistics from a destroyed function.

restore_bn_input_norms(model, reference)
    A strong sparse phase shrinks conv rows that feed a BatchNorm (group lasso, weight decay on
    rows that lost their purpose). BN is scale invariant in its input, so the function does not
    care, but SGD does: the effective learning rate of a row scales as 1 / ||w_k||^2, so a row
    shrunk a times is fine-tuned as if with an a^2-times hotter lr. This scales every such row
    back up to the reference (dense) layer's RMS row norm r (rows already at or above r, and
    rows that are exactly zero, are left alone):

        w_k <- a_k w_k,  b_k <- a_k b_k,  mu_k <- a_k mu_k,
        var_k <- a_k^2 var_k + (a_k^2 - 1) eps,                     a_k = r / ||w_k|| >= 1,

    so (a_k x - a_k mu_k) / sqrt(var_k' + eps) = (x - mu_k) / sqrt(var_k + eps): the eval-mode
    output is unchanged exactly (in train mode BN uses batch statistics and is invariant anyway).
    The rows are those of every ungrouped conv whose output only a BatchNorm reads
    (`conv_bn_pairs`), a BatchNorm subclass with a forward of its own too (timm's
    BatchNormAct2d); a BatchNorm it cannot pair is named by a warning, never skipped silently.
"""
from __future__ import annotations

import warnings
from collections import Counter
from functools import partial
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import bn_calls

__all__ = ["recalibrate_bn", "restore_bn_input_norms", "conv_bn_pairs"]

_BN = nn.modules.batchnorm._BatchNorm


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, n_batches: int = 20) -> nn.Module:
    """Recompute every BN's running statistics from `n_batches` of (x, y) `batches` (in place).

    Returns `model`. Raises ValueError when `n_batches` < 1 or the loader yields nothing.
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"recalibrate_bn: n_batches must be an integer >= 1, got {n_batches!r}")
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model
    p = next(model.parameters())
    cl = any(isinstance(m, nn.Conv2d) for m in model.modules())
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None                                  # cumulative moving average
    model.train()
    seen = 0
    try:
        for x, _ in batches:
            x = x.to(p.device)
            if cl and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            model(x)
            seen += 1
            if seen >= n_batches:
                break
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    if seen == 0:
        raise ValueError("recalibrate_bn: the loader yielded no batches")
    return model


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where an ungrouped convolution's output feeds only that BatchNorm
    (torch.fx). The BatchNorm is a module or subclass, called as a module or computed by
    F.batch_norm on its own parameters (timm's BatchNormAct2d, `graph.bn_calls`); the
    convolution is a conv module, called as a module or by F.conv1d/2d/3d on its own weight and
    bias (timm's Conv2dSame).

    Nothing is skipped silently: a model torch.fx cannot trace gives [] with a warning naming it;
    a BatchNorm module whose tensors forward reads but that is computed in no form above (e.g. by
    hand), and a paired conv or BatchNorm that forward calls more than once (no one scale fits
    every call), are named by a warning and left out of the pairs.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001  (untraceable user model: said, nothing paired)
        warnings.warn(f"conv_bn_pairs: torch.fx cannot trace {type(model).__name__} "
                      f"({type(e).__name__}: {str(e).strip()[:160]}); no conv -> BatchNorm "
                      "pair found, so no conv row is rescaled")
        return []
    calls = bn_calls(gm, model)
    pairs = []
    for bn, node in calls:
        src = node.kwargs.get("input", node.args[0] if node.args else None)
        conv = _conv_module(gm, src)
        if conv is None or model.get_submodule(conv).groups != 1:
            continue
        if [u for u in src.users if not _meta(u)] == [node]:   # x.shape reads: not values
            pairs.append((conv, bn))
    ncalls = Counter(bn for bn, _ in calls)
    ncalls.update(c for c in map(partial(_conv_module, gm), gm.graph.nodes) if c is not None)
    twice = {n for p in pairs for n in p if ncalls[n] > 1}
    if twice:                                # a module called twice: one scale cannot fit both
        warnings.warn("conv_bn_pairs: modules computed more than once are not paired: "
                      f"{', '.join(sorted(twice))}")
        pairs = [p for p in pairs if not twice & set(p)]
    read = {n.target.rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    lost = [n for n, m in model.named_modules()
            if isinstance(m, _BN) and n in read - {bn for bn, _ in calls}]
    if lost:
        warnings.warn("conv_bn_pairs: BatchNorm modules computed neither as a module nor by "
                      f"F.batch_norm on their own parameters are not paired: {', '.join(lost)}")
    return pairs


def _meta(node: fx.Node) -> bool:
    """A node that reads only a tensor's metadata (getattr: shape, ndim, dtype, ...; size, dim)."""
    return (node.op == "call_function" and node.target is getattr) or (
        node.op == "call_method" and node.target in ("size", "dim"))


def _conv_module(gm: fx.GraphModule, node: object) -> str | None:
    """The conv module whose output `node` is: a call of it, or F.conv*d on its own weight and
    bias (a trace through a conv subclass with its own forward). None otherwise."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        ok = isinstance(gm.get_submodule(node.target), nn.modules.conv._ConvNd)
        return str(node.target) if ok else None
    if node.op != "call_function" or node.target not in (F.conv1d, F.conv2d, F.conv3d):
        return None
    w = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
    b = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target.endswith(".weight")):
        return None
    owner = w.target.rpartition(".")[0]
    conv = gm.get_submodule(owner)
    own_bias = (b is None and conv.bias is None) or (
        isinstance(b, fx.Node) and b.op == "get_attr" and b.target == f"{owner}.bias")
    return owner if isinstance(conv, nn.modules.conv._ConvNd) and own_bias else None


@torch.no_grad()
def restore_bn_input_norms(model: nn.Module, reference: nn.Module) -> dict[str, int]:
    """Scale conv rows feeding a BN up to `reference`'s RMS row norm of the same layer (in place,
    eval output unchanged; see the module docstring). Returns {conv name: rows rescaled}."""
    ref = dict(reference.named_modules())
    done: dict[str, int] = {}
    for conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if conv_name not in ref or bn.running_var is None:
            continue
        w_ref = ref[conv_name].weight
        r = float(w_ref.detach().pow(2).sum() / w_ref.shape[0]) ** 0.5
        norms = conv.weight.detach().flatten(1).norm(dim=1)             # (C_out,)
        a = torch.where((norms > 0) & (norms < r), r / norms.clamp_min(1e-30),
                        torch.ones_like(norms))
        if not bool((a > 1).any()):
            continue
        conv.weight.mul_(a.view(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.mul_(a.to(conv.bias.dtype))
        bn.running_mean.mul_(a.to(bn.running_mean.dtype))
        bn.running_var.mul_(a.pow(2)).add_((a.pow(2) - 1) * bn.eps)
        done[conv_name] = int((a > 1).sum())
    return done
