"""Budgets: turning per-channel scores into the channels to keep.

Three rules, all global over the groups a method scores (higher score = more important):
  Budget(macs=r)       remove the lowest-scoring channels, one at a time, until the model's
                       MACs are <= r * dense MACs (predicted exactly from the factored layer
                       costs of `measure.layer_macs`, no forward pass per step);
  Budget(percent=p)    remove the fraction p of all scored channels with the lowest scores
                       (NS's global percentile);
  Budget(threshold=t)  remove every channel whose score is <= t.
`MacModel` predicts the MACs of many removal counts at once (EagleEye's candidates, GBN's ticks).
A per-group guard always keeps max(min_channels, ceil(min_keep * size)) channels (the
highest-scoring ones), so no layer is emptied (NS's known crash).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .graph import ChannelGroup
from .measure import layer_macs


@dataclass
class Budget:
    """What to remove: exactly one of macs (fraction of dense MACs to keep), percent (fraction
    of scored channels to remove) or threshold (remove scores <= threshold)."""
    macs: float | None = None
    percent: float | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("macs", "percent", "threshold") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a Budget needs exactly one of macs/percent/threshold, got {given}")
        if self.macs is not None and not 0 < self.macs <= 1:
            raise ValueError(f"Budget(macs={self.macs}): the fraction of MACs to keep must be "
                             "in (0, 1]")
        if self.percent is not None and not 0 <= self.percent < 1:
            raise ValueError(f"Budget(percent={self.percent}) must be in [0, 1)")


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
    for i, s in scores.items():
        if s.numel() != groups[i].size:
            raise ValueError(f"scores[{i}] has {s.numel()} entries, group {i} has "
                             f"{groups[i].size} channels")
        if not torch.isfinite(s).all():
            raise ValueError(f"scores[{i}] contains NaN or inf: the regularization diverged?")
    order = {i: torch.argsort(s.detach().float().cpu(), descending=True)
             for i, s in scores.items()}
    floor = {i: min_keep_count(groups[i].size, min_keep, min_channels) for i in scores}
    if budget.macs is not None:
        if example_inputs is None:
            raise ValueError("Budget(macs=...) needs example_inputs to count MACs")
        n_keep = _by_macs(model, groups, scores, floor, budget.macs, example_inputs)
    else:
        flat = torch.cat([scores[i].detach().float().cpu().reshape(-1) for i in scores])
        if budget.threshold is not None:
            thr = budget.threshold
        else:
            k = int(budget.percent * flat.numel())
            thr = flat.sort().values[k - 1].item() if k > 0 else -math.inf
        n_keep = {i: max(floor[i], int((scores[i].detach().float().cpu() > thr).sum()))
                  for i in scores}
    return {i: order[i][:n_keep[i]].sort().values for i in scores}


def _by_macs(model: nn.Module, groups: list[ChannelGroup], scores: dict[int, torch.Tensor],
             floor: dict[int, int], target: float, example_inputs: Any) -> dict[int, int]:
    """Greedy global removal in ascending score order until MACs <= target * dense.

    Vectorized: the MACs after every prefix of the sorted candidates (each group's count capped
    at size - floor, i.e. a group at its floor is skipped) come from one `MacModel` call.
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
    macs = mac.macs(removed)                                        # (prefix,)
    goal = target * mac.dense
    ok = torch.nonzero(macs <= goal * (1 + 1e-9)).flatten()
    if len(ok) == 0:
        raise ValueError(
            f"MACs budget {target:.3f} cannot be met: with every prunable group at its minimum "
            f"the model keeps {float(macs[-1]) / mac.dense:.3f} of its MACs. Raise the target, "
            f"lower min_keep, or let the method prune coupled (residual) groups with "
            f"residual='coupled'.")
    k = int(ok[0])
    return {i: groups[i].size - int(removed[k, i]) for i in scores}
