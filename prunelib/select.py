"""Budgets: turning per-channel scores into the channels to keep.

Three rules, all global over the groups a method scores (higher score = more important):
  Budget(macs=r)       remove the lowest-scoring channels, one at a time, until the model's
                       MACs are <= r * dense MACs (predicted exactly from the factored layer
                       costs of `measure.layer_macs`, no forward pass per step);
  Budget(percent=p)    remove exactly floor(p * n) of the n scored channels, the lowest-ranked
                       ones (NS's global percentile, by rank: tied scores do not change the
                       count);
  Budget(threshold=t)  remove every channel whose score is <= t.
Hardware-friendly counts: Budget(..., multiple=m) rounds the number of channels every pruned
group keeps up to a multiple of m, or to the group's full width when that is smaller
(`round_keep`). CPU convolution kernels work on blocks of output channels (16 fp32 lanes with
AVX-512 in oneDNN: 8 or 9 output channels cost what 16 do), so odd or small counts buy MACs
without buying time. Under macs=r the search itself works on the rounded counts and still
meets r (it removes more raw channels until the rounded model fits); under percent and
threshold the rounding keeps up to m - 1 more channels per group than the rule alone.
Ranking is by score, ties broken by group order then channel index (a stable sort), so the same
scores always give the same keep sets. `MacModel` predicts the MACs of many removal counts at once
(EagleEye's candidates, GBN's ticks). A per-group guard always keeps max(min_channels,
ceil(min_keep * size)) channels (the highest-ranked ones), so no layer is emptied (NS's known
crash): a channel the guard protects is skipped and the next-ranked one of another group goes
instead, so the percent and MACs budgets fall short only when every group is at its minimum.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .graph import ChannelGroup
from .measure import layer_macs

_MULTIPLE = "an integer >= 1 (kept channels per pruned group: a multiple of it, or all)"
_RANGES = {"macs": "(0, 1] (the fraction of dense MACs to keep)",
           "percent": "[0, 1) (the fraction of scored channels to remove)",
           "threshold": "any finite number (channels scoring <= it are removed)"}


@dataclass
class Budget:
    """What to remove: exactly one of macs (fraction of dense MACs to keep, in (0, 1]), percent
    (fraction of scored channels to remove, in [0, 1)) or threshold (remove scores <= threshold,
    finite). The value must be a real number (not bool / str): TypeError; NaN, inf or out of
    range: ValueError. It is stored as a float.

    multiple (optional, an integer >= 1; 1 or None: no rounding): every group the rule prunes
    keeps a multiple of `multiple` channels, or its full width (module docstring). Not an
    integer (bool, float, str): TypeError; < 1: ValueError."""
    macs: float | None = None
    percent: float | None = None
    threshold: float | None = None
    multiple: int | None = None

    def __post_init__(self) -> None:
        given = [k for k in _RANGES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a Budget needs exactly one of macs/percent/threshold, got "
                             f"{given or 'none'}")
        key = given[0]
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"Budget({key}={value!r}): {key} must be a real number in "
                            f"{_RANGES[key]}, not {type(value).__name__}")
        value = float(value)
        ok = math.isfinite(value) and (key == "threshold" or (
            0 < value <= 1 if key == "macs" else 0 <= value < 1))
        if not ok:
            raise ValueError(f"Budget({key}={value}): {key} must be in {_RANGES[key]}")
        setattr(self, key, value)
        m = self.multiple
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, numbers.Integral):
                raise TypeError(f"Budget(multiple={m!r}): multiple must be {_MULTIPLE}, not "
                                f"{type(m).__name__}")
            if m < 1:
                raise ValueError(f"Budget(multiple={m}): multiple must be {_MULTIPLE}")
            self.multiple = int(m)


def round_keep(keep: torch.Tensor, size: torch.Tensor, multiple: int | None) -> torch.Tensor:
    """Kept channel counts rounded up to a multiple of `multiple`, capped at the group `size`
    (elementwise, any float or integer tensors; None or 1: unchanged)."""
    if not multiple or multiple == 1:
        return keep
    return torch.minimum(torch.ceil(keep / multiple) * multiple, size.to(keep.dtype))


class MacModel:
    """MACs after removing n_g channels of every group g, vectorized over many strategies.

    Uses the factored per-layer cost a * d0 * d1 of `measure.layer_macs`: removing a channel
    of a group lowers d0 (output rows) or d1 (input slices) of every layer it touches.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], example_inputs: Any):
        layers = layer_macs(model, example_inputs)
        names = list(layers)
        col = {n: i for i, n in enumerate(names)}
        self.a = torch.tensor([float(layers[n][1]) for n in names], dtype=torch.float64)
        self.d = torch.tensor([[layers[n][2], layers[n][3]] for n in names],
                              dtype=torch.float64).reshape(-1)
        self.dense = float(sum(layers[n][0] for n in names))
        inc = torch.zeros(len(groups), len(names), 2, dtype=torch.float64)
        for g in groups:
            for m in g.members:
                if m.param == "weight" and m.module in col and m.dim in (0, 1):
                    inc[g.index, col[m.module], m.dim] += m.idx.shape[1]
        self.inc = inc.reshape(len(groups), -1)

    def macs(self, removed: torch.Tensor) -> torch.Tensor:
        """MACs for `removed` (..., n_groups) channels removed per group."""
        d = self.d - removed.to(torch.float64) @ self.inc
        d = d.reshape(*d.shape[:-1], -1, 2)
        return (self.a * d[..., 0] * d[..., 1]).sum(-1)

    def ratio(self, removed: torch.Tensor) -> torch.Tensor:
        return self.macs(removed) / self.dense


def min_keep_count(size: int, min_keep: float, min_channels: int) -> int:
    return min(size, max(min_channels, math.ceil(min_keep * size)))


def select_keep(model: nn.Module, groups: list[ChannelGroup], scores: dict[int, torch.Tensor],
                budget: Budget, example_inputs: Any = None, min_keep: float = 0.0,
                min_channels: int = 1) -> dict[int, torch.Tensor]:
    """Sorted keep-indices for every scored group (keys of `scores` index `groups`)."""
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a prunelib.select.Budget, not {type(budget).__name__}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, numbers.Real) or not (
            0 <= min_keep <= 1):
        raise ValueError(f"min_keep={min_keep!r}: the fraction of each group always kept must "
                         "be a number in [0, 1]")
    if (isinstance(min_channels, bool) or not isinstance(min_channels, numbers.Integral)
            or min_channels < 0):
        raise ValueError(f"min_channels={min_channels!r}: the channels each group always keeps "
                         "must be an integer >= 0")
    for i, s in scores.items():
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < len(groups):
            raise ValueError(f"scores has key {i!r}, but the groups are indexed 0.."
                             f"{len(groups) - 1}")
        if s.numel() != groups[i].size:
            raise ValueError(f"scores[{i}] has {s.numel()} entries, group {i} has "
                             f"{groups[i].size} channels")
        if not torch.isfinite(s).all():
            raise ValueError(f"scores[{i}] contains NaN or inf: the regularization diverged?")
    if not scores:
        return {}
    scores = {int(i): s for i, s in scores.items()}
    flat = {i: s.detach().float().cpu().reshape(-1) for i, s in scores.items()}
    floor = {i: min_keep_count(groups[i].size, min_keep, min_channels) for i in scores}
    # every scored channel in ascending rank (score, then group order, then channel index)
    values = torch.cat(list(flat.values()))
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in flat.items()])
    channel = torch.cat([torch.arange(s.numel()) for s in flat.values()])
    order = torch.argsort(values, stable=True)
    values, owner, channel = values[order], owner[order], channel[order]
    if budget.macs is not None:
        if example_inputs is None:
            raise ValueError("Budget(macs=...) needs example_inputs to count MACs")
        n_keep = _by_macs(model, groups, scores, floor, budget.macs, example_inputs,
                          budget.multiple)
        cap = {i: groups[i].size - n_keep[i] for i in scores}
    else:
        cap = {i: groups[i].size - floor[i] for i in scores}
    rank = torch.empty_like(owner)                  # rank of each channel within its group
    for i in scores:
        mine = owner == i
        rank[mine] = torch.arange(int(mine.sum()))
    gone = rank < torch.tensor([cap[int(i)] for i in owner.tolist()], dtype=torch.long)
    if budget.threshold is not None:
        gone &= values <= budget.threshold
    elif budget.percent is not None:
        k = math.floor(budget.percent * len(values) + 1e-9)
        gone &= torch.cumsum(gone.long(), 0) <= k
    if budget.multiple and budget.macs is None:      # keep rounded up: the lowest-ranked go
        for i in scores:
            size = torch.tensor(float(groups[i].size))
            mine = owner == i
            kept = round_keep(size - gone[mine].sum(), size, budget.multiple)
            gone[mine] = rank[mine] < size - kept
    return {i: torch.sort(channel[(owner == i) & ~gone]).values for i in scores}


def _by_macs(model: nn.Module, groups: list[ChannelGroup], scores: dict[int, torch.Tensor],
             floor: dict[int, int], target: float, example_inputs: Any,
             multiple: int | None = None) -> dict[int, int]:
    """Greedy global removal in ascending score order until MACs <= target * dense.

    Vectorized: the MACs after every prefix of the sorted candidates (each group's count capped
    at size - floor, i.e. a group at its floor is skipped; with `multiple`, each group's kept
    count rounded up by `round_keep`) come from one `MacModel` call. Rounding up never lowers
    a count, and the counts fall along the prefixes, so the first prefix that fits is the
    least removal.
    """
    mac = MacModel(model, groups, example_inputs)
    cand = torch.cat([torch.stack([s.detach().float().cpu().reshape(-1),
                                   torch.full((s.numel(),), float(i))], 1)
                      for i, s in scores.items()])
    owner = cand[torch.argsort(cand[:, 0], stable=True), 1].long()
    removed = torch.zeros(len(owner) + 1, len(groups), dtype=torch.float64)  # (prefix, group)
    removed[1:].scatter_(1, owner[:, None], 1.0)
    removed = removed.cumsum(0)
    cap = torch.tensor([float(groups[i].size - floor[i]) if i in scores else 0.0
                        for i in range(len(groups))], dtype=torch.float64)
    removed = torch.minimum(removed, cap)
    size = torch.tensor([float(g.size) for g in groups], dtype=torch.float64)
    removed = size - round_keep(size - removed, size, multiple)
    macs = mac.macs(removed)                                        # (prefix,)
    goal = target * mac.dense
    ok = torch.nonzero(macs <= goal * (1 + 1e-9)).flatten()
    if len(ok) == 0:
        raise ValueError(
            f"MACs budget {target:.3f} cannot be met: with every prunable group at its minimum "
            f"the model keeps {float(macs[-1]) / mac.dense:.3f} of its MACs"
            f"{f' (kept counts rounded up to multiples of {multiple})' if multiple else ''}. "
            f"Raise the target, lower min_keep or multiple, or let the method prune coupled "
            f"(residual) groups with residual='coupled'.")
    k = int(ok[0])
    return {i: groups[i].size - int(removed[k, i]) for i in scores}
