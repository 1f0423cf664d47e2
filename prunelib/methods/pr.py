"""PR: the polarization regularizer on BatchNorm scales.

Zhuang, Zhang, Huang, Zeng, Shuang, Li, "Neuron-level Structured Pruning using Polarization
Regularizer", NeurIPS 2020; official code polarizationpruning/PolarizationPruning.

Objective   L = sum l(f(x; W), y) + R(W) + lam * R_s(gamma),
            R_s(gamma) = t ||gamma||_1 - ||gamma - mean(gamma) 1||_1
                       = sum_i ( t |gamma_i| - |gamma_i - gamma_bar| ),  gamma_i in [0, a],
            gamma_bar = the mean over ALL regularized scale factors of the network (one global
            mean, recomputed every step, differentiated through, as the official `bn_sparsity`).
Split       R_s is concave, so on the cube [0, a]^n its minimum lies at a vertex. With k factors
            at a and n - k at 0 (mean k a / n), R_s = a (t k - 2 k (n - k) / n), smallest at
            k / n = rho = 1/2 - t/4 (paper: floor(n rho) or floor(n rho) + 1 factors at a). So
            the global minimizers put a fraction 1/2 + t/4 of the factors at 0 and 1/2 - t/4 at
            a, for 0 < t < 2 (t = 1.4: 85% at 0); t >= 2 sends all of them to 0.
            Subgradient descent does not reach that split by itself. At gamma_k > 0 the
            subgradient is t - s_k + mean(s), s = sign(gamma - gamma_bar); with a fraction q of
            the factors above the mean, mean(s) = 2q - 1, so a factor above the mean moves by
            -(t - 2 + 2q) per unit step (it grows while q < 1 - t/2) and one below the mean by
            -(t + 2q) < 0 (it always falls). The balance point is q = 1 - t/2: every vertex
            with at most a fraction 1 - t/2 at a is a local minimum, and descent from gamma
            spread over [0, a] stops near q = min(1/2, 1 - t/2), i.e. a fraction max(1/2, t/2)
            at 0 (t = 1.4: 70%, not 85%; tests/test_methods_bn.py checks both numbers). In
            training the task loss acts as well, so the split is what the data allow; t sets
            how hard the factors are pushed towards 0.
Update      after backward, grad(gamma_k) += lam * ( t sign(gamma_k) - sign(gamma_k - gamma_bar)
            + (1/n) sum_i sign(gamma_i - gamma_bar) ), the subgradient autograd gives for the
            formula (sign(0) = 0), computed in closed form over one flat vector; after every
            optimizer step gamma is clamped to [0, a], a = `clamp` = 1 (official --clamp).
Decision    'valley' (paper): histogram of gamma with bin width 0.01 on [0, a]; the first local
            minimum (first i with h[i+1]-h[i] <= 0 <= h[i+2]-h[i+1]) gives the threshold
            edge[i+1]; channels with gamma <= threshold are removed. The official code applies
            this per layer (`valley='layer'`, default); the paper's figure shows the whole
            network's histogram (`valley='global'`). 'budget' (default for the book's common
            protocol): global ranking of gamma under a Budget.
Defaults    CIFAR ResNet-56: lam = 5e-5, t = 1.4; VGG-16: lam = 3e-5, t = 1.5 (official README /
            paper Table 4); `PR.for_model(name)` returns them. Weight decay also acts on BN
            (official --bn-wd). gamma is initialized to 0.5 when training from scratch
            (official --bn-init-value); prunelib starts from a trained baseline, so
            `gamma_init=None` keeps the trained gamma (clamped into [0, a] at the first step).
Residual    the official code also prunes each block's last BN with a zero-scatter layer before
            the addition; prunelib removes residual channels only jointly, so the default is
            'internal', and `penalize='all'` polarizes every BN as the official code does
            ('prunable': only the BNs of groups that can be removed).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget, min_keep_count
from ..surgery import remove_channels
from .base import HParam, Method, register
from .ns import group_gamma

DEFAULTS = {"resnet56": {"lam": 5e-5, "t": 1.4}, "vgg16": {"lam": 3e-5, "t": 1.5}}


def valley_threshold(values: torch.Tensor, upper: float = 1.0, width: float = 0.01) -> float:
    """PR's rule: the left edge of the first local-minimum bin of the histogram of `values`
    (bins of `width` on [0, upper]); 0 when there is no valley."""
    bins = max(2, round(upper / width))
    h = torch.histc(values.detach().float().cpu(), bins=bins, min=0.0, max=upper)
    d = h[1:] - h[:-1]
    hit = torch.nonzero((d[:-1] <= 0) & (d[1:] >= 0)).flatten()
    if hit.numel() == 0:
        return 0.0
    return float((hit[0] + 1) * upper / bins)


@register("pr")
class Polarization(Method):
    """Polarization regularizer lam * sum(t|g| - |g - mean g|) on BN gamma, clamp to [0, a],
    histogram-valley threshold (see the module docstring for equations and defaults)."""
    residual = "internal"
    HPARAMS = {
        "lam": HParam(float, lo=0.0, note="a negative lam inverts the penalty"),
        "t": HParam(float, 0.0, 2.0, lo_open=True, hi_open=True,
                    note="t >= 2 sends every factor to 0"),
        "clamp": HParam(float, lo=0.0, lo_open=True, note="the upper value a of gamma"),
        "gamma_init": HParam(float, lo=0.0, lo_open=True, none=True,
                             note="at most clamp; None keeps the trained gamma"),
        "penalize": HParam(str, choices=("all", "prunable"), note="'all': official code"),
        "decision": HParam(str, choices=("budget", "valley")),
        "valley": HParam(str, choices=("layer", "global"),
                         note="'layer': official code, 'global': paper figure"),
    }

    def __init__(self, lam: float = 5e-5, t: float = 1.4, clamp: float = 1.0,
                 gamma_init: float | None = None, penalize: str = "all",
                 decision: str = "budget", valley: str = "layer", **kw: Any) -> None:
        super().__init__(**kw)
        self.set_hparams(lam=lam, t=t, clamp=clamp, gamma_init=gamma_init, penalize=penalize,
                         decision=decision, valley=valley)
        if self.gamma_init is not None and self.gamma_init > self.clamp:
            raise self.invalid("gamma_init", gamma_init, f"gamma_init must be at most clamp="
                               f"{self.clamp:g} (gamma is clamped to [0, clamp])")

    @classmethod
    def for_model(cls, name: str, **kw: Any) -> "Polarization":
        """PR with the paper's (lam, t) for `name` ('resnet56', 'vgg16'); others: ResNet-56's."""
        return cls(**{**DEFAULTS.get(name, DEFAULTS["resnet56"]), **kw})

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        self.groups = [g for g in self.groups if g.bns()]
        if self.penalize == "all":
            names = [n for n, m in model.named_modules()
                     if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        else:
            names = list(dict.fromkeys(m.module for g in self.groups for m in g.bns()))
        self._bn_names = names
        self._gammas = [model.get_submodule(n).weight for n in names]
        if not self._gammas:
            raise ValueError("PR found no BatchNorm layer with affine weights to polarize")
        if self.gamma_init is not None:
            with torch.no_grad():
                for p in self._gammas:
                    p.fill_(self.gamma_init)
        return model

    def gammas(self) -> list[tuple[str, nn.Parameter]]:
        """(BN module name, its weight gamma) of every polarized BatchNorm, in the order of the
        flat vector that `penalty` and `after_backward` use (its mean is gamma_bar). The
        Parameters are the attached model's own (not copies)."""
        if not hasattr(self, "_gammas"):
            raise RuntimeError(f"{self.owner()}: gammas() was called before the method was "
                               "attached to a model: call attach(model, groups) first")
        return list(zip(self._bn_names, self._gammas))

    def penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        """lam * R_s(gamma), differentiable (the formula; training uses `after_backward`)."""
        flat = torch.cat([p.reshape(-1) for p in self._gammas])
        return self.lam * (self.t * flat.abs() - (flat - flat.mean()).abs()).sum()

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        ps = [p for p in self._gammas if p.grad is not None]
        if not ps:
            return
        flat = torch.cat([p.reshape(-1) for p in ps])
        s = torch.sign(flat - flat.mean())
        g = self.lam * (self.t * torch.sign(flat) - s + s.mean())
        torch._foreach_add_([p.grad for p in ps], list(g.split([p.numel() for p in ps])))

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        torch._foreach_clamp_min_(self._gammas, 0.0)
        torch._foreach_clamp_max_(self._gammas, self.clamp)

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        return {g.index: group_gamma(model, g) for g in self.groups}

    def thresholds(self, model: nn.Module) -> dict[int, float]:
        """The valley threshold of every prunable group (per layer, or one global value)."""
        scores = self.scores(model)
        if self.valley == "global":
            thr = valley_threshold(torch.cat(list(scores.values())), self.clamp)
            return {i: thr for i in scores}
        return {i: valley_threshold(s, self.clamp) for i, s in scores.items()}

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        if budget is not None and self.decision == "budget":
            return super().finish(model, budget)
        keep, thr = {}, self.thresholds(model)
        for i, s in self.scores(model).items():
            n = max(min_keep_count(len(s), self.min_keep, self.min_channels),
                    int((s > thr[i]).sum()))
            keep[i] = torch.argsort(s, descending=True)[:n].sort().values
        return remove_channels(model, self.all_groups, keep)
