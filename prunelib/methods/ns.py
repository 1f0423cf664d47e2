"""Network Slimming (NS): L1 on BatchNorm scale factors.

Liu, Li, Shen, Huang, Yan, Zhang, "Learning Efficient Convolutional Networks through Network
Slimming", ICCV 2017 (arXiv:1708.06519); official code Eric-mingjie/network-slimming.

Objective   L = sum_(x,y) l(f(x; W), y) + lam * sum_(gamma in Gamma) |gamma|
Update      after backward, grad(gamma) += lam * sign(gamma) for every BN gamma (a subgradient
            step: gamma never becomes exactly 0; ordinary weight decay also acts on gamma).
Decision    one global threshold on |gamma| over all prunable BN channels (a percentile, or the
            lowest |gamma| until a MACs target is met), a per-layer minimum guards against
            emptying a layer; then fine-tune.
Defaults    lam = 1e-4 (VGG), 1e-5 (ResNet/DenseNet) [official code]; gamma may be initialized to
            0.5 when training from scratch (`gamma_init`); residual: trunk untouched ('internal'),
            as the official ResNet code keeps the residual stream at full width.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import HParam, Method, register


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]


def group_gamma(model: nn.Module, g) -> torch.Tensor:
    """|gamma| of each channel of group g, averaged over the group's BN layers."""
    bns = g.bns()
    if not bns:
        return torch.zeros(0)
    vals = [m.tensor(model).detach().abs()[m.idx[:, 0].to(m.tensor(model).device)] for m in bns]
    return torch.stack(vals).mean(0)


@register("ns")
class NetworkSlimming(Method):
    """Network Slimming: grad(gamma) += lam * sign(gamma); global |gamma| threshold."""
    residual = "internal"
    HPARAMS = {
        "lam": HParam(float, lo=0.0, note="a negative lam inverts the penalty"),
        "gamma_init": HParam(float, lo=0.0, lo_open=True, none=True,
                             note="None keeps the trained gamma"),
        "penalize": HParam(str, choices=("all", "prunable"), note="'all': official code"),
    }

    def __init__(self, lam: float = 1e-5, gamma_init: float | None = None,
                 penalize: str = "all", **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(lam=lam, gamma_init=gamma_init, penalize=penalize)

    def attach(self, model: nn.Module, groups):
        model = super().attach(model, groups)
        if self.penalize == "all":
            self._gammas = [bn.weight for bn in bn_modules(model)]
        else:
            names = {m.module for g in self.groups for m in g.bns()}
            self._gammas = [model.get_submodule(n).weight for n in names]
        if self.gamma_init is not None:
            with torch.no_grad():
                for p in self._gammas:
                    p.fill_(self.gamma_init)
        return model

    def after_backward(self, model: nn.Module) -> None:
        grads = [p.grad for p in self._gammas if p.grad is not None]
        if grads:
            signs = torch._foreach_sign([p.detach() for p in self._gammas if p.grad is not None])
            torch._foreach_add_(grads, signs, alpha=self.lam)

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        return {g.index: group_gamma(model, g) for g in self.groups if g.bns()}
