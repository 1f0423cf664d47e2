"""ResRep: lossless CNN pruning via decoupling remembering and forgetting.

Ding, Hao, Tan, Liu, Han, Guo, Ding, "ResRep: Lossless CNN Pruning via Decoupling Remembering
and Forgetting", ICCV 2021 (arXiv:2007.03260); official code DingXiaoH/ResRep
(rr/compactor.py, rr/resrep_train.py, rr/resrep_util.py, rr/resrep_convert.py).

Compactor  after the BN of every prunable conv, a 1x1 conv Q (D x D, D = the conv's output
           channels), initialized to the identity: y = Q BN(K x) (`attach`; a forward hook, the
           model's modules are not changed), with a 0/1 mask m (D,) on its rows.
Update     "gradient resetting" (paper eq. 14, official train_one_step), `after_backward`:
               G(Q) = m (.) dL/dQ + lam Q_i / ||Q_i||_2     (row i of Q; (.) row-wise mask)
           so a masked row receives only the group-lasso gradient and decays to 0, while the
           rest of the network (the "remembering" part) is trained by the task loss only.
           Compactors: momentum 0.99, no weight decay (`param_groups`); other parameters: the
           run's SGD.
Masks      after a warm-up (the fraction `warmup` of the phase; official 5 of 480 epochs), every
           `mask_interval` steps (`after_step`): all compactor rows are sorted globally by
           ||Q_i||, and the lowest are masked until the MACs target holds, adding at most
           `granularity` newly masked rows per update while the current masks miss the target
           (official resrep_mask_model); every layer keeps its minimum (min_keep / min_channels).
Convert    `finish` (exact, tested): BN folded, compactor composed into the conv:
               Q (A (K x - mu) + beta) = (Q A K) x + Q (beta - A mu),  A = gamma / sqrt(var + eps)
           the merged kernel goes to the conv, the constant to the BN's beta; the BN is set so
           that it adds only the constant (gamma' = sqrt(v + eps), running var v, running mean
           m, beta' = m + Q(beta - A mu)), with m, v the mean and (diagonal) variance of the new
           conv's output predicted from the old statistics, so that a later BN recalibration
           or fine-tuning starts from consistent statistics. Then rows are removed: own rule
           (`finish(model)`), the rows with ||Q_i|| < 1e-5 (official conversion threshold;
           their outputs are 0); with a Budget, the global ranking of ||Q_i|| under it.
Residual   'internal' only (the paper's experiments: first conv of each basic block; the
           pacesetter/follower machinery for trunk layers was not used): groups with one
           producing conv followed by one BN over all its channels.
Defaults   [code: rr/exp_resrep.py] lam = 1e-4, mask_interval = 200, granularity = 4,
           compactor momentum 0.99; MACs target: ctx.extra['budget'].macs, else `macs`.
           [ours] mask_interval=None (the default) scales the official 200 iterations of a
           480-epoch, 782-step (batch 64) run to the phase, as GAL's mask_step: at least 1, so
           a short phase reaches its target as early in the phase as the official run does
           (with 200 a 3-epoch CIFAR phase would mask about 20 rows, far short of the target).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget, MacModel, min_keep_count
from ..surgery import remove_channels
from .base import Context, HParam, Method, register
from .structures import follow_model

CONVERSION_EPS = 1e-5           # official CONVERSION_EPSILON: rows below it are removed
OFFICIAL_STEPS, OFFICIAL_MASK_INTERVAL = 480 * 782, 200     # 480 epochs at batch 64


@register("resrep")
class ResRep(Method):
    """ResRep: identity compactors after BN, gradient resetting m (.) dL/dQ + lam Q_i/||Q_i||,
    global row-norm masks toward the MACs target, BN + compactor merged into the conv."""
    residual = "internal"
    HPARAMS = {
        "residual": HParam(str, choices=("internal",), none=True,
                           note="compactors on trunk (coupled) channels are not supported"),
        "lam": HParam(float, lo=0.0, note="lasso strength on compactor rows"),
        "mask_interval": HParam(int, lo=1, none=True,
                                note="steps between mask updates; None: 200 scaled to the phase"),
        "granularity": HParam(int, lo=1, note="newly masked rows per update at most"),
        "warmup": HParam(float, 0.0, 1.0, note="fraction of the phase before the first mask"),
        "compactor_momentum": HParam(float, 0.0, 1.0, hi_open=True),
        "macs": HParam(float, 0.0, 1.0, lo_open=True,
                       note="fraction of dense MACs to keep when the context has no budget"),
    }

    def __init__(self, lam: float = 1e-4, mask_interval: int | None = None, granularity: int = 4,
                 warmup: float = 5 / 480, compactor_momentum: float = 0.99, macs: float = 0.5,
                 **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(lam=lam, mask_interval=mask_interval, granularity=granularity,
                         warmup=warmup, compactor_momentum=compactor_momentum, macs=macs)
        self.target_reached: bool | None = None

    # -- setup -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        self.comp: list[tuple[ChannelGroup, str, str]] = []       # (group, conv, bn)
        for g in self.groups:
            convs = [m for m in g.by_role("out") if m.param == "weight"]
            bns = g.bns()
            if len(convs) != 1 or len(bns) != 1 or g.by_role("pad"):
                continue
            conv, bn = model.get_submodule(convs[0].module), model.get_submodule(bns[0].module)
            full = torch.arange(g.size)
            if (not isinstance(conv, nn.Conv2d) or conv.groups != 1 or not bn.affine
                    or not bn.track_running_stats or bn.num_features != g.size
                    or conv.out_channels != g.size
                    or not torch.equal(bns[0].idx[:, 0], full)
                    or not torch.equal(convs[0].idx[:, 0], full)):
                continue
            self.comp.append((g, convs[0].module, bns[0].module))
        dev = next(model.parameters()).device
        sizes = [g.size for g, _, _ in self.comp]
        k, d = len(sizes), max(sizes, default=1)
        # every compactor Q_k is the (D_k, D_k) corner of one zero-padded tensor P (K, D, D):
        # the per-step gradient edit is then one batched computation for all of them
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.P = nn.Parameter(torch.zeros(k, d, d, device=dev, dtype=dtype))
        self.M = torch.zeros(k, d, device=dev, dtype=dtype)     # row masks; padding rows 0
        with torch.no_grad():
            for i, n in enumerate(sizes):
                self.P[i, :n, :n] = torch.eye(n, device=dev, dtype=dtype)
                self.M[i, :n] = 1.0
        self._handles = [("", follow_model(model, self._moved))]
        # P is split once per forward (one backward op stacks the K gradients), then each hook
        # slices its own (D, D) matrix: slicing P itself would give every compactor's backward
        # a zero-filled (K, D, D) gradient of its own
        state: dict[str, tuple[torch.Tensor, ...]] = {}

        def split(_m: nn.Module, _a: tuple) -> None:
            state["q"] = self.P.unbind(0)                                   # K x (D, D)
        self._handles.append(("", model.register_forward_pre_hook(split).id))
        for i, (g, _, bn) in enumerate(self.comp):
            def compact(_m: nn.Module, _a: tuple, out: torch.Tensor, i: int = i,
                        n: int = g.size) -> torch.Tensor:
                return F.conv2d(out, state["q"][i][:n, :n, None, None])  # (N, D, H, W) -> same
            h = model.get_submodule(bn).register_forward_hook(compact)
            self._handles.append((bn, h.id))
        ex = self.ctx.example_inputs if self.ctx is not None else None
        self._macmodel = MacModel(model, self.all_groups, ex) if ex is not None else None
        budget = self.ctx.extra.get("budget") if self.ctx is not None else None
        self.target = budget.macs if getattr(budget, "macs", None) is not None else self.macs
        self.step, self._total = 0, 0
        self._every = self.mask_interval or OFFICIAL_MASK_INTERVAL    # until a phase scales it
        self.mask_updates = 0
        return model

    def _moved(self, ref: torch.Tensor) -> None:
        """The model moved after attach: the compactors and their masks follow it."""
        self.P.data = self.P.data.to(ref.device, ref.dtype)
        self.M = self.M.to(ref.device, ref.dtype)

    @property
    def Q(self) -> list[torch.Tensor]:
        """The compactors, views (D_k, D_k) of P (in-place edits change P)."""
        return [self.P[i, :g.size, :g.size] for i, (g, _, _) in enumerate(self.comp)]

    @property
    def mask(self) -> list[torch.Tensor]:
        """The row masks m_k (D_k,), views of M."""
        return [self.M[i, :g.size] for i, (g, _, _) in enumerate(self.comp)]

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """The model's parameters with the run's settings; compactors: momentum 0.99, no wd."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay},
                {"params": [self.P], "lr": lr, "weight_decay": 0.0,
                 "momentum": self.compactor_momentum}]

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        self._total = math.ceil(ctx.epochs * len(ctx.train_loader)) if ctx.epochs > 0 else 0
        self._every = self.mask_interval or max(
            1, round(OFFICIAL_MASK_INTERVAL * self._total / OFFICIAL_STEPS))
        return super().regularize(model, ctx)

    # -- training ----------------------------------------------------------------------------
    @torch.no_grad()
    def after_backward(self, model: nn.Module) -> None:
        """G(Q) = m (.) dL/dQ + lam Q_i / ||Q_i|| for all compactors at once (the zero padding
        of P has zero gradient, mask and norm: it stays 0)."""
        p = self.P
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.mul_(self.M[:, :, None]).add_(
            p / p.norm(dim=2, keepdim=True).clamp_min(1e-12), alpha=self.lam)   # (K, D, D)

    def after_step(self, model: nn.Module) -> None:
        """After the warm-up, every `mask_interval` steps (scaled, see Defaults): `update_masks`."""
        self.step += 1
        start = math.ceil(self.warmup * self._total)
        if self.step >= start and (self.step - start) % self._every == 0:
            self.update_masks()

    def row_norms(self) -> list[torch.Tensor]:
        """||Q_i||_2 of every row of every compactor (the official metric)."""
        return [q.detach().norm(dim=1) for q in self.Q]

    @torch.no_grad()
    def update_masks(self) -> None:
        """Mask the globally smallest rows until the MACs target holds, at most `granularity`
        more than are masked now while the current masks miss it (official resrep_mask_model).
        """
        if self._macmodel is None:
            raise ValueError(f"{self.owner()}: mask updates count MACs: set method.ctx = "
                             "methods.Context(example_inputs) before attach")
        norms = [n.cpu() for n in self.row_norms()]
        values = torch.cat(norms)
        owner = torch.cat([torch.full((n.numel(),), k) for k, n in enumerate(norms)])
        channel = torch.cat([torch.arange(n.numel()) for n in norms])
        order = torch.argsort(values, stable=True)
        owner, channel = owner[order], channel[order]
        rank = torch.empty_like(owner)                  # rank of each row within its layer
        for k in range(len(norms)):
            mine = owner == k
            rank[mine] = torch.arange(int(mine.sum()))
        floor = torch.tensor([g.size - min_keep_count(g.size, self.min_keep, self.min_channels)
                              for g, _, _ in self.comp])
        allowed = rank < floor[owner]
        owner, channel = owner[allowed], channel[allowed]
        gidx = torch.tensor([g.index for g, _, _ in self.comp], dtype=torch.long)
        removed = torch.zeros(len(owner) + 1, len(self.all_groups), dtype=torch.float64)
        removed[1:].scatter_(1, gidx[owner][:, None], 1.0)
        macs = self._macmodel.ratio(removed.cumsum(0))                  # (prefix,)
        ok = torch.nonzero(macs <= self.target + 1e-9).flatten()
        full = int(ok[0]) if len(ok) else len(owner)       # rows to mask to reach the target
        cur = torch.zeros(len(self.all_groups), dtype=torch.float64)
        cur[gidx] = torch.tensor([float((m == 0).sum()) for m in self.mask], dtype=torch.float64)
        n_masked = int(cur.sum())
        n = full
        if float(self._macmodel.ratio(cur)) > self.target + 1e-9:
            n = min(full, n_masked + self.granularity)
        new = torch.zeros(self.M.shape, dtype=self.M.dtype)
        for k, (g, _, _) in enumerate(self.comp):
            new[k, :g.size] = 1.0
        new[owner[:n], channel[:n]] = 0.0
        self.M.copy_(new)
        self.target_reached = n == full and len(ok) > 0
        self.mask_updates += 1

    # -- decision ----------------------------------------------------------------------------
    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """||Q_i|| per channel of every compactor's group."""
        return {g.index: n.cpu() for (g, _, _), n in zip(self.comp, self.row_norms())}

    def merged(self, model: nn.Module) -> nn.Module:
        """A plain copy of `model`: hooks gone, every BN + compactor merged into its conv (the
        same function; no channel removed)."""
        small = copy.deepcopy(model)
        for name, hid in self._handles:
            mod = small.get_submodule(name)
            mod._forward_hooks.pop(hid, None)
            mod._forward_pre_hooks.pop(hid, None)
        with torch.no_grad():
            for q, (_, conv_name, bn_name) in zip(self.Q, self.comp):
                merge_(small.get_submodule(conv_name), small.get_submodule(bn_name), q.detach())
        return small

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        """Merge (exact), then remove rows: ||Q_i|| < 1e-5 (own rule) or by `budget`."""
        small = self.merged(model)
        scores = self.scores(model)
        if budget is None:
            keep = {}
            for i, s in scores.items():
                k = torch.nonzero(s >= CONVERSION_EPS).flatten()
                keep[i] = k if k.numel() else torch.argsort(s, descending=True)[:1]
        else:
            keep = self.select(small, budget, scores)
        keep = {i: k for i, k in keep.items() if k.numel() < self.all_groups[i].size}
        return remove_channels(small, self.all_groups, keep) if keep else small


def merge_(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, q: torch.Tensor) -> None:
    """In place: conv -> BN -> Q becomes conv' -> BN' computing the same function (eval).

    A = gamma / sqrt(var + eps); conv' weight = Q A K; BN' adds Q (A (b0 - mu) + beta)
    (b0: the conv's bias, then set to 0) with running statistics m = Q A (mu - b0) and
    v = (Q A)^2 var (the diagonal prediction), gamma' = sqrt(v + eps), beta' = m + const.
    """
    a = bn.weight / torch.sqrt(bn.running_var + bn.eps)                         # (C,)
    b0 = conv.bias if conv.bias is not None else torch.zeros_like(a)
    qa = q * a[None, :]                                                         # (D, C)
    k = conv.weight.reshape(conv.out_channels, -1)                              # (C, k)
    conv.weight.copy_((qa @ k).reshape(conv.weight.shape))
    if conv.bias is not None:
        conv.bias.zero_()
    const = q @ (a * (b0 - bn.running_mean) + bn.bias)                          # (D,)
    m = qa @ (bn.running_mean - b0)
    v = (qa ** 2) @ bn.running_var
    bn.running_mean.copy_(m)
    bn.running_var.copy_(v)
    bn.weight.copy_(torch.sqrt(v + bn.eps))
    bn.bias.copy_(m + const)
