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
Update     [ours] theta is updated by Adam (betas 0.9, 0.999; lr `gate_lr`, no weight decay) in
           `after_step`, outside the run's SGD: dg/dtheta spans orders of magnitude as eps -> 0
           (2 eps at theta = 1, about 0.65 / sqrt(eps) at theta = sqrt(eps / 3)), so a plain
           SGD step either stalls or overshoots. [ours] A gate whose theta reaches or crosses 0
           in a step passed through g = 0: theta is set to exactly 0 and stays there (the
           paper's "gates reach exactly 0"; in floating point theta only gets close).
Decision   `finish(model)`: the gates at exactly 0 are removed (their channels output 0:
           exact), the others folded into the BN (gamma, beta times g_c): "no disruption".
           `finish(model, budget)`: rank by g, remove under the budget, fold the rest.
Defaults   [ours, no code] lam = 2, eps 1e-2 -> 1e-6 (theta_init = 1: gates start at 0.99),
           gate_lr = 0.01.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget
from .base import Context, HParam, Method, register
from .structures import Structures, mac_model


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
        "gate_lr": HParam(float, lo=0.0, lo_open=True, note="Adam step on theta"),
        "theta_init": HParam(float, lo=0.0, lo_open=True),
        "macs": HParam(float, 0.0, 1.0, lo_open=True,
                       note="fraction of dense MACs to keep when the context has no budget"),
        "anneal_steps": HParam(int, lo=1, none=True, note="None: the regularization phase"),
    }

    def __init__(self, lam: float = 2.0, eps_start: float = 1e-2, eps_end: float = 1e-6,
                 gate_lr: float = 0.01, theta_init: float = 1.0, macs: float = 0.5,
                 anneal_steps: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(lam=lam, eps_start=eps_start, eps_end=eps_end, gate_lr=gate_lr,
                         theta_init=theta_init, macs=macs, anneal_steps=anneal_steps)
        if eps_end > eps_start:
            raise self.invalid("eps_end", eps_end, f"eps_end must be at most eps_start="
                               f"{eps_start:g} (eps is annealed toward 0)")

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        ex = self.ctx.example_inputs if self.ctx is not None else None
        if ex is None:
            raise ValueError(f"{self.owner()}: the FLOPs term counts MACs: set method.ctx = "
                             "methods.Context(example_inputs) before attach")
        self.st = Structures(model, self.groups, "channels", ex, self.owner())
        dev = next(model.parameters()).device
        self.mac = mac_model(model, self.all_groups, ex, dev)
        budget = self.ctx.extra.get("budget")
        self.target = budget.macs if getattr(budget, "macs", None) is not None else self.macs
        self.theta = torch.full((self.st.n,), self.theta_init, device=dev, requires_grad=True)
        self._m = torch.zeros_like(self.theta, requires_grad=False)      # Adam moments (n,)
        self._v = torch.zeros_like(self._m)
        self.eps, self.step, self._total = self.eps_start, 0, self.anneal_steps
        self.st.install(model, self.theta, lambda t: smoothed_l0(t, self.eps))
        return model

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        if self.anneal_steps is None and ctx.epochs > 0:
            self._total = self.step + math.ceil(ctx.epochs * len(ctx.train_loader))
        return super().regularize(model, ctx)

    def gates(self) -> torch.Tensor:
        """g_eps(theta) (n,) at the current eps (no gradient)."""
        return smoothed_l0(self.theta.detach(), self.eps)

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        """lam * max(F(g) / F_0 - p, 0) with the bilinear F of the current gates."""
        ratio = self.st.soft_macs(self.mac, smoothed_l0(self.theta, self.eps)) / self.mac.dense
        return (self.lam * torch.relu(ratio - self.target)).float()

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Adam step on theta (its gradient from the task loss and the FLOPs term), theta that
        reached or crossed 0 set to 0 for good, then the next eps."""
        th, g = self.theta, self.theta.grad
        self.theta.grad = None
        self.step += 1
        if g is not None:
            b1, b2 = 0.9, 0.999
            self._m.mul_(b1).add_(g, alpha=1 - b1)
            self._v.mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = self._m / (1 - b1 ** self.step)
            v_hat = self._v / (1 - b2 ** self.step)
            new = th - self.gate_lr * m_hat / (v_hat.sqrt() + 1e-8)
            th.copy_(torch.where(new * th > 0, new, torch.zeros_like(new)))   # crossed 0: dead
        if self._total is None:
            raise RuntimeError(f"{self.owner()}: eps is annealed over the phase: train through "
                               "regularize() or give anneal_steps")
        frac = min(self.step / self._total, 1.0)
        self.eps = self.eps_start * (self.eps_end / self.eps_start) ** frac

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """The gate g_c of every channel of every gated group."""
        g = self.gates().cpu()
        return {i: g[sl] for i, sl in self.st.slices.items()}

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        """Fold the gates into the BNs; remove the gates at 0 (and, with a budget, the lowest
        ones under it); a plain, smaller copy of `model`."""
        g = self.gates()
        small = self.st.plain(model, g)
        keep = self.select(small, budget, self.scores(model)) if budget is not None else None
        keep = self.st.zero_keep(g, keep, self.min_channels)
        return self.st.remove_zero_channels(small, self.all_groups, keep)
