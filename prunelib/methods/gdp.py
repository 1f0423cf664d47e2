"""GDP: gates with differentiable polarization.

Guo, Yuan, Tan, Wang, Yang, Liu, "GDP: Stabilized Neural Network Pruning via Gates with
Differentiable Polarization", ICCV 2021 (arXiv:2109.02220). There is no official code: every
choice below that the abstract does not fix is ours, and said so.

Gates      one gate per channel of every prunable channel group, g_c = g_eps(theta_c) with the
           smoothed-L0 function
               g_eps(theta) = theta^2 / (theta^2 + eps)
               dg/dtheta    = 2 theta eps / (theta^2 + eps)^2
           g_eps(0) = 0 exactly, g_eps -> 1 for |theta| >> sqrt(eps); as eps -> 0 the gates
           "polarize": a gate is 0 or close to 1.
           The gate multiplies the channel's BN outputs (`structures.Structures`, 'channels').
           [ours] The paper gates the input of the next conv; for BN -> ReLU -> conv this is the
           same function (relu(g x) = g relu(x) for g >= 0), and it folds into the BN exactly.
Coupling   residual='coupled' by default: the channels of a residual coupling group (the trunk
           of a ResNet stage) share one gate, as the paper shares a gate across the convs tied
           to a skip connection; 'internal' gates only the blocks' inner channels.
FLOPs      the MACs are bilinear in the gates of consecutive layers (the paper's "bilinear"
           FLOPs): F(g) = sum_layers a_l d_out(g) d_in(g), d = dense width - sum (1 - g_c)
           (`Structures.soft_macs`, exact for 0/1 gates). [ours] The constraint F(g) <= p F_0 is
           the penalty `loss_term` = lam * max(F(g) / F_0 - p, 0) (the paper solves the
           constrained problem by alternating relaxation, not reproduced here), p the target
           (ctx.extra['budget'].macs, else `macs`).
Anneal     [ours] eps decays geometrically from eps_start to eps_end over the phase
           (`anneal_steps` steps; None: the regularization phase), one step per `after_step`.
Update     [ours] theta is trained by the run's SGD in a parameter group of its own (lr
           `gate_lr`, following the run's schedule, momentum 0.9, no weight decay), with the
           gradient of the task loss and of the FLOPs term, dL/dtheta = dL/dg * dg/dtheta.
           dg/dtheta is 2 eps / (1 + eps)^2 at theta = 1 and about 0.65 / sqrt(eps) at
           theta = sqrt(eps / 3), hence a large gate_lr: a gate whose FLOPs pressure beats its
           usefulness drifts down slowly, then falls; one that is useful rises and locks near 1.
           [ours] A gate whose theta reaches or crosses 0 in a step passed through g = 0
           (g is even in theta): theta is set to exactly 0 and stays there (`after_step`; the
           paper's "gates reach exactly 0"; in floating point theta would only get close).
Decision   `finish(model)`: the gates at exactly 0 are removed (their channels output 0:
           exact), the others folded into the BN (gamma, beta times g_c): "no disruption".
           `finish(model, budget)`: rank by |theta| (the order of g at any eps, without its
           saturation at 1 in floating point), remove under the budget, fold the rest.
Defaults   [ours, no code] lam = 2, eps 1e-2 -> 1e-4 (theta_init = 1: gates start at 0.99),
           gate_lr = 5.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget
from .base import Context, HParam, Method, register
from .structures import channel_gates, finish_gates, mac_to


def smoothed_l0(theta: torch.Tensor, eps: float) -> torch.Tensor:
    """g_eps(theta) = theta^2 / (theta^2 + eps), elementwise."""
    t2 = theta * theta
    return t2 / (t2 + eps)


@register("gdp")
class GDP(Method):
    """Gates with differentiable polarization: g = theta^2 / (theta^2 + eps), eps annealed to
    0, a bilinear FLOPs term; gates at 0 removed, the rest folded."""
    residual = "coupled"
    HPARAMS = {
        "lam": HParam(float, lo=0.0, note="strength of the FLOPs term"),
        "eps_start": HParam(float, lo=0.0, lo_open=True),
        "eps_end": HParam(float, lo=0.0, lo_open=True, note="at most eps_start"),
        "gate_lr": HParam(float, lo=0.0, lo_open=True, note="SGD learning rate of theta"),
        "theta_init": HParam(float, lo=0.0, lo_open=True),
        "macs": HParam(float, 0.0, 1.0, lo_open=True,
                       note="fraction of dense MACs to keep when the context has no budget"),
        "anneal_steps": HParam(int, lo=1, none=True, note="None: the regularization phase"),
    }

    def __init__(self, lam: float = 2.0, eps_start: float = 1e-2, eps_end: float = 1e-4,
                 gate_lr: float = 5.0, theta_init: float = 1.0, macs: float = 0.5,
                 anneal_steps: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(lam=lam, eps_start=eps_start, eps_end=eps_end, gate_lr=gate_lr,
                         theta_init=theta_init, macs=macs, anneal_steps=anneal_steps)
        if eps_end > eps_start:
            raise self.invalid("eps_end", eps_end, f"eps_end must be at most eps_start="
                               f"{eps_start:g} (eps is annealed toward 0)")

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        self.st, self.mac, self.target, self.theta = channel_gates(
            self, model, self.theta_init, "FLOPs term")
        dev = self.theta.device
        self.dead = torch.zeros(self.st.n, dtype=torch.bool, device=dev)    # theta = 0 for good
        self._prev = self.theta.detach().clone()
        self.eps, self.step, self._total = self.eps_start, 0, self.anneal_steps
        self.st.install(model, self.theta, lambda t: smoothed_l0(t, self.eps), self._moved)
        return model

    def _moved(self, ref: torch.Tensor) -> None:
        """The model moved after attach: the gate state and the MACs model follow it."""
        self.dead = self.dead.to(ref.device)
        self._prev = self._prev.to(ref.device, ref.dtype)
        mac_to(self.mac, ref.device)

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        if self.anneal_steps is None and ctx.epochs > 0:
            self._total = self.step + math.ceil(ctx.epochs * len(ctx.train_loader))
        return super().regularize(model, ctx)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """The model's parameters with the run's settings; theta: lr gate_lr, no weight decay,
        momentum 0.9."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay},
                {"params": [self.theta], "lr": self.gate_lr, "weight_decay": 0.0,
                 "momentum": 0.9}]

    def gates(self) -> torch.Tensor:
        """g_eps(theta) (n,) at the current eps (no gradient)."""
        return smoothed_l0(self.theta.detach(), self.eps)

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        """lam * max(F(g) / F_0 - p, 0) with the bilinear F of the current gates."""
        ratio = self.st.soft_macs(self.mac, smoothed_l0(self.theta, self.eps)) / self.mac.dense
        return (self.lam * torch.relu(ratio - self.target)).to(self.theta.dtype)

    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        self._prev.copy_(self.theta)                   # theta before the optimizer's step

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """theta that reached or crossed 0 in the step (or earlier) set to exactly 0; then the
        next eps = eps_start (eps_end / eps_start)^(step / anneal_steps)."""
        th = self.theta
        self.dead |= th * self._prev <= 0
        th.masked_fill_(self.dead, 0.0)
        self.step += 1
        if self._total is None:
            raise RuntimeError(f"{self.owner()}: eps is annealed over the phase: train through "
                               "regularize() or give anneal_steps")
        frac = min(self.step / self._total, 1.0)
        self.eps = self.eps_start * (self.eps_end / self.eps_start) ** frac

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """|theta_c| of every channel of every gated group (ranks as g does at any eps)."""
        th = self.theta.detach().abs().cpu()
        return {i: th[sl] for i, sl in self.st.slices.items()}

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        """Fold the gates into the BNs; remove the gates at 0 (and, with a budget, the lowest
        ones under it); a plain, smaller copy of `model`."""
        g = self.gates()
        self.gates_off = int((g == 0).sum())
        self.gate_macs = float(self.st.soft_macs(self.mac, g) / self.mac.dense)
        return finish_gates(self, model, g, budget)
