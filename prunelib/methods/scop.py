"""SCOP: scientific control for reliable pruning, with knockoff features.

Tang, Wang, Xu, Tao, Xu, Xu, Xu, "SCOP: Scientific Control for Reliable Neural Network Pruning",
NeurIPS 2020 (arXiv:2010.10732); official code huawei-noah/Pruning, SCOP_NeurIPS2020 (train.py:
the knockoff phase, the decision and the fine-tuning). Choices that the paper and the code leave
open, or where we depart from the code, are marked [ours].

Knockoffs  a generator G maps Gaussian noise z (n, 128) to inputs x~ = G(z) that mimic the
           data but carry no information about the label. Every batch of the phase is
           [x; x~] (real and knockoff halves, n each). The official code loads a GAN generator
           trained beforehand (a DCGAN-style net for CIFAR, 128-d latent); prunelib trains its
           own on the same data (`KnockoffGenerator`): probabilistic PCA (Tipping & Bishop,
           1999), the maximum-likelihood linear-Gaussian generator with a q-dimensional latent,
               x~ = mu + W z + sigma e,  z ~ N(0, I_q), e ~ N(0, I_D),
               W = U_q (Lambda_q - sigma^2 I)^(1/2),  sigma^2 = mean of the D - q discarded
               eigenvalues of the data covariance,
           fitted in closed form (randomized PCA, `torch.pca_lowrank`) on `fit_images` training
           batches as the loader yields them (normalized, augmented), at most 32 x 32 pixels
           (larger inputs are fitted at 32 x 32 and upsampled bilinearly). [ours] It matches
           the data's mean and covariance only, so its samples are blurry textures rather than
           objects: deep features of x~ separate from real ones more easily than a GAN's would.
           Cost: one pass over `fit_images` images and a rank-q PCA (about a second for 5,000
           CIFAR images on the 2-core CPU). Any module mapping (n, latent) noise to inputs can
           be given instead (`set_generator`, e.g. a trained GAN's generator).
Mixing     every source conv of a prunable channel group computes A (real half) and A~
           (knockoff half); the real half goes on as the per-filter mixture
               A' = lambda * A + (1 - lambda) * A~,   lambda in [0, 1] per filter,
           the knockoff half unchanged (the official Kf_Conv2d: conv -> mixing -> BN). The loss
           is the task cross-entropy of the real half. [ours] Only the prunable groups' convs
           mix (the official code mixes every conv but the stem).
Update     only lambda is trained; every network weight is frozen (`attach` sets
           requires_grad False; `finish` restores it on the plain copy). Adam, lr 4e-3,
           betas (0.5, 0.9), constant lr, lambda clamped to [0, 1] after every step, lambda
           initialized to 0.5; the phase runs `ctx.epochs` epochs (the official code: 20) with
           the network in train mode (BN on batch statistics). [ours] The BN running statistics
           the phase's mixed batches wrote are restored at its end: the network did not change,
           so the sparse model is the dense one (the official code re-estimates them on the
           training set after masking, as the protocol's recalibrated column does).
Decision   importance of filter k: |gamma_k| (2 lambda_k - 1), gamma the BN scale after the conv
           (the paper: lambda - lambda~ = 2 lambda - 1; the code also multiplies by |gamma|);
           the same fraction of every prunable group is removed (the paper's uniform rate,
           `prune_rate`): under Budget(macs=m) the smallest uniform rate that meets it, exactly
           as `l1` (`magnitude.Magnitude`), then fine-tuning. [ours] Internal groups only: the
           official CIFAR code also prunes the block's last conv and scatters its output back to
           the trunk's width before the addition, which is not a physical removal.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget
from .base import Context, HParam, register
from .magnitude import Magnitude
from .structures import follow_model, strip_hooks

FIT_SIDE = 32             # the generator is fitted at most at FIT_SIDE x FIT_SIDE pixels


class KnockoffGenerator(nn.Module):
    """Probabilistic PCA as a generator: x~ = mu + W z + sigma e (module docstring).

    mean (D,), weight W (D, q), sigma: the fitted model over D = prod(fit_shape) pixels;
    `shape`: the shape of one generated input (upsampled from `fit_shape` when they differ).
    """

    def __init__(self, mean: torch.Tensor, weight: torch.Tensor, sigma: float,
                 fit_shape: tuple[int, ...], shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", mean)                                  # (D,)
        self.register_buffer("weight", weight)                              # (D, q)
        self.sigma = float(sigma)
        self.fit_shape, self.shape = tuple(fit_shape), tuple(shape)
        self.latent = weight.shape[1]

    @classmethod
    @torch.no_grad()
    def fit(cls, batches: Iterable, latent: int = 128, images: int = 5000
            ) -> "KnockoffGenerator":
        """Fit mu, W, sigma by maximum likelihood on up to `images` inputs of `batches`
        ((x, y) pairs or tensors x of shape (n, C, H, W))."""
        xs, n, shape = [], 0, None
        for b in batches:
            x = b[0] if isinstance(b, (tuple, list)) else b
            if not torch.is_tensor(x) or x.dim() != 4:
                raise TypeError("KnockoffGenerator.fit: batches must yield (x, y) pairs with x "
                                f"a (n, C, H, W) tensor, got {type(x).__name__}"
                                f"{'' if not torch.is_tensor(x) else tuple(x.shape)}")
            shape = tuple(x.shape[1:])
            x = x.detach().float()
            if max(shape[1:]) > FIT_SIDE:
                x = F.interpolate(x, size=tuple(min(s, FIT_SIDE) for s in shape[1:]),
                                  mode="area")
            xs.append(x.reshape(len(x), -1).cpu())
            n += len(x)
            if n >= images:
                break
        if shape is None or n < 2:
            raise ValueError(f"KnockoffGenerator.fit: need at least 2 images, got {n}")
        fit_shape = (shape[0], *(min(s, FIT_SIDE) for s in shape[1:]))
        x = torch.cat(xs)[:images].double()                                  # (N, D)
        mean = x.mean(0)
        xc = x - mean
        N, D = xc.shape
        q = min(latent, N - 1, D)
        _, s, v = torch.pca_lowrank(xc, q=q, center=False, niter=6)          # v: (D, q)
        ev = s * s / (N - 1)                                                 # top-q eigenvalues
        total = float((xc * xc).sum()) / (N - 1)
        sigma2 = max(total - float(ev.sum()), 0.0) / (D - q) if D > q else 0.0
        weight = v * (ev - sigma2).clamp_min(0).sqrt()                       # (D, q)
        if q < latent:                                  # pad: the extra latents do nothing
            weight = torch.cat([weight, weight.new_zeros(D, latent - q)], 1)
        return cls(mean.float(), weight.float(), math.sqrt(sigma2), fit_shape, shape)

    def covariance(self) -> torch.Tensor:
        """The model's covariance W W^T + sigma^2 I (D, D), at the fitted resolution."""
        w = self.weight.double()
        return w @ w.T + self.sigma ** 2 * torch.eye(w.shape[0], dtype=w.dtype, device=w.device)

    def forward(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z (n, q) -> x~ (n, *shape); `noise` (n, D) is e (drawn when None)."""
        if noise is None:
            noise = torch.randn(len(z), self.mean.numel(), device=z.device, dtype=z.dtype)
        x = self.mean + z @ self.weight.T + self.sigma * noise                  # (n, D)
        x = x.view(len(z), *self.fit_shape)
        if self.fit_shape != self.shape:
            x = F.interpolate(x, size=self.shape[1:], mode="bilinear", align_corners=False)
        return x


@register("scop")
class SCOP(Magnitude):
    """Scientific control: per-filter mixing lambda A + (1 - lambda) A~ with knockoff features,
    only lambda trained; score |gamma| (2 lambda - 1); a uniform per-layer rate removed."""
    residual = "internal"
    HPARAMS = {
        "lr": HParam(float, lo=0.0, lo_open=True, note="Adam's step size on lambda"),
        "beta1": HParam(float, 0.0, 1.0, hi_open=True, note="Adam's first beta"),
        "beta2": HParam(float, 0.0, 1.0, hi_open=True, note="Adam's second beta"),
        "lam_init": HParam(float, 0.0, 1.0, note="initial lambda"),
        "latent": HParam(int, lo=1, note="the generator's latent size"),
        "fit_images": HParam(int, lo=2, note="images the generator is fitted on"),
    }

    def __init__(self, lr: float = 4e-3, beta1: float = 0.5, beta2: float = 0.9,
                 lam_init: float = 0.5, latent: int = 128, fit_images: int = 5000,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.set_hparams(lr=lr, beta1=beta1, beta2=beta2, lam_init=lam_init, latent=latent,
                         fit_images=fit_images)
        self.generator: nn.Module | None = None
        self.generator_seconds: float | None = None

    def set_generator(self, generator: nn.Module) -> None:
        """Use `generator` (a module mapping (n, latent) noise to inputs, e.g. a trained GAN's
        generator) instead of fitting the PPCA one in `regularize`."""
        if not isinstance(generator, nn.Module):
            raise TypeError(f"{self.owner()}: generator must be an nn.Module mapping (n, "
                            f"latent) noise to inputs, got {type(generator).__name__}")
        self.generator = generator

    # -- attach: lambda, the mixing hooks, frozen weights ------------------------------------
    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        n, self.slices, index = 0, {}, {}
        for g in self.groups:
            srcs = [m for m in g.by_role("out") if m.param == "weight" and m.module in g.sources]
            if not srcs:
                continue
            self.slices[g.index] = slice(n, n + g.size)
            for m in srcs:
                idx = index.setdefault(m.module, torch.full(
                    (m.tensor(model).shape[0],), -1, dtype=torch.long))
                idx[m.idx[:, 0]] = torch.arange(n, n + g.size)
            n += g.size
        for idx in index.values():                   # channels of no mixed group: lambda = 1
            idx[idx < 0] = n
        ref = next(p for p in model.parameters() if p.is_floating_point())
        self.lam = nn.Parameter(torch.full((n,), self.lam_init, device=ref.device,
                                           dtype=ref.dtype))                     # (n,)
        self._index = {k: v.to(ref.device) for k, v in index.items()}
        self._grad_flags = {k: p.requires_grad for k, p in model.named_parameters()}
        model.requires_grad_(False)                  # only lambda is trained
        self._handles: list[tuple[str, int]] = []
        self._install(model)
        return model

    def _install(self, model: nn.Module) -> None:
        """Model pre-hook: in train mode, the batch becomes [x; G(z)] (and the factor vector
        [lambda, 1] is built once); conv hooks: the real half becomes lambda A + (1 - lambda)
        A~; model hook: the output of the real half only. In eval mode nothing happens."""
        state: dict[str, Any] = {}

        def moved(ref: torch.Tensor) -> None:
            self.lam.data = self.lam.data.to(ref.device, ref.dtype)
            self._index = {k: v.to(ref.device) for k, v in self._index.items()}
            if self.generator is not None:
                self.generator.to(ref.device)
        self._handles.append(("", follow_model(model, moved)))

        def double(mod: nn.Module, args: tuple) -> tuple | None:
            state["n"] = None
            if not mod.training:
                return None
            x = args[0]
            state["n"] = len(x)
            state["f"] = torch.cat([self.lam, self.lam.new_ones(1)])              # (n + 1,)
            return (torch.cat([x, self.knockoffs(x)]), *args[1:])                 # (2n, ...)

        def real_half(_mod: nn.Module, _args: tuple, out: Any) -> Any:
            n = state.get("n")
            if n is None:
                return None
            if not torch.is_tensor(out):
                raise TypeError(f"{self.owner()}: the model's output must be a tensor, got "
                                f"{type(out).__name__}")
            return out[:n]

        def mixer(name: str):
            def mix(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
                n = state.get("n")
                if n is None:
                    return None
                lam = state["f"].index_select(0, self._index[name])               # (C,)
                lam = lam.view(1, -1, *[1] * (out.dim() - 2))
                real, kf = out[:n], out[n:]
                return torch.cat([kf + lam * (real - kf), kf])
            return mix

        self._handles.append(("", model.register_forward_pre_hook(double).id))
        self._handles.append(("", model.register_forward_hook(real_half).id))
        for name in self._index:
            h = model.get_submodule(name).register_forward_hook(mixer(name))
            self._handles.append((name, h.id))

    def mixed_convs(self) -> list[str]:
        """Names of the convs whose outputs are mixed (the source convs of the groups)."""
        return list(self._index)

    @torch.no_grad()
    def knockoffs(self, x: torch.Tensor) -> torch.Tensor:
        """A knockoff batch like `x` (same shape, device, dtype and memory format): G(z),
        z ~ N(0, I_latent)."""
        if self.generator is None:
            raise RuntimeError(f"{self.owner()}: no knockoff generator yet: call "
                               "regularize(model, ctx) (which fits one on ctx.train_loader) "
                               "or fit_generator(batches) before a training-mode forward")
        z = torch.randn(len(x), self.latent, device=x.device)
        kf = self.generator(z).to(x.device, x.dtype)
        if kf.shape != x.shape:
            raise ValueError(f"{self.owner()}: the generator made inputs of shape "
                             f"{tuple(kf.shape)}, the model gets {tuple(x.shape)}")
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            kf = kf.contiguous(memory_format=torch.channels_last)
        return kf

    def fit_generator(self, batches: Iterable) -> KnockoffGenerator:
        """Fit the PPCA knockoff generator on `batches` (module docstring); returns it."""
        t = time.time()
        self.generator = KnockoffGenerator.fit(batches, self.latent, self.fit_images)
        self.generator_seconds = time.time() - t
        return self.generator

    # -- the knockoff phase --------------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """lambda alone, without weight decay (the network is frozen)."""
        return [{"params": [self.lam], "lr": self.lr, "weight_decay": 0.0}]

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """lambda <- clamp(lambda, 0, 1)."""
        self.lam.clamp_(0.0, 1.0)

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        """ceil(epochs * len(loader)) Adam steps on lambda with the task loss of the real half
        (module docstring); the BN running statistics are restored at the end."""
        from ..train import _prepare, _to
        if ctx.epochs <= 0:
            return model
        dev, cl = _prepare(model, ctx.device)
        if self.generator is None:
            self.fit_generator(ctx.train_loader)
        self.generator.to(dev)
        bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [copy.deepcopy(m._buffers) for m in bn]
        opt = torch.optim.Adam(self.param_groups(model, ctx.lr, 0.0),
                               betas=(self.beta1, self.beta2))
        total = math.ceil(ctx.epochs * len(ctx.train_loader))
        losses = torch.zeros(total, device=dev)
        model.train()
        step = 0
        while step < total:
            for x, y in ctx.train_loader:
                if step >= total:
                    break
                x, y = _to(x, dev, cl), y.to(dev)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.after_step(model)
                losses[step] = loss.detach()
                step += 1
        for m, buffers in zip(bn, saved):
            for k, v in buffers.items():
                if v is not None:
                    m._buffers[k].copy_(v)
        mean = float(losses.mean())
        if not math.isfinite(mean):
            raise FloatingPointError(f"{self.owner()}: the knockoff phase diverged (mean loss "
                                     f"{mean}); lower lr")
        self.loss = mean
        return model

    # -- decision ------------------------------------------------------------------------------
    def lambdas(self) -> dict[int, torch.Tensor]:
        """{group index: lambda of its channels}."""
        lam = self.lam.detach().cpu()
        return {i: lam[sl] for i, sl in self.slices.items()}

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """|gamma_k| (2 lambda_k - 1) per channel of every mixed group (gamma summed over the
        group's BNs in absolute value; 1 when the group has none)."""
        out = {}
        for g in self.groups:
            if g.index not in self.slices:
                continue
            lam = self.lam.detach().cpu()[self.slices[g.index]]
            gamma = torch.zeros(g.size)
            for m in g.bns():
                gamma += m.tensor(model).detach().cpu().float()[m.idx[:, 0]].abs()
            out[g.index] = (gamma if g.bns() else torch.ones(g.size)) * (2 * lam - 1)
        return out

    def finish(self, model: nn.Module, budget: Budget | None) -> nn.Module:
        """A plain copy of `model` (hooks off, weights trainable again), then the uniform
        per-layer rate on the SCOP scores (`magnitude.Magnitude.finish`)."""
        plain = copy.deepcopy(model)
        strip_hooks(plain, self._handles)
        for k, p in plain.named_parameters():
            p.requires_grad_(self._grad_flags.get(k, True))
        return super().finish(plain, budget)
