"""BAR: budget-aware regularization with Hard-Concrete channel masks.

Lemaire, Achkar, Jodoin, "Structured Pruning of Neural Networks with Budget-Aware
Regularization", CVPR 2019 (arXiv:1811.09332). There is no official code; the defaults below
follow a third-party reimplementation (`BARStructuredLoss`), and every choice the paper or that
code leaves open is marked [ours].

Masks      one Hard-Concrete gate z_c per channel of every prunable channel group (Louizos,
           Welling, Kingma, "Learning Sparse Neural Networks through L0 Regularization",
           ICLR 2018), with a learnable log_alpha_c, temperature beta = 2/3 and stretch
           (gamma, zeta) = (-0.1, 1.1):
             training  u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
                       z = min(1, max(0, s (zeta - gamma) + gamma))
             eval      z = min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))
             P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))
           z multiplies the channel's BN outputs (`structures.Structures`, 'channels').
           [ours] one u per channel per forward, shared by the batch (the mask of a feature
           map, as a dropout-like mask on the whole mini-batch); log_alpha starts at
           log_alpha_init = 3 (eval gate 1, P(open) = 0.99: the trained baseline unchanged).
Objective  L = L_KD + lam * f(V, a, b) * L_s      (paper eqs. 3-6)
           L_KD = alpha T^2 KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) CE(s, y), the
                  dense teacher (a frozen copy of the model at attach), T = 4, alpha = 0.9
                  (`train.fit`'s distillation, called by `regularize`).
           L_s  = V(p) = E[MACs](p) / MACs_dense with p_c = P(z_c != 0): the cost-weighted
                  sparsity term. [ours] The cost of a channel is its MACs given the expected
                  widths of the layers it feeds and reads (`Structures.soft_macs`: the bilinear
                  sum over layers of a * d_out(p) * d_in(p)); with independent gates this is
                  the expected MACs exactly, and equal to `pl.count` of the pruned model for
                  0/1 probabilities. The third-party code weighs each P(open) by a fixed
                  per-feature-map cost of the dense network.
           f    = the budget barrier, r = (V - a) / (b - a):
                      f = 0 for r <= 0,  r^2 / (1 - r) for 0 < r < 1,  f_max for r >= 1,
                  a = budget - margin (1 + tolerance) (the lower bound: f = 0 below it),
                  b = (1 - s(t)) (1 + tolerance) + s(t) budget, annealed from the dense cost
                  (+ tolerance) to the budget along the sigmoid progress
                      s(t) = (sigmoid(k (t - 1/2)) - sigmoid(-k / 2)) / (1 - 2 sigmoid(-k / 2)),
                  t = step / anneal_steps in [0, 1], k = sigmoid_slope = 10.
                  f goes to infinity as V approaches b: a barrier that keeps the expected cost
                  under the shrinking bound. [ours] f is a coefficient computed from V without
                  gradient (as in the third-party code, where it is a Python float); the
                  gradient of the term is lam f dV/dlog_alpha. [ours] V is the expected cost
                  (the third-party code counts the channels whose eval gate is > 0), and f is
                  capped at f_max = 1e4 (theirs: 1e10, with costs in absolute units).
Update     W: the training loop's SGD; log_alpha: SGD with lr gate_lr, momentum 0.9, no weight
           decay. b is updated after every optimizer step (`after_step`).
Decision   `finish(model)`: channels whose eval gate is exactly 0 are removed (P(open) <
           1 / (1 + 11^(1/3)) = 0.32: every gate with P(open) ~ 0, and any other the eval
           network already switches off), the other eval gates folded into the BN (gamma, beta
           times z): exact at eval. `finish(model, budget)`: also removes the lowest log_alpha
           under the budget (`select_keep`), then folds.
Defaults   lam = 1 [ours: our L_s is relative, theirs absolute MACs / batch with lam 1e-5],
           T = 4, alpha = 0.9, margin 1e-4, tolerance 0.01, sigmoid slope 10 (third-party);
           gate_lr = 0.1 [ours].
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget
from .base import Context, HParam, Method, register
from .structures import channel_gates, finish_gates, mac_to

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor, beta: float = BETA,
                         gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """z = min(1, max(0, sigmoid((log u - log(1 - u) + log_alpha) / beta) (zeta - gamma)
    + gamma)) for uniform noise u in (0, 1), elementwise."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def hard_concrete_eval(log_alpha: torch.Tensor, gamma: float = GAMMA,
                       zeta: float = ZETA) -> torch.Tensor:
    """The deterministic gate min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def p_open(log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA,
           zeta: float = ZETA) -> torch.Tensor:
    """P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)), elementwise."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def barrier(v: torch.Tensor, a: float, b: float, f_max: float) -> torch.Tensor:
    """f(V, a, b) with r = (V - a) / (b - a): 0 for r <= 0, r^2 / (1 - r) for 0 < r < 1,
    f_max for r >= 1 (and at most f_max everywhere)."""
    r = (v - a) / (b - a)
    inside = r * r / (1 - r).clamp_min(1e-300)
    f = torch.where(r <= 0, torch.zeros_like(r), torch.where(r < 1, inside,
                                                             torch.full_like(r, f_max)))
    return f.clamp(max=f_max)


def sigmoid_progress(t: float, k: float) -> float:
    """s(t) = (sigmoid(k (t - 1/2)) - sigmoid(-k/2)) / (1 - 2 sigmoid(-k/2)): 0 at t = 0,
    1 at t = 1."""
    lo = 1.0 / (1.0 + math.exp(k / 2))
    return (1.0 / (1.0 + math.exp(-k * (t - 0.5))) - lo) / (1.0 - 2.0 * lo)


@register("bar")
class BAR(Method):
    """Budget-aware regularization: Hard-Concrete channel masks, distillation from the dense
    teacher, lam * f(V, a, b) * V with a barrier f under a budget bound annealed to the
    target; gates at 0 removed, the rest folded."""
    residual = "internal"
    HPARAMS = {
        "lam": HParam(float, lo=0.0, note="strength of the budget-aware sparsity term"),
        "T": HParam(float, lo=0.0, lo_open=True, note="distillation temperature"),
        "alpha": HParam(float, 0.0, 1.0, note="weight of the distillation term"),
        "margin": HParam(float, 0.0, 1.0, lo_open=True, hi_open=True,
                         note="a = budget - margin (1 + tolerance); > 0 keeps a < b"),
        "tolerance": HParam(float, lo=0.0, hi=1.0,
                            note="b starts at (1 + tolerance) times the dense cost"),
        "sigmoid_slope": HParam(float, lo=0.0, lo_open=True, hi=500.0,
                                note="k of the sigmoid progress of b"),
        "f_max": HParam(float, lo=0.0, lo_open=True, note="cap of the barrier coefficient"),
        "gate_lr": HParam(float, lo=0.0, lo_open=True, note="SGD learning rate of log_alpha"),
        "log_alpha_init": HParam(float, lo=-20.0, hi=20.0),
        "macs": HParam(float, 0.0, 1.0, lo_open=True,
                       note="fraction of dense MACs to keep when the context has no budget"),
        "anneal_steps": HParam(int, lo=1, none=True, note="None: the regularization phase"),
    }

    def __init__(self, lam: float = 1.0, T: float = 4.0, alpha: float = 0.9,
                 margin: float = 1e-4, tolerance: float = 0.01, sigmoid_slope: float = 10.0,
                 f_max: float = 1e4, gate_lr: float = 0.1, log_alpha_init: float = 3.0,
                 macs: float = 0.5, anneal_steps: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(lam=lam, T=T, alpha=alpha, margin=margin, tolerance=tolerance,
                         sigmoid_slope=sigmoid_slope, f_max=f_max, gate_lr=gate_lr,
                         log_alpha_init=log_alpha_init, macs=macs, anneal_steps=anneal_steps)

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        self.st, self.mac, self.target, self.log_alpha = channel_gates(
            self, model, self.log_alpha_init, "budget term")
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)   # frozen dense copy
        self.a = self.target - self.margin * (1 + self.tolerance)
        self.b = 1.0 + self.tolerance
        self.step, self._total = 0, self.anneal_steps
        self.st.install(model, self.log_alpha, lambda la: self.gate(la, model.training),
                        lambda r: mac_to(self.mac, r.device))
        return model

    def gate(self, log_alpha: torch.Tensor, training: bool) -> torch.Tensor:
        """Sampled Hard-Concrete gates in training, the deterministic ones at eval."""
        if not training:
            return hard_concrete_eval(log_alpha)
        u = torch.rand_like(log_alpha).clamp_(1e-6, 1 - 1e-6)
        return hard_concrete_sample(log_alpha, u)

    def gates(self) -> torch.Tensor:
        """The deterministic (eval) gates (n,), no gradient."""
        return hard_concrete_eval(self.log_alpha.detach())

    def expected_macs(self, p: torch.Tensor | None = None) -> torch.Tensor:
        """E[MACs per sample] when channel c is open with probability p_c (default P(z != 0));
        float64, differentiable in p."""
        return self.st.soft_macs(self.mac, p_open(self.log_alpha) if p is None else p)

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        """`train.fit` with this method's hooks and distillation from the frozen teacher
        (L_KD = alpha T^2 KL + (1 - alpha) CE)."""
        from ..train import fit
        if ctx.epochs <= 0:
            return model
        if self.anneal_steps is None:
            self._total = self.step + math.ceil(ctx.epochs * len(ctx.train_loader))
        fit(model, ctx.train_loader, epochs=ctx.epochs, lr=ctx.lr,
            weight_decay=ctx.weight_decay, momentum=ctx.momentum, schedule=ctx.schedule,
            hooks=self, device=ctx.device, quiet=ctx.quiet, distill_from=self.teacher,
            distill_T=self.T, distill_alpha=self.alpha)
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """The model's parameters with the run's settings; log_alpha: lr gate_lr, no weight
        decay, momentum 0.9."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay},
                {"params": [self.log_alpha], "lr": self.gate_lr, "weight_decay": 0.0,
                 "momentum": 0.9}]

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        """lam * f(V, a, b) * V with V = E[MACs](P(z != 0)) / MACs_dense, f without gradient."""
        v = self.expected_macs() / self.mac.dense
        f = barrier(v.detach(), self.a, self.b, self.f_max)
        return (self.lam * f * v).to(self.log_alpha.dtype)

    def after_step(self, model: nn.Module) -> None:
        """Next bound b = (1 - s(t)) (1 + tolerance) + s(t) budget, t = step / anneal_steps."""
        self.step += 1
        if self._total is None:
            raise RuntimeError(f"{self.owner()}: the budget bound is annealed over the phase: "
                               "train through regularize() or give anneal_steps")
        s = sigmoid_progress(min(self.step / self._total, 1.0), self.sigmoid_slope)
        self.b = (1 - s) * (1 + self.tolerance) + s * self.target

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """log_alpha of every channel of every gated group (the order of P(open) and z)."""
        la = self.log_alpha.detach().cpu()
        return {i: la[sl] for i, sl in self.st.slices.items()}

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        """Fold the eval gates into the BNs; remove the gates at 0 (and, with a budget, the
        lowest log_alpha under it); a plain, smaller copy of `model`."""
        z = self.gates()
        self.gates_off = int((z == 0).sum())
        self.expected_ratio = float(self.expected_macs().detach() / self.mac.dense)
        return finish_gates(self, model, z, budget)
