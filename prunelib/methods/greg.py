"""GREG: neural pruning via growing regularization (GReg-1 and GReg-2).

Wang, Qin, Zhang, Fu, "Neural Pruning via Growing Regularization", ICLR 2021
(arXiv:2012.09243); official code MingSun-Tse/Regularization-Pruning (pruner/reg_pruner.py,
option.py; GReg-1 = 'IncReg', GReg-2 = 'AdaReg' in the code).

Penalty     a per-filter L2 term with its own, growing coefficient, applied to the gradient and
            not part of the loss (`_apply_reg`): after backward, grad(W_j) += lam_j * W_j for the
            filter rows W_j of the pruned layers' convs (BN and biases are not penalized); the
            optimizer's own weight decay still acts on every weight. The term,
            sum_j lam_j ||W_j||^2 / 2, is smooth (gradient lam_j W_j everywhere, also at 0), so
            the update is a plain gradient step, not a subgradient method: a penalized filter
            shrinks geometrically and approaches 0 without reaching it exactly, which is why
            the removal goes by magnitude.
Weighting   not a group lasso (no ||W_j|| term, so no sqrt(p_g) weight in Yuan & Lin's sense):
            the pull lam_j * w is the same on every element, whatever the filter's size, so
            filters of different sizes at equal lam_j shrink at the same relative rate.
GReg-1      1. fix the pruned set up front: in every prunable layer, the ratio r of its filters
               with the smallest L1 magnitude (mean |w| of the filter), at most size - 1;
            2. every K_u iterations: lam_j += delta for the pruned filters only (kept ones stay
               at 0), until lam > tau or until the kept / pruned magnitude ratio (EMA 0.9 of the
               ratio of means) reaches mag_ratio_limit in every layer;
            3. then hold lam (stabilize) for the rest of the phase, remove, fine-tune.
GReg-2      grow lam for all filters uniformly (+delta_pick every K_u iterations) up to tau_pick;
            filters in flat directions of the loss shrink faster, so magnitudes separate; then
            pick the pruned filters by magnitude with the layer-wise ratios and continue as
            GReg-1 for them, while the kept filters get the slightly negative lam_recover.
            The pick needs ceil(tau_pick / delta_pick) updates, i.e. about that many times K_u
            steps (defaults: 1000 x 10). A phase too short for it is not hidden: `regularize`
            warns up front when the phase's steps cannot reach the pick, and when the pick has
            not happened by the end of the phase (or at `finish`), the pruned set is picked by
            the magnitudes as they are, with a warning, and `pick_reached` (recorded by
            `hparams()`) is False. A warning rather than an error: the removal is still
            well-defined and the phase's training is not thrown away, but the result says it
            is not GReg-2 as specified.
Scope       what lam_j penalizes. 'filters' (default, the official `_apply_reg`): the filter
            rows of the producing convs only. A filter row that feeds a BatchNorm is
            scale-invariant (the BN divides by its output's std), so the task gradient grows as
            1/||W_j|| while lam_j W_j shrinks it: a penalized filter settles where the two meet,
            and the BN scales it back up to full size until its output variance falls below
            the BN's eps. On a long schedule it gets there; on a short one it does not, and the
            "zeroed" channel still carries signal at removal (measured: option-B ResNet-20, 5
            epochs at lr 0.01 cosine, the pruned filters end at 0.4-1.7% of the kept ones'
            norm, their BN output at 11-46% of the kept ones' scale, and zeroing them costs 5.5
            points). 'group': every weight slice of the channel gets the same lam_j pull, as in
            Torch-Pruning's GrowingRegPruner: the producing convs' rows and biases, the BN's
            gamma and beta, and the consumers' input columns; gamma and beta are not
            scale-invariant, so the channel's output itself goes to 0. Measured in the same
            setting (book/results/bar_b, three seeds): removal becomes exactly lossless (86.7%
            before and after, against 86.9% -> 86.2% with 'filters'), the tuned accuracy moves
            by +0.12 points, within the seed noise.
Decision    the paper's rule, `finish(model)`: remove exactly the chosen pruned set (preset
            layer-wise ratios). `finish(model, budget)` ranks all filters globally by mean |w|
            (the pruned ones have been driven towards 0, so they go first) for any Budget.
Ratios      `pr`: one float (uniform), or {layer-name prefix: ratio} (the longest matching
            prefix of a group's producing layer wins, e.g. {'layer1': .75, 'layer2': .75,
            'layer3': .32} as the official stage_pr), or None: a uniform ratio computed at attach
            so that the preset pruned set meets the MACs target: `ctx.extra['budget'].macs` when
            the caller puts the budget there, else `macs` (fraction of dense MACs kept, default
            0.5, the book's common target; `pipeline.run` passes the budget to `finish` only).
            A key of `pr` that matches no layer of the model, or (with a ratio > 0) only layers
            this method does not prune, is an error at `attach` that lists the prunable layers.
Residual    'internal' (default): filter pruning never touches the last conv of a block or the
            shortcuts (official `_get_layer_pr_resnet`: ratios per stage, blocks' inner convs).
Defaults    [option.py + README] delta = 1e-4 (reg_granularity_prune), tau = 1
            (reg_upper_limit), K_u = 10 (README commands; option.py default 5),
            mag_ratio_limit = 1000, delta_pick = 1e-5, tau_pick = 1e-2, lam_recover = -1e-4.
            K_s (stabilize_reg_interval) is the rest of the regularization phase here, and the
            phase's optimizer is the pipeline's (official: lr_prune 1e-3, momentum 0.9).
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

import torch
from torch import nn

from ..graph import ChannelGroup
from ..measure import count
from ..select import Budget
from ..surgery import remove_channels
from .base import Context, HParam, Method, register
from .ssl import FlatChannels, on_model, slices_of


def n_pruned(size: int, ratio: float) -> int:
    """Filters pruned in a layer of `size` at `ratio` (official: ceil, never all of them)."""
    return 0 if ratio <= 0 else min(math.ceil(ratio * size), size - 1)


@register("greg")
class GReg(Method):
    """Growing regularization: grad(W_j) += lam_j W_j, lam_j += delta every K_u steps on the
    preset pruned filters (GReg-1) or after a uniform growth and a pick (GReg-2)."""
    residual = "internal"
    HPARAMS = {
        "variant": HParam(str, choices=("greg1", "greg2")),
        "scope": HParam(str, choices=("filters", "group"),
                        note="what lam penalizes: the producing filters (paper) or every slice "
                        "of the channel (BN gamma and beta, consumers' input columns too)"),
        "pr": HParam(float, 0.0, 1.0, hi_open=True, none=True, mapping=True,
                     note="pruning ratio per layer; None: derived from the MACs target `macs`"),
        "macs": HParam(float, 0.0, 1.0, lo_open=True, none=True,
                       note="fraction of dense MACs to keep, used when pr is None"),
        "delta": HParam(float, lo=0.0, lo_open=True, note="growth of lam per update"),
        "tau": HParam(float, lo=0.0, lo_open=True, note="ceiling of lam"),
        "k_u": HParam(int, lo=1, note="steps between lam updates"),
        "mag_ratio_limit": HParam(float, lo=1.0, lo_open=True, inf=True,
                                  note="kept / pruned magnitude ratio that stops the growth; "
                                  "inf: never"),
        "delta_pick": HParam(float, lo=0.0, lo_open=True, note="GReg-2 growth before the pick"),
        "tau_pick": HParam(float, lo=0.0, lo_open=True, note="GReg-2 lam at the pick"),
        "lam_recover": HParam(float, hi=0.0, note="GReg-2 lam of the kept filters"),
    }

    def __init__(self, variant: str = "greg1", scope: str = "filters",
                 pr: float | Mapping[str, float] | None = None, macs: float | None = 0.5,
                 delta: float = 1e-4, tau: float = 1.0, k_u: int = 10,
                 mag_ratio_limit: float = 1000.0, delta_pick: float = 1e-5,
                 tau_pick: float = 1e-2, lam_recover: float = -1e-4, **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(variant=variant, scope=scope, pr=pr, macs=macs, delta=delta, tau=tau,
                         k_u=k_u, mag_ratio_limit=mag_ratio_limit, delta_pick=delta_pick,
                         tau_pick=tau_pick, lam_recover=lam_recover)
        if pr is None and macs is None:
            raise self.invalid("macs", macs, "give layer-wise ratios `pr` or a MACs target "
                               "`macs` in (0, 1]")
        self.step = 0
        self.log: list[tuple[int, dict[int, torch.Tensor]]] = []
        self.pick_reached: bool | None = None     # GReg-2: did the pick happen in the phase?
        self._pick_warned = False

    # -- setup -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        if isinstance(self.pr, Mapping):
            self._check_pr_keys(model)
        self._filters = {}
        for g in self.groups:
            ss = [s for s in slices_of(model, g, ("out",), ("weight",))
                  if s.member.module in g.sources]
            if not ss:
                raise ValueError(f"GREG: group {g.index} has no producing weight to regularize")
            self._filters[g.index] = ss
        self._flat = FlatChannels(model, [(g.size, self._penalized(g)) for g in self.groups])
        self.ratios = self._ratios(model)
        dev = next(iter(self._filters.values()))[0].param.device if self._filters else "cpu"
        self.lam = {g.index: torch.zeros(g.size, device=dev) for g in self.groups}
        self.hist = {g.index: None for g in self.groups}
        self.done = {g.index: self.ratios[g.index] == 0 for g in self.groups}
        self.pruned: dict[int, torch.Tensor] | None = None
        if self.variant == "greg1":
            self.pruned = self.pick(model)
        self.step, self.log = 0, []
        self.pick_reached, self._pick_warned = (None if self.variant == "greg1" else False), False
        return model

    def _penalized(self, g: ChannelGroup) -> list:
        """The members lam_j acts on: the filter rows ('filters') or every weight slice of the
        channel, running statistics and ChannelPad slots aside ('group')."""
        if self.scope == "filters":
            return [s.member for s in self._filters[g.index]]
        return [m for m in g.members if m.role in ("out", "affine", "in")]

    def _check_pr_keys(self, model: nn.Module) -> None:
        """Every key of `pr` must name (a prefix of) a layer this method prunes."""
        prunable = sorted({s for g in self.groups for s in g.sources})
        modules = [n for n, _ in model.named_modules() if n]

        def hits(key: str, names: list[str]) -> list[str]:
            return [n for n in names if key == "" or n == key or n.startswith(key + ".")]
        for key, ratio in self.pr.items():
            if hits(key, prunable):
                continue
            found = hits(key, modules)
            if not found:
                raise ValueError(f"{self.owner()}: pr key {key!r} matches no layer of the "
                                 f"model (keys are module-name prefixes); prunable layers: "
                                 f"{', '.join(prunable)}")
            if ratio > 0:
                raise ValueError(f"{self.owner()}: pr key {key!r} (ratio {ratio:g}) matches "
                                 f"{', '.join(found[:5])}{' ...' if len(found) > 5 else ''}, "
                                 f"none of which this method prunes (residual="
                                 f"{self.residual!r}); prunable layers: {', '.join(prunable)}")

    def _ratio_of(self, g: ChannelGroup) -> float:
        if isinstance(self.pr, (int, float)):
            return float(self.pr)
        best, ratio = -1, 0.0
        for key, r in self.pr.items():
            if any(src == key or src.startswith(key + ".") or key == "" for src in g.sources):
                if len(key) > best:
                    best, ratio = len(key), float(r)
        return ratio

    def _ratios(self, model: nn.Module) -> dict[int, float]:
        if self.pr is not None:
            return {g.index: self._ratio_of(g) for g in self.groups}
        budget = self.ctx.extra.get("budget") if self.ctx is not None else None
        target = budget.macs if getattr(budget, "macs", None) is not None else self.macs
        r = uniform_ratio(model, self.all_groups, self.groups, target,
                          self.ctx.example_inputs if self.ctx is not None else None)
        return {g.index: r for g in self.groups}

    def magnitude(self, model: nn.Module | None = None) -> dict[int, torch.Tensor]:
        """Mean |w| of every filter (the official L1 score), summed over a group's producers, of
        `model`'s weights (None: the attached model's)."""
        return {i: sum(s.rows(t).abs().mean(1) for s, t in zip(ss, on_model(ss, model)))
                for i, ss in self._filters.items()}

    def pick(self, model: nn.Module | None = None) -> dict[int, torch.Tensor]:
        """The pruned set: per group, the ratio of its filters with the smallest magnitude."""
        mags = self.magnitude(model)
        out = {}
        for g in self.groups:
            k = n_pruned(g.size, self.ratios[g.index])
            mask = torch.zeros(g.size, dtype=torch.bool, device=mags[g.index].device)
            mask[torch.argsort(mags[g.index])[:k]] = True
            out[g.index] = mask
        return out

    # -- growing regularization --------------------------------------------------------------
    def pick_steps(self) -> int:
        """Steps GReg-2 needs before its pick: ceil(tau_pick / delta_pick) updates, K_u apart
        (the first update is at step 0)."""
        return (math.ceil(self.tau_pick / self.delta_pick - 1e-9) - 1) * self.k_u + 1

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        """The sparse phase (plain SGD with the hooks); GReg-2 says so when it cannot pick."""
        if (self.variant == "greg2" and self.pruned is None and ctx.epochs > 0
                and hasattr(ctx.train_loader, "__len__")):
            steps = self.step + math.ceil(ctx.epochs * len(ctx.train_loader))
            if steps < self.pick_steps():
                self._warn_pick(f"the phase has {steps} steps, the pick needs about "
                                f"{self.pick_steps()} (ceil(tau_pick / delta_pick) = "
                                f"{math.ceil(self.tau_pick / self.delta_pick - 1e-9)} updates "
                                f"every k_u = {self.k_u} steps)")
        model = super().regularize(model, ctx)
        if self.variant == "greg2" and self.pruned is None:
            self._pick_now(model, "the regularization phase ended")
        return model

    def _warn_pick(self, why: str) -> None:
        if not self._pick_warned:
            warnings.warn(f"{self.owner()}: GReg-2 will not reach its pick (lam = tau_pick = "
                          f"{self.tau_pick:g}): {why}. The pruned set is then picked by the "
                          "magnitudes as they are (pick_reached=False). Raise delta_pick, "
                          "lower tau_pick or k_u, or lengthen the phase.", stacklevel=3)
            self._pick_warned = True

    def _pick_now(self, model: nn.Module | None, why: str) -> None:
        lam = max((float(v.max()) for v in self.lam.values()), default=0.0)
        self._warn_pick(f"{why} at lam = {lam:.3g} after {self.step} steps")
        self.pruned = self.pick(model)
        self.pick_reached = False

    def after_backward(self, model: nn.Module) -> None:
        """Every k_u steps `_update` lam; then grad(W_j) += lam_j W_j for every penalized
        slice W_j (`scope`), all channels at once (`FlatChannels`)."""
        with torch.no_grad():
            if self.step % self.k_u == 0:
                self._update()
            f = self._flat
            if f.numels:                                   # all filters at once
                x = f.read("x")
                lam = torch.cat([self.lam[g.index] for g in self.groups]).to(x)
                f.spread(lam, "step").mul_(x)
                torch._foreach_add_(f.grads(), f.views("step"))

    def after_step(self, model: nn.Module) -> None:
        self.step += 1

    def _update(self) -> None:
        mags = self.magnitude()
        if self.pruned is None:                                # GReg-2, picking stage
            for i in self.lam:
                if self.ratios[i] > 0:
                    self.lam[i] += self.delta_pick
            if all(float(self.lam[i].max()) >= self.tau_pick
                   for i in self.lam if self.ratios[i] > 0):
                self.pruned = self.pick()
                self.pick_reached = True
            self.log.append((self.step, {i: m.clone() for i, m in mags.items()}))
            return
        for i, mask in self.pruned.items():
            if self.done[i] or not mask.any():
                continue
            ratio = mags[i][~mask].mean() / mags[i][mask].mean().clamp_min(1e-30)
            h = self.hist[i]
            self.hist[i] = ratio if h is None else 0.9 * h + 0.1 * ratio
            self.lam[i] += self.delta * mask
            if self.variant == "greg2":
                self.lam[i][~mask] = self.lam_recover
        # GReg-1 stops when every layer is separated enough, GReg-2 layer by layer (official)
        every = all(h is None or float(h) >= self.mag_ratio_limit for h in self.hist.values())
        for i in self.pruned:
            sep = every if self.variant == "greg1" else (
                self.hist[i] is not None and float(self.hist[i]) >= self.mag_ratio_limit)
            if not self.done[i] and (sep or float(self.lam[i].max()) > self.tau):
                self.done[i] = True
        self.log.append((self.step, {i: m.clone() for i, m in mags.items()}))

    # -- decision ----------------------------------------------------------------------------
    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        return self.magnitude(model)

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        """Remove the preset pruned set (`budget` None) or follow `budget` by magnitude."""
        if self.pruned is None:
            self._pick_now(model, "finish was called before the pick")
        if budget is not None:
            return super().finish(model, budget)
        keep = {i: torch.nonzero(~m).flatten().cpu() for i, m in self.pruned.items()}
        return remove_channels(model, self.all_groups, keep)


def uniform_ratio(model: nn.Module, all_groups: list[ChannelGroup],
                  groups: list[ChannelGroup], macs: float, example_inputs: torch.Tensor | None,
                  tol: float = 1e-3) -> float:
    """Smallest uniform layer-wise ratio (to `tol`) whose pruned model keeps <= macs of dense."""
    if example_inputs is None:
        raise ValueError("GREG: a MACs target needs example inputs: run through the pipeline "
                         "(method.ctx) or give layer-wise ratios `pr`")
    dense = count(model, example_inputs)[0]

    def kept(r: float) -> float:
        keep = {g.index: torch.arange(g.size - n_pruned(g.size, r)) for g in groups}
        return count(remove_channels(model, all_groups, keep), example_inputs)[0] / dense

    least = kept(1 - 1e-9)
    if least > macs:
        raise ValueError(f"GREG: a MACs target of {macs} cannot be met by layer-wise ratios on "
                         f"the prunable groups (at best {least:.3f} of the MACs remain); "
                         f"use residual='coupled' or a larger target")
    lo, hi = 0.0, 1 - 1e-9
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if kept(mid) <= macs else (mid, hi)
    return hi

