"""SSS: Data-Driven Sparse Structure Selection.

Huang & Wang, "Data-Driven Sparse Structure Selection for Deep Neural Networks", ECCV 2018
(arXiv:1707.01213); official code TuSimple/sparse-structure-selection (MXNet:
symbol/resnet.py puts one lambda per residual block on the branch output, core/optimizer.py
APGNAG updates it).

Scales      a factor lambda_s >= 0 multiplies the output of every structure s
            (`structures.Structures`): 'blocks' - one per residual branch, y = lambda_b F(x)
            + s(x) (the paper's and the official code's choice for ResNets, the default when
            the model has residual branches); 'channels' - one per channel of each prunable
            group, y_c = lambda_c BN(x)_c (the paper's "neurons").
Objective   min_(W, lambda) 1/N sum_i L(y_i, C(x_i; W, lambda)) + R(W) + gamma ||lambda||_1,
            R(W) the weight decay of W only (lambda has no weight decay).
Update      W: the training loop's SGD. lambda: accelerated proximal gradient in NAG form
            (paper eqs. 10-12, official APGNAG), with eta the current learning rate and
            g = dL/dlambda of the task loss:
                z      = lambda - eta g
                z      = S_(eta gamma)(z) = sign(z) max(|z| - eta gamma, 0)
                v      = mu v + (z - lambda)
                lambda = max(z + mu v, 0)
            `after_backward` takes g off lambda (so the optimizer does not step it) and
            `after_step` applies the four lines to all factors at once.
Decision    structures whose lambda is exactly 0 are removed exactly (their outputs are 0
            once lambda is folded in): `finish(model)` (own rule). `finish(model, budget)` also
            removes the next-lowest lambdas until the budget holds (blocks: greedy by lambda
            until the MACs target; channels: `select_keep` on lambda). The remaining lambdas are
            folded into the producers (the branch's last BN or the channel's BN: gamma, beta
            times lambda), leaving a plain, smaller model.
Defaults    gamma = 0.01 (official config resnet-50-sss-0.01), lambda initialized to 1, mu =
            0.9 (the optimizer's momentum in the official code), no weight decay on lambda.
            The paper trains from scratch; prunelib's protocol starts from a trained baseline.
"""
from __future__ import annotations

import torch
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget
from .base import HParam, Method, register
from .structures import STRUCTURES, Structures


def soft_threshold(z: torch.Tensor, t: float) -> torch.Tensor:
    """S_t(z) = sign(z) max(|z| - t, 0), elementwise."""
    return torch.sign(z) * (z.abs() - t).clamp_min(0)


@register("sss")
class SSS(Method):
    """Sparse Structure Selection: scales lambda >= 0 on residual branches (or channels),
    gamma ||lambda||_1 solved by APG in NAG form; structures with lambda = 0 removed."""
    residual = "internal"
    HPARAMS = {
        "gamma": HParam(float, lo=0.0, note="the L1 strength on the scales"),
        "momentum": HParam(float, 0.0, 1.0, hi_open=True, note="APG's mu"),
        "lam_init": HParam(float, lo=0.0, lo_open=True, note="initial scale"),
        "structure": HParam(str, choices=STRUCTURES,
                            note="'auto': blocks when the model has residual branches"),
    }

    def __init__(self, gamma: float = 0.01, momentum: float = 0.9, lam_init: float = 1.0,
                 structure: str = "auto", **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(gamma=gamma, momentum=momentum, lam_init=lam_init, structure=structure)
        self.target_reached: bool | None = None

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        ex = self.ctx.example_inputs if self.ctx is not None else None
        self.st = Structures(model, self.groups, self.structure, ex, self.owner())
        ref = next(p for p in model.parameters() if p.is_floating_point())
        self.lam = nn.Parameter(torch.full((self.st.n,), self.lam_init, device=ref.device,
                                           dtype=ref.dtype))                        # (n,)
        self.v = torch.zeros_like(self.lam, requires_grad=False)                     # (n,)
        self._g: torch.Tensor | None = None
        self._pgroup = {"params": [self.lam], "lr": self.ctx.lr if self.ctx else 0.01,
                        "weight_decay": 0.0, "momentum": 0.0, "nesterov": False}
        self.st.install(model, self.lam, lambda t: t, self._moved)
        return model

    def _moved(self, ref: torch.Tensor) -> None:
        """The model moved after attach: the momentum v follows lambda."""
        self.v = self.v.to(ref.device, ref.dtype)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Model parameters with the run's weight decay; lambda in a group of its own (no
        weight decay), whose current lr is the APG step eta (the group never steps lambda:
        `after_backward` takes its gradient)."""
        self._pgroup["lr"] = lr
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay}, self._pgroup]

    def after_backward(self, model: nn.Module) -> None:
        """g = dL/dlambda is taken off lambda (kept for the APG step; the optimizer skips a
        parameter without a gradient)."""
        self._g, self.lam.grad = self.lam.grad, None

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """APG (NAG form): z = S_(eta gamma)(lambda - eta g); v <- mu v + (z - lambda);
        lambda <- max(z + mu v, 0)."""
        g, self._g = self._g, None
        if g is None:
            return
        eta = self._pgroup["lr"]
        z = soft_threshold(self.lam - eta * g, eta * self.gamma)
        self.v.mul_(self.momentum).add_(z - self.lam)
        torch.add(z, self.v, alpha=self.momentum, out=self.lam.data).clamp_(min=0)

    def lambdas(self) -> dict:
        """{branch end (blocks) or (group index, channel) (channels): lambda}."""
        return dict(zip(self.st.names, self.lam.detach().cpu().tolist()))

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """Channels: lambda per channel of every scaled group. Blocks: {} (a block is not a
        channel group; see `lambdas`)."""
        lam = self.lam.detach().cpu()
        return {i: lam[sl] for i, sl in self.st.slices.items()}

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        """Fold lambda into the weights and remove the structures with lambda = 0 (and, with a
        budget, the next-lowest ones); a plain, smaller copy of `model`."""
        lam = self.lam.detach()
        self.lambda_zeros = int((lam == 0).sum())          # recorded by hparams()
        small = self.st.plain(model, lam)
        if self.st.kind == "blocks":
            small, self.target_reached = self.st.remove_blocks(small, lam, lam, budget)
            return small
        keep = self.select(small, budget, self.scores(model)) if budget is not None else None
        keep = self.st.zero_keep(lam, keep, self.min_channels)
        return self.st.remove_zero_channels(small, self.all_groups, keep)
