"""Inference export: the model as prunelib recommends running it (`for_inference`).

A pruned CNN keeps its residual trunk at full width and loses channels inside the blocks, so
its convolutions shrink while its BatchNorms, additions and ReLUs on the trunk do not. On a CPU
these elementwise passes over memory cost a large share of the pruned model's time (see
`measure.profile_layers`). The export removes what inference does not need, exactly:

  fold_bn        every BatchNorm (eval mode, running statistics) whose input is a convolution
                 used by nothing else (and called once) is folded into its weight and bias:
                 W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps),
                 computed in float64 and stored in the weight's dtype. The BatchNorm node
                 disappears from the graph.
  inplace        a ReLU (F.relu, torch.relu, nn.ReLU) or an addition (a + b, torch.add) whose
                 first input is an intermediate tensor used by nothing else, of the output's
                 shape and dtype (checked by running the example inputs), writes into that
                 input instead of allocating and writing a new tensor.
  channels_last  parameters of 4-D convolutions in NHWC memory order (oneDNN's native layout).
  backend        'eager' (the traced torch.fx GraphModule, default) or 'jit' (torch.jit.trace,
                 then torch.jit.freeze: less Python overhead per op; TorchScript is deprecated
                 in torch 2.x). A failing backend raises `ExportError` naming it.

Measured on the 2-core CPU (ResNet-56, L1 at 50% MACs, one thread, process CPU time, median
of 7 interleaved rounds, load ~5.5): at batch 64 folding alone takes the pruned/dense ratio
from 1.42 to 1.50 and the in-place pass to 1.62 (dense 224 -> 186 ms, pruned 158 -> 117 ms);
'jit' and torch.compile (TorchInductor) add nothing measurable there (1.63 each), at batch 1
'jit' runs both models ~20% faster than 'eager'. torch.compile (45 s to compile a ResNet-56)
was dropped for that reason.

The result computes the eval-mode model's function up to float rounding (tests/test_export.py:
ResNet-20/56, option A and B shortcuts, dense and pruned: max abs difference <= 1e-6 x the
largest logit; the committed ResNet-20 baseline's predictions on 500 CIFAR-10 test images are
unchanged).
It is for inference only: it is in eval mode and its BatchNorms are gone. The model is traced
with torch.fx (prunelib's tracer: `ChannelPad` and modules declared with `register_op` are
leaves); a model fx cannot trace raises `ExportError` naming the cause.
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .graph import _LeafTracer

BACKENDS = ("eager", "jit")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RELU = (F.relu, torch.relu)
_ADD = (operator.add, operator.iadd, torch.add)
_FRESH_MODS = (nn.modules.conv._ConvNd, nn.Linear) + _BN
_FRESH_FNS = _RELU + (operator.add, torch.add, operator.mul, torch.mul)


class ExportError(RuntimeError):
    """The model cannot be exported as asked (untraceable, or the backend is unavailable)."""


def trace(model: nn.Module) -> fx.GraphModule:
    """`model` (not copied) traced by torch.fx with prunelib's leaf modules; ExportError if
    fx cannot trace it."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure is re-raised with its cause
        raise ExportError(f"for_inference: torch.fx cannot trace {type(model).__name__} "
                          f"({type(e).__name__}: {e}); run the eval model as it is") from e
    return fx.GraphModule(model, graph, type(model).__name__)


def fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold every eval BatchNorm that follows a conv used only by it into that conv, in place
    in `gm`; returns how many were folded."""
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}                    # a conv called twice keeps its weights
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in list(gm.graph.nodes):
        bn = mods.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BN) or bn.running_mean is None or len(node.args) != 1:
            continue
        src = node.args[0]
        conv = mods.get(src.target) if isinstance(src, fx.Node) and \
            src.op == "call_module" else None
        if (not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed
                or len(src.users) != 1 or calls[src.target] != 1
                or conv.out_channels != bn.num_features):
            continue
        _fold_into(conv, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


@torch.no_grad()
def _fold_into(conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm) -> None:
    w = conv.weight
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    shape = (-1,) + (1,) * (w.dim() - 1)
    conv.weight = nn.Parameter((w.double() * s.reshape(shape)).to(w.dtype),
                               requires_grad=False)
    conv.bias = nn.Parameter(((b - mean) * s + beta).to(w.dtype), requires_grad=False)


def make_inplace(gm: fx.GraphModule, example_inputs: tuple) -> int:
    """Make ReLUs and additions write into their first input where that input is an
    intermediate tensor used only by them, of the result's shape and dtype (shapes from running
    `example_inputs`); in place in `gm`, returns how many ops changed."""
    ShapeProp(gm).propagate(*example_inputs)
    mods = dict(gm.named_modules())
    fresh: set[fx.Node] = set()         # nodes whose output is a new tensor, aliasing nothing
    changed = 0
    for node in gm.graph.nodes:
        if (node.op == "call_module" and isinstance(mods.get(node.target), _FRESH_MODS)) or (
                node.op == "call_function" and node.target in _FRESH_FNS
                and not node.kwargs.get("inplace")):
            fresh.add(node)
        if not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        if src not in fresh or len(src.users) != 1 or not _same_meta(src, node):
            continue
        if (node.op == "call_function" and node.target in _RELU) or (
                node.op == "call_module" and isinstance(mods.get(node.target), nn.ReLU)):
            node.op, node.target, node.args = "call_function", F.relu, (src,)
            node.kwargs = {"inplace": True}           # a shared nn.ReLU module stays as it is
        elif (node.op == "call_function" and node.target in _ADD and len(node.args) == 2
              and not node.kwargs and isinstance(node.args[1], (fx.Node, int, float))):
            node.target = operator.iadd
        else:
            continue
        fresh.add(node)                  # aliases src, which nothing else reads
        changed += 1
    gm.recompile()
    return changed


def _same_meta(a: fx.Node, b: fx.Node) -> bool:
    ta, tb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta")
    return (hasattr(ta, "shape") and hasattr(tb, "shape") and ta.shape == tb.shape
            and ta.dtype == tb.dtype)


def for_inference(model: nn.Module, example_inputs: Any, fold_bn: bool = True,
                  inplace: bool = True, channels_last: bool = True, backend: str = "eager",
                  strict: bool = True) -> nn.Module:
    """An eval-mode inference copy of `model` computing the same function up to float
    rounding: BatchNorms folded into their convs, ReLUs and adds in place, channels_last
    weights, run by `backend` (module docstring). `model` is not changed.

    example_inputs: a batch (tensor or tuple of arguments) on the model's device, used to check
    shapes for the in-place pass and by the 'jit' trace; any batch size runs afterwards.
    strict=False: where the export fails (fx cannot trace the model, the backend fails), warn
    naming the cause and return an eval copy of the model (channels_last if asked) instead.
    """
    if backend not in BACKENDS:
        raise ExportError(f"for_inference: backend={backend!r}: use one of {BACKENDS}")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        return _export(model, inputs, fold_bn, inplace, channels_last, backend)
    except ExportError as e:
        if strict:
            raise
        warnings.warn(f"{e}; timing the eval model as it is", stacklevel=2)
    out = copy.deepcopy(model).eval()
    return out.to(memory_format=torch.channels_last) if channels_last else out


def _export(model: nn.Module, inputs: tuple, fold_bn: bool, inplace: bool,
            channels_last: bool, backend: str) -> nn.Module:
    gm = trace(copy.deepcopy(model).eval())
    if fold_bn:
        fold_batchnorm(gm)
    if inplace:
        with torch.no_grad():
            make_inplace(gm, inputs)
    if channels_last and any(isinstance(m, nn.Conv2d) for m in gm.modules()):
        gm = gm.to(memory_format=torch.channels_last)
    for p in gm.parameters():
        p.requires_grad_(False)
    if backend == "jit":
        try:                        # TorchScript is deprecated in torch 2.x: not warned here
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.freeze(torch.jit.trace(gm, inputs))
        except Exception as e:  # noqa: BLE001 - re-raised naming the backend
            raise ExportError(f"for_inference: backend='jit' failed ({type(e).__name__}: "
                              f"{e}); use backend='eager'") from e
    return gm
