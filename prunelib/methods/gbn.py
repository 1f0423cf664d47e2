"""GBN: Gate Decorator (gated BatchNorm), Taylor scores, tick-tock pruning.

You, Yan, Ye, Ma, Wang, "Gate Decorator: Global Filter Pruning Method for Accelerating Deep
Convolutional Neural Networks", NeurIPS 2019 (arXiv:1909.08174); official code
youzhonghui/gate-decorator-pruning (prune/universal.py, run/resnet-56/resnet56_prune.ipynb).

Gate        GBN(x) = phi * BN(x) with a gate phi per channel. As the official `extract_from_bn`:
            phi <- gamma, BN weight <- 1 (frozen), beta <- clamp(beta / gamma, -10, 10), so the
            function is unchanged (up to the clamp). A mask (0/1 buffer) multiplies phi; a masked
            channel outputs exactly 0, so its removal is exact. The gate is applied to the BN's
            affine parameters (torch parametrizations: weight = 1 * phi * mask, bias = beta *
            phi * mask), the same function and gradients as multiplying the output, one pass
            cheaper; `melt` makes those values plain BN parameters again. phi * mask of all
            gated BNs is computed at once when the model's forward starts (a forward pre-hook
            on the model); a BN called on its own computes its own.
Score       Taylor estimate of the loss change when phi_i -> 0, accumulated as in the official
            gradient hook:  Theta_i = sum_batches |phi_i * dL/dphi_i|  (the absolute value is
            taken per batch, inside the sum). BNs joined by one residual sum share a summed score
            and one mask (a coupled group; residual='coupled' is the default, as the official
            ResNet-56 notebook groups the stem BN, every block's bn2 and the shortcut BN).
Tick        conv weights frozen, train the rest for `tick` of an epoch at lr_min with the task
            loss only while accumulating Theta; then globally remove the floor(p * remaining)
            lowest-scoring filters (a coupled channel counts once per BN, as the official
            `get_threshold`), keeping each group's top max(1, int(0.1 * size)) by score, and
            stopping as soon as the MACs target is met.
Tock        train everything with L = CE + lam * sum |phi| (lam = 1e-3), every `ticks_per_tock`
            (10) ticks, and once before the first tick.
Defaults    official ResNet-56: p = 0.002 of the remaining filters per tick, lam = 1e-3, T = 10
            ticks per tock, tock 10 epochs with a triangular lr 1e-3 -> 1e-2 -> 1e-3, tick
            1 epoch at 1e-3, weight decay 5e-4, momentum 0.9. prunelib fits the whole tick-tock
            schedule into the regularization phase of `ctx.epochs`: half of it in ticks (as the
            official 10 x 1-epoch ticks per 10-epoch tock), `rounds` tocks after the initial one,
            tocks with the official triangular lr ctx.lr / 10 -> ctx.lr -> ctx.lr / 10 (ctx.lr
            is the official lr_max), ticks at lr_min = ctx.lr / 10. With a MACs target
            (`target_macs`, else ctx.extra['budget']) and p=None, p is recomputed before every
            tick so that the target is reached within the ticks left:
            p = 1.1 * (1 - (1 - f)^(1 / ticks_left)), f the share of the remaining filters that
            a one-shot ranking by the current scores removes to meet the target (capped at 0.5);
            without a target, the official p = 0.002.
Stop        as the official loop (`while True: ... if len(flops_save_points) == 0: break`): as
            soon as the tick that meets the MACs target has pruned, the phase ends; no further
            tock or tick runs (the official loop still runs a tock that falls due on that very
            tick; the paper goes straight to fine-tuning, and so does prunelib). `history`
            lists the tocks and ticks that ran, in order. If the ticks run out first, a
            warning says so and `target_reached` is False (recorded by `hparams()`).
Decision    tick-tock until the MACs target, then remove the masked channels
            (`finish(model, None)`); with a Budget, masked channels go first and the rest by
            Theta (|phi| if no tick ran) until the budget is met.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..graph import ChannelGroup
from ..select import Budget, MacModel, select_keep
from ..surgery import remove_channels
from ..train import fit
from .base import Context, HParam, Method, register


@register("gbn")
class GateDecorator(Method):
    """Gated BN with Taylor scores |phi * dL/dphi|, global tick-tock pruning, coupled residual
    groups (module docstring: equations, schedule and defaults)."""
    residual = "coupled"
    HPARAMS = {
        "lam": HParam(float, lo=0.0, note="a negative lam inverts the penalty"),
        "p": HParam(float, 0.0, 1.0, lo_open=True, hi_open=True, none=True,
                    note="fraction of the remaining filters pruned per tick; None: derived "
                    "from the MACs target"),
        "ticks_per_tock": HParam(int, lo=1),
        "rounds": HParam(int, lo=1, note="tocks after the initial one"),
        "tick_share": HParam(float, 0.0, 1.0, lo_open=True, hi_open=True,
                             note="share of the phase spent in ticks"),
        "target_macs": HParam(float, 0.0, 1.0, lo_open=True, none=True,
                              note="fraction of dense MACs to keep; None: the context's "
                              "Budget(macs=...)"),
    }

    def __init__(self, lam: float = 1e-3, p: float | None = None, ticks_per_tock: int = 10,
                 rounds: int = 1, tick_share: float = 0.5, target_macs: float | None = None,
                 min_keep: float = 0.1, **kw: Any) -> None:
        super().__init__(min_keep=min_keep, **kw)
        self.set_hparams(lam=lam, p=p, ticks_per_tock=ticks_per_tock, rounds=rounds,
                         tick_share=tick_share, target_macs=target_macs)
        self._collect = False
        self.log: list[dict] = []
        self.history: list[str] = []               # 'tock' / 'tick', in the order they ran
        self.target_reached: bool | None = None    # set by `regularize` when there is a target

    # -- gates ---------------------------------------------------------------------------------
    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        self.groups = [g for g in self.groups if g.bns()]
        if not self.groups:
            raise ValueError("GBN found no prunable channel group with a BatchNorm layer")
        names = list(dict.fromkeys(m.module for g in self.groups for m in g.bns()))
        with torch.no_grad():
            for n in names:
                bn = model.get_submodule(n)
                gamma = bn.weight.detach().clone()
                safe = torch.where(gamma.abs() < 1e-12, torch.full_like(gamma, 1e-12), gamma)
                bn.bias.copy_((bn.bias / safe).clamp(-10, 10))
                bn.weight.fill_(1.0)
                bn.weight.requires_grad_(False)
                bn.register_parameter("gbn_gate", nn.Parameter(gamma))
                bn.register_buffer("gbn_mask", torch.ones_like(gamma))
                bn.register_buffer("gbn_score", torch.zeros_like(gamma))
                parametrize.register_parametrization(bn, "weight", _Gate(bn))
                parametrize.register_parametrization(bn, "bias", _Gate(bn))
        self._names = names
        self._gates = [model.get_submodule(n).gbn_gate for n in names]
        self._bns = [model.get_submodule(n) for n in names]
        self._sizes = [g.numel() for g in self._gates]
        self._root = (model.register_forward_pre_hook(self._scales_on).id,
                      model.register_forward_hook(self._scales_off, always_call=True).id)
        self.ticks_done, self.tocks_done, self.history = 0, 0, []
        return model

    def _scales_on(self, model: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the model: phi * mask of every gated BN at once, for this
        forward (each BN's parametrizations read theirs; a BN called alone makes its own)."""
        scale = torch.cat(self._gates) * torch.cat([bn.gbn_mask for bn in self._bns])
        for bn, part in zip(self._bns, scale.split(self._sizes)):
            bn.__dict__["_gbn_scale"] = part

    def _scales_off(self, model: nn.Module, args: tuple, out: Any) -> None:
        for bn in self._bns:
            bn.__dict__.pop("_gbn_scale", None)

    @contextlib.contextmanager
    def collecting(self) -> Iterator["GateDecorator"]:
        """Inside this block the method does what a tick does to the loss and the gradients:
        `after_backward` adds |phi * dL/dphi| of the batch to every gated BN's `gbn_score`
        buffer (read them summed per group with `taylor`), and `loss_term` adds no sparsity
        penalty. Scores are not reset on entry (`_tick` zeroes them before each tick); the
        previous state is restored on exit, also after an exception.

            with gbn.collecting():
                loss(model(x), y).backward()
                gbn.after_backward(model)
        """
        was, self._collect = self._collect, True
        try:
            yield self
        finally:
            self._collect = was

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        if self._collect or self.lam == 0:
            return None
        return self.lam * torch.cat([g.reshape(-1) for g in self._gates]).abs().sum()

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        if self._collect:
            for bn in self._bns:
                if bn.gbn_gate.grad is not None:
                    bn.gbn_score.add_((bn.gbn_gate.grad * bn.gbn_gate).abs())

    # -- scores and masks ----------------------------------------------------------------------
    def _group_vals(self, model: nn.Module, attr: str) -> dict[int, torch.Tensor]:
        out = {}
        for g in self.groups:
            vals = [getattr(model.get_submodule(m.module), attr).detach()[m.idx[:, 0].to(
                m.tensor(model).device)] for m in g.bns()]
            out[g.index] = torch.stack(vals).sum(0).cpu()
        return out

    def taylor(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """Theta summed over the BNs of each group (zero for masked channels)."""
        s, mask = self._group_vals(model, "gbn_score"), self.masks(model)
        return {i: v * mask[i] for i, v in s.items()}

    def masks(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """1 = alive, 0 = pruned, per group channel."""
        return {i: (v > 0).float() for i, v in self._group_vals(model, "gbn_mask").items()}

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """Theta if a tick has run, else |phi| summed over the group's BNs; masked = -1."""
        base = (self.taylor(model) if self.ticks_done else
                {i: v.abs() for i, v in self._group_vals(model, "gbn_gate").items()})
        mask = self.masks(model)
        return {i: torch.where(mask[i] > 0, v, torch.full_like(v, -1.0))
                for i, v in base.items()}

    def floor(self, size: int) -> int:
        """Channels a group always keeps: max(min_channels, int(min_keep * size)) (official)."""
        return min(size, max(self.min_channels, int(self.min_keep * size)))

    @torch.no_grad()
    def prune_step(self, model: nn.Module, num: int, target: float | None,
                   macs: MacModel) -> int:
        """Mask up to `num` filters (a coupled channel counts once per BN) with the lowest
        Theta, globally, each group keeping its `floor` best; stop at `target` MACs."""
        theta, mask = self.taylor(model), self.masks(model)
        cand, owner, weight = [], [], []
        for g in self.groups:
            s, alive = theta[g.index], mask[g.index] > 0
            top = torch.argsort(s, descending=True)[:self.floor(g.size)]
            ok = alive.clone()
            ok[top] = False
            idx = torch.nonzero(ok).flatten()
            cand.append(torch.stack([s[idx], idx.float()], 1))
            owner.append(torch.full((len(idx),), g.index))
            weight.append(torch.full((len(idx),), len(g.bns())))
        cand, owner, weight = torch.cat(cand), torch.cat(owner), torch.cat(weight)
        order = torch.argsort(cand[:, 0], stable=True)
        cand, owner, weight = cand[order], owner[order], weight[order]
        n = int((torch.cumsum(weight, 0) <= max(num, 1)).sum().clamp_min(1))
        n = min(n, len(cand))
        if target is not None and n > 0:
            removed = self.removed_counts(model).double()
            steps = torch.zeros(n, len(self.all_groups), dtype=torch.float64)
            steps[torch.arange(n), owner[:n]] = 1.0
            curve = macs.ratio(removed + torch.cumsum(steps, 0))
            hit = torch.nonzero(curve <= target).flatten()
            if len(hit):
                n = int(hit[0]) + 1
        for gi, ch in zip(owner[:n].tolist(), cand[:n, 1].long().tolist()):
            for m in self.all_groups[gi].bns():
                model.get_submodule(m.module).gbn_mask[int(m.idx[ch, 0])] = 0.0
        return int(weight[:n].sum())

    def removed_counts(self, model: nn.Module) -> torch.Tensor:
        """Masked channels per group index (all groups; zeros for unscored ones)."""
        out = torch.zeros(len(self.all_groups))
        for i, m in self.masks(model).items():
            out[i] = float((m == 0).sum())
        return out

    # -- the tick-tock phase ---------------------------------------------------------------------
    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        if ctx.epochs <= 0:
            return model
        budget = ctx.extra.get("budget")
        target = self.target_macs if self.target_macs is not None else (
            budget.macs if budget is not None and budget.macs is not None else None)
        macs = MacModel(model, self.all_groups, ctx.example_inputs)
        ticks = self.rounds * self.ticks_per_tock
        tick_ep = ctx.epochs * self.tick_share / ticks
        tock_ep = ctx.epochs * (1 - self.tick_share) / (self.rounds + 1)
        fit_kw = dict(weight_decay=ctx.weight_decay, momentum=ctx.momentum, hooks=self,
                      device=ctx.device, quiet=ctx.quiet)
        self._tock(model, ctx, tock_ep, fit_kw)
        ratio = float(macs.ratio(self.removed_counts(model).double()))
        self.target_reached = None if target is None else ratio <= target
        for _ in range(self.rounds):
            for _ in range(self.ticks_per_tock):
                if self.target_reached:
                    return model              # target met: stop, no further tock or tick
                left = sum(len(g.bns()) * int(self.masks(model)[g.index].sum())
                           for g in self.groups)
                self._tick(model, ctx, tick_ep, fit_kw)
                p = self.tick_fraction(model, target, ticks - self.ticks_done + 1, left)
                n = self.prune_step(model, int(left * p), target, macs)
                ratio = float(macs.ratio(self.removed_counts(model).double()))
                self.log.append({"tick": self.ticks_done, "pruned": n, "p": p,
                                 "macs_ratio": ratio})
                self.target_reached = None if target is None else ratio <= target
            if self.target_reached:
                return model
            self._tock(model, ctx, tock_ep, fit_kw)
        if self.target_reached is False:
            warnings.warn(f"{self.owner()}: the MACs target {target:g} was not reached in "
                          f"{self.ticks_done} ticks (MACs ratio {ratio:.3f}); finish(model, "
                          "None) removes only the masked channels, finish(model, budget) the "
                          "rest by score. Use more ticks (rounds, ticks_per_tock) or p=None.",
                          stacklevel=2)
        return model

    def tick_fraction(self, model: nn.Module, target: float | None, ticks_left: int,
                      left: int) -> float:
        """p, or (p=None with a target) the fraction of the remaining filters each of the
        `ticks_left` ticks must remove: 1 - (1 - f)^(1/ticks_left), f = the share a one-shot
        ranking by the current scores removes to meet the target (x 1.1, capped at 0.5)."""
        if self.p is not None or target is None:
            return self.p if self.p is not None else 0.002
        est = select_keep(model, self.all_groups, self.scores(model), Budget(macs=target),
                          self.ctx.example_inputs if self.ctx is not None else None,
                          min_keep=self.min_keep, min_channels=self.min_channels)
        mask = self.masks(model)
        gone = sum(len(g.bns()) * int(mask[g.index].sum() - mask[g.index][est[g.index]].sum())
                   for g in self.groups)
        f = min(1.0, gone / max(left, 1))
        return min(0.5, 1.1 * (1 - (1 - f) ** (1 / max(ticks_left, 1))))

    def _tock(self, model: nn.Module, ctx: Context, epochs: float, kw: dict) -> None:
        if epochs > 0:
            fit(model, ctx.train_loader, epochs=epochs, lr=ctx.lr, schedule="triangular",
                gamma=0.1, **kw)
            self.tocks_done += 1
            self.history.append("tock")

    def _tick(self, model: nn.Module, ctx: Context, epochs: float, kw: dict) -> None:
        convs = [p for mod in model.modules() if isinstance(mod, nn.modules.conv._ConvNd)
                 for p in mod.parameters() if p.requires_grad]
        for bn in self._bns:
            bn.gbn_score.zero_()
        try:
            for q in convs:
                q.requires_grad_(False)
            with self.collecting():
                fit(model, ctx.train_loader, epochs=epochs, lr=ctx.lr / 10,
                    schedule="constant", **kw)
        finally:
            for q in convs:
                q.requires_grad_(True)
        self.ticks_done += 1
        self.history.append("tick")

    # -- back to a plain model -----------------------------------------------------------------
    @torch.no_grad()
    def melt(self, model: nn.Module) -> nn.Module:
        """Fold phi * mask into each gated BN of `model` (in place) and remove the gates."""
        for hooks in (model._forward_pre_hooks, model._forward_hooks,
                      model._forward_hooks_always_called):
            for hook_id in self._root:
                hooks.pop(hook_id, None)
        for n in self._names:
            bn = model.get_submodule(n)
            w, b = bn.weight.detach().clone(), bn.bias.detach().clone()   # phi*mask, beta*phi*mask
            # undo the parametrization by hand: torch's remove_parametrizations edits the
            # parametrized class, which a deepcopy shares with the original model
            bn.__class__ = type(bn).__bases__[0]
            del bn._modules["parametrizations"]
            bn.weight, bn.bias = nn.Parameter(w), nn.Parameter(b)
            del bn._parameters["gbn_gate"]
            for key in ("gbn_mask", "gbn_score"):
                del bn._buffers[key]
        return model

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        scores, mask = self.scores(model), self.masks(model)
        plain = self.melt(copy.deepcopy(model))
        if budget is None:
            keep = {i: torch.nonzero(m > 0).flatten() for i, m in mask.items()}
        else:
            keep = self.select(plain, budget, scores)
            keep = {i: k[mask[i][k] > 0] if (mask[i][k] > 0).any() else k[:1]
                    for i, k in keep.items()}
        return remove_channels(plain, self.all_groups, keep)


class _Gate(nn.Module):
    """Parametrization t -> t * phi * mask of a gated BN's weight (= 1) and bias (= beta).

    phi * BN(x) = (phi * mask) * x_hat + beta * phi * mask: gating the affine parameters gives
    the official GatedBatchNorm's output and gradients without an extra pass over the
    activation (the bench's hook overhead). The BN is held outside the module tree (no cycle);
    deepcopy maps it to the copied BN.
    """

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_bn", bn)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        scale = self._bn.__dict__.get("_gbn_scale")
        return t * (self._bn.gbn_gate * self._bn.gbn_mask if scale is None else scale)

