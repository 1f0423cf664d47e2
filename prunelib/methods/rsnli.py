"""RSNLI: ISTA on BatchNorm scales, exact zeros, constant channels folded into the next layer.

Ye, Lu, Lin, Wang, "Rethinking the Smaller-Norm-Less-Informative Assumption in Channel Pruning
of Convolution Layers", ICLR 2018 (arXiv:1802.00124); official TF code bobye/batchnorm_prune.

Objective   min_W,gamma (1/N) sum_i l(f(x_i; W, gamma), y_i) + mu ||W||^2
                                   + rho * sum_l lambda_l ||gamma^l||_1
Update      after every optimizer step, on gamma only (a proximal / ISTA step that gives exact
            zeros):  gamma <- sign(gamma) * max(|gamma| - eta * rho * lambda_l, 0),
            eta = the current learning rate of gamma's parameter group. As in the official
            optimizer (`BlockProximalGradientDescentOptimizer`) gamma takes a plain gradient step
            (no momentum, no weight decay) before the shrinkage, so the step is exactly ISTA;
            the other parameters use the pipeline's SGD.
Warm-up     rho_warmup (1e-3) for the first `warmup` fraction of the steps, then rho (5e-3): the
            official ResNet-20 recipe is 30k steps at 0.001, then 50k at 0.005 (fraction 0.375).
lambda_l    per-channel cost; 'memory' = the official code's default ("memory" priority):
            (H_out W_out + k_h k_w C_in) / P of the producing conv plus sum over consumers of
            (C_out k_h k_w) / P, P = input pixels; 'uniform' = 1.
gamma-W     rescaling trick (paper): gamma, beta *= alpha and the consuming weights
            /= alpha leaves a BN -> ReLU -> conv path unchanged but changes how fast ISTA
            sparsifies; undone in `finish`. alpha = 1 (off) by default: the official code has no
            such step, and the paper's values are not verified here.
Decision    channels whose gamma is exactly 0 output the constant ReLU(beta); they are removed
            and that constant is folded into the next layer (decision='zeros', or finish(budget=
            None)). Under a Budget the lowest |gamma| are removed (zeros first) and only the
            exactly-zero ones are folded.
Folding     for a removed channel c: consumer output += sum_spatial(W_next[:, c]) * v_c, v_c the
            constant the consumer sees (measured by one forward pass, so any elementwise path
            BN -> ReLU/pool -> consumer works). Added to the running_mean (subtracted) of the BN
            that directly follows the consumer, as the official code does, else to the consumer's
            bias (created if missing). Exact for 1x1 convs and linear consumers and at interior
            positions of k x k convs; at the border the consumer's zero padding saw 0, not v_c,
            so border outputs differ (the official code makes the same choice; the error is
            measured in the tests and in chapter 2).
Residual    'internal' (the official ResNet-20 only has gamma on the first BN of each block).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph import ChannelGroup, Member, bn_outputs
from ..measure import layer_macs
from ..select import Budget, select_keep
from ..surgery import remove_channels
from .base import Context, HParam, Method, register

_RELUS = (nn.ReLU, nn.ReLU6)
_RELU_FNS = {F.relu, torch.relu, F.relu6}


# --- helpers shared by the BN-based methods ---------------------------------------------------
def decisive_bn(g: ChannelGroup) -> Member | None:
    """The BN gamma member of `g` nearest to its consumers (last in trace order), or None."""
    bns = g.bns()
    return bns[-1] if bns else None


def bn_channels(model: nn.Module, g: ChannelGroup) -> tuple[nn.Module, torch.Tensor]:
    """(BN module, positions of the group's channels in it) for the decisive BN of `g`."""
    m = decisive_bn(g)
    if m is None:
        raise ValueError(f"group {g.index} has no BatchNorm layer")
    return model.get_submodule(m.module), m.idx[:, 0]


def relu_after_bn(model: nn.Module) -> set[str]:
    """Names of BN modules whose output goes only to a ReLU (module or function); a BN subclass
    whose forward applies the ReLU itself (timm's BatchNormAct2d) counts (`graph.bn_outputs`)."""
    gm = fx.symbolic_trace(model)
    return {name for name, users in bn_outputs(gm, model)
            if users and all(_is_relu(gm, u) for u in users)}


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), _RELUS)
    if n.op == "call_function":
        return n.target in _RELU_FNS
    return n.op == "call_method" and n.target in ("relu", "relu_")


def bn_follower(model: nn.Module) -> dict[str, str]:
    """{module name: name of the BatchNorm module that is its only user}."""
    gm = fx.symbolic_trace(model)
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and len(node.users) == 1:
            (u,) = node.users
            if u.op == "call_module" and isinstance(
                    gm.get_submodule(u.target), nn.modules.batchnorm._BatchNorm):
                out[str(node.target)] = str(u.target)
    return out


def kept_positions(groups: list[ChannelGroup], keep: dict[int, Any], module: str, param: str,
                   dim: int, length: int) -> torch.Tensor:
    """Positions along `dim` of `module.param` that `remove_channels(..., keep)` keeps."""
    gone = torch.zeros(length, dtype=torch.bool)
    for i, kept in keep.items():
        mask = torch.ones(groups[i].size, dtype=torch.bool)
        mask[torch.as_tensor(kept, dtype=torch.long).cpu()] = False
        for m in groups[i].members:
            if (m.module, m.param, m.dim) == (module, param, dim):
                gone[m.idx[mask].reshape(-1)] = True
    return torch.nonzero(~gone).flatten()


@torch.no_grad()
def fold_constants(model: nn.Module, small: nn.Module, groups: list[ChannelGroup],
                   keep: dict[int, Any], channels: dict[int, torch.Tensor],
                   example_inputs: Any, tol: float = 1e-4) -> dict[str, float]:
    """Fold the constant value of removed channels into the consumers of the pruned `small`.

    `channels[i]` are channels of group i (removed in `small`) whose value at every consumer
    input is a constant in `model` (e.g. BN gamma = 0 followed by ReLU). The constant is read by
    one eval-mode forward pass of `model` on `example_inputs`. Returns {consumer: max spread of
    the measured "constant"} (0 when it really is constant; > tol triggers a warning).
    """
    wanted: dict[str, list[torch.Tensor]] = {}
    for i, ch in channels.items():
        if len(ch) == 0:
            continue
        for m in groups[i].by_role("in"):
            if m.param == "weight" and m.dim == 1:
                wanted.setdefault(m.module, []).append(m.idx[ch.cpu()].reshape(-1))
    if not wanted:
        return {}
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.__setitem__(n, args[0].detach())) for n in wanted]
    was = model.training
    try:
        model.eval()
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        model(*inputs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    follow = bn_follower(model)
    spread = {}
    for name, parts in wanted.items():
        mod = model.get_submodule(name)
        if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1:
            raise ValueError(f"cannot fold constants into grouped conv {name!r}")
        pos = torch.cat(parts).to(seen[name].device)
        vals = seen[name].index_select(1, pos).movedim(1, 0).reshape(len(pos), -1)
        v = vals.mean(1)
        spread[name] = float((vals.amax(1) - vals.amin(1)).abs().max())
        if spread[name] > tol * (1.0 + float(v.abs().max())):
            warnings.warn(f"input of {name!r} is not constant on removed channels (spread "
                          f"{spread[name]:.2e}); folding its mean")
        w = mod.weight.detach()
        wsum = w.reshape(w.shape[0], w.shape[1], -1).sum(2)              # (C_out, C_in)
        delta = wsum[:, pos] @ v.to(w.dtype)                             # (C_out,)
        out_pos = kept_positions(groups, keep, name, "weight", 0, w.shape[0]).to(delta.device)
        delta = delta[out_pos]
        target = small.get_submodule(name)
        bn_name = follow.get(name)
        bn = small.get_submodule(bn_name) if bn_name else None
        if bn is not None and bn.running_mean is not None:
            rm_pos = kept_positions(groups, keep, bn_name, "running_mean", 0,
                                    model.get_submodule(bn_name).running_mean.shape[0])
            assert len(rm_pos) == len(delta), f"{name} -> {bn_name}: channel counts differ"
            bn.running_mean.sub_(delta.to(bn.running_mean))
        elif target.bias is not None:
            target.bias.add_(delta.to(target.bias))
        else:
            target.bias = nn.Parameter(delta.clone().to(target.weight))
    return spread


def channel_cost(model: nn.Module, groups: list[ChannelGroup],
                 example_inputs: Any) -> dict[int, float]:
    """RSNLI's 'memory' cost lambda of one channel of each group (official `priority='memory'`).

    (output positions + weights per filter) of the producer plus (C_out x kernel) of every
    consumer, divided by the input pixels.
    """
    layers = layer_macs(model, example_inputs)
    x = example_inputs[0] if isinstance(example_inputs, tuple) else example_inputs
    pixels = float(x.shape[-2] * x.shape[-1]) if x.dim() == 4 else 1.0
    out = {}
    for g in groups:
        cost = 0.0
        for m in g.members:
            if m.param != "weight" or m.module not in layers or m.dim not in (0, 1):
                continue
            w = m.tensor(model)
            kernel = w[0, 0].numel() if w.dim() > 2 else 1
            if m.role == "out" and m.module in g.sources:
                cost += layers[m.module][1] / kernel + w[0].numel()
            elif m.role == "in":
                cost += w.shape[0] * kernel
        out[g.index] = cost / pixels
    return out


# --- the method ---------------------------------------------------------------------------------
@register("rsnli")
class RSNLI(Method):
    """ISTA on BN gamma (exact zeros), warm-up of rho, optional gamma-W rescaling, constant
    channels folded into the next layer (see the module docstring for equations and defaults)."""
    residual = "internal"
    HPARAMS = {
        "rho": HParam(float, lo=0.0, note="a negative rho inverts the shrinkage"),
        "rho_warmup": HParam(float, lo=0.0, note="rho of the warm-up steps"),
        "warmup": HParam(float, 0.0, 1.0, note="fraction of the phase's steps"),
        "cost": HParam(str, choices=("memory", "uniform"), note="'memory': official code"),
        "alpha": HParam(float, lo=0.0, lo_open=True, note="gamma-W rescaling factor, 1 = off"),
        "decision": HParam(str, choices=("budget", "zeros")),
        "fold": HParam(bool),
    }

    def __init__(self, rho: float = 5e-3, rho_warmup: float = 1e-3, warmup: float = 0.375,
                 cost: str = "memory", alpha: float = 1.0, decision: str = "budget",
                 fold: bool = True, **kw: Any) -> None:
        super().__init__(**kw)
        self.set_hparams(rho=rho, rho_warmup=rho_warmup, warmup=warmup, cost=cost, alpha=alpha,
                         decision=decision, fold=fold)
        self._pgroup: dict | None = None
        self._step, self._total = 0, 0
        self._scaled = False

    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        model = super().attach(model, groups)
        self.groups = [g for g in self.groups if decisive_bn(g) is not None]
        if not self.groups:
            raise ValueError("RSNLI found no prunable channel group with a BatchNorm layer")
        if self.cost == "memory":
            x = self.ctx.example_inputs if self.ctx is not None else None
            if x is None:
                raise ValueError("cost='memory' needs ctx.example_inputs; set method.ctx or "
                                 "use cost='uniform'")
            lam = channel_cost(model, self.groups, x)
        else:
            lam = {g.index: 1.0 for g in self.groups}
        weights: dict[str, torch.Tensor] = {}
        for g in self.groups:
            bn, pos = bn_channels(model, g)
            name = decisive_bn(g).module
            w = weights.setdefault(name, torch.zeros_like(bn.weight.detach()))
            w[pos.to(w.device)] = lam[g.index]
        self._bn_names = list(weights)
        self._gammas = [model.get_submodule(n).weight for n in self._bn_names]
        self._lam = [weights[n] for n in self._bn_names]
        if self.alpha != 1.0:
            ok = relu_after_bn(model)
            bad = [n for n in self._bn_names if n not in ok]
            if bad:
                raise ValueError(f"gamma-W rescaling needs BN -> ReLU -> consumer; not so for "
                                 f"{', '.join(bad)}")
            self._rescale(model, self.alpha)
            self._scaled = True
        return model

    @torch.no_grad()
    def _rescale(self, model: nn.Module, a: float) -> None:
        """gamma, beta *= a on the decisive BNs, consuming input slices /= a."""
        for g in self.groups:
            bn, pos = bn_channels(model, g)
            pos = pos.to(bn.weight.device)
            bn.weight[pos] *= a
            bn.bias[pos] *= a
            for m in g.by_role("in"):
                t = m.tensor(model)
                idx = m.idx.reshape(-1).to(t.device)
                t.index_copy_(m.dim, idx, t.index_select(m.dim, idx) / a)

    def _attached(self, what: str) -> None:
        if not hasattr(self, "_gammas"):
            raise RuntimeError(f"{self.owner()}: {what}() was called before the method was "
                               "attached to a model: call attach(model, groups) first")

    def gammas(self) -> list[tuple[str, nn.Parameter]]:
        """(BN module name, its weight gamma) of every BatchNorm the prox step acts on: the
        decisive BN of each prunable group, in the order `after_step` visits them. The
        Parameters are the attached model's own (not copies), so they show every step."""
        self._attached("gammas")
        return list(zip(self._bn_names, self._gammas))

    def channel_weights(self) -> dict[str, torch.Tensor]:
        """{BN module name: per-channel weight lambda_l} of the prox step (the `cost` of the
        channel's group; 0 for channels of that BN no prunable group owns): one ISTA step at
        learning rate eta shrinks |gamma_c| by eta * current_rho() * lambda_l. Copies."""
        self._attached("channel_weights")
        return {n: w.detach().clone() for n, w in zip(self._bn_names, self._lam)}

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        ids = {id(p) for p in self._gammas}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        self._pgroup = {"params": list(self._gammas), "lr": lr, "weight_decay": 0.0,
                        "momentum": 0.0, "nesterov": False}
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay}, self._pgroup]

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        self._step = 0
        self._total = math.ceil(ctx.epochs * len(ctx.train_loader)) if ctx.epochs > 0 else 0
        return super().regularize(model, ctx)

    def current_rho(self) -> float:
        """rho_warmup during the first `warmup` fraction of the phase's steps, then rho."""
        if self._total and self._step < self.warmup * self._total:
            return self.rho_warmup
        return self.rho

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        if self._pgroup is None:
            raise RuntimeError("RSNLI.after_step needs the optimizer group made by "
                               "param_groups (train with prunelib.train.fit(hooks=method))")
        t = self._pgroup["lr"] * self.current_rho()
        self._step += 1
        if self._lam[0].device != self._gammas[0].device:
            self._lam = [w.to(p.device) for w, p in zip(self._lam, self._gammas)]
        # gamma <- sign(gamma) * max(|gamma| - t * lambda, 0), every BN in one foreach call each
        shrunk = torch._foreach_abs(self._gammas)
        torch._foreach_sub_(shrunk, self._lam, alpha=t)
        torch._foreach_clamp_min_(shrunk, 0.0)
        torch._foreach_mul_(shrunk, torch._foreach_sign(self._gammas))
        torch._foreach_copy_(self._gammas, shrunk)

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        out = {}
        for g in self.groups:
            bn, pos = bn_channels(model, g)
            out[g.index] = bn.weight.detach().abs()[pos.to(bn.weight.device)].cpu()
        return out

    def zero_channels(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """Channels of each group whose (decisive) gamma is exactly zero."""
        return {i: torch.nonzero(s == 0).flatten() for i, s in self.scores(model).items()}

    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        if self._scaled:
            self._rescale(model, 1.0 / self.alpha)
            self._scaled = False
        if budget is None or self.decision == "zeros":
            budget = Budget(threshold=0.0)
        scores = self.scores(model)
        ex = self.ctx.example_inputs if self.ctx is not None else None
        keep = select_keep(model, self.all_groups, scores, budget, example_inputs=ex,
                           min_keep=0.0 if budget.threshold == 0.0 else self.min_keep,
                           min_channels=self.min_channels)
        small = remove_channels(model, self.all_groups, keep)
        if self.fold:
            zeros = self.zero_channels(model)
            gone = {}
            for i, z in zeros.items():
                kept = torch.zeros(self.all_groups[i].size, dtype=torch.bool)
                kept[keep[i]] = True
                gone[i] = z[~kept[z]]
            if any(len(v) for v in gone.values()):
                if ex is None:
                    raise ValueError("folding needs example inputs: set method.ctx")
                self.fold_spread = fold_constants(model, small, self.all_groups, keep, gone, ex)
        return small
