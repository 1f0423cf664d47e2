"""`prunelib report`: result JSONs -> a table of mean ± std and n per method and budget, figures.

    results = load_results(["results/"])          # folders (their *.json) or JSON files
    rows = aggregate(results)                     # one row per (model, scale, method, budget)
                                                  # (and settings, where runs differ in them)
    print(table(rows))                            # markdown (or fmt='text')
    write_figures(rows, "report/")                # four PNGs, written atomically
    print(choices_table(choices(results)))        # residual policy, strength, decision rule...
    print(reported_table(methods={"ns", "pr"}))   # the papers' own numbers (not measured here)

Files are read as JSON only (nothing is unpickled) and checked (`read_result`): a file that is
not JSON, or JSON that is not a `pipeline.run` result, is a `ResultError` naming the file.

Per row, every metric is the mean, the sample standard deviation (n - 1 in the denominator;
none for n = 1) and the number of runs that have it: accuracy (%) dense, at the end of the
sparse phase, right after removal, after BN recalibration, after fine-tuning, and the drop
tuned - dense (per run, then averaged); MACs and params kept (fractions of dense); the measured
batch-64 latency speedup dense / pruned and the ideal one, dense MACs / pruned MACs; the run's
wall time (`seconds.total`, else the sum of its phases).

`choices` gives, per method and budget, the choices that explain the differences between
methods (residual policy, strength rule, decision rule, BN-recalibration gain, sparse-phase cost
per epoch, realized share of the ideal speedup); `reported_table` the results the papers
report (`prunelib.reported`), which prunelib did not measure.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .results import PHASES, standard_error

__all__ = ["ResultError", "Stat", "read_result", "row_name", "settings_note", "load_results",
           "aggregate", "table", "choices", "choices_table", "DECISIONS", "OWN_DECISIONS",
           "reported_table", "REPORTED_CAVEATS", "write_figures", "plot_accuracy_vs_macs",
           "plot_removed_vs_tuned", "plot_speedup", "plot_wall_time", "FIGURES"]


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


def row_name(r: dict) -> str:
    """The row a result belongs to: its method, or its variant (``ns+residual=coupled``) when
    the sweep that made it set hyperparameters (`sweep.Grid.hparams`)."""
    v = r.get("variant")
    return v if isinstance(v, str) and v else r["method"]


def settings_note(r: dict) -> str:
    """The fields of a run's settings that differ from its scale's defaults (`SCALES`), as
    ' (reg_epochs=5, ft_epochs=5)'; '' when none differ or the scale is not a known one."""
    from .pipeline import SCALES
    sc, s = SCALES.get(r.get("scale", "")), r.get("settings")
    if sc is None or not isinstance(s, dict):
        return ""
    diff = [f"{k}={s[k]:g}" if _number(s[k]) else f"{k}={s[k]}"
            for k, v in asdict(sc).items() if k in s and s[k] != v]
    return f" ({', '.join(diff)})" if diff else ""


def _dense_accuracy(r: dict) -> Any:
    """The accuracy of the dense model a run started from (None when the file lacks it)."""
    return (r.get("dense") or {}).get("accuracy")


def _grouped(results: Sequence[dict]) -> list[tuple[tuple, list[dict]]]:
    """(model, scale, row name, budget) -> its runs, in the order of `_order`. Runs of one row
    made with different settings (a longer schedule through `sweep --ft-epochs`, say) or from
    different dense baselines are never averaged together: each gets what differs after its
    row name, `settings_note` and/or the baseline's accuracy ('l1 (dense 88.71%)')."""
    from .pipeline import SCALES

    def key(r: dict) -> tuple:
        return r.get("model", ""), r.get("scale", ""), row_name(r)

    def settings(r: dict) -> str:
        return json.dumps(r.get("settings"), sort_keys=True)
    kinds: dict[tuple, set[str]] = {}
    denses: dict[tuple, set[str]] = {}
    for r in results:
        kinds.setdefault(key(r), set()).add(settings(r))
        denses.setdefault(key(r), set()).add(json.dumps(_dense_accuracy(r)))
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        (model, scale, name), notes = key(r), []
        if len(kinds[key(r)]) > 1:            # known scale: what changed; else a number
            notes.append(settings_note(r)[2:-1] if scale in SCALES
                         else f"settings {sorted(kinds[key(r)]).index(settings(r))}")
        if len(denses[key(r)]) > 1:
            acc = _dense_accuracy(r)
            notes.append(f"dense {acc:.2f}%" if _number(acc) else "dense ?")
        if any(notes):
            name += f" ({'; '.join(n for n in notes if n)})"
        groups.setdefault((model, scale, name, _budget(r)), []).append(r)
    return sorted(groups.items(), key=lambda g: _order(g[0]))


def aggregate(results: Sequence[dict]) -> list[dict]:
    """One row per (model, scale, method, budget), ordered by model, scale, budget (MACs kept,
    largest first) and method name (a sweep variant's `row_name`, e.g. 'ns+residual=coupled',
    is a row of its own, and so are runs made with other settings, e.g. 'l1 (ft_epochs=5)':
    `settings_note`): the keys,
    `n` (runs), `seeds`, `test_images` and {metric: Stat or None} for every name in METRICS."""
    rows = []
    for (model, scale, method, budget), rs in _grouped(results):
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


def _check_fmt(fmt: str) -> None:
    if fmt not in ("markdown", "text"):
        raise ValueError(f"fmt must be 'markdown' or 'text', got {fmt!r}")


def _render(head: Sequence[str], body: Sequence[Sequence[str]], fmt: str) -> list[str]:
    """The lines of a markdown table, or of aligned plain-text columns (fmt='text')."""
    if fmt == "markdown":
        esc = lambda cells: " | ".join(c.replace("|", "\\|") for c in cells)  # noqa: E731
        return ["| " + esc(head) + " |", "|" + "---|" * len(head)] + [f"| {esc(c)} |"
                                                                       for c in body]
    w = [max(len(x) for x in col) for col in zip(head, *body)]
    return ["  ".join(x.ljust(n) for x, n in zip(line, w)).rstrip() for line in (head, *body)]


def table(rows: Sequence[dict], fmt: str = "markdown") -> str:
    """The rows as a markdown table (fmt='markdown') or aligned plain text (fmt='text'); model
    and scale get a column only when they vary. Cells are mean ± std (± left out for n = 1)."""
    _check_fmt(fmt)
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
    lines = _render(head, body, fmt)
    notes = ["", "Accuracies in %, mean ± sample std over the n runs (seeds); MACs and params "
             "as fractions of dense; speedup@64 = measured dense / pruned latency at batch 64, "
             "ideal = dense / pruned MACs."]
    n_img, dense = rows[0]["test_images"] if rows else None, rows[0]["dense"] if rows else None
    if isinstance(n_img, int) and n_img > 0 and dense is not None:
        notes.append(f"On {n_img} test images one accuracy has a binomial standard error of "
                     f"about {standard_error(dense.mean, n_img):.2f} points at "
                     f"{dense.mean:.1f}%.")
    return "\n".join(lines + notes)


# -- choices: what explains the differences between methods ------------------------------------
DECISIONS: dict[str, str] = {
    "bar": "global: eval gates at 0, then lowest log-alpha",
    "dmc": "global: gates at 0, then lowest theta",
    "eagleeye": "search: best of random per-layer L1 rates (adaptive-BN score)",
    "gal": "global: masks at 0, then lowest m (whole blocks on ResNets)",
    "gbn": "global Taylor ranking, tick-tock masks until the target",
    "gdp": "global: gates at 0, then lowest |theta|",
    "greg": "per-layer preset set (uniform rate) penalized, then global mean |w|",
    "l1": "uniform per-layer rate, lowest filter L1",
    "l1_global": "global ranking of filter L1",
    "ns": "global ranking of |gamma|",
    "oicsr": "global greedy by out-in group energy",
    "oto": "global: zero groups, then lowest group norm",
    "pr": "global ranking of gamma (paper: histogram valley)",
    "resrep": "global ranking of compactor-row norms, masked in the phase",
    "rsnli": "global: gamma at 0 (constant folded), then lowest |gamma|",
    "scop": "uniform per-layer rate of |gamma| (2 lambda - 1)",
    "scp": "global ranking of z (1 - P(off))",
    "ssl": "global ranking of min(filter, channel group norm)",
    "sss": "global: lambda at 0, then lowest lambda (whole blocks on ResNets)",
}
"""How each registered method chooses the channels to remove under a MACs budget (what
`prunelib sweep` runs): 'global' = one ranking across all prunable layers, 'uniform per-layer
rate' = the same fraction of every layer, 'preset' = a pruned set fixed before the phase,
'search' = candidate layer-wise rates scored on held-out data; 'at 0' = exact zeros (their
removal does not change the output) go first. From each method's module docstring."""

OWN_DECISIONS: dict[str, str] = {
    "bar": "own: eval gates exactly 0",
    "dmc": "own: gates exactly 0",
    "gal": "own: masks exactly 0",
    "gbn": "own: the channels tick-tock masked",
    "gdp": "own: gates exactly 0",
    "greg": "own: the preset pruned set",
    "oto": "own: zero groups (exact)",
    "pr": "own: histogram valley of gamma",
    "resrep": "own: compactor rows with norm < 1e-5",
    "rsnli": "own: gamma exactly 0, constant folded",
    "scp": "own: P(off) >= tau",
    "ssl": "own: zero filter or channel groups",
    "sss": "own: lambda exactly 0",
}
"""The rule of a run without a budget (`target.own_rule`: `finish(model, None)`), for the
methods that have one."""

NO_SPARSE_PHASE = frozenset({"l1", "l1_global", "eagleeye"})
"""Methods whose `regularize` trains nothing (one-shot or a search): no sparse-phase cost."""

EXTERNAL: dict[str, dict[str, Any]] = {"tp_magnitude": {"residual": "coupled",
                                                        "sparse_phase": False}}
"""What the report needs of methods the book's results hold that prunelib does not register:
`tp_magnitude` is Torch-Pruning's pruner, registered by `tools/torch_pruning_row.py` only; it
prunes every channel group, trunk included, and trains nothing before it (one-shot)."""


def _one_shot(method: str) -> bool:
    return method in NO_SPARSE_PHASE or EXTERNAL.get(method, {}).get("sparse_phase") is False


def _residual(method: str, runs: Sequence[dict]) -> str:
    """The residual policy of the runs: hparams['residual'], else the class's default."""
    vals = {(r.get("hparams") or {}).get("residual") for r in runs}
    if None in vals:
        vals.discard(None)
        try:
            from . import methods
            vals.add(methods.get(method).residual)
        except (KeyError, ValueError, TypeError):
            vals.add(EXTERNAL.get(method, {}).get("residual", "?"))
    return " / ".join(sorted(vals))


def _num(x: Any) -> str:
    return f"{x:.3g}" if _number(x) else str(x)


def _strength(runs: Sequence[dict]) -> str:
    """'<rule>: p=v, ...' (a range lo-hi where the runs differ), or "paper's values" when the
    method kept its own (the 'method' rule)."""
    out = []
    for rule in dict.fromkeys((r.get("strength") or {}).get("rule") for r in runs):
        rs = [r for r in runs if (r.get("strength") or {}).get("rule") == rule]
        if rule is None:
            out.append("?")
            continue
        if rule == "method":
            whys = {r["strength"].get("why", "") for r in rs}
            out.append("paper's values" if whys <= {"", "the paper's values (full scale)"} else
                       "paper's values (no rule)" if all(w.startswith("no rule") for w in whys)
                       else "method's values (" + "; ".join(sorted(whys)) + ")")
            continue
        params: dict[str, list] = {}
        for r in rs:
            for k, v in (r["strength"].get("params") or {}).items():
                params.setdefault(k, []).append(v)
        cells = []
        for k, vs in params.items():
            nums = [v for v in vs if _number(v)]
            if len(nums) == len(vs) and min(nums) != max(nums):
                cells.append(f"{k}={min(nums):.3g}-{max(nums):.3g}")
            else:
                cells.append(f"{k}={_num(vs[0])}")
        out.append(f"{rule}: {', '.join(cells)}" if cells else str(rule))
    return "; ".join(out)


def _decision(method: str, runs: Sequence[dict]) -> str:
    if any(r["target"].get("own_rule") for r in runs):
        return OWN_DECISIONS.get(method, "own: the method's finish(model, None)")
    if method in ("l1", "l1_global", "tp_magnitude"):
        return " / ".join(dict.fromkeys(_magnitude_rule(method, r.get("hparams") or {})
                                        for r in runs))
    return DECISIONS.get(method, "?")


def _magnitude_rule(method: str, hp: dict) -> str:
    """The magnitude rules' decision with their score and normalization (hparams), e.g.
    'global ranking of group L2 / group mean'."""
    if method == "tp_magnitude":
        how = ("global ranking" if hp.get("global_pruning", True)
               else "uniform per-group rate")
        return (f"Torch-Pruning: {how} of group L{hp.get('p', 2)} / group mean, "
                f"{hp.get('steps', 400)} re-scored steps")
    score = {"l1": "filter L1", "group_l2": "group L2"}.get(hp.get("importance", "l1"), "?")
    score += " / group mean" if hp.get("normalize", "none") == "mean" else ""
    return (f"uniform per-layer rate, lowest {score}" if method == "l1"
            else f"global ranking of {score}")


def recal_gain(r: dict) -> float:
    """Accuracy recalibrated - removed (points): what BN recalibration alone recovers."""
    return r["accuracy"]["recalibrated"] - r["accuracy"]["removed"]


def sparse_cost(r: dict) -> float | None:
    """Seconds per epoch of the sparse phase / seconds per epoch of fine-tuning; None when the
    run has no sparse phase (reg_epochs 0, or a method in NO_SPARSE_PHASE not run with the
    magnitudes' `train_first`) or no timing."""
    st, s = r.get("settings") or {}, r["seconds"]
    reg_ep, ft_ep = st.get("reg_epochs"), st.get("ft_epochs")
    reg_s, ft_s = s.get("regularize"), s.get("finetune")
    if ((_one_shot(r["method"]) and not (r.get("hparams") or {}).get("train_first"))
            or not all(_number(x) and x > 0 for x in (reg_ep, ft_ep, reg_s, ft_s))):
        return None
    return (reg_s / reg_ep) / (ft_s / ft_ep)


def realized_share(r: dict) -> float | None:
    """(measured batch-64 speedup - 1) / (ideal speedup - 1), ideal = dense / pruned MACs: the
    share of the MACs reduction that became wall-clock time (1 = all of it, 0 = none); None
    without a latency measurement or when no MACs were removed."""
    measured, ideal = _speedup(r), METRICS["ideal"](r)
    if measured is None or ideal is None or ideal <= 1 + 1e-9:
        return None
    return (measured - 1) / (ideal - 1)


def choices(results: Sequence[dict]) -> list[dict]:
    """One row per (model, scale, method, budget), ordered as `aggregate`: the choices that
    explain why methods differ at the same budget. Keys: model, scale, method, budget, n and

    residual     the residual policy (hparams['residual'], else the method class's `residual`):
                 'internal' = only channels with a single producing layer are pruned (the inner
                 channels of a residual block; the ResNet trunk keeps its width); 'coupled' =
                 also the trunk channels tied together by residual additions, removed jointly
                 across a stage. Several values are joined with ' / '.
    strength     the rule that set the regularizer's strength and the values it set
                 ('target drift: lam=2.48', a lo-hi range when the runs differ), or "paper's
                 values" when the method kept its own ('(no rule)': prunelib.strength has no
                 rule for it, e.g. l1, or the method plans its own phase; "method's values
                 (why)" when the caller kept them at a short scale); '- (no penalty)' for
                 the methods without a sparse phase (NO_SPARSE_PHASE, EXTERNAL).
    decision     how channels were chosen (DECISIONS; OWN_DECISIONS for runs without a budget;
                 the magnitude rules name their score and normalization from their hparams).
    recal_gain   Stat of accuracy recalibrated - removed (points): what re-estimating the BN
                 statistics alone recovers after removal (large: stale statistics, not a
                 destroyed function).
    sparse_cost  Stat of (seconds per sparse-phase epoch) / (seconds per fine-tuning epoch), or
                 None without a sparse phase (reg_epochs 0, l1, l1_global, EagleEye).
    realized     Stat of (measured batch-64 speedup - 1) / (ideal - 1), ideal = dense MACs /
                 pruned MACs: the share of the ideal speedup realized on the device.
    """
    rows = []
    for (model, scale, method, budget), rs in _grouped(results):
        base = rs[0]["method"]                       # a variant's method (ns+... -> ns)
        rows.append({"model": model, "scale": scale, "method": method, "budget": budget,
                     "n": len(rs), "residual": _residual(base, rs),
                     "strength": "- (no penalty)" if _one_shot(base)
                     else _strength(rs), "decision": _decision(base, rs),
                     "recal_gain": Stat.of([recal_gain(r) for r in rs]),
                     "sparse_cost": Stat.of([sparse_cost(r) for r in rs]),
                     "realized": Stat.of([realized_share(r) for r in rs])})
    return rows


def choices_table(rows: Sequence[dict], fmt: str = "markdown") -> str:
    """The rows of `choices` as a markdown table (or aligned text, fmt='text'), one line per
    method and budget, and a note saying what each column means; model and scale get a column
    only when they vary."""
    _check_fmt(fmt)
    keys = [k for k in ("model", "scale") if len({r[k] for r in rows}) > 1]
    head = [*keys, "method", "budget", "n", "residual", "strength", "decision",
            "recal. gain", "sparse/ft cost per epoch", "realized speedup share"]
    body = []
    for r in rows:
        cells = [str(r[k]) for k in keys] + [r["method"], r["budget"], str(r["n"])]
        cells += [r["residual"], r["strength"], r["decision"]]
        cells += [r[k].cell(2) if r[k] else "-" for k in ("recal_gain", "sparse_cost",
                                                          "realized")]
        body.append(cells)
    notes = ["", "residual: 'internal' prunes only channels with one producing layer (the "
             "ResNet trunk keeps its width), 'coupled' also the trunk channels tied by residual "
             "additions. strength: the rule that set the penalty for this schedule and its "
             "values, or the paper's values. decision: how the channels to remove were chosen. "
             "recal. gain: accuracy points recovered by BN recalibration alone (recalibrated - "
             "removed). sparse/ft cost per epoch: seconds per sparse-phase epoch / seconds per "
             "fine-tuning epoch ('-': no sparse phase). realized speedup share: (measured "
             "batch-64 speedup - 1) / (ideal - 1), ideal = dense / pruned MACs. Mean ± sample "
             "std over the n runs."]
    return "\n".join(_render(head, body, fmt) + notes)


# -- what the papers report (not measured here) --------------------------------------------------
REPORTED_CAVEATS: list[str] = [
    "Baselines differ: the papers start from ResNet-56 at 93.1-93.8% (93.4-93.8% among the "
    "verified entries; ImageNet ResNet-50 at 76.1-77.2%), prunelib's runs from its ResNet-20 "
    "at about 91.2%.",
    "Schedules differ: 160-480 epochs of sparse training and fine-tuning in the papers, "
    "3 + 3 epochs at the bench scale here.",
    "FLOPs are counted by each paper's own convention (MACs or 2x MACs, with or without BN, "
    "shortcuts and the classifier); prunelib counts conv and linear MACs.",
    "Papers often give the best of several runs or an unstated number of seeds; a sweep here "
    "reports one seed (or mean ± std over a few).",
    "Models differ: ResNet-56, VGG-16 or ResNet-50 in the papers, ResNet-20 here; a deeper "
    "or wider network usually loses less accuracy at the same FLOPs reduction.",
]
"""Why the reported table and prunelib's measured table can disagree."""


def reported_table(fmt: str = "markdown", methods: Iterable[str] | None = None, *,
                   caveats: bool = False) -> str:
    """The verified results the papers report (`prunelib.reported.REPORTED`), under a heading
    line that says they were not measured by prunelib; `caveats=True` appends REPORTED_CAVEATS
    as a list. `methods` keeps only those method names. Columns: method, model, dataset,
    baseline and pruned top-1 accuracy (%), their difference, FLOPs and params reductions (%),
    source tag, note."""
    from .reported import REPORTED
    _check_fmt(fmt)
    keep = None if methods is None else set(methods)
    entries = [e for e in REPORTED if keep is None or e.method in keep]
    heading = ("Reported by the papers or named re-implementations, NOT measured by prunelib: "
               "other baselines, models, schedules and FLOPs conventions; compare the "
               "differences to each paper's own baseline, not absolute accuracies.")
    if fmt == "markdown":
        heading = f"**{heading}**"
    if not entries:
        return heading + "\n\n(no verified reported result for these methods)"
    head = ["method", "model", "dataset", "baseline", "pruned", "pruned - baseline", "FLOPs↓",
            "params↓", "source", "note"]
    pct = lambda x: f"{100 * x:.1f}%" if x is not None else "-"  # noqa: E731
    body = [[e.method, e.model, e.dataset, f"{e.baseline:.2f}" if e.baseline is not None else "-",
             f"{e.pruned:.2f}",
             f"{e.pruned - e.baseline:+.2f}" if e.baseline is not None else "-",
             pct(e.flops_reduction), pct(e.params_reduction), e.source, e.note]
            for e in entries]
    lines = [heading, "", *_render(head, body, fmt)]
    if caveats:
        bullet = "- " if fmt == "markdown" else "* "
        lines += ["", "Why these numbers and the measured table can differ:",
                  *(bullet + c for c in REPORTED_CAVEATS)]
    return "\n".join(lines)


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
