"""Tables and figures from `pipeline.run` result dicts: the one helper every chapter uses.

    rows = {"NS": res_ns, "L1": res_l1}          # label -> result dict (or a list of results)
    print(table(rows))                           # markdown: every phase, MACs, params, latency
    phase_figure(rows); width_figure(rows)       # matplotlib figures

Accuracies are in percent of `result['test_images']` test images; `standard_error(p, n)` is the
binomial standard error sqrt(p (1 - p) / n) of such an accuracy, in points.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

__all__ = ["PHASES", "table", "phase_figure", "width_figure", "standard_error", "as_rows"]

PHASES = ("dense", "regularized", "removed", "recalibrated", "finetuned")
_SHORT = {"dense": "dense", "regularized": "sparse", "removed": "removed",
          "recalibrated": "recal.", "finetuned": "tuned"}


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error, in points, of an accuracy (percent) measured on n images."""
    if not (isinstance(n, int) and n > 0) or not 0 <= accuracy <= 100:
        raise ValueError(f"need n >= 1 images and 0 <= accuracy <= 100, got {n}, {accuracy}")
    p = accuracy / 100.0
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def as_rows(results: Mapping[str, dict] | Sequence[dict]) -> list[tuple[str, dict]]:
    """(label, result) pairs from a {label: result} mapping or a list (label = result['method'])."""
    if isinstance(results, Mapping):
        return list(results.items())
    return [(r.get("label", r["method"]), r) for r in results]


_NO_PARAMS = {"no rule: the method plans its own phase": "own plan",
              "the paper's values (full scale)": "paper's", "set by the caller": "caller's"}


def _strength(r: dict) -> str:
    """The strength cell: the values the rule (or the caller) set, else where they came from."""
    s = r.get("strength") or {}
    params = s.get("params") or {}
    if params:
        return ", ".join(f"{k} {v:.3g}" for k, v in params.items())
    return _NO_PARAMS.get(s.get("why", ""), s.get("why", ""))


def table(results: Mapping[str, dict] | Sequence[dict], latency: bool = True,
          strength: bool = True) -> str:
    """A markdown table: accuracy at every phase, MACs and params kept, latency, strength."""
    rows = as_rows(results)
    head = ["method", *(_SHORT[p] for p in PHASES), "MACs", "params"]
    if latency:
        head += ["ms@1", "ms@64"]
    if strength:
        head += ["strength"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows:
        acc = r["accuracy"]
        cells = [label] + [f"{acc[p]:.2f}" if acc.get(p) is not None else "" for p in PHASES]
        cells += [f"{r['pruned']['macs'] / 1e6:.2f}M ({r['pruned']['macs_ratio']:.2f})",
                  f"{r['pruned']['params'] / 1e3:.1f}k ({r['pruned']['params_ratio']:.2f})"]
        if latency:
            lat = r.get("latency") or {}
            cells += [f"{lat[k]['pruned_ms']:.2f}" if k in lat else ""
                      for k in ("batch1", "batch64")]
        if strength:
            cells.append(_strength(r))
        lines.append("| " + " | ".join(cells) + " |")
    n = next((r.get("test_images") for _, r in rows if r.get("test_images")), None)
    if n:
        p = rows[0][1]["accuracy"]["dense"]
        lines.append(f"\nAccuracies on {n} test images: standard error about "
                     f"{standard_error(p, n):.2f} points at {p:.1f}%.")
    return "\n".join(lines)


def phase_figure(results: Mapping[str, dict] | Sequence[dict], ax: Any = None,
                 title: str | None = None) -> Any:
    """Grouped bars: per method, the accuracy at every phase (dense line dashed); returns ax."""
    import matplotlib.pyplot as plt
    import numpy as np
    rows = as_rows(results)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 3.6))
    phases = PHASES[1:]
    width = 0.8 / len(phases)
    x = np.arange(len(rows))
    for k, ph in enumerate(phases):
        vals = [r["accuracy"].get(ph, float("nan")) for _, r in rows]
        ax.bar(x + (k - (len(phases) - 1) / 2) * width, vals, width, label=_SHORT[ph])
    ax.axhline(rows[0][1]["accuracy"]["dense"], color="k", ls="--", lw=1, label="dense")
    ax.set_xticks(x, [label for label, _ in rows], rotation=20, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=5, fontsize=8, loc="lower center")
    ax.set_title(title or "accuracy at every phase of the protocol")
    return ax


def width_figure(results: Mapping[str, dict] | Sequence[dict], ax: Any = None,
                 title: str | None = None) -> Any:
    """Output channels of every conv / linear layer, dense (grey) and per method; returns ax."""
    import matplotlib.pyplot as plt
    rows = as_rows(results)
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.4))
    dense = rows[0][1]["dense_widths"]
    names = list(dense)
    ax.bar(range(len(names)), [dense[n] for n in names], color="0.85", label="dense")
    for label, r in rows:
        w = r["widths"]
        ax.plot(range(len(names)), [w.get(n, 0) for n in names], marker=".", lw=1, label=label)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("output channels")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(title or "layer widths after removal")
    return ax
