"""OTO (Only Train Once): zero-invariant groups trained by the Half-Space Projected Gradient.

Chen, Ji, Ding, Fang, Wang, Zhu, Liang, Shi, Yi, Tu, "Only Train Once: A One-Shot Neural Network
Training and Pruning Framework", NeurIPS 2021 (arXiv:2107.07467); official v1 code
tianyic/only_train_once (optimizer/hspg.py, backend/resnet_cifar.py, train/configs/).

Groups      zero-invariant groups (ZIGs): channel k of a ChannelGroup = every producer parameter
            of the channel, i.e. conv/linear rows and biases ('out') and BN gamma and beta
            ('affine'). If a ZIG is zero the channel's output is exactly zero, whatever the input,
            so removing it leaves the network function unchanged: no fine-tuning is needed.
Problem     min_x  f(x) + lam * sum_g ||x_g||_2
Weighting   the plain sum of ||x_g|| (hspg.py: lam x_g / ||x_g|| for every group), not Yuan &
            Lin's group lasso, which weights group g by sqrt(p_g), p_g its number of
            parameters. Every group is pulled towards 0 by a step of norm lam whatever its size,
            so per parameter a large group (a coupled trunk channel with many producers, a
            filter with many inputs) gets about lam / sqrt(p_g), less than a small one; with
            sqrt(p_g) weights the pull per parameter would be the same for all groups.
HSPG        stage 1 (the first n_p of the phase): subgradient steps on psi = f + lam sum ||x_g||,
            grad(x_g) += lam x_g / ||x_g|| for non-zero groups (hspg.py sgd_step).
            stage 2 (half-space step): trial point x^ = x - alpha grad(psi) (the optimizer's
            step); every non-zero group with <x^_g, x_g> < eps ||x_g||^2 is projected to 0, and
            groups that were already zero stay zero (hspg.py half_space_step, "fixed non_free
            variables"). The condition is a half-space test: x^_g has left the half-space
            {z : <z, x_g> >= eps ||x_g||^2} bounded by the hyperplane orthogonal to x_g through
            eps x_g, i.e. the step shrank the component of x_g along itself below eps times its
            length (eps = 0: the step turned the group by more than 90 degrees). It does not
            mean that the group crossed the origin: x^_g can be far from 0 and fail it.
            Here `after_backward` adds the subgradient and saves x, the optimizer step makes
            x^ on the very same tensors, and `after_step` projects. The ZIG tensors get their
            own optimizer group with weight decay 0 (HSPG has none) and momentum `momentum` (0
            in the official configs); gradients of zero groups are set to 0 and zero groups are
            re-zeroed after every step, so neither momentum nor weight decay can revive them.
Descent     the half-space step decreases psi only under step-size conditions. The OTO / HSPG
            analysis assumes f L-smooth, eps in [0, 1) and a step size bounded in terms of
            (1 - eps) / L; for mini-batch gradients its guarantee holds in expectation, with
            further conditions on step size and batch size (exact constants: the paper's
            theorem; reference/methods.md does not quote them). The projection part is a
            one-line check: a group projected with the others held has alpha <grad(psi)_g,
            x_g> > (1 - eps) ||x_g||^2, so setting it to 0 changes psi by at most
            -<grad(psi)_g, x_g> + (L / 2) ||x_g||^2 < -((1 - eps) / alpha - L / 2) ||x_g||^2,
            a decrease when alpha < 2 (1 - eps) / L (f L-smooth, exact gradient). prunelib
            enforces none of this: the step size is the pipeline's lr.
Decision    remove exactly the zero groups: `finish(model)` (= Budget(threshold=0) on the group
            norm; exact, see tests). `finish(model, Budget(macs=r))` removes the zero groups and
            then the smallest-norm ones until the target is met (no longer exact).
Residual    'coupled' (default): v1's ResNet-50 ZIGs join the trunk producers of a stage (the
            last conv + BN of each block and the shortcut conv + BN, `create_zig_params`,
            `get_group`), i.e. prunelib's coupled groups; 'internal' keeps the trunk whole.
Defaults    [v1 configs, ResNet-50 CIFAR-10 and ImageNet] lam = 1e-3; eps = 0 for conv groups;
            momentum 0; n_p = 75 of 300 epochs (CIFAR) / 30 of 120 (ImageNet): n_p = 0.25 of
            the regularization phase here. Not implemented: the random `upper_group_sparsity`
            cap (1.0 = off in every config) and the optional lambda decay (`decays_lambda`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget
from .base import Context, HParam, Method, register
from .ssl import FlatChannels, channel_sqnorm, lasso_coef, on_model, slices_of


@register("oto")
class OTO(Method):
    """OTO / HSPG: group-lasso subgradient on zero-invariant groups, then half-space
    projection to exact zeros; zero groups are removed with no change of the output."""
    residual = "coupled"
    HPARAMS = {
        "lam": HParam(float, lo=0.0, note="a negative lam inverts the penalty"),
        "eps": HParam(float, 0.0, 1.0, hi_open=True, note="of the half-space test"),
        "n_p": HParam(float, 0.0, 1.0,
                      note="fraction of the phase spent in the subgradient stage"),
        "momentum": HParam(float, 0.0, 1.0, hi_open=True, note="of the ZIG parameters"),
        "log_every": HParam(int, lo=0, note="steps between sparsity records, 0 = off"),
    }

    def __init__(self, lam: float = 1e-3, eps: float = 0.0, n_p: float = 0.25,
                 momentum: float = 0.0, log_every: int = 10, **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(lam=lam, eps=eps, n_p=n_p, momentum=momentum, log_every=log_every)
        self.total_steps: int | None = None    # set by `regularize` (or by hand)
        self.step = 0
        self.log: list[tuple[int, torch.Tensor]] = []

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        self._zigs = {g.index: slices_of(model, g, ("out", "affine")) for g in self.groups}
        self._flat = FlatChannels(model, [(g.size, [s.member for s in self._zigs[g.index]])
                                          for g in self.groups])
        self._params = list(self._flat.tensors())
        self._zero = torch.zeros(self._flat.n, dtype=torch.bool)   # zero groups at x
        self._x: torch.Tensor | None = None                        # x, for the half-space test
        self._sq: torch.Tensor | None = None                       # ||x_g||^2
        self.step, self.log = 0, []
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        mine = {id(p) for p in self._params}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in mine]
        zig = [p for p in self._params if p.requires_grad]
        groups = [{"params": zig, "lr": lr, "weight_decay": 0.0, "momentum": self.momentum,
                   "nesterov": False, "dampening": 0.0}]
        if rest:
            groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay})
        return groups

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        if ctx.train_loader is not None:
            self.total_steps = math.ceil(ctx.epochs * len(ctx.train_loader))
        return super().regularize(model, ctx)

    # -- HSPG --------------------------------------------------------------------------------
    @property
    def half_space(self) -> bool:
        """True once the subgradient stage (the first n_p of the phase) is over."""
        if self.n_p == 0:
            return True
        if self.total_steps is None:
            raise RuntimeError("OTO needs the length of the phase to switch stages: run it "
                               "through regularize() or set `total_steps` (or n_p=0)")
        return self.step >= math.ceil(self.n_p * self.total_steps)

    def after_backward(self, model: nn.Module) -> None:
        """grad(x_g) += lam x_g / ||x_g|| for every non-zero ZIG, grad(x_g) = 0 for zero ones,
        all groups at once (`FlatChannels`); x and ||x_g||^2 are kept for the half-space
        test."""
        f = self._flat
        if not f.numels:
            return
        half = self.half_space
        with torch.no_grad():
            x = f.read("x")
            sq = f.dot(x)
            self._zero = sq == 0
            grads = f.grads()                  # grad <- grad [x_g != 0] + lam x / ||x_g||
            g = f.read("g", grads)
            g.mul_(f.spread((~self._zero).to(x.dtype), "e", fill=1.0))
            g.addcmul_(x, f.spread(lasso_coef(sq, self.lam), "e"))
            torch._foreach_copy_(grads, f.views("g"))
            self._x, self._sq = (x, sq) if half else (None, None)

    def after_step(self, model: nn.Module) -> None:
        """Zero the ZIGs that were zero, and (half-space stage) those whose trial point x^
        fails <x^_g, x_g> >= eps ||x_g||^2, all groups at once."""
        f = self._flat
        half = self.half_space
        with torch.no_grad():
            if f.numels:
                xh = f.read("xh")                           # the trial point x^ = x - a grad
                zero = self._zero.to(xh.device)
                if half and self._x is not None:
                    zero = zero | (f.dot(xh, self._x) < self.eps * self._sq)
                xh.masked_fill_(f.spread(zero, "mask"), 0.0)
                torch._foreach_copy_(f.tensors(), f.views("xh"))
            self._x = self._sq = None
            self.step += 1
            if self.log_every and self.step % self.log_every == 0:
                self.log.append((self.step, self._count_zero()))

    def _count_zero(self) -> torch.Tensor:
        f = self._flat
        return (f.dot(f.read("xh")) == 0).sum() if f.numels else torch.zeros((), dtype=torch.long)

    def _zero_masks(self, model: nn.Module | None = None) -> dict[int, torch.Tensor]:
        """Per group: which ZIGs of `model` (None: the attached one) are exactly zero."""
        return {i: sum(s.rows(t).pow(2).sum(1) for s, t in zip(ss, on_model(ss, model))) == 0
                for i, ss in self._zigs.items()}

    def sparsity_history(self) -> list[tuple[int, float]]:
        """(step, fraction of zero groups) every `log_every` steps of the last phase."""
        n = sum(g.size for g in self.groups)
        return [(s, float(c) / max(n, 1)) for s, c in self.log]

    # -- decision ----------------------------------------------------------------------------
    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """L2 norm of each zero-invariant group (exactly 0 for a removable channel)."""
        return {i: channel_sqnorm(ss, on_model(ss, model)).sqrt()
                for i, ss in self._zigs.items()}

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        """Remove the zero groups (budget None: exact) or follow `budget` by group norm."""
        return super().finish(model, Budget(threshold=0.0) if budget is None else budget)
