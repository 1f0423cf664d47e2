"""Channel groups: which channels of a network must be removed together.

We trace the model with torch.fx and run it once on `example_inputs`. Next to every real tensor
we propagate a tensor of *codes* of the same shape: code = 2 * (id + 1) + safe, where `id` names
the channel an element belongs to (-1: a constant) and `safe` says that the element is exactly 0
once that channel's producers are zeroed. Ops that only move data (view, permute, cat, pad,
getitem, channel shuffle, ...) are replayed on the codes, so couplings through flatten, concat,
shuffle and strided subsampling fall out without special cases (channel padding: see below).
Elementwise ops (residual adds, gating multiplies) *union* the ids they combine; a union-find
over ids then gives the classes of channels that must go together.

Every tensor slice indexed by channels is a *slot*: conv/linear output rows and biases ('out'),
consumer input slices ('in'), BN/affine gamma and beta and per-channel parameters ('affine'),
running statistics and PReLU slopes ('stat', sliced but never zeroed). A `ChannelGroup` is a set
of classes that touch exactly the same slots; channel k of the group is one class.

Functional forms (F.conv1d/2d/3d, F.linear, F.batch_norm, F.instance_norm) whose weights are a
module's own parameters or buffers (a get_attr of the traced model) get the slots of the module
forms, named after that module: timm's BatchNormAct2d (an nn.BatchNorm2d subclass whose forward
calls F.batch_norm on self.weight, then an activation) is a BatchNorm for every lookup
(`ChannelGroup.bns`, `Member.bn`, `bn_outputs`). A conv / linear weight computed in forward
(weight standardization: StdConv2d, ScaledStdConv2d) or a depthwise F.conv2d with a literal
`groups` (timm's BlurPool2d) cannot follow a pruned input: its channels are frozen.

Zero padding along channels comes in two kinds. A literal `F.pad` pads by the same amount in the
pruned model, so its padded positions get a frozen id (whatever they are added to must stay). A
`prunelib.models.ChannelPad` module (the option-A shortcut) is a leaf: each padded position is a
new channel of its own, and its group gets a member with role 'pad' (param 'pad'; slot position
p < left is the left side, the others the right side) so that `remove_channels` narrows the pad.

Channels that reach the network output, come from its input, pass through a normalization over
channels (LayerNorm, GroupNorm, softmax) or a channel-mixing op (matmul, einsum), a reduction over
channels, a literal index, slice, size or shift along channels (index_select, x[:, :4],
view(n, 64, -1), roll), or reach a consumer through an op with f(0) != 0 (sigmoid, logsumexp
over space, ...) are frozen: never in a group; so are the operands of an op with f(0) not finite
(reciprocal, log, a divisor) and channels combined with a fixed-size constant. An op we do not
know raises `UnsupportedOpError` naming the node; `register_op` tells us what it does. Every
entry of the op table has a numerical test (tests/test_guarantees_graph.py). A slice that keeps
a whole channel dim (GhostNet's `cat(...)[:, :out_chs]` when out_chs is the full width) stays
whole in the pruned model and is not a literal index.

A size read along a channel dim (x.shape[1], x.size(1), x.size() or x.shape indexed or unpacked,
x.numel()) is followed through integer arithmetic (`_Size`: q times a channel count, or opaque).
Where it is used (slice bounds, narrow / split sizes, view / reshape / expand / zeros sizes,
repeat counts, pad widths, a scalar factor, the model's output), the pruned model would compute
another value, so its channels are frozen (listed as "<op>, a size read from channels"), except
in two uses that are exact: a view / reshape / expand / unflatten size that stays equal to the
width of the output dim it gives (each channel there appears q times as often as in the dim it
was read from: x.view(x.size(0), x.size(1), -1), a channel shuffle by x.size(), the size of a
tensor coupled with the one it shapes), and a slice [:n] whose n stays >= the width of its dim
(x[:, :x.shape[1]]). The size of a dim without prunable channels (batch, spatial, frozen) is a
literal.

`channel_groups` returns a `GroupList` whose `frozen` names, for every frozen channel, the op
that froze it first (with the module it sits in), so a listing says why a layer cannot shrink; a
module torch.fx cannot trace (Python control flow on tensor values) is an UnsupportedOpError
naming it (`register_op` makes it a leaf).

`example_inputs` must be a batch (batch dimension first; size 1 is fine): ValueError otherwise.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .measure import check_batched, example_tuple
from .measure import flat_tensors as _tensors
from .models import ChannelPad

ROLES = ("out", "in", "affine", "stat", "pad")


class UnsupportedOpError(RuntimeError):
    """An operation whose effect on channels prunelib does not know."""


# --- what each op does to channels --------------------------------------------------------------
# The rule every entry obeys: a channel whose producers are zeroed must stay exactly 0, in the
# same position, through the op, or the op freezes the channels it touches (or refuses them).
# zero:    elementwise, f(0) = 0                unsafe:  elementwise, f(0) finite and != 0
# freeze:  elementwise, f(0) not finite: the channels it touches are frozen
# move:    only moves data: replayed on the codes; literal sizes/indices/shifts along channels
#          (slices, split sizes, index_select, roll, ...) freeze or couple them (`literal_rules`)
# chan:    pools / resamples the trailing spatial dims (pooling them with channels freezes)
# binary:  elementwise of two operands          reduce:  reduction over `dim` with f(0) = 0
# reduce_unsafe: reduction with f(0) != 0 (logsumexp): the result is not zero-safe
# mix:     mixes channels: inputs frozen, output opaque          meta: returns no tensor
# weighted: functional conv / linear / batch or instance norm: with weights that are a module's
#          parameters or buffers (get_attr), sliced like the module forms; otherwise as 'mix'
# Argument-dependent cases are refined in `_refine` (hardtanh with 0 outside [min, max], alpha
# dropout in training). tests/test_guarantees_graph.py checks every entry numerically.
_OPS: dict[str, str] = {}                     # filled below, then frozen as BUILTIN_OPS
for _k, _names in {
    "zero": "relu relu_ relu6 leaky_relu leaky_relu_ gelu silu mish hardswish elu selu celu tanh "
            "hardtanh hardtanh_ softsign dropout dropout1d dropout2d dropout3d alpha_dropout "
            "feature_alpha_dropout neg abs clone contiguous detach float double half "
            "bfloat16 to type type_as sin tanhshrink softshrink hardshrink erf sqrt "
            "stochastic_depth",
    "unsafe": "sigmoid hardsigmoid softplus exp cos log_sigmoid",
    "freeze": "reciprocal rsqrt log",
    "move": "view reshape permute transpose t flatten unflatten squeeze unsqueeze expand "
            "expand_as repeat getitem cat concat concatenate stack chunk split tensor_split "
            "unbind narrow select index_select flip roll pixel_shuffle pixel_unshuffle "
            "channel_shuffle native_channel_shuffle movedim swapaxes pad reshape_as view_as",
    "chan": "max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d "
            "adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d "
            "adaptive_max_pool3d lp_pool2d interpolate",
    "binary": "add sub mul truediv div add_ mul_ sub_ div_ rsub maximum minimum",
    "reduce": "mean sum amax amin std var",
    "reduce_unsafe": "logsumexp",
    "mix": "matmul bmm mm einsum softmax log_softmax layer_norm group_norm local_response_norm "
           "scaled_dot_product_attention baddbmm addmm norm",
    "weighted": "conv1d conv2d conv3d linear batch_norm instance_norm",
    "meta": "size dim numel getattr",
}.items():
    for _n in _names.split():
        _OPS[_n] = _k

_MODULE_OPS: dict[type, str] = {
    nn.ReLU: "zero", nn.ReLU6: "zero", nn.LeakyReLU: "zero", nn.GELU: "zero", nn.SiLU: "zero",
    nn.Mish: "zero", nn.Hardswish: "zero", nn.ELU: "zero", nn.SELU: "zero", nn.CELU: "zero",
    nn.Tanh: "zero", nn.Hardtanh: "zero", nn.Softsign: "zero", nn.Identity: "zero",
    nn.Dropout: "zero", nn.Dropout1d: "zero", nn.Dropout2d: "zero", nn.Dropout3d: "zero",
    nn.AlphaDropout: "zero", nn.FeatureAlphaDropout: "zero", nn.Softshrink: "zero",
    nn.Hardshrink: "zero",
    nn.Sigmoid: "unsafe", nn.Hardsigmoid: "unsafe", nn.Softplus: "unsafe",
    nn.MaxPool1d: "chan", nn.MaxPool2d: "chan", nn.MaxPool3d: "chan", nn.AvgPool1d: "chan",
    nn.AvgPool2d: "chan", nn.AvgPool3d: "chan", nn.AdaptiveAvgPool1d: "chan",
    nn.AdaptiveAvgPool2d: "chan", nn.AdaptiveAvgPool3d: "chan", nn.AdaptiveMaxPool1d: "chan",
    nn.AdaptiveMaxPool2d: "chan", nn.AdaptiveMaxPool3d: "chan", nn.LPPool2d: "chan",
    nn.Upsample: "chan", nn.UpsamplingNearest2d: "chan", nn.UpsamplingBilinear2d: "chan",
    nn.ReflectionPad2d: "move", nn.ReplicationPad2d: "move", nn.ZeroPad2d: "move",
    nn.ConstantPad2d: "move",
    nn.Flatten: "move", nn.Unflatten: "move", nn.PixelShuffle: "move",
    nn.PixelUnshuffle: "move", nn.ChannelShuffle: "move",
    nn.LayerNorm: "mix", nn.GroupNorm: "mix", nn.LocalResponseNorm: "mix", nn.Softmax: "mix",
    nn.LogSoftmax: "mix", nn.MultiheadAttention: "mix",
}
# the built-in tables, read-only (each entry has a test case); `register_op` adds to the user ones
BUILTIN_OPS: Mapping[str, str] = MappingProxyType(_OPS)
BUILTIN_MODULE_OPS: Mapping[type, str] = MappingProxyType(_MODULE_OPS)
del _OPS, _MODULE_OPS
_USER_OPS: dict[str, str] = {}
_USER_MODULES: dict[type, str] = {}
# argument names of the 'weighted' functions, in order
_WEIGHTED = {
    **{f"conv{d}d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
       for d in (1, 2, 3)},
    "linear": ("input", "weight", "bias"),
    "batch_norm": ("input", "running_mean", "running_var", "weight", "bias"),
    "instance_norm": ("input", "running_mean", "running_var", "weight", "bias"),
}
_PAD_MODULES = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate",
                nn.ZeroPad2d: "constant", nn.ConstantPad2d: "constant"}
_TENSOR_ATTRS = ("T", "mT", "H", "mH", "data")   # tensor attributes that only move data


def register_op(target: Any, kind: str) -> None:
    """Tell `channel_groups` what an op does: kind in zero/unsafe/freeze/move/chan/mix (see the
    table above). Declaring a wrong kind breaks the exactness of pruning: when in doubt, 'mix'.

    `target` is a function/method name (str) or an nn.Module subclass (traced as a leaf). An op
    of the built-in table cannot be redeclared (its handling is tested).
    """
    if kind not in ("zero", "unsafe", "freeze", "move", "chan", "mix"):
        raise ValueError(f"register_op: unknown op kind {kind!r}; use one of zero, unsafe, "
                         "freeze, move, chan, mix")
    builtin = (BUILTIN_MODULE_OPS if isinstance(target, type) else BUILTIN_OPS)
    key = target if isinstance(target, type) else str(target)
    if key in builtin and builtin[key] != kind:
        raise ValueError(f"register_op: {getattr(key, '__name__', key)!r} is built in as "
                         f"{builtin[key]!r}; it cannot be redeclared as {kind!r}")
    (_USER_MODULES if isinstance(target, type) else _USER_OPS)[key] = kind


def _op_kind(name: str) -> str | None:
    return _USER_OPS.get(name, BUILTIN_OPS.get(name))


def _module_kind(mod: nn.Module) -> str | None:
    t = type(mod)
    return _USER_MODULES.get(t, BUILTIN_MODULE_OPS.get(t))


def _refine(name: str, kind: str, args: tuple, kwargs: dict, mod: nn.Module | None) -> str:
    """The kind of one call when it depends on the arguments: hardtanh(0) = min_val when
    min_val > 0 (or max_val when max_val < 0); alpha dropout maps 0 to a non-zero value while
    training."""
    def arg(pos: int, key: str, default: Any) -> Any:
        return kwargs.get(key, args[pos] if len(args) > pos else default)
    if name in ("hardtanh", "hardtanh_", "Hardtanh"):
        lo, hi = (mod.min_val, mod.max_val) if mod is not None else (
            arg(1, "min_val", -1.0), arg(2, "max_val", 1.0))
        return kind if lo <= 0 <= hi else "unsafe"
    if name in ("alpha_dropout", "feature_alpha_dropout", "AlphaDropout", "FeatureAlphaDropout"):
        p, training = (mod.p, mod.training) if mod is not None else (
            arg(1, "p", 0.5), arg(2, "training", False))
        return "unsafe" if training and p > 0 else kind
    return kind


# --- groups ---------------------------------------------------------------------------------------
@dataclass
class Member:
    """One tensor slice of a group: `idx[k]` are the positions along `dim` of channel k."""
    module: str          # qualified module name ('' = the model itself)
    param: str           # attribute name: 'weight', 'bias', 'running_mean', ...
    dim: int             # the dimension indexed by channels
    idx: torch.Tensor    # LongTensor (size, m); m > 1 after flatten (H*W) or grouped convs
    role: str            # 'out' | 'in' | 'affine' | 'stat' | 'pad' (positions of a ChannelPad)
    kind: str            # class name of the module, e.g. 'Conv2d', 'BatchNorm2d'
    bn: bool = False     # the module is a BatchNorm (a subclass too: timm's BatchNormAct2d)

    def tensor(self, model: nn.Module) -> torch.Tensor:
        if self.role == "pad":
            raise TypeError(f"{self.module}: a 'pad' member (ChannelPad) has no tensor")
        return getattr(model.get_submodule(self.module), self.param)

    def __repr__(self) -> str:
        return (f"Member({self.module or '<root>'}.{self.param}[dim {self.dim}], {self.role}, "
                f"{self.kind}, {tuple(self.idx.shape)})")


@dataclass
class ChannelGroup:
    """Channels that must be removed together; `size` of them, channel k = row k of every idx."""
    index: int
    size: int
    members: list[Member]
    sources: list[str]                 # layers whose outputs create these channels
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def coupled(self) -> bool:
        """True when several layers produce the same channels (joined by residual adds)."""
        return len(self.sources) > 1

    def by_role(self, *roles: str) -> list[Member]:
        return [m for m in self.members if m.role in roles]

    def bns(self) -> list[Member]:
        """The BatchNorm gamma members (one per BN layer of the group): BatchNorm modules and
        their subclasses, also those with a forward of their own (timm's BatchNormAct2d)."""
        return [m for m in self.members if m.role == "affine" and m.param == "weight"
                and (m.bn or "BatchNorm" in m.kind)]

    def rows(self, model: nn.Module | None = None, roles: Iterable[str] = ("out",),
             params: Iterable[str] | None = None) -> list[torch.Tensor]:
        """Differentiable slices of the members, each reshaped to (size, -1): row k = channel k."""
        model = self._model(model)
        out = []
        for m in self.members:
            if m.role not in roles or (params is not None and m.param not in params):
                continue
            t = m.tensor(model).index_select(m.dim, m.idx.reshape(-1).to(m.tensor(model).device))
            t = t.movedim(m.dim, 0).reshape(self.size, -1)        # (size*m, ...) -> (size, -1)
            out.append(t)
        return out

    def zero_(self, idx: torch.Tensor | Iterable[int], model: nn.Module | None = None) -> None:
        """Zero every producer parameter (rows, biases, gamma, beta) of channels `idx`."""
        model = self._model(model)
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        with torch.no_grad():
            for m in self.by_role("out", "affine"):
                t = m.tensor(model)
                t.index_fill_(m.dim, m.idx[idx].reshape(-1).to(t.device), 0.0)

    def _model(self, model: nn.Module | None) -> nn.Module:
        if model is None:
            model = self.model
        if model is None:
            raise ValueError("this group holds no model; pass model=")
        return model

    def __repr__(self) -> str:
        def names(role: str) -> str:
            seen = list(dict.fromkeys(m.module or "<root>" for m in self.by_role(role)))
            return ", ".join(seen[:6]) + (f", +{len(seen) - 6}" if len(seen) > 6 else "")
        kind = "coupled" if self.coupled else "internal"
        pad = f"; pad: {names('pad')}" if self.by_role("pad") else ""
        return (f"ChannelGroup(#{self.index}, {self.size} ch, {kind}; out: {names('out')}; "
                f"affine: {names('affine')}; in: {names('in')}{pad})")


@dataclass
class FrozenOp:
    """The op that first froze `channels` channels made by `layers`: they enter no group."""
    op: str              # 'output', 'input', "mul_3 ('mul')", 'layer1.0.aa (BlurPool2d)', ...
    channels: int
    layers: list[str]

    def __repr__(self) -> str:
        few = ", ".join(self.layers[:4]) + (f", +{len(self.layers) - 4}"
                                             if len(self.layers) > 4 else "")
        return f"FrozenOp({self.op}: {self.channels} ch of {few})"


class GroupList(list):
    """What `channel_groups` returns: the list of ChannelGroups, plus `frozen`, the ops that
    froze channels (each channel under the first op in trace order), and `summary()`."""

    def __init__(self, groups: Iterable[ChannelGroup] = (),
                 frozen: Iterable[FrozenOp] = ()) -> None:
        super().__init__(groups)
        self.frozen: list[FrozenOp] = list(frozen)

    def summary(self) -> str:
        """One line per group, then one per op that froze channels."""
        lines = [repr(g) for g in self]
        lines += [f"frozen by {f.op}: {f.channels} channels of "
                  f"{', '.join(f.layers[:6])}{' ...' if len(f.layers) > 6 else ''}"
                  for f in self.frozen]
        return "\n".join(lines)


# --- tracing --------------------------------------------------------------------------------------
class _LeafTracer(fx.Tracer):
    """torch.fx tracer that keeps ChannelPad and the modules given to `register_op` as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, ChannelPad) or _module_kind(m) is not None
                or super().is_leaf_module(m, qualname))

    def trace(self, root: nn.Module, *args: Any, **kwargs: Any) -> fx.Graph:
        self._names: dict[int, str] = {}               # parameter -> name, then buffers
        self._buffers: dict[int, str] = {}
        for n, t in root.named_parameters():
            self._names.setdefault(id(t), n)
        for n, t in root.named_buffers():
            self._buffers.setdefault(id(t), n)
        return super().trace(root, *args, **kwargs)

    def create_arg(self, a: Any) -> Any:
        """A parameter or buffer as an argument: its get_attr node, found by a dict."""
        if isinstance(a, torch.Tensor):
            name = self._names.get(id(a)) if isinstance(a, nn.Parameter) else \
                self._buffers.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        """A module's parameter read in forward: a get_attr node, found by a dict (fx's own
        lookup scans every parameter of the model for each read); the rest as fx does it."""
        name = self._names.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not keep.any():
            return
        n = len(self.parent)                      # distinct pairs, as one int64 key each
        for key in np.unique(a[keep].astype(np.int64) * n + b[keep]).tolist():
            rx, ry = self.find(key // n), self.find(key % n)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)


def _enc(ids: torch.Tensor, safe: torch.Tensor | bool) -> torch.Tensor:
    return 2 * (ids + 1) + torch.as_tensor(safe, dtype=torch.long)


def _ids(code: torch.Tensor) -> torch.Tensor:
    return torch.div(code, 2, rounding_mode="floor") - 1


def _safe(code: torch.Tensor) -> torch.Tensor:
    return code % 2


def _const_code(value: Any) -> torch.Tensor:
    """Code of a constant: id -1, safe iff it is exactly zero."""
    zero = bool((torch.as_tensor(value) == 0).all()) if value is not None else False
    return torch.tensor(1 if zero else 0)


class _Tracer:
    def __init__(self, model: nn.Module, example_inputs: tuple) -> None:
        self.model = model
        self.uf = _UnionFind()
        self.frozen: list[np.ndarray] = []
        self.why: list[str] = []                # the op that froze each entry of `frozen`
        self.where = "input"                    # the op being traced (for `why`)
        self.read: set[str] = set()             # modules whose tensors forward reads (get_attr)
        self.made: list[tuple[str, np.ndarray]] = []   # frozen outputs of unsliceable layers
        self.slots: dict[tuple[str, str, int], dict] = {}
        self.inputs = example_inputs
        self.sizes: dict[fx.Node, Any] = {}     # size values that depend on channels (_Size)
        self.exact: set[int] = set()            # the _Dyn uses of the current node found exact
        self.nargs: Any = ()                    # node args / kwargs as the literal rules see them
        self.nkw: dict = {}
        self.dyn: list[_Dyn] = []               # the sizes that depend on channels it uses

    # slots ---------------------------------------------------------------------------------------
    def slot(self, module: str, param: str, dim: int, ids: np.ndarray, role: str, kind: str,
             source: bool = False) -> None:
        key = (module, param, dim)
        ids = np.asarray(ids, dtype=np.int64)
        old = self.slots.get(key)
        if old is not None:                     # a module called twice: same channels
            self.uf.union_arrays(old["ids"], ids)
            if old["attr"]:                     # read by get_attr, now claimed by its op
                old.update(role=role, kind=kind, source=source, attr=False)
            return
        self.slots[key] = dict(ids=ids, role=role, kind=kind, source=source, attr=False)

    def per_channel(self, code: torch.Tensor, dim: int,
                    freeze_unsafe: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """ids and safety of each position along `dim` (union of ids found at that position).

        A consumer (conv/linear input) that would see a non-zero value from a zeroed channel
        freezes it (`freeze_unsafe`); BN and pooling pass the flag on instead.
        """
        c = _squeeze_broadcast(code, keep=dim).movedim(dim, 0)
        c = c.reshape(c.shape[0], -1)                                      # (C, rest)
        ids, safe = _ids(c), _safe(c)
        lo, hi = ids.amin(1), ids.amax(1)
        out = hi.clone()
        for ch in torch.nonzero(lo != hi).flatten().tolist():             # mixed positions
            vals = torch.unique(ids[ch])
            vals = vals[vals >= 0].numpy()
            self.uf.union_arrays(vals[:1], vals)
            out[ch] = int(vals[0])
        unsafe = safe.amin(1) == 0
        ids_np = out.numpy().astype(np.int64)
        if freeze_unsafe:
            self.freeze(ids_np[unsafe.numpy()])
        return ids_np, (~unsafe).numpy()

    def rooted(self, code: torch.Tensor) -> torch.Tensor:
        """The same codes with every id replaced by its class (the union-find root so far)."""
        small = _squeeze_broadcast(code)
        ids = _ids(small)
        u = torch.unique(ids)
        u = u[u >= 0]
        r = torch.tensor([self.uf.find(v) for v in u.tolist()], dtype=torch.long)
        if len(u) == 0 or torch.equal(r, u):
            return code
        pos = torch.searchsorted(u, ids.clamp_min(0)).clamp_max(len(u) - 1)
        return _enc(torch.where(ids >= 0, r[pos], ids), _safe(small)).expand(code.shape)

    def freeze(self, ids: Any) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[ids >= 0]
        if ids.size:
            self.frozen.append(np.unique(ids))
            self.why.append(self.where)

    def freeze_code(self, code: Any) -> None:
        for c in _tensors(code):
            self.freeze(torch.unique(_ids(c)).numpy())

    # handlers ------------------------------------------------------------------------------------
    def run(self) -> None:
        before = set(vars(self.model))
        tracer = _LeafTracer()
        try:
            gm = fx.GraphModule(self.model, tracer.trace(self.model))
        except (fx.proxy.TraceError, TypeError, AssertionError) as e:
            stack = list(getattr(tracer, "module_stack", {}))
            path = stack[-1] if stack else ""
            kind = type(self.model.get_submodule(path)).__name__
            raise UnsupportedOpError(
                f"channel_groups cannot trace module {kind} at '{path or '<root>'}' with "
                f"torch.fx ({type(e).__name__}: {str(e).strip()[:160]}). If it does not mix "
                f"channels, declare it with prunelib.graph.register_op({kind}, kind) before "
                "tracing (it is then a leaf).") from e
        finally:                      # fx stores literal tensors of forward on the root module
            self.constants = set(vars(self.model)) - before
            for name in self.constants:
                delattr(self.model, name)
        self.gm = gm
        last_use: dict[fx.Node, fx.Node] = {}
        for node in gm.graph.nodes:
            for a in node.all_input_nodes:
                last_use[a] = node
        env: dict[fx.Node, Any] = {}
        codes: dict[fx.Node, Any] = {}
        self.env = env
        inputs = iter(self.inputs)
        for node in gm.graph.nodes:
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            cargs = fx.node.map_arg(node.args, lambda n: codes[n])
            ckw = fx.node.map_arg(node.kwargs, lambda n: codes[n])
            self.where = _describe(node, gm)
            if node.op == "placeholder":
                real = next(inputs, None)
                code = None
                if isinstance(real, torch.Tensor):
                    code = self.fresh_code(real, frozen=True)
            elif node.op == "get_attr":
                real = _fetch(gm, node.target)
                self.read.add(node.target.rpartition(".")[0])
                code = self.attr_code(node.target, real)
            elif node.op == "output":
                self.freeze_code(cargs)
                self.literal_args(node)               # sizes returned: their channels stay
                self.freeze_sizes()
                break
            else:
                real, code = self.call(node, args, kwargs, cargs, ckw)
            env[node], codes[node] = real, code
            for a in node.all_input_nodes:
                if last_use.get(a) is node:
                    del env[a], codes[a]

    def fresh_code(self, real: torch.Tensor, frozen: bool = False, dim: int = 1) -> torch.Tensor:
        if real.dim() <= dim:
            return _const_code(None).expand(real.shape)
        ids = torch.from_numpy(self.uf.new(real.shape[dim]))
        if frozen:
            self.freeze(ids.numpy())
        shape = [1] * real.dim()
        shape[dim] = -1
        return _enc(ids.reshape(shape), True).expand(real.shape)

    def attr_code(self, target: str, t: Any) -> Any:
        """A parameter / buffer with one dim of size > 1 is a per-channel tensor (a slot, sliced
        by pruning); anything else, including constants that tracing created (literal tensors
        built in forward, which the pruned model builds at the same size), is a constant."""
        if not isinstance(t, torch.Tensor):
            return None
        big = [d for d, s in enumerate(t.shape) if s > 1]
        if len(big) != 1 or target in self.constants:
            return _const_code(t).expand(t.shape)
        owner, _, name = target.rpartition(".")
        d = big[0]
        ids = self.uf.new(t.shape[d])
        kind = type(self.model.get_submodule(owner)).__name__
        new = (owner, name, d) not in self.slots
        self.slot(owner, name, d, ids, "affine", kind)
        if new:                                 # the op that uses it may claim another role
            self.slots[(owner, name, d)]["attr"] = True
        shape = [1] * t.dim()
        shape[d] = -1
        return _enc(torch.from_numpy(ids).reshape(shape), True).expand(t.shape)

    def call(self, node: fx.Node, args: tuple, kwargs: dict, cargs: tuple, ckw: dict):
        """Run one node on values and codes. Sizes that depend on channels (`_Size`) are
        followed through arithmetic; every other use of one freezes the channels it was read
        from, unless the op's handler found the use exact (`self.exact`)."""
        self.literal_args(node)
        real, code = self._call(node, args, kwargs, cargs, ckw)
        self.freeze_sizes()
        return real, code

    def _call(self, node: fx.Node, args: tuple, kwargs: dict, cargs: tuple, ckw: dict):
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            check_batched(node.target, mod, args[0] if args else None, "channel_groups")
            real = mod(*args, **kwargs)
            return real, self.module_code(node, mod, real, args, kwargs, cargs, ckw)
        fn = node.target
        if node.op == "call_method":
            real = getattr(args[0], fn)(*args[1:], **kwargs)
            name = fn
        else:
            real = fn(*args, **kwargs)
            name = getattr(fn, "__name__", str(fn))
        if not _tensors(args) and not _tensors(kwargs):
            if self.dyn and not _tensors(real):       # arithmetic on sizes: followed
                self.sizes[node] = self.size_arith(name, real)
                self.exact.update(id(d) for d in self.dyn)
            return real, _const_like(real)
        kind = _op_kind(name)
        if kind is None:
            raise UnsupportedOpError(
                f"channel_groups cannot follow channels through {node.op} {name!r} "
                f"(node '{node.name}'){_inside(node)}. If it does not mix channels, declare "
                f"what it does with prunelib.graph.register_op({name!r}, kind) before tracing.")
        if name == "getattr" and args[1] == "shape" and isinstance(args[0], torch.Tensor):
            self.read_size(node, cargs[0], None)
            return real, None
        if name == "getattr":
            return real, self.tensor_attr(args, cargs, real)
        if name in ("size", "numel") and isinstance(args[0], torch.Tensor):
            d = kwargs.get("dim", args[1] if len(args) > 1 else None)
            self.read_size(node, cargs[0], "numel" if name == "numel" else d)
        if kind == "meta" or not _tensors(real):            # sizes, dtypes, x.type() -> str
            return real, None
        if kind == "weighted":
            return real, self.weighted(name, node, real, args, kwargs, cargs, ckw)
        kind = _refine(name, kind, args, kwargs, None)
        return real, self.apply(kind, name, node, real, args, kwargs, cargs, ckw)

    # sizes read from channel dims --------------------------------------------------------------
    def classes(self, ids: Any) -> np.ndarray:
        """The class (union-find root) of each id; -1 for positions that no pruning removes:
        constants (id -1) and frozen channels. Pure: the union-find is not changed."""
        ids = np.asarray(ids, dtype=np.int64)
        p = np.asarray(self.uf.parent, dtype=np.int64)
        if not len(p):
            return np.full(ids.shape, -1, dtype=np.int64)
        while not np.array_equal(p[p], p):
            p = p[p]
        fixed = np.zeros(len(p), dtype=bool)
        if self.frozen:
            fixed[p[np.concatenate(self.frozen)]] = True
        r = p[np.maximum(ids, 0)]
        return np.where((ids < 0) | fixed[r], -1, r)

    def dim_classes(self, code: torch.Tensor, d: int) -> np.ndarray | None:
        """The class of each position along dim `d` of `code`, or None when a position holds
        elements of several classes (its size then follows no single channel)."""
        c = _squeeze_broadcast(code, keep=d).movedim(d, 0)
        cl = self.classes(_ids(c).reshape(c.shape[0], -1).numpy())
        return cl[:, 0] if bool((cl.min(1) == cl.max(1)).all()) else None

    def read_size(self, node: fx.Node, code: torch.Tensor, d: int | str | None) -> None:
        """x.size(d), x.size() / x.shape (d None: one entry per dim), x.numel() ('numel'): record
        in `self.sizes` what the value depends on. A dim whose positions are all constants or
        frozen channels has a fixed size (nothing recorded: it acts as a literal); otherwise the
        size is q * (number of positions) of those channels (`_Size`), or opaque when a position
        mixes classes or (numel) several dims carry channels."""
        def one(e: int) -> _Size | None:
            if e not in varying:                      # no channel changes along it: fixed
                return None
            cl = self.dim_classes(code, e)
            if cl is None:                            # opaque: all of x's channels
                return _Size(torch.unique(_ids(_squeeze_broadcast(code))).numpy(), None)
            return _Size(cl, Fraction(1)) if (cl >= 0).any() else None
        if not isinstance(code, torch.Tensor) or code.dim() == 0:
            return
        varying = _varying_dims(code)
        if d is None:
            forms = tuple(one(e) for e in range(code.dim()))
            if any(f is not None for f in forms):
                self.sizes[node] = forms
            return
        if d != "numel":
            form = one(d % code.dim())
        else:
            forms = [(e, one(e)) for e in range(code.dim())]
            forms = [(e, f) for e, f in forms if f is not None]
            if len(forms) > 1:
                form = _Size(np.concatenate([f.ids for _, f in forms]), None)
            else:
                form = forms[0][1] if forms else None
                if form is not None and form.q is not None:
                    form = _Size(form.ids, Fraction(code.numel(), code.shape[forms[0][0]]))
        if form is not None:
            self.sizes[node] = form

    def literal_args(self, node: fx.Node) -> None:
        """`node`'s args and kwargs as the literal rules see them (`self.nargs`, `self.nkw`):
        a size value that no pruning changes is its value (a literal); one that depends on
        channels is a `_Dyn` (torch.Size / tuples element-wise), listed in `self.dyn`; other
        nodes (tensors) stay nodes."""
        self.dyn = []
        self.exact = set()

        def sub(n: fx.Node) -> Any:
            v, form = self.env.get(n), self.sizes.get(n)
            if form is None:
                return n if _tensors(v) else v
            if isinstance(form, tuple):
                out = tuple(e if f is None else _Dyn(f, e) for e, f in zip(v, form))
                self.dyn.extend(e for e in out if isinstance(e, _Dyn))
                return out
            self.dyn.append(_Dyn(form, v))
            return self.dyn[-1]
        self.nargs = fx.node.map_arg(node.args, sub)
        self.nkw = fx.node.map_arg(node.kwargs, sub)

    def freeze_sizes(self) -> None:
        """Freeze the channels behind every size the current node used in a way not found
        exact: the pruned model would compute another value there."""
        where = self.where
        self.where += ", a size read from channels"
        for d in self.dyn:
            if id(d) not in self.exact:
                self.freeze(d.form.ids)
        self.where = where

    def size_arith(self, name: str, real: Any) -> Any:
        """The dependence of the result of arithmetic on sizes: indexing a torch.Size, a size
        times or floor-divided by a literal int keep it a multiple of a channel count; any other
        combination is opaque (its uses freeze the channels it was read from)."""
        a = self.nargs
        if name == "getitem" and isinstance(a[0], tuple) and isinstance(a[1], (int, slice)):
            part = a[0][a[1]]
            if isinstance(part, tuple):
                forms = tuple(e.form if isinstance(e, _Dyn) else None for e in part)
                return forms if any(f is not None for f in forms) else None
            return part.form if isinstance(part, _Dyn) else None
        if name == "add" and isinstance(real, tuple) and all(isinstance(e, tuple) for e in a):
            return tuple(e.form if isinstance(e, _Dyn) else None for e in a[0] + a[1])
        if name in ("mul", "floordiv") and len(a) == 2 and len(self.dyn) == 1:
            (d,) = self.dyn
            k = a[1] if a[0] is d else a[0] if name == "mul" else None
            if d.form.q is not None and isinstance(k, int) and not isinstance(k, bool) and k:
                return _Size(d.form.ids, d.form.q * k if name == "mul" else d.form.q / k)
        return _Size(np.concatenate([d.form.ids for d in self.dyn]), None)

    def follows(self, d: Any, cl: np.ndarray | None, at_least: bool = False) -> bool:
        """True when size `d` (a _Dyn) stays equal, in every pruned model, to the number of
        positions with classes `cl` (at_least: stays >= it): it is q times a channel count and
        each class appears q times as often there as in the dim it was read from."""
        if not isinstance(d, _Dyn) or d.form.q is None or cl is None:
            return False
        cs = dict(zip(*np.unique(self.classes(d.form.ids), return_counts=True)))
        ck = dict(zip(*np.unique(cl, return_counts=True)))
        if at_least:
            return all(d.form.q * cs.get(r, 0) >= n for r, n in ck.items())
        return cs.keys() == ck.keys() and all(d.form.q * cs[r] == ck[r] for r in cs)

    def tensor_attr(self, args: tuple, cargs: tuple, real: Any) -> Any:
        """getattr(owner, attr): T / mT / H / mH / data of a tensor only move data (replayed on
        the codes); a field of a returned tuple keeps its codes; any other tensor attribute
        (grad, real, ...) freezes the owner's channels and is opaque."""
        if not isinstance(real, torch.Tensor):
            return None
        owner, attr = cargs[0], args[1]
        if not isinstance(args[0], torch.Tensor) or attr in _TENSOR_ATTRS:
            code = getattr(owner, attr, None) if owner is not None else None
            if isinstance(code, torch.Tensor) and code.shape == real.shape:
                return code
        self.freeze_code(owner)
        return _const_code(None).expand(real.shape)

    def apply(self, kind: str, name: str, node: fx.Node, real: Any, args: tuple, kwargs: dict,
              cargs: tuple, ckw: dict) -> Any:
        x = cargs[0] if cargs else next(iter(ckw.values()))
        if kind == "zero":
            return x.expand(real.shape) if isinstance(x, torch.Tensor) else x
        if kind in ("unsafe", "freeze"):
            if kind == "freeze":                     # f(0) = inf / nan: these never get zeroed
                self.freeze_code(x)
            return _enc(_ids(x), False).expand(real.shape)
        if kind == "move":
            return self.replay(name, node, real, args, kwargs, cargs, ckw)
        if kind == "chan":
            return self.pooled(name, x, real)
        if kind == "binary":
            return self.binary(name, args, kwargs, cargs, ckw, real)
        if kind in ("reduce", "reduce_unsafe"):
            return self.reduce(x, real, args, kwargs, zero_safe=kind == "reduce")
        if name in ("softmax", "log_softmax", "Softmax", "LogSoftmax") and \
                isinstance(x, torch.Tensor):               # over a dim that carries no channels:
            d = (self.gm.get_submodule(node.target).dim if node.op == "call_module"  # per channel
                 else kwargs.get("dim", args[1] if len(args) > 1 else None))
            if isinstance(d, int) and d % x.dim() not in _varying_dims(self.rooted(x)):
                return _enc(_ids(x), False).expand(real.shape)     # f(0) != 0: like 'unsafe'
        self.freeze_code((cargs, ckw))                           # mix
        return _map_tensors(real, lambda r: _const_code(None).expand(r.shape))

    def replay(self, name: str, node: fx.Node, real: Any, args: tuple, kwargs: dict,
               cargs: tuple, ckw: dict) -> Any:
        """`_replay`, then the sizes given to view / reshape / expand / unflatten that pruning
        may change: exact when each stays equal to the size of the output dim it gives (the
        output's channels there are those it was read from, `follows`); the others act as the
        literals they are in the pruned model: the literal rules run again with their values
        (and `freeze_sizes` freezes the channels they were read from)."""
        out = _map_tensors(self._replay(name, node, real, args, kwargs, cargs, ckw), _compress)
        if not self.dyn or name not in ("view", "reshape", "expand", "unflatten", "Unflatten") \
                or not isinstance(out, torch.Tensor) or not isinstance(cargs[0], torch.Tensor):
            return out
        mod = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        sizes, first = self.shape_args(name, mod, cargs[0])
        bad = set()
        for k, v in enumerate(sizes):
            if isinstance(v, _Dyn):
                if self.follows(v, self.dim_classes(out, first + k)):
                    self.exact.add(id(v))
                else:
                    bad.add(id(v))
        if bad:
            def lit(v: Any) -> Any:
                if isinstance(v, (list, tuple)):
                    return type(v)(lit(e) for e in v)
                return v.value if isinstance(v, _Dyn) and id(v) in bad else v
            self.nargs, self.nkw = lit(self.nargs), {k: lit(v) for k, v in self.nkw.items()}
            self.literal_rules(name, node, cargs[0], args, kwargs, real)
        return out

    def _replay(self, name: str, node: fx.Node, real: Any, args: tuple, kwargs: dict,
                cargs: tuple, ckw: dict) -> Any:
        """Run a data-movement op on the codes instead of the values.

        Only the data operand (the first argument: a tensor or a list of tensors) is replaced by
        its codes; index tensors and sizes stay as they are. A pruned model re-runs the same op
        with sizes derived from its (smaller) inputs, but with the same literal constants. So
        before replaying, channels that a literal would misplace are frozen (slices, narrow,
        index_select, literal split sizes, roll, channel padding) or coupled so that the
        structure survives removal (chunk, channel shuffle, pixel shuffle, a view or unflatten
        that splits channels).
        """
        def sub(real_arg: Any, code_arg: Any) -> Any:
            if isinstance(real_arg, torch.Tensor):
                return code_arg
            if isinstance(real_arg, (list, tuple)):
                return type(real_arg)(sub(r, c) for r, c in zip(real_arg, code_arg))
            return real_arg
        x = cargs[0] if cargs and isinstance(cargs[0], torch.Tensor) else None
        if x is not None:
            self.literal_rules(name, node, x, args, kwargs, real)
        if name in ("cat", "concat", "concatenate", "stack"):
            parts = kwargs.get("tensors", args[0] if args else None)
            codes = ckw.get("tensors", cargs[0] if cargs else None)
            d = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            self.couple_shapes(list(codes), parts[0].dim(), None if name == "stack" else d)
        elif name in ("reshape_as", "view_as") and x is not None:   # `other`'s shape: both
            if real.shape == x.shape:      # shrink alike, or (another shape) neither may
                self.couple_shapes([x, cargs[1]], x.dim(), None)
            else:
                self.freeze_code((x, cargs[1]))
        elif name == "expand_as":                 # x's full dims must keep matching `other`'s
            a, b = torch.broadcast_tensors(cargs[0], cargs[1])
            self.fixed_operand(a, b, args[0])
            self.fixed_operand(b, a, args[1])
            self.uf.union_arrays(_ids(a).numpy(), _ids(b).numpy())
        a = (sub(args[0], cargs[0]),) + tuple(args[1:]) if args else ()
        kw = {k: sub(v, ckw[k]) if k in ("input", "tensors") else v for k, v in kwargs.items()}
        if name == "pad":
            value = kw.pop("value", a[3] if len(a) > 3 else 0) or 0
            mode = kw.pop("mode", a[2] if len(a) > 2 else "constant")
            return self.pad(kw["input"] if "input" in kw else a[0],
                            list(kw["pad"] if "pad" in kw else a[1]), mode, value)
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            if type(mod) in _PAD_MODULES:
                return self.pad(a[0], list(mod.padding), _PAD_MODULES[type(mod)],
                                getattr(mod, "value", 0))
            return mod(*a, **kw)
        if node.op == "call_method":
            fn = "reshape" if name == "view" else name
            return getattr(a[0], fn)(*a[1:], **kw)
        if name == "getitem" and not isinstance(args[0], torch.Tensor):
            return cargs[0][args[1]]
        return node.target(*a, **kw)

    def pad(self, code: torch.Tensor, pads: list[int], mode: str, value: Any) -> torch.Tensor:
        """F.pad on the codes. The pruned model pads by the same literal amounts, so: constant
        padding along a channel dim gives its positions a frozen id (whatever they are added to
        must stay); cropping (negative pads) or reflect / replicate / circular padding along a
        channel dim would misplace channels and freezes them. Padding along another dim adds
        positions of the same channels, holding the pad value (zero-safe iff it is 0)."""
        varying = _varying_dims(code)
        padded = {code.dim() - 1 - i // 2: pads[i:i + 2] for i in range(0, len(pads), 2)}
        along = {d: p for d, p in padded.items() if d in varying and any(p)}
        if any(mode != "constant" or min(p) < 0 for p in along.values()):
            self.freeze_code(code)
        if mode != "constant":
            return F.pad(code.contiguous(), pads, mode=mode)
        pin = int(self.uf.new(1)[0])
        self.freeze([pin])
        for d, (left, right) in padded.items():
            if d in varying:
                fill = int(_enc(torch.tensor(pin), True))
                code = F.pad(code, [0, 0] * (code.dim() - 1 - d) + [left, right], value=fill)
                continue
            code = code.narrow(d, max(0, -left), code.shape[d] - max(0, -left) - max(0, -right))
            edge = _enc(_ids(code.narrow(d, 0, 1)), bool(_const_code(value)))
            sizes = [list(code.shape[:d]) + [n] + list(code.shape[d + 1:])
                     for n in (max(0, left), max(0, right))]
            code = torch.cat([edge.expand(sizes[0]), code, edge.expand(sizes[1])], d)
        return code

    def literal_rules(self, name: str, node: fx.Node, x: torch.Tensor, args: tuple,
                      kwargs: dict, real: Any) -> None:
        varying = _varying_dims(x)
        if not varying:
            return
        mod = self.gm.get_submodule(node.target) if node.op == "call_module" else None

        def arg(pos: int, key: str, default: Any = None) -> Any:
            return kwargs.get(key, args[pos] if len(args) > pos else default)

        def dim_arg(pos: int, default: int = 0) -> int:
            return arg(pos, "dim", default) % x.dim()
        if name == "getitem":
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            lit = self.nargs[1] if isinstance(self.nargs[1], tuple) else (self.nargs[1],)
            idx = tuple(self.derived_slice(x, e, f, d) if isinstance(e, slice) else e
                        for e, f, d in zip(idx, lit, _index_dims(idx, x.dim())))
            if any(d in varying for d in _indexed_dims(idx, tuple(x.shape))):
                self.freeze_code(x)
        elif name in ("narrow", "select", "index_select", "unbind"):
            if dim_arg(1) in varying:
                self.freeze_code(x)
        elif name == "split":
            if dim_arg(2) in varying:
                self.freeze_code(x)
        elif name == "roll":                          # shifts by a literal amount: misplaces
            dims = arg(2, "dims")
            dims = (range(x.dim()) if dims is None or dims == () else
                    [dims] if isinstance(dims, int) else dims)
            if any(d % x.dim() in varying for d in dims):
                self.freeze_code(x)
        elif name in ("chunk", "tensor_split"):      # n equal blocks, or literal indices
            d, n = dim_arg(2), arg(1, "chunks" if name == "chunk" else "indices_or_sections")
            if d in varying:
                if not isinstance(n, int) or x.shape[d] % n:
                    self.freeze_code(x)
                else:
                    self.couple_blocks(x, d, n)
        elif name in ("channel_shuffle", "native_channel_shuffle", "ChannelShuffle"):
            self.couple_blocks(x, 1, mod.groups if mod is not None else arg(1, "groups"))
        elif name in ("pixel_shuffle", "PixelShuffle"):   # blocks of r*r channels go together
            r = mod.upscale_factor if mod is not None else arg(1, "upscale_factor")
            if x.dim() - 3 in varying:
                ids, _ = self.per_channel(x, x.dim() - 3, freeze_unsafe=False)
                blocks = ids.reshape(-1, r * r)
                for k in range(1, r * r):
                    self.uf.union_arrays(blocks[:, 0], blocks[:, k])
        elif name == "expand":                        # a literal size of a channel dim
            sizes, _ = self.shape_args(name, mod, x)
            lead = len(sizes) - x.dim()
            if any(isinstance(sizes[lead + d], int) and sizes[lead + d] != -1
                   for d in varying):
                self.freeze_code(x)
        elif name in ("view", "reshape"):
            self.split_rule(x, varying, list(self.shape_args(name, mod, x)[0]), real.shape)
        elif name in ("unflatten", "Unflatten"):
            sizes, d = self.shape_args(name, mod, x)
            self.split_rule(x, varying, [-1] * d + list(sizes) + [-1] * (x.dim() - d - 1),
                            real.shape)

    def shape_args(self, name: str, mod: nn.Module | None, x: torch.Tensor) -> tuple[list, int]:
        """The sizes given to view / reshape / expand / unflatten (as `literal_args` sees them:
        literals, or _Dyn for sizes pruning may change) and the output dim of the first one."""
        a, kw = self.nargs, self.nkw
        if name in ("unflatten", "Unflatten"):
            if mod is not None:
                return list(mod.unflattened_size), mod.dim % x.dim()
            d = kw.get("dim", a[1] if len(a) > 1 else None)
            return list(kw.get("sizes", a[2] if len(a) > 2 else None)), d % x.dim()
        if "size" in kw or "shape" in kw:
            return list(kw.get("size", kw.get("shape"))), 0
        return list(a[1:] if len(a) > 2 or not isinstance(a[1], (list, tuple)) else a[1]), 0

    def derived_slice(self, x: torch.Tensor, e: slice, f: Any, d: int | None) -> Any:
        """A slice `e` of dim `d` of `x` whose bounds (`f`, as `literal_args` sees them) pruning
        may change: it keeps the whole dim in every pruned model (and its sizes are exact uses)
        when it is [:n] with n >= the dim's size for every choice of removed channels (x[:, :
        x.shape[1]]); otherwise it restricts the dim (_Derived), and its sizes freeze the channels
        they were read from. A slice with literal bounds is returned as it is."""
        if not isinstance(f, slice):                     # bounds held in a tensor, ...
            return _Derived()
        parts = (f.start, f.stop, f.step)
        if any(isinstance(v, fx.Node) for v in parts):
            return _Derived()
        if not any(isinstance(v, _Dyn) for v in parts):
            return e
        if d is not None and f.start in (None, 0) and f.step in (None, 1) and \
                self.follows(f.stop, self.dim_classes(x, d), at_least=True):
            self.exact.add(id(f.stop))
            return slice(None)
        return _Derived()

    def couple_shapes(self, codes: list[torch.Tensor], ndim: int, skip: int | None) -> None:
        """Inputs of cat (along dim `skip`) or stack (skip None) must keep equal sizes along
        their other dims in the pruned model: couple their positions along every such dim that
        carries channels, and freeze those facing a position without channels (fixed size)."""
        skip = None if skip is None else skip % ndim
        dims = set().union(*(_varying_dims(c) for c in codes)) - {skip}
        for e in sorted(dims):
            per = [self.per_channel(c, e, freeze_unsafe=False)[0] for c in codes]
            fixed = np.zeros(len(per[0]), dtype=bool)
            for p in per:
                self.uf.union_arrays(per[0], p)
                fixed |= p < 0
            if fixed.any():
                for p in per:
                    self.freeze(p[fixed])

    def couple_blocks(self, x: torch.Tensor, d: int, n: int) -> None:
        """Dim d is cut into n equal blocks whose size the pruned model derives from its input:
        position p of every block must go together."""
        ids, _ = self.per_channel(x, d, freeze_unsafe=False)
        blocks = ids.reshape(n, -1)
        for k in range(1, n):
            self.uf.union_arrays(blocks[0], blocks[k])

    def split_rule(self, x: torch.Tensor, varying: set[int], sizes: list, out: torch.Size):
        """A view / reshape / unflatten of channel dims. Sizes given as literals stay fixed in the
        pruned model, the others shrink: a channel dim whose new size is all literal is frozen;
        one split into factors, some literal, couples positions across the literal factors."""
        i = j = 0
        shape = list(x.shape)
        while i < len(shape) and j < len(out):
            pi, pj, i0, j0 = shape[i], out[j], i, j
            while pi != pj:
                if pi < pj:
                    i += 1
                    pi *= shape[i]
                else:
                    j += 1
                    pj *= out[j]
            factors = [k for k in range(j0, j + 1) if out[k] > 1]
            lit = [k for k in factors if isinstance(sizes[k], int) and sizes[k] != -1]
            seg = varying & set(range(i0, i + 1))
            if seg and factors and (len(lit) == len(factors) or (i > i0 and lit)):
                self.freeze_code(x)                   # a literal size of a channel dim
            elif i == i0 and seg and len(factors) > 1:
                if lit:
                    ids, _ = self.per_channel(x, i0, freeze_unsafe=False)
                    arr = ids.reshape([out[k] for k in factors])
                    arr = np.moveaxis(arr, [factors.index(k) for k in lit],
                                      list(range(len(lit))))
                    arr = arr.reshape(int(np.prod([out[k] for k in lit])), -1)
                    for k in range(1, arr.shape[0]):
                        self.uf.union_arrays(arr[0], arr[k])
            i, j = i + 1, j + 1

    def pooled(self, name: str, x: torch.Tensor, real: Any) -> Any:
        """Codes of a pooling / resampling op over the trailing spatial dims (the last 1, 2 or 3
        by the op's name, else all dims after the second): a zeroed channel stays 0 at every
        position of the other dims; pooling along a dim that carries channels freezes them.
        With return_indices, the indices of a zeroed channel are not 0 (not zero-safe)."""
        n = int(name[-2]) if name[-2:] in ("1d", "2d", "3d") else x.dim() - 2
        vals = real[0] if isinstance(real, tuple) else real
        code = self.reduced(x, list(range(x.dim() - n, x.dim())), keep=True).expand(vals.shape)
        if isinstance(real, tuple):
            return type(real)((code, _enc(_ids(code), False).expand(real[1].shape)))
        return code

    def binary(self, name: str, args: tuple, kwargs: dict, cargs: tuple, ckw: dict,
               real: torch.Tensor) -> torch.Tensor:
        ops, cops = list(args[:2]), list(cargs[:2])
        for key in ("input", "other"):
            if key in kwargs and len(ops) < 2:
                ops.append(kwargs[key])
                cops.append(ckw[key])
        ca = [c if isinstance(a, torch.Tensor) else _const_code(a) for a, c in zip(ops, cops)]
        a, b = torch.broadcast_tensors(*ca)
        self.fixed_operand(a, b, ops[0])
        self.fixed_operand(b, a, ops[1])
        for d in range(a.dim()):                      # work on what actually varies
            if a.shape[d] > 1 and a.stride(d) == 0 and b.stride(d) == 0:
                a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
        ia, ib = _ids(a), _ids(b)
        self.uf.union_arrays(ia.numpy(), ib.numpy())
        ids = torch.where(ia >= 0, ia, ib)
        sa, sb = _safe(a), _safe(b)
        if name in ("mul", "mul_"):
            safe = sa | sb
        elif name in ("truediv", "div", "div_"):
            self.freeze(ib.unique().numpy())          # a zeroed divisor gives inf / nan
            safe = sa
        else:
            safe = sa & sb
        return _enc(ids, safe).expand(real.shape)

    def fixed_operand(self, own: torch.Tensor, other: torch.Tensor, real: Any) -> None:
        """Freeze the channels of `other` that face positions of `own` whose size cannot follow
        the pruning: `own` is full-size along a dim where `other` carries channels, but has no
        channels there (a constant, an opaque result) or only one repeated channel."""
        if not isinstance(real, torch.Tensor):
            return
        full = {own.dim() - real.dim() + d for d in range(real.dim()) if real.shape[d] > 1}
        dims = full & _varying_dims(other)
        if not dims:
            return
        mine, theirs = _varying_dims(own), _ids(_squeeze_broadcast(other))
        for d in dims:
            if d not in mine:
                self.freeze(theirs.unique().numpy())
                return
            o = _ids(_squeeze_broadcast(own, keep=d)).movedim(d, 0)
            empty = torch.nonzero((o.reshape(o.shape[0], -1) < 0).all(1)).flatten()
            if len(empty):
                self.freeze(theirs.index_select(d, empty).unique().numpy())

    def reduced(self, x: torch.Tensor, dims: list[int], keep: bool) -> torch.Tensor:
        """Codes of a reduction of `x` over `dims` with f(0) = 0: channels whose values are
        combined with other channels' (not already coupled with them: summing stacked branches
        whose channels go together is exact) are frozen; a position is zero-safe if all its
        inputs are."""
        x = self.rooted(_squeeze_broadcast(x))
        ids = _ids(x)
        lo, hi = ids, ids
        for d in dims:
            lo, hi = lo.amin(d, keepdim=True), hi.amax(d, keepdim=True)
        self.freeze(ids[(lo != hi).expand_as(ids)].unique().numpy())
        safe = _safe(x)
        for d in dims:
            safe = safe.amin(d, keepdim=True)
        code = _enc(hi, safe & (lo == hi).long())
        if not keep:
            for d in sorted(dims, reverse=True):
                code = code.squeeze(d)
        return code

    def reduce(self, x: torch.Tensor, real: Any, args: tuple, kwargs: dict,
               zero_safe: bool = True) -> Any:
        """sum / mean / amax / std / ... over `dim` (all dims when None or empty). keepdim is
        read off the result; a bool second argument is std/var's `unbiased`, not a dim."""
        vals = real[0] if isinstance(real, tuple) else real
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if isinstance(dim, bool) or not isinstance(dim, (int, list, tuple)):
            dim = None
        dims = (list(range(x.dim())) if dim is None or (not isinstance(dim, int) and not dim)
                else [dim] if isinstance(dim, int) else list(dim))
        dims = sorted({d % x.dim() for d in dims}) if x.dim() else []
        code = self.reduced(x, dims, keep=vals.dim() == x.dim() and x.dim() > 0)
        if not zero_safe:                              # e.g. logsumexp(0) = log(n) != 0
            code = _enc(_ids(code), False)
        code = code.expand(vals.shape)
        if isinstance(real, tuple):                   # (values, indices)
            return type(real)((code, _const_code(None).expand(real[1].shape)))
        return code

    def module_code(self, node: fx.Node, mod: nn.Module, real: Any, args: tuple, kwargs: dict,
                    cargs: tuple, ckw: dict) -> Any:
        name, kind = node.target, type(mod).__name__
        x = cargs[0] if cargs else None
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return self.conv(name, kind, x, real, mod.groups, mod.out_channels,
                             "bias" if mod.bias is not None else None)
        if isinstance(mod, nn.Linear):
            return self.linear(name, kind, x, real, mod.out_features,
                               "bias" if mod.bias is not None else None)
        if isinstance(mod, (nn.modules.batchnorm._NormBase)):   # BatchNorm*, InstanceNorm*
            ids, _ = self.per_channel(x, 1, freeze_unsafe=False)   # zeroed gamma, beta -> 0
            if mod.affine:
                self.slot(name, "weight", 0, ids, "affine", kind)
                self.slot(name, "bias", 0, ids, "affine", kind)
            if mod.track_running_stats and mod.running_mean is not None:
                self.slot(name, "running_mean", 0, ids, "stat", kind)
                self.slot(name, "running_var", 0, ids, "stat", kind)
            code = self.fresh_like(ids, real, 1)
            return code if mod.affine else _enc(_ids(code), False)   # (x - mu) / sigma != 0
        if isinstance(mod, ChannelPad):
            return self.channel_pad(name, mod, x, real)
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters > 1:
                ids, _ = self.per_channel(x, 1, freeze_unsafe=False)
                self.slot(name, "weight", 0, ids, "stat", kind)
            return x.expand(real.shape)
        op = _module_kind(mod)
        if op is None:
            raise UnsupportedOpError(
                f"channel_groups cannot follow channels through module {kind} at '{name}'. "
                f"If it does not mix channels, declare it with "
                f"prunelib.graph.register_op({kind}, kind) before tracing.")
        op = _refine(kind, op, args, kwargs, mod)
        return self.apply(op, kind, node, real, args, kwargs, cargs, ckw)

    def conv(self, name: str, kind: str, x: torch.Tensor, real: torch.Tensor, g: int,
             cout: int, bias: str | None, weight: str = "weight") -> torch.Tensor:
        """Codes of a convolution of `x` by `name.weight` (+ `name.bias`) with `g` groups."""
        ids, _ = self.per_channel(x, 1)                              # (C_in,)
        cin = len(ids)
        if cin // g == 1:                                            # depthwise: out j <- in j//m
            out = np.repeat(ids, cout // cin)
            self.slot(name, weight, 0, out, "out", kind)
            if bias is not None:
                self.slot(name, bias, 0, out, "out", kind)
            return self.fresh_like(out, real, 1)
        per_g = ids.reshape(g, cin // g)                             # grouped: position p of
        for k in range(1, g):                                        # every group goes together
            self.uf.union_arrays(per_g[0], per_g[k])
        self.slot(name, weight, 1, per_g[0], "in", kind)
        out = np.tile(self.uf.new(cout // g), g)
        self.slot(name, weight, 0, out, "out", kind, source=True)
        if bias is not None:
            self.slot(name, bias, 0, out, "out", kind)
        return self.fresh_like(out, real, 1)

    def linear(self, name: str, kind: str, x: torch.Tensor, real: torch.Tensor, cout: int,
               bias: str | None, weight: str = "weight") -> torch.Tensor:
        """Codes of `x @ name.weight.T (+ name.bias)` over the last dim of `x`."""
        ids, _ = self.per_channel(x, x.dim() - 1)
        self.slot(name, weight, 1, ids, "in", kind)
        out = self.uf.new(cout)
        self.slot(name, weight, 0, out, "out", kind, source=True)
        if bias is not None:
            self.slot(name, bias, 0, out, "out", kind)
        return self.fresh_like(out, real, real.dim() - 1)

    def weighted(self, name: str, node: fx.Node, real: torch.Tensor, args: tuple, kwargs: dict,
                 cargs: tuple, ckw: dict) -> Any:
        """F.conv1d/2d/3d, F.linear, F.batch_norm, F.instance_norm. Weights read straight from
        a module (its parameters or buffers, e.g. timm's BatchNormAct2d calling F.batch_norm on
        self.weight) get the slots of the module forms, named after that module. A conv or
        linear weight built in forward (standardized, expanded, a literal) mixes channels:
        inputs frozen, output opaque; so does a depthwise F.conv with a literal `groups`, which
        the pruned model would still pass (timm's BlurPool2d: groups=self.channels)."""
        sig = _WEIGHTED[name]

        def arg(key: str) -> tuple[Any, Any, Any]:
            i = sig.index(key)
            if key in kwargs:
                return kwargs[key], ckw[key], node.kwargs[key]
            if i < len(args):
                return args[i], cargs[i], node.args[i]
            return None, None, None

        def owner(src: Any) -> tuple[str, str] | None:
            if isinstance(src, fx.Node) and src.op == "get_attr" \
                    and src.target not in self.constants and "." in src.target:
                mod, _, attr = src.target.rpartition(".")
                return mod, attr
            return None
        x = cargs[0] if cargs else ckw["input"]
        if not isinstance(x, torch.Tensor):
            return self.apply("mix", name, node, real, args, kwargs, cargs, ckw)
        if name in ("batch_norm", "instance_norm"):
            return self.norm(x, real, {k: arg(k)[1:] for k in sig[1:5]}, owner)
        w, _, wsrc = arg("weight")
        b, _, bsrc = arg("bias")
        wo, bo = owner(wsrc), owner(bsrc) if b is not None else None
        groups = arg("groups")[0] if "groups" in sig else 1
        groups = 1 if groups is None else groups
        stack = list((node.meta.get("nn_module_stack") or {node.name: (node.name,)}).values())
        if wo is None or (b is not None and (bo is None or bo[0] != wo[0])):
            self.where += ", weight computed in forward"
            self.apply("mix", name, node, real, args, kwargs, cargs, ckw)   # inputs frozen
            dim = real.dim() - 1 if name == "linear" else 1
            out = self.uf.new(real.shape[dim])             # outputs: channels of their own,
            self.freeze(out)                               # frozen, listed under this op
            self.made.append((stack[-1][0], out))
            return _enc(_ids(self.fresh_like(out, real, dim)), False)
        if groups > 1 and x.shape[1] // groups == 1:      # depthwise, literal groups: frozen
            ids, _ = self.per_channel(x, 1)
            self.where += f", depthwise with a literal groups={groups}"
            self.freeze(ids)
            return self.fresh_like(np.repeat(ids, w.shape[0] // len(ids)), real, 1)
        kind = type(self.model.get_submodule(wo[0])).__name__
        bias = bo[1] if bo is not None else None
        if name == "linear":
            return self.linear(wo[0], kind, x, real, w.shape[0], bias, wo[1])
        return self.conv(wo[0], kind, x, real, groups, w.shape[0], bias, wo[1])

    def norm(self, x: torch.Tensor, real: torch.Tensor, operands: dict, owner) -> torch.Tensor:
        """F.batch_norm / F.instance_norm: per channel of dim 1. Running statistics read from a
        module are 'stat' slots, weight and bias 'affine' ones (so `zero_` zeroes them and the
        output of a zeroed channel is exactly 0, whatever its input); an operand without
        channels (a literal tensor) freezes the channels it faces."""
        ids, _ = self.per_channel(x, 1, freeze_unsafe=False)
        safe = np.zeros(len(ids), dtype=bool)
        for key, (code, src) in operands.items():
            if code is None:
                continue
            vids, vsafe = self.per_channel(code, 0, freeze_unsafe=False)
            self.freeze(ids[vids < 0])
            at = owner(src)
            if at is not None and (at[0], at[1], 0) in self.slots:   # slot() unions them
                role = "stat" if key.startswith("running") else "affine"
                kind = type(self.model.get_submodule(at[0])).__name__
                self.slot(at[0], at[1], 0, np.where(ids >= 0, ids, vids), role, kind)
            else:
                self.uf.union_arrays(ids, vids)
            ids = np.where(ids >= 0, ids, vids)
            if key == "weight":
                safe = vsafe.astype(bool)
            elif key == "bias":
                safe &= vsafe.astype(bool)
        shape = [1] * real.dim()
        shape[1] = -1
        code = _enc(torch.from_numpy(ids).reshape(shape), torch.from_numpy(safe).reshape(shape))
        return code.expand(real.shape)

    def channel_pad(self, name: str, mod: ChannelPad, x: torch.Tensor,
                    real: torch.Tensor) -> torch.Tensor:
        """Codes of a ChannelPad output: each padded position is a new channel (zero: safe).

        Its slot ('pad') lists the left positions first: slot position p < left is the left side.
        """
        new = self.uf.new(mod.left + mod.right)
        self.slot(name, "pad", 1, new, "pad", type(mod).__name__)
        x = _squeeze_broadcast(x, keep=1)
        shape = [1] * x.dim()
        shape[1] = -1
        pad = _enc(torch.from_numpy(new).reshape(shape), True)
        parts = [pad[:, :mod.left], x, pad[:, mod.left:]]
        n, _, *rest = real.shape
        return _compress(torch.cat([p.expand(n, p.shape[1], *rest) for p in parts], 1))

    def fresh_like(self, ids: np.ndarray, real: torch.Tensor, dim: int) -> torch.Tensor:
        """Codes of an output whose positions along `dim` carry `ids` (safe: zeroed producer)."""
        shape = [1] * real.dim()
        shape[dim] = -1
        return _enc(torch.from_numpy(np.asarray(ids)).reshape(shape), True).expand(real.shape)

    # groups --------------------------------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        uf = self.uf
        roots = np.array([uf.find(i) for i in range(len(uf.parent))], dtype=np.int64)
        frozen = np.zeros(len(roots), dtype=bool)
        if self.frozen:
            frozen[roots[np.concatenate(self.frozen)]] = True
        # class -> {slot key: positions}
        members: dict[int, dict[tuple, list[int]]] = {}
        sourced: set[int] = set()
        keys = list(self.slots)
        for key in keys:
            s = self.slots[key]
            r = roots[s["ids"]]
            for pos in np.nonzero(~frozen[r])[0]:
                members.setdefault(int(r[pos]), {}).setdefault(key, []).append(int(pos))
            if s["source"]:
                sourced.update(int(v) for v in np.unique(r))
        order = {k: i for i, k in enumerate(keys)}
        by_sig: dict[tuple, list[int]] = {}
        for cls, slots in members.items():
            if cls not in sourced:
                continue
            sig = tuple(sorted(((k, len(p)) for k, p in slots.items()), key=lambda t: order[t[0]]))
            by_sig.setdefault(sig, []).append(cls)
        out = []
        for sig, classes in by_sig.items():
            first = sig[0][0]
            classes.sort(key=lambda c: members[c][first][0])
            mems, sources = [], []
            for key, _ in sig:
                s = self.slots[key]
                idx = torch.tensor([members[c][key] for c in classes], dtype=torch.long)
                bn = isinstance(self.model.get_submodule(key[0]),
                                nn.modules.batchnorm._BatchNorm)
                mems.append(Member(key[0], key[1], key[2], idx, s["role"], s["kind"], bn))
                if s["source"]:
                    sources.append(key[0])
            out.append(ChannelGroup(0, len(classes), mems, sources, self.model))
        out.sort(key=lambda g: min(order[(m.module, m.param, m.dim)] for m in g.members))
        for i, g in enumerate(out):
            g.index = i
        return GroupList(out, self.frozen_ops(roots, sourced))

    def frozen_ops(self, roots: np.ndarray, sourced: set[int]) -> list[FrozenOp]:
        """For each op that first froze channels some layer produces (ops that freeze them
        again further down are not listed): how many, and those layers."""
        makers: dict[int, list[str]] = {}
        for (module, _, _), s in self.slots.items():
            if s["source"]:
                for r in np.unique(roots[s["ids"]]):
                    makers.setdefault(int(r), []).append(module)
        listed = set(sourced)
        for why, ids in self.made:
            for r in np.unique(roots[ids]):
                makers.setdefault(int(r), []).append(why)
                listed.add(int(r))
        first: dict[int, str] = {}
        for why, ids in zip(self.why, self.frozen):
            for r in np.unique(roots[ids]):
                first.setdefault(int(r), why)
        per: dict[str, set[int]] = {}
        for r, why in first.items():
            if r in listed:
                per.setdefault(why, set()).add(r)
        out = []
        for why, classes in per.items():
            if classes:
                layers = dict.fromkeys(m for c in sorted(classes) for m in makers.get(c, ()))
                out.append(FrozenOp(why, len(classes), list(layers)))
        return out


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """How a node is named in messages: 'input', 'output', 'layer1.0.se (SEModule)',
    "mul_3 ('mul')"."""
    if node.op in ("placeholder", "output"):
        return "input" if node.op == "placeholder" else "output"
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__",
                                                                   str(node.target))
    return f"{node.name} ({target!r}){_inside(node)}"


def _inside(node: fx.Node) -> str:
    """' in <module path> (<class>)': the module whose forward made a function-call node."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, kind = list(stack.values())[-1]
    return f" in {path} ({getattr(kind, '__name__', kind)})"


def _squeeze_broadcast(code: torch.Tensor, keep: int = -1) -> torch.Tensor:
    """The same codes with every stride-0 (broadcast) dim narrowed to size 1."""
    for d in range(code.dim()):
        if d != keep % code.dim() and code.shape[d] > 1 and code.stride(d) == 0:
            code = code.narrow(d, 0, 1)
    return code


def _compress(code: torch.Tensor) -> torch.Tensor:
    """Re-express dims along which the codes are constant as broadcasts (saves memory/time)."""
    if code.numel() < 4096:
        return code
    small = _squeeze_broadcast(code)
    for d in range(small.dim()):
        if small.shape[d] > 1 and bool((small == small.narrow(d, 0, 1)).all()):
            small = small.narrow(d, 0, 1)
    return small.expand(code.shape)


def _varying_dims(code: torch.Tensor) -> set[int]:
    """Dims along which the channel ids of `code` change (the dims that carry channels)."""
    ids = _ids(_squeeze_broadcast(code))
    return {d for d in range(ids.dim())
            if ids.shape[d] > 1 and bool((ids.amax(d) != ids.amin(d)).any())}


class _Derived:
    """An index computed from sizes at run time (not a literal): it restricts its dim."""


@dataclass(frozen=True)
class _Size:
    """What a size value depends on: q * (number of positions along a dim whose channel classes
    are `ids`; -1 marks positions no pruning removes), or, with q None, on channels `ids` in a
    way we do not follow (any use freezes them)."""
    ids: np.ndarray
    q: Fraction | None


@dataclass(eq=False)
class _Dyn:
    """A size value, in a node's arguments, that pruning may change: its `_Size` and value."""
    form: _Size
    value: Any


def _span(e: Any) -> int:
    """How many dims an index element covers: a bool mask as many as it has, others one."""
    return e.dim() if isinstance(e, torch.Tensor) and e.dtype == torch.bool else 1


def _index_dims(idx: tuple, ndim: int) -> list[int | None]:
    """The dim of a tensor with `ndim` dims that each element of an index tuple indexes first
    (None for None and Ellipsis)."""
    n_real = sum(_span(e) for e in idx if e is not None and e is not Ellipsis)
    out: list[int | None] = []
    d = 0
    for e in idx:
        out.append(None if e is None or e is Ellipsis else d)
        d += ndim - n_real if e is Ellipsis else 0 if e is None else _span(e)
    return out


def _indexed_dims(idx: tuple, shape: tuple[int, ...]) -> list[int]:
    """Dims of a tensor of `shape` that an index tuple restricts: anything but a slice that
    keeps every position in order (':', '0:n' or ':n' with n >= the size, which stays the whole
    dim when it shrinks: GhostNet's cat(...)[:, :out_chs]); a bool mask covers as many dims as
    it has."""
    return [k for e, d in zip(idx, _index_dims(idx, len(shape))) if d is not None
            and not (isinstance(e, slice) and e.indices(shape[d]) == (0, shape[d], 1))
            for k in range(d, d + _span(e))]


def _map_tensors(x: Any, fn) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x) if not hasattr(x, "_fields") else \
            type(x)(*(_map_tensors(v, fn) for v in x))
    return None


def _const_like(real: Any) -> Any:
    return _map_tensors(real, lambda r: _const_code(r).expand(r.shape))


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def channel_groups(model: nn.Module, example_inputs: Any) -> GroupList:
    """Trace `model` on `example_inputs` (a tensor or tuple) and return its channel groups.

    The model is run once (in its current train/eval mode, without gradients) and left as it
    was: buffers (BatchNorm running statistics, counters) are restored afterwards and the global
    random state is forked, so tracing a model in training mode does not overwrite its
    statistics with those of `example_inputs`. Every group holds a reference to `model`, which
    `ChannelGroup.zero_` acts on by default. The result is a list (`GroupList`) whose `frozen`
    names the ops that kept channels out of every group (`summary()` prints both).

    `example_inputs` must be a batch (batch dimension first; size 1 is fine): no tensor, an empty
    batch or an unbatched input to a conv / linear layer is a ValueError. An op whose effect on
    channels is not known raises `UnsupportedOpError` naming the node.
    """
    inputs = example_tuple(example_inputs, "channel_groups")
    tracer = _Tracer(model, inputs)
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    devices = sorted({b.device.index or 0 for b in saved.values() if b.is_cuda})
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        try:
            tracer.run()
        finally:
            for n, b in model.named_buffers():
                b.copy_(saved[n])
    traced = {k[0] for k in tracer.slots} | tracer.read
    untraced = [n for n, m in model.named_modules()
                if n and not list(m.children()) and any(True for _ in m.parameters(False))
                and n not in traced and _is_leaf_with_channels(m)]
    if untraced:
        warnings.warn("modules not used in the traced forward pass are left unchanged by "
                      f"pruning: {', '.join(untraced[:8])}" + (" ..." if len(untraced) > 8 else ""))
    return tracer.groups()


def bn_calls(gm: fx.GraphModule, model: nn.Module) -> list[tuple[str, fx.Node]]:
    """Every BatchNorm computed in `gm`, a trace of `model`: (module name, the node that computes
    it). A BatchNorm is a call of a BatchNorm module (a subclass too), or a call of F.batch_norm
    whose weight (or, without one, running mean) is that of a BatchNorm module: a subclass with a
    forward of its own (timm's BatchNormAct2d: F.batch_norm, then `drop` and `act`) is traced
    through."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                  nn.modules.batchnorm._BatchNorm):
            found.append((str(node.target), node))
        elif node.op == "call_function" and getattr(node.target, "__name__", "") == "batch_norm":
            for pos, key in ((3, "weight"), (1, "running_mean")):
                a = node.kwargs.get(key, node.args[pos] if len(node.args) > pos else None)
                owner = a.target.rpartition(".")[0] if isinstance(a, fx.Node) and \
                    a.op == "get_attr" else None
                if owner is not None and isinstance(model.get_submodule(owner),
                                                    nn.modules.batchnorm._BatchNorm):
                    found.append((owner, node))
                    break
    return found


def bn_outputs(gm: fx.GraphModule, model: nn.Module) -> list[tuple[str, list[fx.Node]]]:
    """Every BatchNorm computed in `gm` (`bn_calls`): (module name, the nodes that use its
    output, looking past nn.Identity modules)."""
    def users(n: fx.Node) -> list[fx.Node]:
        out = []
        for u in n.users:
            skip = u.op == "call_module" and isinstance(gm.get_submodule(u.target), nn.Identity)
            out += users(u) if skip else [u]
        return out
    return [(name, users(node)) for name, node in bn_calls(gm, model)]


def _is_leaf_with_channels(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                          nn.modules.batchnorm._NormBase))


__all__ = ["ChannelGroup", "FrozenOp", "GroupList", "Member", "UnsupportedOpError",
           "channel_groups", "register_op", "ROLES"]
