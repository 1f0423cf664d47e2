"""What the papers (or named re-implementations) report: accuracies prunelib did NOT measure.

Transcribed as data from the method dossier (reference/methods.md: its summary table, its
per-method "Results" bullets and its reconstructed comparison), keeping only numbers whose
source is verified there: `[code]` (official repository), `[paper]` / `[paper: X]` (the paper,
or paper X's re-implementation), `[readme]` (official README), `[abs]` (abstract), `[3rd]`
(a named third-party benchmark) or `[issue]` (a named GitHub issue). Numbers the dossier tags
`[mem]` (recalled, unverified) are left out, and so are results without an absolute pruned
accuracy or a FLOPs reduction (OICSR's "+0.22 points", GBN's ImageNet abstract). CIFAR-10 and
ImageNet only; ResNet-56 on CIFAR-10 first (the closest to the book's ResNet-20).

Fractions, not percents: `flops_reduction` = 1 - pruned FLOPs / dense FLOPs in the source's own
FLOPs convention (a speed-up s is 1 - 1/s); `params_reduction` likewise, None when the source
gives none. `baseline` is the source's own unpruned accuracy (None when not verified).

    from prunelib.reported import REPORTED
    [r for r in REPORTED if r.method == "pr"]
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Reported", "REPORTED", "VERIFIED_TAGS"]

VERIFIED_TAGS = ("code", "paper", "readme", "abs", "3rd", "issue")
"""Source tags of the dossier that count as verified ('paper: PR' is a 'paper' tag)."""


@dataclass(frozen=True)
class Reported:
    """One reported result: top-1 accuracy (%) before and after pruning, reductions as
    fractions of the dense model, the dossier's source tag (e.g. '[paper: PR]') and a note."""
    method: str                      # prunelib's registered name ('ns', 'pr', ...)
    model: str
    dataset: str                     # 'CIFAR-10' or 'ImageNet'
    baseline: float | None           # the source's unpruned accuracy, %
    pruned: float                    # accuracy after pruning (and fine-tuning), %
    flops_reduction: float           # 1 - pruned / dense FLOPs, in (0, 1)
    params_reduction: float | None   # 1 - pruned / dense params, or None
    source: str                      # dossier tag, e.g. '[readme]'
    note: str = ""


_C10, _IN = "CIFAR-10", "ImageNet"

REPORTED: tuple[Reported, ...] = (
    # -- ResNet-56 on CIFAR-10 ------------------------------------------------------------------
    Reported("ns", "ResNet-56", _C10, 93.80, 93.27, 0.48, None, "[paper: PR]",
             "NS as re-run in the PR paper"),
    Reported("ns", "ResNet-56", _C10, 93.80, 91.20, 0.68, None, "[paper: PR]",
             "NS as re-run in the PR paper, stronger pruning"),
    Reported("gbn", "ResNet-56", _C10, None, 93.15, 0.70, None, "[readme]",
             "official README; its baseline not verified"),
    Reported("pr", "ResNet-56", _C10, 93.80, 93.83, 0.47, None, "[paper]",
             "paper, Table 1"),
    Reported("resrep", "ResNet-56", _C10, 93.71, 93.71, 0.529, None, "[readme]",
             "official README; Torch-Pruning lists it at 2.12x"),
    Reported("greg", "ResNet-56", _C10, 93.36, 93.18, 1 - 1 / 2.55, None, "[3rd]",
             "GReg-1 at a 2.55x speed-up, Torch-Pruning's table and issue #2"),
    Reported("greg", "ResNet-56", _C10, 93.36, 93.36, 1 - 1 / 2.55, None, "[3rd]",
             "GReg-2 at a 2.55x speed-up, Torch-Pruning's table and issue #2"),
    # -- other CIFAR-10 models ------------------------------------------------------------------
    Reported("pr", "VGG-16", _C10, 93.88, 93.92, 0.54, None, "[paper]", "paper, Table 1"),
    Reported("gbn", "VGG-16", _C10, None, 92.07, 0.90, 0.98, "[readme]",
             "official README; its baseline not verified"),
    Reported("oto", "VGG-16-BN", _C10, None, 93.3, 1 - 0.268, 1 - 0.055, "[readme]",
             "v1 README: 26.8% of the FLOPs, 5.5% of the params kept"),
    Reported("oto", "ResNet-50", _C10, None, 94.4, 1 - 0.128, 1 - 0.088, "[readme]",
             "v1 README: 12.8% of the FLOPs, 8.8% of the params kept"),
    # -- ResNet-50 on ImageNet -------------------------------------------------------------------
    Reported("ns", "ResNet-50", _IN, 76.15, 74.88, 0.53, None, "[paper: PR]",
             "NS as re-run in the PR paper"),
    Reported("sss", "ResNet-50", _IN, 76.12, 71.82, 0.43, None, "[paper: PR]",
             "block pruning (a 26-layer result), PR paper's Table 2"),
    Reported("pr", "ResNet-50", _IN, 76.15, 75.63, 0.54, None, "[paper]", "paper, Table 2"),
    Reported("pr", "MobileNetV2", _IN, 72.0, 71.8, 0.28, None, "[paper]", "paper, Table 2"),
    Reported("eagleeye", "ResNet-50", _IN, 77.2, 76.4, 0.50, 1 - 14.37 / 25.5, "[readme]",
             "2G-FLOPs model (about half the FLOPs); own 77.2 baseline (issue #40)"),
    Reported("resrep", "ResNet-50", _IN, 76.15, 76.15, 0.545, None, "[code]",
             "released training log (76.152); the abstract says 45% of the FLOPs kept"),
    Reported("oto", "ResNet-50", _IN, None, 74.7, 1 - 0.345, 1 - 0.355, "[readme]",
             "v1 README: 34.5% of the FLOPs, 35.5% of the params kept"),
    Reported("greg", "ResNet-50", _IN, 76.13, 75.16, 1 - 1 / 2.31, None, "[readme]",
             "GReg-1 at 2.31x, README's results figure"),
    Reported("greg", "ResNet-50", _IN, 76.13, 75.36, 1 - 1 / 2.31, None, "[readme]",
             "GReg-2 at 2.31x, README's results figure"),
    Reported("greg", "ResNet-50", _IN, 76.13, 76.27, 1 - 1 / 1.49, None, "[readme]",
             "GReg-1 at 1.49x, README's results figure"),
)
"""Every verified reported result, ResNet-56 / CIFAR-10 first."""
