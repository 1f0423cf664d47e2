"""OICSR: Out-In-Channel Sparsity Regularization.

Li, Qi, Wang, Ge, Li, Yue, Sun, "OICSR: Out-In-Channel Sparsity Regularization for Compact Deep
Neural Networks", CVPR 2019 (arXiv:1905.11664). No official code is public.

Group       one out-in-channel: output channel k of layer l (its filter row and bias) together
            with input channel k of every layer that consumes it, W^(l+1)[:, k]. A prunelib
            ChannelGroup is exactly this (roles 'out' + 'in'); through residual adds and
            concatenations it spans every producer and every consumer slice of the channel.
Objective   L = E_D(W) + lam * sum_groups sum_k sqrt(||W^l[k, :]||^2 + ||W^(l+1)[:, k]||^2)
            (OICSR-GL: group lasso on the joint group; SSL puts the two halves in separate groups)
Weighting   unweighted, as the formula above (no sqrt(p_g) factor of Yuan & Lin's group lasso,
            p_g the group's number of weights; the paper's exact form is not verified, no code).
            A group's pull has norm lam whatever its size, so per weight the large out-in groups
            (wide consumers, big kernels) get about lam / sqrt(p_g), less than small ones; the
            energy ranking of the decision also grows with group size.
Update      subgradient after backward: grad(w_k) += lam * w_k / ||w_k|| over the whole joint
            group (0 for a zero group), then the usual SGD step.
Decision    channel importance = the energy of the whole out-in group, E_k = ||W^l[k]||^2 +
            ||W^(l+1)[:, k]||^2, statistics of two consecutive layers; a global greedy algorithm
            removes the lowest-energy out-in-channels across all layers until the target is met
            (prunelib's Budget(macs=r) is this greedy: one channel at a time, lowest energy
            first, exact MAC prediction), then the smaller model is fine-tuned. The paper
            repeats train-prune-finetune several times; the pipeline runs one round.
Defaults    no official code, so nothing is verified: lam = 3e-3 (SSL's README value, so that
            the two group shapes compare at equal strength); residual 'internal' (the trunk of
            a ResNet is left whole, as in the other filter-regularization methods of prunelib;
            'coupled' regularizes and prunes the residual groups too). BN parameters are not in
            the group (the paper's group is the two layers' weights).
"""
from __future__ import annotations

import torch
from torch import nn

from ..graph import ChannelGroup
from .base import HParam, Method, register
from .ssl import FlatChannels, channel_sqnorm, lasso_coef, on_model, slices_of


@register("oicsr")
class OICSR(Method):
    """OICSR-GL: grad += lam * w_g/||w_g|| over each out-in-channel group; global greedy removal
    of the lowest-energy out-in-channels."""
    residual = "internal"
    HPARAMS = {"lam": HParam(float, lo=0.0, note="a negative lam inverts the penalty")}

    def __init__(self, lam: float = 3e-3, **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(lam=lam)

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        self._slices = {g.index: slices_of(model, g, ("out", "in"), ("weight", "bias"))
                        for g in self.groups}
        self._flat = FlatChannels(model, [(g.size, [s.member for s in self._slices[g.index]])
                                          for g in self.groups])
        return model

    def penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        """lam * sum over out-in-channels of the joint L2 norm (differentiable; of `model`'s
        weights, or of the attached model's when None)."""
        total = None
        for ss in self._slices.values():
            sq = sum(s.rows(s.param if model is None else s.member.tensor(model)).pow(2).sum(1)
                     for s in ss)
            term = self.lam * sq.sqrt().sum()
            total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    def after_backward(self, model: nn.Module) -> None:
        """grad(w_e) += lam w_e / ||w_k|| for every out-in-channel k whose group holds w_e (a
        weight is in two: its filter's and its input channel's), all groups at once."""
        f = self._flat
        if not self.lam or not f.numels:
            return
        with torch.no_grad():
            x = f.read("x")
            f.spread(lasso_coef(f.dot(x), self.lam), "step").mul_(x)
            torch._foreach_add_(f.grads(), f.views("step"))

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """Energy of each out-in-channel of `model`: squared norm of its filter rows and input
        slices."""
        return {i: channel_sqnorm(ss, on_model(ss, model)) for i, ss in self._slices.items()}
