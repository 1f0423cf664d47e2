"""Magnitude baselines: L1 norm of each filter, no regularization.

Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017.
Score of channel k = sum over the group's producing layers of ||W_k||_1 (the conv/linear rows
that create the channel). Every chapter compares its regularizers against this: a regularizer
earns its name when the removal after its sparse phase loses less than this one-shot rule.

'l1' (the paper's rule)  a per-layer pruning rate: within every prunable group the filters with
            the smallest L1 norm go, the same fraction r of each group (Li et al. prune a fixed
            fraction per layer, or per-layer rates chosen by a sensitivity analysis; prunelib
            uses one uniform rate). Group of size n loses floor(r n) channels (capped by the
            per-group minimum max(min_channels, ceil(min_keep n))):
              Budget(percent=p)   r = p;
              Budget(macs=m)      r = the smallest rate whose pruned model keeps <= m of the
                                  dense MACs, found exactly over the breakpoints r = k / n of
                                  every group (the MACs of all of them in one `MacModel` call);
              Budget(threshold=t) every filter with L1 <= t, per group (a threshold is not a
                                  rate: the same rule as 'l1_global').
            With Budget(..., multiple=k) every group keeps ceil((n - floor(r n)) / k) * k
            channels (at most n), and under macs=m the rate search runs on these rounded
            counts, so the target is still met (the rounded model may keep less than m).
            Residual 'internal' (the paper prunes only the first layer of each ResNet block).
'l1_global' one global ranking of the raw filter L1 norms across layers (`select_keep`). The
            norm grows with the fan-in (at He initialization ||W_k||_1 ~ sqrt(fan-in)), so
            this ranking removes the narrow early layers first. Measured on the book's trained
            ResNet-20 (book/baselines) under Budget(macs=0.5): 'l1_global' keeps 2, 2, 4 of 16
            filters in the blocks of stage 1 and 22, 64, 63 of 64 in stage 3; 'l1' keeps 8 of
            16, 15 of 32 and 30 of 64 in every block (rate 17/32, 0.485 of the MACs). Kept as
            the contrast to 'l1'.

Two scores (`importance`) and a normalization, for both rules (neither is in Li et al.):
'l1'        the default: s_k = sum over the producing layers of ||W_k||_1, as above.
'group_l2'  Torch-Pruning's `MagnitudeImportance(p=2)` idea (Fang et al., DepGraph, CVPR 2023):
            every parameter slice the channel owns counts, s_k = mean over the group's members
            of ||slice_k||_2^2 (the producing convs' filters, the BNs' gamma, the consuming
            convs' / linears' input columns; no biases, no BN beta).
normalize='mean' divides every group's scores by their mean, s_k / mean_j(s_j) (Torch-Pruning's
            default normalizer): a global ranking then compares each channel with the others
            of its own group, not raw norms that grow with the fan-in. A per-layer ranking is
            unchanged by it.

Both are one-shot: no sparse phase. `train_first=True` (not in the paper) spends the protocol's
sparse-phase epochs on plain SGD without a penalty before ranking: the control that gives the
magnitude baseline the extra epochs of training a regularizer gets, so a comparison can tell
what the penalty did from what the epochs did (chapter 5, Section 7).
"""
from __future__ import annotations

import torch
from torch import nn

from ..select import Budget, MacModel, min_keep_count, round_keep
from ..surgery import remove_channels
from .base import Context, HParam, Method, register


@register("l1_global")
class MagnitudeGlobal(Method):
    """L1-norm filter pruning ranked globally across layers (`select_keep`); no sparse phase."""
    residual = "internal"
    HPARAMS = {"train_first": HParam(bool, note="True: train the sparse phase's epochs without "
                                                "a penalty before ranking"),
               "importance": HParam(str, choices=("l1", "group_l2"),
                                    note="the channel score (module docstring)"),
               "normalize": HParam(str, choices=("none", "mean"),
                                   note="'mean': each group's scores over their mean")}

    def __init__(self, train_first: bool = False, importance: str = "l1",
                 normalize: str = "none", **kw) -> None:
        super().__init__(**kw)
        self.set_hparams(train_first=train_first, importance=importance, normalize=normalize)

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        """One-shot: nothing is trained before removal; with `train_first`, `ctx.epochs` of
        plain SGD (the base class's phase, no penalty term)."""
        return super().regularize(model, ctx) if self.train_first else model

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """{group index: (size,) score} by `importance`, then `normalize` (module docstring)."""
        out = {}
        for g in self.groups:
            if self.importance == "group_l2":       # mean over members of ||slice_k||_2^2
                rows = g.rows(model, roles=("out", "affine", "in"), params=("weight",))
                s = torch.stack([r.detach().pow(2).sum(1) for r in rows]).mean(0)
            else:                                   # sum over producers of ||W_k||_1
                rows = g.rows(model, roles=("out",), params=("weight",))
                src = [r for r, m in zip(rows, [m for m in g.by_role("out")
                                                if m.param == "weight"])
                       if m.module in g.sources]
                s = torch.stack([r.detach().abs().sum(1) for r in src]).sum(0)
            if self.normalize == "mean" and s.mean() > 0:
                s = s / s.mean()
            out[g.index] = s
        return out


@register("l1")
class Magnitude(MagnitudeGlobal):
    """Li et al.'s L1-norm filter pruning: the same fraction of every prunable group, its
    lowest-L1 filters; under Budget(macs=m) the common rate that meets the target. `rate` is
    the rate the last `finish` used."""
    rate: float | None = None

    def removed_counts(self, rates: torch.Tensor, multiple: int | None = None) -> torch.Tensor:
        """(len(rates), len(all_groups)) channels removed per group at each uniform rate:
        floor(rate * size) for the prunable groups, capped by the per-group minimum, then the
        kept count rounded up to a multiple of `multiple` (or the full size)."""
        out = torch.zeros(len(rates), len(self.all_groups), dtype=torch.float64)
        if self.groups:
            size = torch.tensor([float(g.size) for g in self.groups], dtype=torch.float64)
            cap = size - torch.tensor([float(min_keep_count(g.size, self.min_keep,
                                                            self.min_channels))
                                       for g in self.groups], dtype=torch.float64)
            n = torch.minimum(torch.floor(rates.to(torch.float64)[:, None] * size + 1e-9), cap)
            out[:, [g.index for g in self.groups]] = size - round_keep(size - n, size, multiple)
        return out

    def rate_for_macs(self, model: nn.Module, target: float, multiple: int | None = None
                      ) -> float:
        """The smallest uniform rate whose pruned model (kept counts rounded by `multiple`)
        keeps <= `target` of the dense MACs (exact: the MACs only change at the rates
        k / size of some group)."""
        if self.ctx is None or self.ctx.example_inputs is None:
            raise ValueError(f"{self.owner()}: Budget(macs=...) needs example inputs to count "
                             "MACs: set method.ctx = Context(example_inputs=...)")
        macs = MacModel(model, self.all_groups, self.ctx.example_inputs)
        rates = torch.tensor(sorted({k / g.size for g in self.groups for k in range(g.size + 1)}),
                             dtype=torch.float64)
        ratio = macs.ratio(self.removed_counts(rates, multiple))
        ok = torch.nonzero(ratio <= target * (1 + 1e-9)).flatten()
        if len(ok) == 0:
            raise ValueError(f"{self.owner()}: MACs budget {target:g} cannot be met by a "
                             f"uniform per-layer rate: with every prunable group at its "
                             f"minimum the model keeps {float(ratio[-1]):.3f} of its MACs"
                             f"{' (counts rounded to multiples)' if multiple else ''}. "
                             f"Raise the target, lower min_keep or multiple, or use "
                             f"residual='coupled'.")
        return float(rates[int(ok[0])])

    def finish(self, model: nn.Module, budget: Budget | None) -> nn.Module:
        """Remove the lowest-L1 filters of every group at one common rate (module docstring)."""
        if budget is None or budget.threshold is not None:
            return super().finish(model, budget)
        self.rate = (budget.percent if budget.percent is not None
                     else self.rate_for_macs(model, budget.macs, budget.multiple))
        gone = self.removed_counts(torch.tensor([self.rate]), budget.multiple)[0]
        keep = {i: torch.argsort(s.detach().cpu(), descending=True)[:s.numel() - int(gone[i])]
                .sort().values for i, s in self.scores(model).items()}
        return remove_channels(model, self.all_groups, keep)
