"""DMC: discrete model compression with a resource constraint.

Gao, Huang, Pei, Huang, "Discrete Model Compression With Resource Constraint for Deep Neural
Networks", CVPR 2020, pp. 1899-1908. There is no official code: every choice below that the
abstract does not fix is ours, and said so.

Gates      one discrete gate per channel of every prunable group, g_c = 1[theta_c > 0] in the
           forward pass (the channel's BN outputs times g_c, `structures.Structures`), trained
           with the straight-through estimator:
               dL/dtheta_c := dL/dg_c * 1[|theta_c| <= 1]
           [ours] the clipped ("hard-tanh") STE: g = step(theta) + (c(theta) - c(theta).detach()),
           c = clamp(., -1, 1), whose forward value is exactly step(theta).
           [ours] dL/dg is the gradient of a gate on the channel's *activated* output
           z = g relu(u), sum(dL/dz relu(u)), not the zero that a gate folded into the BN
           (before the ReLU, relu'(0) = 0) would give at g = 0: there an off gate gets no
           gradient from the loss, can never come back, and the noise that switches gates
           near 0 off ratchets the network far below the budget (measured: 14% of the MACs
           for a 50% budget after 3 epochs). The gate is still folded into the BN (one
           multiplication per channel, `Structures`), its off value `OFF` (2^-40, or the
           dtype's smallest normal if larger) instead of 0: relu(OFF u) = OFF relu(u) is
           positive where u > 0, so autograd gives exactly sum(dL/dz relu(u)), while the
           channel's contribution (1e-12 of its size) is lost in the rounding of the next
           layer. `gates()`, the resource term and removal use the exact 0/1 gates.
Weights    frozen: only theta is trained in the regularization phase (`param_groups` gives the
           optimizer theta alone: the paper optimizes the gates "while all other parameters
           are frozen"); BN statistics still follow the batches in train mode.
Budget     the FLOPs term of the paper's resource constraint [dossier, tagged unverified]:
               R(T(g), p T_0) = log(max(T(g), p T_0) / (p T_0)),   loss = CE + lam R
           zero once the budget holds; T(g) the MACs of the gated model (`Structures.soft_macs`,
           exact for 0/1 gates), p the fraction of dense MACs to keep (ctx.extra['budget'].macs,
           else `macs`), T_0 the dense MACs.
Decision   prune then fine-tune: `finish(model)` removes the channels whose gate is 0 (exact:
           their outputs are 0; the gates at 1 fold as the identity); `finish(model, budget)`
           ranks by theta under the budget.
Not done   the stochastic variant (sampled gates) of the paper.
Defaults   [ours, no code] lam = 1 (R is a log-ratio, O(1) when the MACs are 2x the budget),
           theta_init = 0.1 (every gate on, inside the STE window, close enough to 0 that a
           short phase can switch gates off), residual 'internal' (only the blocks' inner
           channels; the trunk of a ResNet stage untouched).
"""
from __future__ import annotations

import torch
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget
from .base import HParam, Method, register
from .structures import channel_gates, finish_gates, mac_to


OFF = 2.0 ** -40


def off_value(dtype: torch.dtype) -> float:
    """The forward value of an off gate in `dtype`: `OFF`, or the smallest normal number where
    OFF would underflow (float16: 2^-14)."""
    return max(OFF, torch.finfo(dtype).tiny)


def ste_step(theta: torch.Tensor) -> torch.Tensor:
    """1[theta > 0] forward, gradient 1[|theta| <= 1] backward (clipped straight-through)."""
    c = theta.clamp(-1.0, 1.0)
    return (theta > 0).to(theta.dtype) + (c - c.detach())


def ste_gate(theta: torch.Tensor) -> torch.Tensor:
    """The factor on the channels: `ste_step` with off gates at `off_value` instead of 0, so
    the gradient through the ReLU after the BN is the activated output's (module docstring)."""
    c = theta.clamp(-1.0, 1.0)
    hard = torch.where(theta > 0, 1.0, off_value(theta.dtype)).to(theta.dtype)
    return hard + (c - c.detach())


@register("dmc")
class DMC(Method):
    """Discrete 0/1 channel gates trained by the straight-through estimator with the weights
    frozen, under log(max(T(g), p T_0) / (p T_0)); gates at 0 removed."""
    residual = "internal"
    HPARAMS = {
        "lam": HParam(float, lo=0.0, note="strength of the resource term"),
        "theta_init": HParam(float, lo=0.0, lo_open=True, note="> 0: every gate starts on"),
        "macs": HParam(float, 0.0, 1.0, lo_open=True,
                       note="fraction of dense MACs to keep when the context has no budget"),
    }

    def __init__(self, lam: float = 1.0, theta_init: float = 0.1, macs: float = 0.5,
                 **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(lam=lam, theta_init=theta_init, macs=macs)

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        self.st, self.mac, self.target, self.theta = channel_gates(
            self, model, self.theta_init, "resource term")
        self.st.install(model, self.theta, ste_gate,
                        lambda ref: mac_to(self.mac, ref.device))   # the model moved
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """theta alone, without weight decay: the network's weights are frozen."""
        return [{"params": [self.theta], "lr": lr, "weight_decay": 0.0}]

    def gates(self) -> torch.Tensor:
        """The discrete gates 1[theta > 0] (n,)."""
        return (self.theta.detach() > 0).float()

    def resource(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        """R = log(max(T(g), p T_0) / (p T_0)) of the gates of `theta` (default: the current),
        differentiable through the straight-through gates."""
        t = self.st.soft_macs(self.mac, ste_step(self.theta if theta is None else theta))
        goal = self.target * self.mac.dense
        return torch.log(torch.clamp(t, min=goal) / goal)

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        """lam * log(max(T(g), p T_0) / (p T_0)), its gradient reaching theta through the STE."""
        return (self.lam * self.resource()).to(self.theta.dtype)

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """theta of every gated channel (gate on iff > 0)."""
        th = self.theta.detach().cpu()
        return {i: th[sl] for i, sl in self.st.slices.items()}

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        """Remove the channels whose gate is 0 (and, with a budget, the lowest theta under it);
        the gates at 1 fold as the identity: a plain, smaller copy of `model`."""
        g = self.gates()
        self.gates_off = int((g == 0).sum())
        self.gate_macs = float(self.st.soft_macs(self.mac, g) / self.mac.dense)
        return finish_gates(self, model, g, budget)
