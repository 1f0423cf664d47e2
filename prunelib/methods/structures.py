"""Factors on structures (channels or residual branches), shared by SSS, GDP and DMC.

A method with extra learnable parameters keeps one flat vector theta (n,) and multiplies the
output of every structure s by a factor f_s = fn(theta)_s (SSS: fn = identity, the scale
lambda; GDP: the smoothed-L0 gate; DMC: the 0/1 step with a straight-through gradient):

  'channels'  one factor per channel of every scaled channel group: the outputs of the group's
              BatchNorm layers are multiplied, y_c <- f_c * BN(x)_c (all BNs of a coupled group
              by the same factor, frozen channels by 1);
  'blocks'    one factor per residual branch (`prunelib.surgery.residual_branches`): the
              output of the branch's end module is multiplied, y = f_b * F(x) + s(x).

Nothing is added to the model's modules or parameters: a forward pre-hook on the model computes
fn(theta) once per forward, and forward hooks on the scaled modules multiply their outputs
(index tensors built once, in `__init__`). `finish` works on a copy: the hooks are taken off the
copy, the factors are folded into the producers (f * (W x + b) = (f W) x + f b for a conv,
linear or affine BN: exact), and the structures with factor 0, whose outputs are then exactly
0, are removed by prunelib's surgery (`remove_channels`, `remove_branches`).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ..graph import ChannelGroup
from ..measure import layer_macs
from ..select import Budget, MacModel
from ..surgery import Branch, remove_branches, remove_channels, residual_branches

STRUCTURES = ("auto", "blocks", "channels")


def foldable(mod: nn.Module) -> bool:
    """A module whose output is linear in (weight, bias) jointly: a factor folds into both."""
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return mod.affine
    return isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) and not getattr(
        mod, "transposed", False)


@torch.no_grad()
def fold_(mod: nn.Module, f: torch.Tensor) -> None:
    """Multiply the output of `mod` by `f` (a scalar or one factor per output channel) by
    scaling its weight rows and bias in place."""
    for name in ("weight", "bias"):
        t = getattr(mod, name, None)
        if t is not None:
            t.mul_(f.to(t) if f.dim() == 0 else f.to(t).view(-1, *[1] * (t.dim() - 1)))


def mac_model(model: nn.Module, groups: list[ChannelGroup], example_inputs: torch.Tensor,
              device: torch.device) -> MacModel:
    """`select.MacModel` of `model` with its tensors on `device` (for a per-step MACs term)."""
    return mac_to(MacModel(model, groups, example_inputs), device)


def _plain_bn(mod: nn.Module) -> bool:
    """A BatchNorm whose forward is torch's own, with affine parameters (not timm's
    BatchNormAct2d, whose forward also applies its activation)."""
    return (isinstance(mod, nn.modules.batchnorm._BatchNorm)
            and type(mod).forward is nn.modules.batchnorm._BatchNorm.forward
            and mod.weight is not None and mod.bias is not None)


def channel_gates(method, model: nn.Module, init: float, term: str
                  ) -> tuple["Structures", MacModel, float, nn.Parameter]:
    """The set-up every channel-gate method shares (DMC, GDP, BAR): per-channel factors on
    `method.groups`, the MACs model of `model`, the MACs target (the context's budget, else
    `method.macs`) and the factor vector (n,) filled with `init`, on the model's device and in
    its float dtype. `term` names what counts MACs in the error without example inputs."""
    ex = method.ctx.example_inputs if method.ctx is not None else None
    if ex is None:
        raise ValueError(f"{method.owner()}: the {term} counts MACs: set method.ctx = "
                         "methods.Context(example_inputs) before attach")
    st = Structures(model, method.groups, "channels", ex, method.owner())
    ref = next(p for p in model.parameters() if p.is_floating_point())
    mac = mac_model(model, method.all_groups, ex, ref.device)
    budget = method.ctx.extra.get("budget")
    target = budget.macs if getattr(budget, "macs", None) is not None else method.macs
    theta = nn.Parameter(torch.full((st.n,), init, device=ref.device, dtype=ref.dtype))
    return st, mac, target, theta


def finish_gates(method, model: nn.Module, g: torch.Tensor, budget: Budget | None
                 ) -> nn.Module:
    """What DMC, GDP and BAR do at `finish`: fold the channel factors `g` (n,) into a plain copy
    of `model`, then remove the channels at 0 and, with a budget, the lowest-scored ones until
    it holds (`method.select` on `method.scores`); a plain, smaller model."""
    small = method.st.plain(model, g)
    keep = method.select(small, budget, method.scores(model)) if budget is not None else None
    keep = method.st.zero_keep(g, keep, method.min_channels)
    return method.st.remove_zero_channels(small, method.all_groups, keep)


def mac_to(mac: MacModel, device: torch.device) -> MacModel:
    """`mac` with its (float64) tensors moved to `device`, in place."""
    mac.a, mac.d, mac.inc = mac.a.to(device), mac.d.to(device), mac.inc.to(device)
    return mac


def follow_model(model: nn.Module, move: Callable[[torch.Tensor], None]) -> int:
    """Register a forward pre-hook that calls move(ref) when the model's first floating-point
    parameter `ref` has changed device or dtype since the last forward (the model was moved
    after attach, e.g. `.cuda()`, `.double()`); one attribute comparison per forward, no
    device sync. Returns the hook's id. Register it before the hooks that use the state."""
    ref = next(p for p in model.parameters() if p.is_floating_point())
    seen = [ref.device, ref.dtype]

    def pre(_mod: nn.Module, _args: tuple) -> None:
        if ref.device != seen[0] or ref.dtype != seen[1]:
            seen[:] = [ref.device, ref.dtype]
            move(ref)
    return model.register_forward_pre_hook(pre).id


def strip_hooks(model: nn.Module, handles: list[tuple[str, int]]) -> None:
    """Remove the forward (pre-)hooks `handles` ((module name, hook id) pairs, '' the model
    itself) from `model`: the model they were registered on, or a deep copy of it (whose hook
    dicts hold the same ids)."""
    for name, hid in handles:
        mod = model.get_submodule(name)
        mod._forward_pre_hooks.pop(hid, None)
        mod._forward_hooks.pop(hid, None)
        mod._forward_hooks_always_called.pop(hid, None)


class Structures:
    """The structures a method scales, the hooks that scale them, folding and removal.

    model, groups:   the model and the groups the method may prune (residual policy applied);
    structure:       'blocks', 'channels' or 'auto' (blocks when the model has residual
                     branches, else channels);
    example_inputs:  a batch (needed to find residual branches and for MACs).
    After construction: `kind`, `n` (number of factors), `names` (a branch end or
    (group index, channel) per factor), `slices` ({group index: slice of theta}, channels).
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], structure: str,
                 example_inputs: torch.Tensor | None, owner: str) -> None:
        self.example_inputs = example_inputs
        branches: list[Branch] = []
        if structure in ("auto", "blocks"):
            if example_inputs is None:
                raise ValueError(f"{owner}: structure={structure!r} needs example inputs to "
                                 "find the residual branches: set method.ctx = "
                                 "methods.Context(example_inputs) before attach")
            branches = residual_branches(model, example_inputs)
            if structure == "blocks" and not branches:
                raise ValueError(f"{owner}: structure='blocks' but the model has no removable "
                                 "residual branch; use structure='channels'")
        self.kind = "blocks" if branches else "channels"
        self.branches = branches
        self.slices: dict[int, slice] = {}
        self._bn_index: dict[str, torch.Tensor] = {}   # BN module -> (C,) index into theta ext.
        self.group_of = torch.zeros(0, dtype=torch.long)   # (n,) group of each channel factor
        if self.kind == "blocks":
            bad = [b.end for b in branches if not foldable(model.get_submodule(b.end))]
            if bad:
                raise ValueError(f"{owner}: the branches ending at {bad[:4]} end in a module a "
                                 "factor cannot be folded into (conv, linear, affine BN)")
            self.names: list = [b.end for b in branches]
            self.n = len(branches)
            return
        n, names, group_of = 0, [], []
        for g in groups:
            bns = g.bns()
            if not bns:
                continue
            self.slices[g.index] = slice(n, n + g.size)
            group_of.append(torch.full((g.size,), g.index, dtype=torch.long))
            for m in bns:
                t = m.tensor(model)
                idx = self._bn_index.setdefault(m.module, torch.full(
                    (t.shape[0],), -1, dtype=torch.long))
                idx[m.idx[:, 0]] = torch.arange(n, n + g.size)
            names += [(g.index, k) for k in range(g.size)]
            n += g.size
        for idx in self._bn_index.values():           # frozen / unscaled channels: factor 1
            idx[idx < 0] = n
        self.names, self.n = names, n
        self.group_of = (torch.cat(group_of) if group_of                      # (n,) group index
                         else torch.zeros(0, dtype=torch.long))

    def soft_macs(self, mac: MacModel, f: torch.Tensor) -> torch.Tensor:
        """MACs per sample when channel c of every scaled group counts f_c times (channels):
        the bilinear cost sum_layers a * d_out(f) * d_in(f) of `select.MacModel`, with
        d = dense width - sum over the layer's channels of (1 - f_c). Exact for 0/1 factors;
        differentiable in f. `mac` must be built on the model and all its groups."""
        removed = torch.zeros(mac.inc.shape[0], dtype=torch.float64, device=f.device)
        removed = removed.index_add(0, self.group_of, (1 - f).to(torch.float64))    # (groups,)
        return mac.macs(removed)

    # -- hooks ---------------------------------------------------------------------------------
    def install(self, model: nn.Module, theta: torch.Tensor,
                fn: Callable[[torch.Tensor], torch.Tensor],
                on_move: Callable[[torch.Tensor], None] | None = None) -> None:
        """Scale the structures of `model` by fn(theta) in every forward from now on.

        theta, the index tensors and (through `on_move(ref)`) the method's own state follow
        the model when it is moved to another device or dtype after attach (`follow_model`).
        """
        self._handles: list[tuple[str, int]] = []
        self._idx = {name: idx.to(theta.device) for name, idx in self._bn_index.items()}
        self.group_of = self.group_of.to(theta.device)
        state: dict[str, torch.Tensor] = {}
        channels = self.kind == "channels"

        def moved(ref: torch.Tensor) -> None:
            theta.data = theta.data.to(ref.device, ref.dtype)
            self._idx = {k: v.to(ref.device) for k, v in self._idx.items()}
            self.group_of = self.group_of.to(ref.device)
            if on_move is not None:
                on_move(ref)
        self._handles.append(("", follow_model(model, moved)))

        def pre(_mod: nn.Module, _args: tuple) -> None:
            f = fn(theta)                                                    # (n,)
            state["f"] = torch.cat([f, f.new_ones(1)]) if channels else f    # (n + 1,)
        h = model.register_forward_pre_hook(pre)
        self._handles.append(("", h.id))
        if channels:
            for name in self._bn_index:
                self._scale(model, name, lambda name=name: state["f"].index_select(
                    0, self._idx[name]))                                       # (C,)
        else:
            for i, b in enumerate(self.branches):
                self._scale(model, b.end, lambda i=i: state["f"][i])        # scalar

    def _scale(self, model: nn.Module, name: str, factor: Callable[[], torch.Tensor]) -> None:
        """Multiply the output of module `name` by factor() (per channel (C,), or a scalar) in
        every forward. A plain affine BatchNorm gets it folded into its affine parameters for
        the call, BN(x; f gamma, f beta) = f BN(x; gamma, beta) exactly (and with the same
        gradients): C multiplications instead of a pass over the activation. Any other module
        (conv, linear, a BN subclass with its own forward) has its output multiplied."""
        mod = model.get_submodule(name)
        if _plain_bn(mod):
            saved: list[tuple[torch.Tensor, torch.Tensor]] = []

            def on(m: nn.Module, _args: tuple) -> None:
                f, p = factor(), m._parameters
                saved.append((p["weight"], p["bias"]))
                p["weight"], p["bias"] = p["weight"] * f, p["bias"] * f

            def off(m: nn.Module, _args: tuple, _out: torch.Tensor) -> None:
                if saved:
                    m._parameters["weight"], m._parameters["bias"] = saved.pop()
            self._handles.append((name, mod.register_forward_pre_hook(on).id))
            self._handles.append((name, mod.register_forward_hook(off, always_call=True).id))
            return

        def scale(_mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            f = factor()
            return out * (f.view(1, -1, *[1] * (out.dim() - 2)) if f.dim() else f)
        self._handles.append((name, mod.register_forward_hook(scale).id))

    def strip(self, model: nn.Module) -> None:
        """Take this object's hooks off `model` (the attached model or a deep copy of it)."""
        strip_hooks(model, self._handles)

    # -- folding and removal -------------------------------------------------------------------
    def plain(self, model: nn.Module, f: torch.Tensor) -> nn.Module:
        """A copy of `model` without hooks, the factors `f` (n,) folded into the producers."""
        small = copy.deepcopy(model)
        self.strip(small)
        f = f.detach()
        if self.kind == "blocks":
            for i, b in enumerate(self.branches):
                fold_(small.get_submodule(b.end), f[i])
        else:
            ext = torch.cat([f, f.new_ones(1)])
            for name, idx in self._bn_index.items():
                fold_(small.get_submodule(name), ext[idx.to(ext.device)])
        return small

    def branch_macs(self, model: nn.Module) -> torch.Tensor:
        """MACs per sample of every scaled branch's conv / linear layers (float64, (n,))."""
        layers = layer_macs(model, self.example_inputs)
        return torch.tensor([float(sum(layers[m][0] for m in b.modules if m in layers))
                             for b in self.branches], dtype=torch.float64)

    def remove_blocks(self, model: nn.Module, f: torch.Tensor, rank: torch.Tensor,
                      budget: Budget | None) -> tuple[nn.Module, bool]:
        """Remove the branches with f == 0, then (budget) the lowest-`rank` ones: macs -
        until the MACs are <= budget.macs * MACs of `model`; percent - floor(p * n) of them in
        all; threshold - those with rank <= t. Returns (model, target reached)."""
        f, rank = f.detach().cpu(), rank.detach().cpu().double()
        gone = f == 0
        reached = True
        if budget is not None and self.n:
            order = torch.argsort(rank, stable=True)
            if budget.macs is not None:
                macs = self.branch_macs(model)
                total = float(sum(v[0] for v in layer_macs(model, self.example_inputs).values()))
                left = total - float(macs[gone].sum())
                for i in order.tolist():
                    if left <= budget.macs * total:
                        break
                    if not gone[i]:
                        gone[i] = True
                        left -= float(macs[i])
                reached = left <= budget.macs * total + 0.5
            elif budget.percent is not None:
                gone[order[:int(budget.percent * self.n)]] = True
            else:
                gone |= rank <= budget.threshold
        ends = [b.end for b, g in zip(self.branches, gone.tolist()) if g]
        return (remove_branches(model, ends) if ends else model), reached

    def zero_keep(self, f: torch.Tensor, keep: dict[int, torch.Tensor] | None,
                  min_channels: int) -> dict[int, torch.Tensor]:
        """Keep-indices per scaled group: `keep` (all channels when None) without the channels
        whose factor is 0; a group keeps at least `min_channels` (its largest factors)."""
        f = f.detach().cpu()
        out = {}
        for gi, sl in self.slices.items():
            fg = f[sl]
            k = torch.ones(fg.numel(), dtype=torch.bool)
            if keep is not None and gi in keep:
                k[:] = False
                k[keep[gi].long()] = True
            k &= fg != 0
            if int(k.sum()) < min(min_channels, fg.numel()):
                k[torch.argsort(fg.abs(), descending=True, stable=True)[:min_channels]] = True
            out[gi] = torch.nonzero(k).flatten()
        return out

    def remove_zero_channels(self, model: nn.Module, groups: list[ChannelGroup],
                             keep: dict[int, torch.Tensor]) -> nn.Module:
        """`remove_channels` with `keep` (groups keeping every channel are left out)."""
        keep = {i: k for i, k in keep.items() if k.numel() < groups[i].size}
        return remove_channels(model, groups, keep) if keep else model
