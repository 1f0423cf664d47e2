"""`prunelib report`: result JSONs -> a table of mean ± std and n per method and budget, figures.

    results = load_results(["results/"])          # folders (their *.json) or JSON files
    rows = aggregate(results)                     # one row per (model, scale, method, budget)
    print(table(rows))                            # markdown (or fmt='text')
    write_figures(rows, "report/")                # four PNGs, written atomically

Files are read as JSON only (nothing is unpickled) and checked (`read_result`): a file that is
not JSON, or JSON that is not a `pipeline.run` result, is a `ResultError` naming the file.

Per row, every metric is the mean, the sample standard deviation (n - 1 in the denominator;
none for n = 1) and the number of runs that have it: accuracy (%) dense, at the end of the
sparse phase, right after removal, after BN recalibration, after fine-tuning, and the drop
tuned - dense (per run, then averaged); MACs and params kept (fractions of dense); the measured
batch-64 latency speedup dense / pruned and the ideal one, dense MACs / pruned MACs; the run's
wall time (`seconds.total`, else the sum of its phases).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .results import PHASES, standard_error

__all__ = ["ResultError", "Stat", "read_result", "load_results", "aggregate", "table",
           "write_figures", "plot_accuracy_vs_macs", "plot_removed_vs_tuned",
           "plot_speedup", "plot_wall_time", "FIGURES"]


class ResultError(ValueError):
    """A file that is not a prunelib result JSON."""


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_result(obj: Any, where: str) -> dict:
    """`obj` if it has the fields of a `pipeline.run` result, else ResultError naming `where`."""
    if not isinstance(obj, dict):
        raise ResultError(f"{where}: not a prunelib result (a JSON {type(obj).__name__}, not an "
                          "object)")
    need = {"method": str, "accuracy": dict, "pruned": dict, "dense": dict, "target": dict,
            "seconds": dict}
    missing = [k for k, t in need.items() if not isinstance(obj.get(k), t)]
    missing += [f"accuracy.{p}" for p in PHASES
                if isinstance(obj.get("accuracy"), dict) and not _number(obj["accuracy"].get(p))]
    missing += [f"pruned.{k}" for k in ("macs", "params", "macs_ratio", "params_ratio")
                if isinstance(obj.get("pruned"), dict) and not _number(obj["pruned"].get(k))]
    if missing:
        raise ResultError(f"{where}: not a prunelib result (missing or not a number: "
                          f"{', '.join(missing)})")
    return obj


def read_result(path: str | Path) -> dict:
    """The result stored in the JSON file `path` (never unpickled), checked by `check_result`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ResultError(f"{path}: not JSON (binary, not UTF-8 text); a result file is the "
                          "JSON written by `prunelib run --out` or `prunelib sweep`") from None
    except OSError as e:
        raise ResultError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultError(f"{path}: not JSON ({e}); a result file is the JSON written by "
                          "`prunelib run --out` or `prunelib sweep`") from None
    return check_result(obj, str(path))


def load_results(paths: Iterable[str | Path]) -> list[dict]:
    """Every result in `paths`: a folder gives its ``*.json`` files (sorted, not recursive), a
    file itself. ResultError for a path that does not exist, a folder without JSON files, or a
    file that is not a result."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.glob("*.json") if f.is_file())
            if not files:
                raise ResultError(f"{p}: no *.json result files in this folder")
        elif p.is_file():
            files = [p]
        else:
            raise ResultError(f"{p}: no such file or folder")
        out += [read_result(f) for f in files]
    return out


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (None when n < 2) and number of values."""
    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat | None":
        """The Stat of the finite `values` (None when there is none)."""
        v = [float(x) for x in values if x is not None and math.isfinite(x)]
        if not v:
            return None
        return cls(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None, len(v))

    def cell(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.std is not None
                                            else "")


def _budget(r: dict) -> str:
    t = r["target"]
    if t.get("own_rule"):
        return "own"
    for k in ("macs", "percent", "threshold"):
        if t.get(k) is not None:
            return f"{k} {t[k]:g}"
    return "?"


def _seconds(r: dict) -> float:
    s = r["seconds"]
    return s["total"] if _number(s.get("total")) else sum(v for v in s.values() if _number(v))


def _speedup(r: dict) -> float | None:
    b = (r.get("latency") or {}).get("batch64") or {}
    return b.get("speedup") if _number(b.get("speedup")) else None


METRICS: dict[str, Callable[[dict], float | None]] = {
    "dense": lambda r: r["accuracy"]["dense"],
    "sparse": lambda r: r["accuracy"]["regularized"],
    "removed": lambda r: r["accuracy"]["removed"],
    "recal": lambda r: r["accuracy"]["recalibrated"],
    "tuned": lambda r: r["accuracy"]["finetuned"],
    "drop": lambda r: r["accuracy"]["finetuned"] - r["accuracy"]["dense"],
    "macs": lambda r: r["pruned"]["macs_ratio"],
    "params": lambda r: r["pruned"]["params_ratio"],
    "speedup64": _speedup,
    "ideal": lambda r: r["dense"]["macs"] / r["pruned"]["macs"] if r["pruned"]["macs"] else None,
    "seconds": _seconds,
    "regularize_s": lambda r: r["seconds"].get("regularize"),
    "finetune_s": lambda r: r["seconds"].get("finetune"),
}


def _order(key: tuple) -> tuple:
    """Rows by model, scale, budget (MACs kept, largest first; other budgets after), method."""
    model, scale, method, budget = key
    kind, _, value = budget.partition(" ")
    return (model, scale, kind != "macs", -float(value) if kind == "macs" else 0.0, budget,
            method)


def aggregate(results: Sequence[dict]) -> list[dict]:
    """One row per (model, scale, method, budget), ordered by model, scale, budget (MACs kept,
    largest first) and method name: the keys,
    `n` (runs), `seeds`, `test_images` and {metric: Stat or None} for every name in METRICS."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r.get("model", ""), r.get("scale", ""), r["method"], _budget(r))
        groups.setdefault(key, []).append(r)
    rows = []
    for (model, scale, method, budget), rs in sorted(groups.items(), key=lambda g: _order(g[0])):
        row: dict[str, Any] = {"model": model, "scale": scale, "method": method,
                               "budget": budget, "n": len(rs),
                               "seeds": sorted({r.get("seed") for r in rs}, key=str),
                               "test_images": rs[0].get("test_images")}
        row.update({k: Stat.of([f(r) for r in rs]) for k, f in METRICS.items()})
        rows.append(row)
    return rows


_COLUMNS = [("dense", "dense", 2), ("sparse", "sparse", 2), ("removed", "removed", 2),
            ("recal", "recal.", 2), ("tuned", "tuned", 2), ("drop", "tuned - dense", 2),
            ("macs", "MACs", 3), ("params", "params", 3), ("speedup64", "speedup@64", 2),
            ("ideal", "ideal", 2)]


def table(rows: Sequence[dict], fmt: str = "markdown") -> str:
    """The rows as a markdown table (fmt='markdown') or aligned plain text (fmt='text'); model
    and scale get a column only when they vary. Cells are mean ± std (± left out for n = 1)."""
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be 'markdown' or 'text', got {fmt!r}")
    keys = [k for k in ("model", "scale") if len({r[k] for r in rows}) > 1]
    head = [*keys, "method", "budget", "n", *(h for _, h, _ in _COLUMNS), "minutes"]
    body = []
    for r in rows:
        cells = [str(r[k]) for k in keys] + [r["method"], r["budget"], str(r["n"])]
        cells += [r[k].cell(d) if r[k] else "" for k, _, d in _COLUMNS]
        s = r["seconds"]
        cells.append(Stat(s.mean / 60, s.std / 60 if s.std is not None else None, s.n).cell(1)
                     if s else "")
        body.append(cells)
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c) + " |" for c in body]
    else:
        w = [max(len(x) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(x.ljust(n) for x, n in zip(line, w)).rstrip()
                 for line in (head, *body)]
    notes = ["", "Accuracies in %, mean ± sample std over the n runs (seeds); MACs and params "
             "as fractions of dense; speedup@64 = measured dense / pruned latency at batch 64, "
             "ideal = dense / pruned MACs."]
    n_img, dense = rows[0]["test_images"] if rows else None, rows[0]["dense"] if rows else None
    if isinstance(n_img, int) and n_img > 0 and dense is not None:
        notes.append(f"On {n_img} test images one accuracy has a binomial standard error of "
                     f"about {standard_error(dense.mean, n_img):.2f} points at "
                     f"{dense.mean:.1f}%.")
    return "\n".join(lines + notes)


# -- figures ------------------------------------------------------------------------------------
def _colors(rows: Sequence[dict]) -> dict[str, Any]:
    from matplotlib import colormaps
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = colormaps["tab20"]
    return {m: cmap(i % 20) for i, m in enumerate(methods)}


def _markers(rows: Sequence[dict]) -> dict[str, str]:
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    return {b: "osD^v<>ph*"[i % 10] for i, b in enumerate(budgets)}


def _err(s: Any) -> float:
    return s.std if s is not None and s.std is not None else 0.0


def plot_accuracy_vs_macs(rows: Sequence[dict], ax: Any) -> Any:
    """Fine-tuned accuracy (± std) against the fraction of dense MACs kept, one line per method;
    the dense accuracy dashed."""
    colors = _colors(rows)
    for method, c in colors.items():
        rs = sorted((r for r in rows if r["method"] == method and r["tuned"] and r["macs"]),
                    key=lambda r: r["macs"].mean)
        if rs:
            ax.errorbar([r["macs"].mean for r in rs], [r["tuned"].mean for r in rs],
                        yerr=[_err(r["tuned"]) for r in rs], color=c, marker="o", ms=4,
                        capsize=2, lw=1, label=method)
    dense = Stat.of([r["dense"].mean for r in rows if r["dense"]])
    if dense:
        ax.axhline(dense.mean, color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("MACs kept (fraction of dense)")
    ax.set_ylabel("accuracy after fine-tuning (%)")
    ax.set_title("accuracy vs MACs kept")
    ax.legend(fontsize=6, ncol=2)
    return ax


def plot_removed_vs_tuned(rows: Sequence[dict], ax: Any) -> Any:
    """Accuracy right after removal (x) against after fine-tuning (y), a point per method and
    budget (marker = budget), the dense accuracy dashed."""
    colors, markers = _colors(rows), _markers(rows)
    for b, mk in markers.items():
        ax.scatter([], [], marker=mk, color="0.4", label=b)
    for r in rows:
        if r["removed"] and r["tuned"]:
            ax.errorbar(r["removed"].mean, r["tuned"].mean, xerr=_err(r["removed"]),
                        yerr=_err(r["tuned"]), color=colors[r["method"]],
                        marker=markers[r["budget"]], ms=5, capsize=2, lw=0.8)
            ax.annotate(r["method"], (r["removed"].mean, r["tuned"].mean), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    dense = Stat.of([r["dense"].mean for r in rows if r["dense"]])
    if dense:
        ax.axhline(dense.mean, color="k", ls="--", lw=0.8, label="dense")
    ax.set_xlabel("accuracy right after removal (%)")
    ax.set_ylabel("accuracy after fine-tuning (%)")
    ax.set_title("what fine-tuning recovers")
    ax.legend(fontsize=7)
    return ax


def plot_speedup(rows: Sequence[dict], ax: Any) -> Any:
    """Measured batch-64 speedup against the MACs reduction (dense / pruned MACs), a point per
    method and budget, the ideal speedup = MACs reduction dashed."""
    colors, markers = _colors(rows), _markers(rows)
    pts = [r for r in rows if r["speedup64"] and r["ideal"]]
    for r in pts:
        ax.errorbar(r["ideal"].mean, r["speedup64"].mean, yerr=_err(r["speedup64"]),
                    color=colors[r["method"]], marker=markers[r["budget"]], ms=5, capsize=2)
        ax.annotate(r["method"], (r["ideal"].mean, r["speedup64"].mean), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    top = max([1.0] + [r["ideal"].mean for r in pts] + [r["speedup64"].mean for r in pts])
    ax.plot([1, top], [1, top], color="k", ls="--", lw=0.8, label="ideal (speedup = MACs "
                                                                   "reduction)")
    ax.set_xlabel("MACs reduction (dense / pruned MACs)")
    ax.set_ylabel("measured speedup at batch 64")
    ax.set_title("latency: measured vs MACs")
    ax.legend(fontsize=7)
    return ax


def plot_wall_time(rows: Sequence[dict], ax: Any) -> Any:
    """Mean wall time of a run per method and budget, in minutes, split into the sparse phase,
    fine-tuning and the rest (evaluations, removal, recalibration, latency)."""
    labels = [f"{r['method']} ({r['budget']})" for r in rows]
    mean = lambda s: s.mean / 60 if s else 0.0  # noqa: E731
    reg = [mean(r["regularize_s"]) for r in rows]
    ft = [mean(r["finetune_s"]) for r in rows]
    rest = [max(mean(r["seconds"]) - a - b, 0.0) for r, a, b in zip(rows, reg, ft)]
    y = range(len(rows))
    ax.barh(y, reg, label="sparse phase")
    ax.barh(y, ft, left=reg, label="fine-tuning")
    ax.barh(y, rest, left=[a + b for a, b in zip(reg, ft)], label="rest")
    ax.set_yticks(list(y), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("minutes per run (mean)")
    ax.set_title("wall time per method")
    ax.legend(fontsize=7)
    return ax


_Size = Callable[[int], tuple[float, float]]
FIGURES: dict[str, tuple[Callable[[Sequence[dict], Any], Any], _Size]] = {
    "accuracy_vs_macs.png": (plot_accuracy_vs_macs, lambda n: (6.0, 4.2)),
    "removed_vs_tuned.png": (plot_removed_vs_tuned, lambda n: (6.0, 5.0)),
    "speedup_vs_macs.png": (plot_speedup, lambda n: (6.0, 4.2)),
    "wall_time.png": (plot_wall_time, lambda n: (6.0, 1.5 + 0.18 * n)),
}
"""File name -> (drawing function, figure size for n rows)."""


def write_figures(rows: Sequence[dict], folder: str | Path, dpi: int = 120) -> list[Path]:
    """Draw every figure of FIGURES (matplotlib's Agg canvas, no pyplot state) and write each
    as PNG under `folder`, atomically; return the paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .fileio import atomic_open
    out = []
    for name, (draw, size) in FIGURES.items():
        fig = Figure(figsize=size(len(rows)), layout="constrained")
        FigureCanvasAgg(fig)
        draw(rows, fig.add_subplot())
        path = Path(folder) / name
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
        out.append(path)
    return out
