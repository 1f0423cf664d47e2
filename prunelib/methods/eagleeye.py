"""EagleEye: random layer-wise pruning strategies scored after adaptive BatchNorm.

Li, Wu, Su, Wang, Lin, "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network
Pruning", ECCV 2020 (arXiv:2007.02491); official code anonymous47823493/EagleEye (search.py).

Not a regularizer: the survey files it under BN-based methods for its adaptive BN.
Strategy    per prunable layer (group) a prune ratio r_l = min_rate + U(0, 1) * max_rate (the
            official `get_pruning_strategy`: the upper bound is min_rate + max_rate); inside a
            layer the filters with the smallest L1 norm go (distiller's
            L1RankedStructureParameterPruner), int(r_l * size) of them. A strategy is kept only
            if its MACs ratio is within target +- window (official 0.005), predicted exactly from
            the factored layer costs (no model is built to reject a strategy).
Adaptive BN put the pruned net in train mode and run `abn_batches` training batches without
            gradients; running statistics are NOT reset (official: the BN momentum update alone).
            Official search.py: `if index > 100: break` after each forward, i.e. 102 batches of
            128 images (the README's snippet: max_iter = 100; the first version of search.py
            stopped at index > 50); default abn_batches = 100. A loader with fewer batches than
            `abn_batches` gets a warning (adaptive BN then runs one pass over it).
Score       top-1 accuracy on held-out training images (ctx.calib_loader; the official
            imagenet_train_val_split). The best of `n_candidates` strategies is removed and
            returned with its adapted BN statistics; the pipeline then fine-tunes it.
Rates       the official configs hand-set max_rate per target (0.4 / 0.7 / 0.8 for 25 / 50 / 75 %
            FLOPs reduction of ResNet-50; min_rate 0). Given max_rate: min_rate defaults to 0
            (official). max_rate=None: max_rate is chosen so that the mean rate min_rate +
            max_rate / 2 equals the uniform rate u that meets the target, with min_rate +
            max_rate <= 1 - min_keep; min_rate=None as well chooses both (min_rate = 0,
            max_rate = 2u, or, when 2u > 1 - min_keep, the interval of that width centred on u).
            A given min_rate >= u is an error (every strategy would remove too much).
Evaluation  candidates are evaluated in place: the channels of a strategy are zeroed on the
            working model (exact: zeroed producers give zero outputs, also in train-mode BN),
            adaptive BN runs, the score is taken, and the saved state is loaded back; no model
            copy per candidate.
Residual    'internal' by default (the trunk keeps its width). The official ResNet-50 config
            (compress_config/res50_imagenet.yaml) prunes the stem conv and conv1 / conv2 of every
            bottleneck, and also each stage's conv3s together with its downsample conv as one
            group with one ratio (distiller `group_dependency: Leader`): 37 ratios. That is
            prunelib's coupled residual group, so residual='coupled' reproduces the official
            grouping.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch import nn

from ..select import Budget, MacModel, min_keep_count
from ..surgery import remove_channels
from ..train import evaluate
from .base import Context, HParam, Method, register


@torch.no_grad()
def adaptive_bn(model: nn.Module, batches: Iterable, n: int,
                device: torch.device | str | None = None) -> nn.Module:
    """Recalibrate BN running statistics: `n` train-mode forward passes, no gradients, no reset.

    Only BN buffers (running_mean / running_var / num_batches_tracked) change.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was = model.training
    model.train()
    try:
        for i, (x, _) in enumerate(batches):
            if i >= n:
                break
            model(x.to(dev))
    finally:
        model.train(was)
    return model


@register("eagleeye")
class EagleEye(Method):
    """Random L1 layer-wise strategies within the MACs window, adaptive-BN accuracy on held-out
    training data, best one kept (module docstring: procedure and defaults)."""
    residual = "internal"
    HPARAMS = {
        "n_candidates": HParam(int, lo=1),
        "abn_batches": HParam(int, lo=0, note="train-mode batches of adaptive BN"),
        "window": HParam(float, 0.0, 1.0, lo_open=True, hi_open=True,
                         note="MACs-ratio tolerance around the target"),
        "max_rate": HParam(float, 0.0, 1.0, lo_open=True, hi_open=True, none=True,
                           note="width of the rate interval, min_rate + max_rate < 1; None: "
                           "derived from the target"),
        "min_rate": HParam(float, 0.0, 1.0, hi_open=True, none=True,
                           note="lower end of the rate interval; None: 0, or derived from the "
                           "target when max_rate is None"),
        "target_macs": HParam(float, 0.0, 1.0, lo_open=True, none=True,
                              note="fraction of dense MACs to keep when finish gets no Budget"),
        "seed": HParam(int, lo=0),
    }

    def __init__(self, n_candidates: int = 100, abn_batches: int = 100, window: float = 0.005,
                 max_rate: float | None = None, min_rate: float | None = None,
                 target_macs: float | None = None, seed: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        self.set_hparams(n_candidates=n_candidates, abn_batches=abn_batches, window=window,
                         max_rate=max_rate, min_rate=min_rate, target_macs=target_macs,
                         seed=seed)
        if max_rate is not None and (self.min_rate or 0.0) + self.max_rate >= 1:
            raise self.invalid("max_rate", max_rate, f"min_rate + max_rate must be < 1 "
                               f"(rates are min_rate + U(0, 1) * max_rate), min_rate = "
                               f"{self.min_rate or 0.0:g}")
        self.candidates: list[dict] = []

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        return model                                     # no sparse training: a search

    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """L1 norm of each filter (sum over the producing layers of the group)."""
        out = {}
        for g in self.groups:
            rows = [r for r, m in zip(g.rows(model, ("out",), ("weight",)),
                                      [m for m in g.by_role("out") if m.param == "weight"])
                    if m.module in g.sources]
            out[g.index] = torch.stack([r.detach().abs().sum(1) for r in rows]).sum(0).cpu()
        return out

    # -- strategies ------------------------------------------------------------------------------
    def _rates(self, macs: MacModel, target: float) -> tuple[float, float]:
        """(min_rate, max_rate): given, or centred on the uniform rate that meets `target`."""
        low = 0.0 if self.min_rate is None else self.min_rate
        if self.max_rate is not None:
            return low, self.max_rate
        n = len(self.groups)
        top = 1.0 - self.min_keep
        lo, hi = 0.0, top
        if float(macs.ratio(self._removed(torch.full((1, n), top))[0])) > target:
            raise ValueError(f"MACs target {target} cannot be met by pruning the internal "
                             f"groups at most {top:.0%} each")
        for _ in range(40):
            mid = (lo + hi) / 2
            r = float(macs.ratio(self._removed(torch.full((1, n), mid))[0]))
            lo, hi = (mid, hi) if r > target else (lo, mid)
        uni = hi
        if self.min_rate is not None:
            if self.min_rate >= uni:
                raise self.invalid("min_rate", self.min_rate, f"min_rate must be below the "
                                   f"uniform rate {uni:.3f} that meets the MACs target "
                                   f"{target:g}: every strategy would remove too much")
            return self.min_rate, min(2 * (uni - self.min_rate), top - self.min_rate)
        if 2 * uni <= top:
            return 0.0, 2 * uni
        return top - 2 * (top - uni), 2 * (top - uni)

    def _removed(self, rates: torch.Tensor) -> torch.Tensor:
        """(n, n_all_groups) channels removed per group for (n, n_groups) rates."""
        out = torch.zeros(rates.shape[0], len(self.all_groups))
        for j, g in enumerate(self.groups):
            cap = g.size - min_keep_count(g.size, self.min_keep, self.min_channels)
            out[:, g.index] = (rates[:, j] * g.size).floor().clamp(0, cap)
        return out

    def sample(self, macs: MacModel, target: float, n: int,
               gen: torch.Generator) -> list[dict]:
        """`n` random strategies whose MACs ratio lies in target +- window."""
        lo, hi = self._rates(macs, target)
        self.rate_range = (lo, lo + hi)
        found: list[dict] = []
        for _ in range(500):
            rates = lo + torch.rand(4096, len(self.groups), generator=gen) * hi
            removed = self._removed(rates)
            ratio = macs.ratio(removed)
            ok = torch.nonzero((ratio - target).abs() <= self.window).flatten()
            for k in ok[:n - len(found)].tolist():
                found.append({"rates": rates[k], "removed": removed[k].long(),
                              "macs_ratio": float(ratio[k])})
            if len(found) >= n:
                return found
        raise ValueError(f"found only {len(found)} of {n} strategies within {self.window} of "
                         f"the MACs target {target}; widen `window` or set max_rate/min_rate")

    def keep_for(self, cand: dict, model: nn.Module,
                 scores: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Keep-indices of a strategy: the largest-L1 filters of each group."""
        scores = self.scores(model) if scores is None else scores
        keep = {}
        for g in self.groups:
            n_rm = int(cand["removed"][g.index])
            keep[g.index] = torch.argsort(scores[g.index], descending=True)[
                :g.size - n_rm].sort().values
        return keep

    # -- the search ------------------------------------------------------------------------------
    def finish(self, model: nn.Module, budget: Budget | None = None) -> nn.Module:
        from tqdm.auto import tqdm
        if budget is not None and budget.macs is None:
            raise ValueError("EagleEye searches for a MACs target: use Budget(macs=...)")
        target = budget.macs if budget is not None else self.target_macs
        if target is None:
            raise ValueError("EagleEye needs a MACs target: Budget(macs=...) or target_macs=")
        ctx = self.ctx
        if ctx is None or ctx.train_loader is None:
            raise ValueError("EagleEye needs method.ctx with train_loader (adaptive BN) and "
                             "calib_loader (held-out scoring)")
        held = ctx.calib_loader
        if held is None:
            warnings.warn("no held-out calibration data (ctx.calib_loader): scoring strategies "
                          "on the training loader")
            held = ctx.train_loader
        if hasattr(ctx.train_loader, "__len__") and len(ctx.train_loader) < self.abn_batches:
            warnings.warn(f"{self.owner()}: abn_batches={self.abn_batches} but the training "
                          f"loader has {len(ctx.train_loader)} batches: adaptive BN runs one "
                          "pass over it")
        macs = MacModel(model, self.all_groups, ctx.example_inputs)
        gen = torch.Generator().manual_seed(self.seed)
        cands = self.sample(macs, target, self.n_candidates, gen)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        l1 = self.scores(model)
        was = model.training
        try:
            for c in tqdm(cands, desc="eagleeye candidates", disable=ctx.quiet, leave=False):
                keep = self.keep_for(c, model, l1)
                for g in self.groups:
                    gone = torch.ones(g.size, dtype=torch.bool)
                    gone[keep[g.index]] = False
                    g.zero_(torch.nonzero(gone).flatten(), model)
                adaptive_bn(model, ctx.train_loader, self.abn_batches, ctx.device)
                c["score"] = evaluate(model, held, device=ctx.device)
                model.load_state_dict(state)
        finally:
            model.load_state_dict(state)
            model.train(was)
        self.candidates = cands
        best = max(cands, key=lambda c: c["score"])
        self.best = best
        small = remove_channels(model, self.all_groups, self.keep_for(best, model, l1))
        return adaptive_bn(small, ctx.train_loader, self.abn_batches, ctx.device).eval()
