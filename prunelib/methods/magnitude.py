"""Magnitude baseline: L1 norm of each filter, no regularization.

Li, Kadav, Durdanovic, Samet, Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017.
Score of channel k = sum over the group's producing layers of ||W_k||_1 (the conv/linear rows
that create the channel). Every chapter compares its regularizers against this: a regularizer
earns its name when the removal after its sparse phase loses less than this one-shot rule.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Context, Method, register


@register("l1")
class Magnitude(Method):
    """L1-norm filter pruning: no sparse phase, rank filters by sum |W|, remove, fine-tune."""
    residual = "internal"

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        return model                       # one-shot: nothing to train before removal

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        out = {}
        for g in self.groups:
            rows = g.rows(model, roles=("out",), params=("weight",))
            src = [r for r, m in zip(rows, [m for m in g.by_role("out") if m.param == "weight"])
                   if m.module in g.sources]
            out[g.index] = torch.stack([r.detach().abs().sum(1) for r in src]).sum(0)
        return out
