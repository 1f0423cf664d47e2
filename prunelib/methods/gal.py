"""GAL: structured pruning by generative adversarial learning.

Lin, Ji, Yan, Zhang, Cao, Ye, Huang, Doermann, "Towards Optimal Structured CNN Pruning via
Generative Adversarial Learning", CVPR 2019 (arXiv:1903.09291); official code ShaohuiLin/GAL
(main.py: the training step, fista.py: the mask optimizer, model/discriminator.py). Choices
that the paper and the code leave open, or where we depart from the code, are marked [ours].

Masks      a soft mask m_s >= 0 multiplies the output of every structure s
           (`structures.Structures`): 'blocks' - one scalar per residual branch,
           y = m_b F(x) + s(x) (the official ResNet-56 choice, the default when the model has
           residual branches); 'channels' - one per channel of each prunable group,
           y_c = m_c BN(x)_c (the official VGG choice).
           [ours] m starts at 1 (mask_init='ones': the student equals the trained baseline);
           mask_init='normal' draws N(0, 1) as the official code.
Game       teacher T: the frozen dense model (a copy at attach), its logits the "real"
           samples; generator G: the masked student, its logits the "fake" ones; D: an MLP
           on logits with widths (classes, 128, 256, 128) as the official discriminator, with
           ReLU between its layers [ours: the official layers are purely linear], BCE with
           logits averaged over its 128 outputs. Label-free: no label enters any loss.
           D step:  L_D = BCE(D(T(x)), 1) + BCE(D(G(x)), 0) + BCE(D(G(x)), 1)  (the third term
                    as in the official code), SGD on W_D (lr, momentum, weight decay of the run).
           G step:  L_G = BCE(D(G(x)), 1) + mu MSE(G(x), T(x)) + lam ||m||_1, SGD on W_G;
                    its gradient on m (which includes lam sign(m), as in the official code, so
                    m is shrunk twice) is kept for the FISTA step.
FISTA      every mask_step iterations, with eta the current learning rate, g = dL_G/dm:
               t' = (1 + sqrt(1 + 4 t^2)) / 2
               y  = m + ((t - 1) / t') (m - m_prev)          (y = m at the first step)
               m_prev <- m;  t <- t'
               m  <- max(S_(eta lam)(y - eta g), 0),  S_c(z) = sign(z) max(|z| - c, 0)
           (fista.py). [ours] The official code resets t at LR-decay epochs only when
           mask_step = 1 (the reset flag is set at the first iteration of an epoch only); we
           reset it at the start of the phase only.
           [ours] mask_step=None scales the official 200 iterations (of a 100-epoch, 391
           iterations-per-epoch ResNet-56 run: 195 FISTA steps) to the phase: max(1,
           round(200 * steps / 39100)), the same number of FISTA steps per phase.
Decision   structures with m = 0 are removed exactly (`finish(model)`: own rule; the
           remaining m folded into the producers: gamma, beta times m); `finish(model, budget)`
           also removes the next-lowest m until the budget holds (as SSS).
Defaults   mu = 1, lam = 0.6 (ResNet-56 GAL-0.6; the official VGG values are mu = 0.1,
           lam = 1e-3), SGD for W_G and D with the run's lr / momentum / weight decay.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget
from .base import Context, HParam, Method, register
from .structures import STRUCTURES, Structures

OFFICIAL_STEPS, OFFICIAL_MASK_STEP = 100 * 391, 200


def soft_threshold(z: torch.Tensor, t: float) -> torch.Tensor:
    """S_t(z) = sign(z) max(|z| - t, 0), elementwise."""
    return torch.sign(z) * (z.abs() - t).clamp_min(0)


class Discriminator(nn.Module):
    """MLP on logits: Linear(classes, 128) - ReLU - Linear(128, 256) - ReLU - Linear(256, 128),
    weights N(0, 0.01), biases 0 (the official initialization)."""

    def __init__(self, classes: int, widths: tuple[int, ...] = (128, 256, 128)) -> None:
        super().__init__()
        dims = (classes, *widths)
        layers: list[nn.Module] = []
        for i in range(len(widths)):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(widths) - 1:
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)
        for m in self.body:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.body(logits)


@register("gal")
class GAL(Method):
    """Generative adversarial learning: the masked student fools a discriminator on the
    teacher's logits, mu MSE to the teacher's logits, lam ||m||_1 by FISTA; m = 0 removed."""
    residual = "internal"
    HPARAMS = {
        "mu": HParam(float, lo=0.0, note="weight of the MSE to the teacher's logits"),
        "lam": HParam(float, lo=0.0, note="the L1 strength on the masks"),
        "mask_step": HParam(int, lo=1, none=True,
                            note="iterations between FISTA steps; None: 200 scaled to the phase"),
        "mask_init": HParam(str, choices=("ones", "normal")),
        "structure": HParam(str, choices=STRUCTURES,
                            note="'auto': blocks when the model has residual branches"),
    }

    def __init__(self, mu: float = 1.0, lam: float = 0.6, mask_step: int | None = None,
                 mask_init: str = "ones", structure: str = "auto", **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(mu=mu, lam=lam, mask_step=mask_step, mask_init=mask_init,
                         structure=structure)
        self.target_reached: bool | None = None

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        ex = self.ctx.example_inputs if self.ctx is not None else None
        if ex is None:
            raise ValueError(f"{self.owner()}: the discriminator's width is the model's output "
                             "width: set method.ctx = methods.Context(example_inputs) before "
                             "attach")
        self.st = Structures(model, self.groups, self.structure, ex, self.owner())
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)   # frozen dense copy
        was = model.training
        with torch.no_grad():
            classes = model.eval()(ex).shape[-1]
        model.train(was)
        ref = next(p for p in model.parameters() if p.is_floating_point())
        self.disc = Discriminator(classes).to(ref.device, ref.dtype)
        if self.mask_init == "ones":
            m0 = torch.ones(self.st.n, device=ref.device, dtype=ref.dtype)
        else:
            m0 = torch.randn(self.st.n, device=ref.device, dtype=ref.dtype)
        self.m = nn.Parameter(m0)                                                   # (n,)
        self.m_prev = self.m.detach().clone()
        self.t = 1.0
        self.step, self.fista_steps = 0, 0
        self._every = self.mask_step or 1
        self._g: torch.Tensor | None = None
        self._pgroup = {"params": [self.m], "lr": self.ctx.lr, "weight_decay": 0.0,
                        "momentum": 0.0, "nesterov": False}
        self.st.install(model, self.m, lambda t: t, self._moved)
        return model

    def _moved(self, ref: torch.Tensor) -> None:
        """The model moved after attach: the FISTA state and D follow m."""
        self.m_prev = self.m_prev.to(ref.device, ref.dtype)
        self.disc.to(ref.device, ref.dtype)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Model parameters with the run's settings; m in a group of its own whose current lr
        is the FISTA step eta (the group never steps m: `after_backward` takes its gradient)."""
        self._pgroup["lr"] = lr
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay}, self._pgroup]

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        """lam ||m||_1 (its gradient lam sign(m) joins the FISTA step's g)."""
        return self.lam * self.m.abs().sum()

    def after_backward(self, model: nn.Module) -> None:
        """g = dL/dm is taken off m (kept for the FISTA step; the optimizer skips m)."""
        self._g, self.m.grad = self.m.grad, None

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Every mask_step iterations: t' = (1 + sqrt(1 + 4 t^2)) / 2, y = m + ((t - 1) / t')
        (m - m_prev), m_prev <- m, m <- max(S_(eta lam)(y - eta g), 0)."""
        self.step += 1
        g, self._g = self._g, None
        if g is None or self.step % self._every:
            return
        eta = self._pgroup["lr"]
        if self.fista_steps == 0:
            y = self.m.detach().clone()
        else:
            t_new = (1 + math.sqrt(1 + 4 * self.t * self.t)) / 2
            y = self.m + ((self.t - 1) / t_new) * (self.m - self.m_prev)
            self.t = t_new
        self.m_prev.copy_(self.m)
        self.m.copy_(soft_threshold(y - eta * g, eta * self.lam).clamp_(min=0))
        self.fista_steps += 1

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        """The adversarial phase (module docstring), ceil(epochs * len(loader)) iterations:
        a D step, then a G step with the hooks above. Label-free."""
        from ..train import _prepare, _to, lr_factor
        if ctx.epochs <= 0:
            return model
        total = math.ceil(ctx.epochs * len(ctx.train_loader))
        if self.mask_step is None:
            self._every = max(1, round(OFFICIAL_MASK_STEP * total / OFFICIAL_STEPS))
        self.t, self.fista_steps = 1.0, 0                     # FISTA restarts with the phase
        dev, cl = _prepare(model, ctx.device)
        _prepare(self.teacher, dev)
        self.disc.to(dev)
        opt_g = torch.optim.SGD(self.param_groups(model, ctx.lr, ctx.weight_decay),
                                lr=ctx.lr, momentum=ctx.momentum,
                                weight_decay=ctx.weight_decay)
        opt_d = torch.optim.SGD(self.disc.parameters(), lr=ctx.lr, momentum=ctx.momentum,
                                weight_decay=ctx.weight_decay)
        scheds = [torch.optim.lr_scheduler.LambdaLR(
            o, lambda s: lr_factor(s, total, ctx.schedule)) for o in (opt_g, opt_d)]
        losses = torch.zeros(total, 2, device=dev)                 # (L_D, L_G) per iteration
        model.train()
        self.disc.train()
        step = 0
        while step < total:
            for x, _ in ctx.train_loader:                         # labels are not used
                if step >= total:
                    break
                x = _to(x, dev, cl)
                with torch.no_grad():
                    real = self.teacher(x)
                fake = model(x)
                loss_d = self.disc_loss(real, fake.detach())
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                loss_g = self.gen_loss(real, fake) + self.loss_term(model)
                opt_g.zero_grad(set_to_none=True)
                self.disc.requires_grad_(False)
                loss_g.backward()
                self.disc.requires_grad_(True)
                self.after_backward(model)
                opt_g.step()
                self.after_step(model)
                for s in scheds:
                    s.step()
                losses[step, 0], losses[step, 1] = loss_d.detach(), loss_g.detach()
                step += 1
        mean = losses.mean(0).cpu()
        if not torch.isfinite(mean).all():
            raise FloatingPointError(f"{self.owner()}: the adversarial phase diverged (mean "
                                     f"L_D, L_G = {mean.tolist()}); lower the learning rate")
        self.loss_d, self.loss_g = float(mean[0]), float(mean[1])
        return model

    def disc_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """L_D = BCE(D(real), 1) + BCE(D(fake), 0) + BCE(D(fake), 1) (with logits)."""
        d_real, d_fake = self.disc(real), self.disc(fake)
        bce = F.binary_cross_entropy_with_logits
        return (bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
                + bce(d_fake, torch.ones_like(d_fake)))

    def gen_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """BCE(D(fake), 1) + mu MSE(fake, real): the adversarial and data terms of L_G."""
        d_fake = self.disc(fake)
        return (F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
                + self.mu * F.mse_loss(fake, real))

    def masks(self) -> dict:
        """{branch end (blocks) or (group index, channel) (channels): m}."""
        return dict(zip(self.st.names, self.m.detach().cpu().tolist()))

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """Channels: m per channel of every masked group. Blocks: {} (see `masks`)."""
        m = self.m.detach().cpu()
        return {i: m[sl] for i, sl in self.st.slices.items()}

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        """Fold m into the weights and remove the structures with m = 0 (and, with a budget,
        the next-lowest ones); a plain, smaller copy of `model`."""
        m = self.m.detach()
        self.mask_zeros = int((m == 0).sum())
        small = self.st.plain(model, m)
        if self.st.kind == "blocks":
            small, self.target_reached = self.st.remove_blocks(small, m, m, budget)
            return small
        keep = self.select(small, budget, self.scores(model)) if budget is not None else None
        keep = self.st.zero_keep(m, keep, self.min_channels)
        return self.st.remove_zero_channels(small, self.all_groups, keep)
