"""Structured Sparsity Learning (SSL): group lasso on filters, channels, filter shapes, depth.

Wen, Wu, Wang, Chen, Li, "Learning Structured Sparsity in Deep Neural Networks", NeurIPS 2016
(arXiv:1608.03665); official code wenwei202/caffe, branch scnn.

Objective   E(W) = E_D(W) + lam_f sum_l sum_n ||W^l[n,:,:,:]||_2      (filter groups)
                          + lam_c sum_l sum_c ||W^l[:,c,:,:]||_2      (channel groups)
                          + lam_s sum_l sum_(c,i,j) ||W^l[:,c,i,j]||_2  (shape groups, option)
                          + lam_d sum_b ||W^(b)||_2                   (depth groups, option)
Weighting   the plain sum of ||w_g|| with one lam per group type (Caffe's GroupLassoRegularize),
            not Yuan & Lin's group lasso, which weights group g by sqrt(p_g), p_g its number of
            weights. Each group's pull lam w_g / ||w_g|| has norm lam whatever its size, so per
            weight a large group (the filter of a layer with many inputs, the channel slice of a
            layer with many outputs) gets about lam / sqrt(p_g), less than a small one; the
            groups of wide layers are thus penalized less per weight than those of narrow ones.
Update      a subgradient step, as the Caffe solver's GroupLassoRegularize: after backward,
            grad(w_g) += lam * w_g / ||w_g|| (0 for a group that is exactly zero), then plain SGD
            (momentum, weight decay). After every step each regularized weight with |w| < zerout
            is set to exactly 0 (README "Stabilizing sparsity": threshold 1e-4), so whole groups
            reach exact zeros.
Decision    a channel whose filter group or channel group is exactly zero is removed: that is
            `finish(model)` (= Budget(threshold=0) on the score below). `finish(model, budget)`
            ranks channels by min(||filters of k||, ||input slices of k||) for any Budget, e.g.
            Budget(macs=0.5). The smaller model is then fine-tuned; removed channels are gone,
            so they stay "frozen" (Caffe's connectivity_mode DISCONNECTED_GRPWISE) by construction.
Groups      for channel k of a ChannelGroup, every producing layer's weight row ('out') is one
            filter group and every consuming layer's input slice ('in') one channel group: SSL
            regularizes each layer's slices separately (OICSR joins them into one group).
Residual    'internal' (default): the authors' ResNet rule, group lasso only on the convs between
            shortcut endpoints (BVLC/caffe#4328); 'coupled' also regularizes the trunk.
Shape       lam_s > 0: the columns W[:, c, i, j] of every regularized conv. Channel surgery cannot
            remove a kernel position, so `finish` keeps zero columns in the smaller model and
            freezes them with a mask that a forward pre-hook re-applies before every forward
            (zeroed + masked during fine-tuning). They save no MACs in prunelib's dense count.
Depth       lam_d > 0: one group = all weights of the producer and consumer layers of an internal
            channel group (the two convs of a CIFAR ResNet basic block, the authors' depth
            groups). A branch driven to zero has zero filters, so the zero rule shrinks it to the
            per-group minimum (`min_channels`); removing the whole block needs block surgery,
            which prunelib does not provide.
Defaults    lam_f = lam_c = 3e-3 (README, CIFAR-10 ConvNet: breadth_decay = kernel_shape_decay =
            3e-3 at base_lr 1e-3; the README gives no separate channel value, so channel groups
            use the filter value); lam_s = 0 and lam_d = 0 (off; the README's ResNet depth run
            uses block_group_decay 7e-3 at lr 0.1); zerout = 1e-4 (README).

`Slices`, `slices_of`, `channel_sqnorm` and `FlatChannels` (every group at once in one flat
vector: the per-step hooks) are shared by the filter-group family (OICSR, OTO, GREG).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..graph import ChannelGroup, Member
from ..select import Budget
from .base import HParam, Method, register


class Slices:
    """The per-channel slices of one group member (penalties, scores).

    rows(t) -> (size, -1): row k holds every element of channel k (as `ChannelGroup.rows`).
    """
    __slots__ = ("param", "dim", "idx", "size", "member")

    def __init__(self, model: nn.Module, member: Member, size: int) -> None:
        self.param = member.tensor(model)
        self.dim, self.size, self.member = member.dim, size, member
        self.idx = member.idx.to(self.param.device)                  # (size, m)

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        if self.idx.device != t.device:
            self.idx = self.idx.to(t.device)
        return self.idx.reshape(-1)

    def rows(self, t: torch.Tensor | None = None) -> torch.Tensor:
        t = self.param.detach() if t is None else t
        sel = t.index_select(self.dim, self._flat(t))
        return sel.movedim(self.dim, 0).reshape(self.size, -1)


class FlatChannels:
    """The channel slices of many groups as constant index tensors over one flat vector.

    Built once at `attach`. The distinct tensors P_1..P_T holding the slices are read as one
    vector x = (P_1.reshape(-1), ..., P_T.reshape(-1)) (N elements); the channels of all
    entries (size, members) are numbered c = 0..n-1 and `chan` (L, N) gives for each element e
    up to L channels it belongs to (L = 2 when an element lies in two slices, e.g. a weight
    that is one channel's filter row and another's input slice), the dummy channel n where it
    has fewer. Then, with no loop over groups:

        dot(x, y)[c] = sum_{e in channel c} x_e y_e        (y = x: the squared norms ||x_c||^2)
        spread(w)_e  = sum_l w[chan[l, e]],  w[n] = fill    (one gather per layer)

    so that, e.g., the group-lasso subgradient lam x_e / ||x_c|| of every element at once is
    x * spread(lam / ||x_c||). `dot` sums each run of consecutive elements of one channel (a
    filter row, a kernel's k x k taps) with one segment reduction and adds the run sums into
    their channels (a scatter over all N elements is several times slower on a CPU). Flat
    vectors live in buffers kept between steps, `read(key)` copies the tensors into buffer
    `key` and `views(key)` are its pieces shaped like the tensors (for `torch._foreach_*`
    writes): no per-step allocation or view creation per tensor. `tensors(model)` resolves
    the same tensors on any model by name.
    """

    def __init__(self, model: nn.Module, entries: list[tuple[int, list[Member]]]) -> None:
        sizes = [size for size, _ in entries]
        self.n = n = sum(sizes)
        names: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = {}
        for j, (size, members) in enumerate(entries):
            ids = torch.arange(sum(sizes[:j]), sum(sizes[:j + 1]))
            for m in members:
                layers = names.setdefault((m.module, m.param), [])
                pos = m.idx.reshape(-1).cpu()
                free = [a for d, a in layers if d == m.dim and (a[pos] == n).all()]
                if not free:
                    free = [torch.full((m.tensor(model).shape[m.dim],), n)]
                    layers.append((m.dim, free[0]))
                free[0][pos] = ids.repeat_interleave(m.idx.shape[1])
        self.names = list(names)
        self._tensors = [getattr(model.get_submodule(a), b) for a, b in self.names]
        self.shapes = [t.shape for t in self._tensors]
        self.numels = [t.numel() for t in self._tensors]
        chan = []
        for layer in range(max((len(v) for v in names.values()), default=0)):
            parts = []
            for layers, shape in zip(names.values(), self.shapes):
                if layer < len(layers):
                    d, a = layers[layer]
                    parts.append(a.view([-1 if i == d else 1 for i in range(len(shape))])
                                 .expand(shape).reshape(-1))
                else:
                    parts.append(torch.full((math.prod(shape),), n))
            chan.append(torch.cat(parts))
        self.runs = []                                  # per layer: (run lengths, channels)
        for c in chan:
            start = torch.ones(len(c), dtype=torch.bool)
            start[1:] = c[1:] != c[:-1]
            first = torch.nonzero(start).flatten()
            self.runs.append((torch.diff(first, append=torch.tensor([len(c)])), c[first]))
        self.chan = torch.stack(chan).int() if chan else torch.zeros(0, 0, dtype=torch.int32)
        self._bufs: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def tensors(self, model: nn.Module | None = None) -> list[torch.Tensor]:
        """The tensors of the attached model (None), or the same-named ones of `model`."""
        if model is None:
            return self._tensors
        return [getattr(model.get_submodule(a), b) for a, b in self.names]

    def buffer(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """The flat (N,) buffer `key`, with the dtype and device of `like` (kept between calls;
        the index tensors follow it to its device)."""
        buf = self._bufs.get(key)
        if buf is None or buf[0].dtype != like.dtype or buf[0].device != like.device:
            with torch.no_grad():
                flat = torch.empty(sum(self.numels), dtype=like.dtype, device=like.device)
                buf = (flat, [a.view(s) for a, s in zip(flat.split(self.numels), self.shapes)])
            self._bufs[key] = buf
            if self.chan.device != like.device:
                self.chan = self.chan.to(like.device)
                self.runs = [(a.to(like.device), b.to(like.device)) for a, b in self.runs]
        return buf[0]

    def views(self, key: str) -> list[torch.Tensor]:
        """The pieces of buffer `key`, shaped like the tensors."""
        return self._bufs[key][1]

    @torch.no_grad()
    def read(self, key: str, tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x: the tensors (default: the attached parameters) copied into buffer `key`."""
        ts = self._tensors if tensors is None else tensors
        x = self.buffer(key, ts[0])
        torch._foreach_copy_(self.views(key), ts)
        return x

    def dot(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) sum of x_e * y_e over the elements e of every channel (y = x: ||x_c||^2)."""
        v = torch.mul(x, x if y is None else y, out=self.buffer("_dot", x))
        out = torch.zeros(self.n + 1, dtype=v.dtype, device=v.device)
        for lengths, chan in self.runs:
            out.index_add_(0, chan, torch.segment_reduce(v, "sum", lengths=lengths))
        return out[:self.n]

    def spread(self, w: torch.Tensor, key: str, fill: float = 0.0) -> torch.Tensor:
        """(N,) sum over the layers of w[channel of e], `fill` for the dummy channel, written
        into buffer `key`."""
        w = torch.cat([w, torch.full((1,), fill, dtype=w.dtype, device=w.device)])
        out = self.buffer(key, w)
        torch.index_select(w, 0, self.chan[0], out=out)
        for c in self.chan[1:]:
            out += w.index_select(0, c)
        return out

    def grads(self) -> list[torch.Tensor]:
        """The .grad of every attached tensor (zeros where there is none yet)."""
        return [_grad(t) for t in self._tensors]


def lasso_coef(sq: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """lam / ||x_c|| per channel from the squared norms, 0 where the norm is 0."""
    tiny = torch.finfo(sq.dtype).tiny
    return torch.where(sq > 0, lam / sq.clamp_min(tiny).sqrt(), torch.zeros_like(sq))


def slices_of(model: nn.Module, g: ChannelGroup, roles: Iterable[str],
              params: Iterable[str] | None = None) -> list[Slices]:
    """`Slices` of the members of `g` with a role in `roles` (and a param name in `params`)."""
    roles, params = tuple(roles), None if params is None else tuple(params)
    return [Slices(model, m, g.size) for m in g.members
            if m.role in roles and (params is None or m.param in params)]


def on_model(slices: list[Slices], model: nn.Module | None) -> list[torch.Tensor]:
    """The tensors of `slices` in `model` (found by module name; None: the attached model's),
    detached."""
    return [(s.param if model is None else s.member.tensor(model)).detach() for s in slices]


def channel_sqnorm(slices: list[Slices], tensors: list[torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """Squared L2 norm of every channel over all `slices` (optionally of other `tensors`)."""
    out = None
    for i, s in enumerate(slices):
        r = s.rows(None if tensors is None else tensors[i])
        sq = r.float().pow(2).sum(1)
        out = sq if out is None else out + sq
    return out


def _grad(p: torch.Tensor) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


class _ShapeMask:
    """Forward pre-hook: multiply a conv weight by its frozen 0/1 mask before every forward."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if torch.is_inference_mode_enabled():
            return                                         # weights are masked already
        with torch.no_grad():
            module.weight.mul_(module.ssl_shape_mask)


@register("ssl")
class SSL(Method):
    """SSL: grad += lam * w_g/||w_g|| on filter and channel groups (+ shape, depth); zeroes out
    |w| < zerout after each step; removes channels with a zero filter or channel group."""
    residual = "internal"
    HPARAMS = {
        "lam_filter": HParam(float, lo=0.0, note="a negative lam inverts the penalty"),
        "lam_channel": HParam(float, lo=0.0, note="a negative lam inverts the penalty"),
        "lam_shape": HParam(float, lo=0.0, note="0 = off"),
        "lam_depth": HParam(float, lo=0.0, note="0 = off"),
        "zerout": HParam(float, lo=0.0, note="0 = off; checked at attach: below the largest "
                         "|w| of every regularized layer"),
    }

    def __init__(self, lam_filter: float = 3e-3, lam_channel: float = 3e-3,
                 lam_shape: float = 0.0, lam_depth: float = 0.0, zerout: float = 1e-4,
                 **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(lam_filter=lam_filter, lam_channel=lam_channel, lam_shape=lam_shape,
                         lam_depth=lam_depth, zerout=zerout)

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        self._filters = {g.index: slices_of(model, g, ("out",), ("weight",)) for g in self.groups}
        self._channels = {g.index: slices_of(model, g, ("in",), ("weight",)) for g in self.groups}
        layers = {s.member.module for ss in (*self._filters.values(), *self._channels.values())
                  for s in ss}
        self._weights = [model.get_submodule(n).weight for n in sorted(layers)]
        for n, w in zip(sorted(layers), self._weights):
            top = float(w.detach().abs().max()) if w.numel() else 0.0
            if 0 < top <= self.zerout:
                raise self.invalid("zerout", self.zerout, f"the first step would zero every "
                                   f"weight of {n!r} (largest |w| = {top:.3g}); zerout must be "
                                   f"below the largest |w| of every regularized layer (README: "
                                   f"1e-4)")
        self._convs = [w for w in self._weights if w.dim() > 2]
        # one entry per slice: SSL's groups are each layer's own filter row / input slice
        filters = [(g.size, [s.member]) for g in self.groups for s in self._filters[g.index]]
        channels = [(g.size, [s.member]) for g in self.groups for s in self._channels[g.index]]
        self._flat = FlatChannels(model, filters + channels)
        self._is_filter = torch.arange(self._flat.n) < sum(size for size, _ in filters)
        self._depth = []
        for g in self.groups:
            names = {s.member.module for s in self._filters[g.index] + self._channels[g.index]}
            self._depth.append([model.get_submodule(n).weight for n in sorted(names)])
        return model

    # -- the regularizer ---------------------------------------------------------------------
    def penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        """The value of the SSL regularizer (differentiable; for logging and for tests)."""
        total = torch.zeros((), device=self._weights[0].device) if self._weights else \
            torch.zeros(())
        for lam, table in ((self.lam_filter, self._filters), (self.lam_channel, self._channels)):
            if lam:
                for ss in table.values():
                    for s in ss:
                        t = s.param if model is None else s.member.tensor(model)
                        total = total + lam * s.rows(t).norm(dim=1).sum()
        if self.lam_shape:
            for w in self._convs:
                total = total + self.lam_shape * w.pow(2).sum(0).sqrt().sum()
        if self.lam_depth:
            for ws in self._depth:
                total = total + self.lam_depth * torch.cat([w.reshape(-1) for w in ws]).norm()
        return total

    def after_backward(self, model: nn.Module) -> None:
        """grad(w_e) += lam_t w_e / ||w_g|| for the filter (t = f) and channel (t = c) groups
        g that contain w_e, all groups at once (`FlatChannels`); then shape and depth groups."""
        with torch.no_grad():
            f = self._flat
            if (self.lam_filter or self.lam_channel) and f.numels:
                x = f.read("x")
                if self._is_filter.device != x.device:
                    self._is_filter = self._is_filter.to(x.device)
                lam = torch.full((f.n,), self.lam_channel, dtype=x.dtype, device=x.device)
                lam.masked_fill_(self._is_filter, self.lam_filter)
                f.spread(lasso_coef(f.dot(x), lam), "step").mul_(x)
                torch._foreach_add_(f.grads(), f.views("step"))
            if self.lam_shape:
                for w in self._convs:
                    norm = w.detach().pow(2).sum(0, keepdim=True).sqrt()
                    step = torch.where(norm > 0, w.detach() / norm.clamp_min(1e-30),
                                       torch.zeros_like(norm))
                    _grad(w).add_(step, alpha=self.lam_shape)
            if self.lam_depth:
                for ws in self._depth:
                    norm = torch.sqrt(sum(w.detach().pow(2).sum() for w in ws))
                    scale = torch.where(norm > 0, self.lam_depth / norm.clamp_min(1e-30),
                                        torch.zeros_like(norm))
                    for w in ws:
                        _grad(w).add_(w.detach() * scale)

    def after_step(self, model: nn.Module) -> None:
        """w <- 0 where |w| < zerout, on every regularized layer's weight (one flat pass)."""
        f = self._flat
        if self.zerout > 0 and f.numels:
            with torch.no_grad():
                x = f.read("x")
                x.masked_fill_(x.abs() < self.zerout, 0.0)
                torch._foreach_copy_(f.tensors(), f.views("x"))

    # -- decision ----------------------------------------------------------------------------
    def group_norms(self, model: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per prunable group: (norm of channel k's filter rows, norm of its input slices)."""
        out = {}
        for g in self.groups:
            f, c = self._filters[g.index], self._channels[g.index]
            dev = (f + c)[0].member.tensor(model).device
            inf = torch.full((g.size,), float("inf"), device=dev)
            out[g.index] = (channel_sqnorm(f, on_model(f, model)).sqrt() if f else inf,
                            channel_sqnorm(c, on_model(c, model)).sqrt() if c else inf)
        return out

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        return {i: torch.minimum(f, c) for i, (f, c) in self.group_norms(model).items()}

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        """Remove channels (zero rule when `budget` is None), then freeze zero shape columns."""
        small = super().finish(model, Budget(threshold=0.0) if budget is None else budget)
        if self.lam_shape:
            names = {s.member.module for ss in (*self._filters.values(),
                                                *self._channels.values()) for s in ss}
            for n in sorted(names):
                freeze_zero_columns(small.get_submodule(n))
        return small


def freeze_zero_columns(conv: nn.Module) -> int:
    """Mask the all-zero columns W[:, c, i, j] of `conv` so that training keeps them at zero.

    The mask is a non-persistent buffer (state_dict unchanged) applied by a forward pre-hook.
    Returns the number of frozen columns.
    """
    w = conv.weight
    if w.dim() < 3:
        return 0
    with torch.no_grad():
        mask = (w.abs().sum(0, keepdim=True) > 0).to(w.dtype)
    conv.register_buffer("ssl_shape_mask", mask, persistent=False)
    if not any(isinstance(h, _ShapeMask) for h in conv._forward_pre_hooks.values()):
        conv.register_forward_pre_hook(_ShapeMask())
    return int((mask == 0).sum())
