"""SCP: operation-aware soft channel pruning with differentiable masks (BN + ReLU together).

Kang & Han, "Operation-Aware Soft Channel Pruning using Differentiable Masks", ICML 2020
(arXiv:2007.03938). There is no official code; everything below is derived from the paper's
model, and every choice the paper leaves open is stated here.

Model       a BN output channel y_c = gamma_c * x_hat + beta_c with x_hat ~ N(0, 1) is
            N(beta_c, gamma_c^2); the following ReLU switches it off (output <= eps) with
            probability  P_off,c = Phi((eps - beta_c) / |gamma_c|) = Phi(-z_c),
            z_c = (beta_c - eps) / |gamma_c|  (the "on" margin, in standard deviations).
Mask        a differentiable mask m_c multiplies the BN output (m >= 0 commutes with the ReLU);
            gradients reach gamma and beta through the BN output and through P_off. A mask
            per channel is applied to the BN's affine parameters for the call, m * BN(x) =
            BN(x; m gamma, m beta) (the same function and gradients, no extra pass over the
            activation); per-sample Concrete masks in training multiply the output. The soft
            masks of all masked BNs are computed at once when the model's forward starts (a
            forward pre-hook on the model); a BN called on its own computes its own.
            mask='soft' (default): the deterministic relaxation m = 1 - P_off ("soft decisions"
            in training and inference). mask='concrete': in training a relaxed-Bernoulli (binary
            Concrete) sample with keep probability 1 - P_off,
            m = sigmoid((logit(1 - P_off) + log u - log(1 - u)) / T), u ~ U(0, 1) per sample and
            channel, logit(1 - P_off) = log Phi(z) - log Phi(-z) (stable); at inference its mean
            1 - P_off, as dropout. Why 'soft' by default: a conventionally trained ReLU network
            has most channels off more than half of the time (P_off ~ 0.6), so Concrete masks
            started from such a network act as ~60% channel dropout (measured on prunelib's
            ResNet-20 baseline: 35% accuracy after 0.3 epochs); the paper trains with the masks
            from the start, where the masks polarize.
Loss        L = CE + lam * sum_c (1 - P_off,c): the expected number of active channels over the
            prunable groups.
Decision    'off' (paper): remove the channels with P_off >= tau ("likely off"). 'budget': rank
            channels by z (monotone in 1 - P_off, no saturation) under a Budget. The mask of every
            kept channel is folded into its BN (gamma, beta *= 1 - P_off, exact since
            relu(m y) = m relu(y)), so the finished model equals the inference-mode masked
            network minus the removed channels, whose masked output was at most (1 - tau) x
            their ReLU output (exact in the limit P_off -> 1 the paper's training reaches).
Choices     eps = 0 (a channel is off when the ReLU outputs 0), T = 0.5, tau = 0.5, lam = 1e-3;
            masks only on the BN nearest the consumers of an internal group, which must feed a
            ReLU (checked); the paper trains jointly without fine-tuning (the pipeline still
            fine-tunes; chapter 2 reports the accuracy before and after).
Residual    'internal' (a residual sum is not a BN + ReLU pair).
"""
from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn
from torch.special import log_ndtr, ndtr

from ..graph import ChannelGroup
from ..select import Budget, select_keep
from ..surgery import remove_channels
from .base import HParam, Method, register
from .rsnli import bn_channels, decisive_bn, relu_after_bn


@register("scp")
class SoftChannelPruning(Method):
    """Channel masks from P_off = Phi((eps - beta)/|gamma|) on BN+ReLU (soft 1 - P_off, or
    Concrete samples), lam * expected active channels, remove likely-off channels."""
    residual = "internal"
    HPARAMS = {
        "lam": HParam(float, lo=0.0, note="a negative lam rewards active channels"),
        "eps": HParam(float, lo=0.0, note="a ReLU output <= eps counts as off"),
        "temperature": HParam(float, lo=0.0, lo_open=True, note="of the Concrete masks"),
        "tau": HParam(float, 0.0, 1.0, lo_open=True, hi_open=True,
                      note="P_off >= tau means likely off"),
        "mask": HParam(str, choices=("soft", "concrete"),
                       note="'soft': deterministic 1 - P_off"),
        "decision": HParam(str, choices=("budget", "off")),
    }

    def __init__(self, lam: float = 1e-3, eps: float = 0.0, temperature: float = 0.5,
                 tau: float = 0.5, mask: str = "soft", decision: str = "budget",
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.set_hparams(lam=lam, eps=eps, temperature=temperature, tau=tau, mask=mask,
                         decision=decision)

    # -- probabilities -------------------------------------------------------------------------
    def margin(self, bn: nn.Module) -> torch.Tensor:
        """z = (beta - eps) / |gamma| of every channel of `bn` (differentiable)."""
        return (bn.bias - self.eps) / bn.weight.abs().clamp_min(1e-12)

    def off_probability(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """P_off = Phi(-z) of the channels of every prunable group (detached, on CPU)."""
        out = {}
        for g in self.groups:
            bn, pos = bn_channels(model, g)
            out[g.index] = ndtr(-self.margin(bn).detach())[pos.to(bn.weight.device)].cpu()
        return out

    def _z_cut(self) -> float:
        """z below which P_off >= tau."""
        return float(-torch.special.ndtri(torch.tensor(self.tau, dtype=torch.float64)))

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        relu = relu_after_bn(model)
        self.groups = [g for g in self.groups
                       if decisive_bn(g) is not None and decisive_bn(g).module in relu]
        if not self.groups:
            raise ValueError("SCP needs prunable channels that go through BatchNorm -> ReLU; "
                             "none found")
        self._pos: dict[str, torch.Tensor] = {}
        for g in self.groups:
            bn, pos = bn_channels(model, g)
            name = decisive_bn(g).module
            mask = self._pos.setdefault(name, torch.zeros(bn.weight.shape[0], dtype=torch.bool))
            mask[pos] = True
        for name, mask in self._pos.items():
            bn = model.get_submodule(name)
            bn.register_buffer("scp_prunable", mask.to(bn.weight.device), persistent=False)
            bn.forward = functools.partial(self._forward, bn)    # instance attribute
        self._bns = [model.get_submodule(n) for n in self._pos]
        self._fixed = ~torch.cat([bn.scp_prunable for bn in self._bns])
        self._sizes = [bn.weight.numel() for bn in self._bns]
        self._batched: dict[int, torch.Tensor] | None = None
        self._root = (model.register_forward_pre_hook(self._masks_on).id,
                      model.register_forward_hook(self._masks_off, always_call=True).id)
        return model

    def channel_mask(self, bn: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """The mask the attached `bn` multiplies its output `out` (N, C, ...) by.

        Shape (N, C, 1, ...) of fresh Concrete samples when `bn` is in training mode and
        mask='concrete', else (1, C, 1, ...) = 1 - P_off; 1 on the channels of `bn` that no
        prunable group owns. Differentiable in gamma and beta, as in training.
        """
        if not hasattr(bn, "scp_prunable"):
            raise ValueError(f"{self.owner()}: channel_mask() needs a BatchNorm of the model "
                             "this method was attached to that carries a mask (the decisive "
                             "BN of a prunable group followed by a ReLU)")
        z = self.margin(bn)
        shape = (1, -1) + (1,) * (out.dim() - 2)
        if bn.training and self.mask == "concrete":
            logit = (log_ndtr(z) - log_ndtr(-z)).view(shape)
            u = torch.rand((out.shape[0],) + logit.shape[1:], device=out.device,
                           dtype=out.dtype).clamp_(1e-6, 1 - 1e-6)
            m = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.temperature)
        else:
            m = ndtr(z).view(shape)
        return torch.where(bn.scp_prunable.view(shape), m, torch.ones_like(m))

    def _forward(self, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The masked BN: its own forward with (gamma, beta) * m for the call when the mask is
        one per channel, else its output times the per-sample masks."""
        if bn.training and self.mask == "concrete":
            return type(bn).forward(bn, x) * self.channel_mask(bn, x)
        m = None if self._batched is None else self._batched.get(id(bn))
        if m is None:
            m = self.channel_mask(bn, x).reshape(-1)
        params = bn._parameters
        gamma, beta = params["weight"], params["bias"]
        params["weight"], params["bias"] = gamma * m, beta * m
        try:
            return type(bn).forward(bn, x)
        finally:
            params["weight"], params["bias"] = gamma, beta

    def _keep_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """1 - P_off = Phi(z) of every channel of the masked BNs, as one flat vector
        (differentiable), and the mask of the channels no prunable group owns."""
        gamma = torch.cat([bn.weight for bn in self._bns])
        beta = torch.cat([bn.bias for bn in self._bns])
        if self._fixed.device != gamma.device:
            self._fixed = self._fixed.to(gamma.device)
        return ndtr((beta - self.eps) / gamma.abs().clamp_min(1e-12)), self._fixed

    def _masks_on(self, model: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the model: the soft masks of all masked BNs for this forward."""
        if not (model.training and self.mask == "concrete"):
            keep, fixed = self._keep_all()
            m = keep.masked_fill(fixed, 1.0).split(self._sizes)
            self._batched = {id(bn): mb for bn, mb in zip(self._bns, m)}

    def _masks_off(self, model: nn.Module, args: tuple, out: Any) -> None:
        self._batched = None

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        """lam * sum_c (1 - P_off,c) over the prunable channels of all masked BNs at once."""
        keep, fixed = self._keep_all()
        return self.lam * keep.masked_fill(fixed, 0.0).sum()

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        out = {}
        for g in self.groups:
            bn, pos = bn_channels(model, g)
            out[g.index] = self.margin(bn).detach()[pos.to(bn.weight.device)].cpu()
        return out

    def detach(self, model: nn.Module) -> nn.Module:
        """Remove the masks' hooks and buffers from `model` (in place)."""
        for hooks in (model._forward_pre_hooks, model._forward_hooks,
                      model._forward_hooks_always_called):
            for hook_id in self._root:
                hooks.pop(hook_id, None)
        for name in self._pos:
            bn = model.get_submodule(name)
            bn.__dict__.pop("forward", None)
            bn._buffers.pop("scp_prunable", None)
        return model

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        scores = self.scores(model)
        cut = self._z_cut()
        if budget is None or self.decision == "off":
            budget, floor = Budget(threshold=cut), 0.0
        else:
            floor = self.min_keep
        ex = self.ctx.example_inputs if self.ctx is not None else None
        keep = select_keep(model, self.all_groups, scores, budget, example_inputs=ex,
                           min_keep=floor, min_channels=self.min_channels)
        plain = self.detach(copy.deepcopy(model))
        with torch.no_grad():                       # fold the masks of the kept channels
            for name, pos in self._pos.items():
                bn = plain.get_submodule(name)
                m = torch.where(pos.to(bn.weight.device), ndtr(self.margin(bn)),
                                torch.ones_like(bn.weight))
                bn.weight.mul_(m)
                bn.bias.mul_(m)
        return remove_channels(plain, self.all_groups, keep)
