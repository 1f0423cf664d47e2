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

`Slices`, `slices_of` and `channel_sqnorm` are shared by the filter-group family (OICSR, OTO).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..graph import ChannelGroup, Member
from ..select import Budget
from .base import HParam, Method, register


class Slices:
    """The per-channel slices of one group member, cached for fast per-step updates.

    rows(t) -> (size, -1): row k holds every element of channel k (as `ChannelGroup.rows`);
    add_(t, rows) scatters such rows back into a tensor shaped like the parameter (index_add);
    zero_(t, mask) zeroes the elements of the channels where `mask` (bool, (size,)) is True.
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

    def add_(self, t: torch.Tensor, rows: torch.Tensor) -> None:
        flat = self._flat(t)
        rest = [s for d, s in enumerate(t.shape) if d != self.dim]
        t.index_add_(self.dim, flat, rows.reshape(flat.numel(), *rest).movedim(0, self.dim)
                     .to(t.dtype))

    def zero_(self, t: torch.Tensor, mask: torch.Tensor) -> None:
        self._flat(t)
        pos = self.idx[mask.to(self.idx.device)].reshape(-1)
        if pos.numel():
            t.index_fill_(self.dim, pos, 0.0)


def slices_of(model: nn.Module, g: ChannelGroup, roles: Iterable[str],
              params: Iterable[str] | None = None) -> list[Slices]:
    """`Slices` of the members of `g` with a role in `roles` (and a param name in `params`)."""
    roles, params = tuple(roles), None if params is None else tuple(params)
    return [Slices(model, m, g.size) for m in g.members
            if m.role in roles and (params is None or m.param in params)]


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


def lasso_step(rows: torch.Tensor, norm: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * w / ||w|| row by row, 0 where the norm is 0 (Caffe's div_checkzero)."""
    inv = torch.where(norm > 0, lam / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                      torch.zeros_like(norm))
    return rows * inv.to(rows.dtype).unsqueeze(1)


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
                        total = total + lam * s.rows(s.param).norm(dim=1).sum()
        if self.lam_shape:
            for w in self._convs:
                total = total + self.lam_shape * w.pow(2).sum(0).sqrt().sum()
        if self.lam_depth:
            for ws in self._depth:
                total = total + self.lam_depth * torch.cat([w.reshape(-1) for w in ws]).norm()
        return total

    def after_backward(self, model: nn.Module) -> None:
        with torch.no_grad():
            for lam, table in ((self.lam_filter, self._filters),
                               (self.lam_channel, self._channels)):
                if not lam:
                    continue
                for ss in table.values():
                    for s in ss:
                        rows = s.rows()
                        s.add_(_grad(s.param), lasso_step(rows, rows.norm(dim=1), lam))
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
        if self.zerout > 0:
            with torch.no_grad():
                for w in self._weights:
                    w.masked_fill_(w.abs() < self.zerout, 0.0)

    # -- decision ----------------------------------------------------------------------------
    def group_norms(self, model: nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per prunable group: (norm of channel k's filter rows, norm of its input slices)."""
        out = {}
        for g in self.groups:
            f, c = self._filters[g.index], self._channels[g.index]
            dev = (f + c)[0].param.device
            inf = torch.full((g.size,), float("inf"), device=dev)
            out[g.index] = (channel_sqnorm(f).sqrt() if f else inf,
                            channel_sqnorm(c).sqrt() if c else inf)
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
