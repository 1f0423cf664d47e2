"""A grid of protocol runs (methods x budgets x seeds), one JSON file per run, resumable.

    grid = Grid(methods=("l1", "ns"), budgets=(0.5, 0.3), seeds=(0,), model="resnet20",
                scale="bench")
    done = sweep(grid, "results/", load_data=lambda seed: ..., load_model=lambda data: ...)

Every run goes through `pipeline.run`, exactly as `prunelib run` does. Its file,
`<folder>/<run_name(...)>`, e.g. ``resnet20-bench-ns-macs0.5-seed0.json``, holds the whole result
(every phase's accuracy, MACs, params, latency at batch 1 and 64, seconds per phase and their
`total`, strength, torch, device) plus `model`, `baseline`, `run` (the spec that names the file:
model, scale, method, budget, seed and every setting of the scale), `grid`, `command`, `commit`
(git commit and whether the tree was dirty, None outside a checkout) and `threads`.

Guarantees:
  - atomic: each file is written to a temporary name and renamed (`prunelib.fileio`), so a file
    under a run's name is always complete; an interruption leaves at most a stray ``.*.tmp``;
  - resumable: a run is finished when its file parses as a complete result (`report.read_result`)
    whose `run` equals the planned spec; a missing, unreadable or incomplete file is run again;
  - never mixed: a complete file whose spec differs (other epochs, learning rates, ...) is an
    error found before anything runs (`plan`), and so is one made from another dense baseline
    (its `baseline.accuracy` differs from the loaded one's, checked before the first run
    trains): one folder holds one protocol from one baseline;
  - a run that fails (e.g. a diverging loss) is reported and writes nothing, the others go on.
"""
from __future__ import annotations

import json
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .fileio import atomic_write_text
from .pipeline import Scale, get_scale

__all__ = ["Grid", "Planned", "SweepError", "SweepResult", "run_name", "plan", "sweep",
           "git_commit", "variant"]


class SweepError(ValueError):
    """A grid that cannot run as given (a conflicting results file, a bad value)."""


@dataclass(frozen=True)
class Grid:
    """methods x budgets (fractions of dense MACs kept) x seeds, for one model and scale.
    `overrides` replace fields of the scale (e.g. {'ft_epochs': 1}) for every run. `hparams`
    (e.g. {'residual': 'coupled'}) are given to every method of the grid: each run is then a
    *variant*, named and reported as ``<method>+key=value`` (an ablation row next to the
    method's own)."""
    methods: tuple[str, ...]
    budgets: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    model: str = "resnet20"
    scale: str = "bench"
    overrides: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> Scale:
        """The scale every run uses, with `overrides` applied."""
        sc = get_scale(self.scale)
        return Scale(**{**asdict(sc), **self.overrides}) if self.overrides else sc

    def specs(self) -> list[dict]:
        """One spec per run, seed-major (data is loaded once per seed), then budget, method."""
        settings = asdict(self.settings())
        extra = {"hparams": dict(sorted(self.hparams.items()))} if self.hparams else {}
        return [{"model": self.model, "scale": self.scale, "method": m, "budget": float(b),
                 "seed": int(s), "settings": settings, **extra}
                for s in self.seeds for b in self.budgets for m in self.methods]


def variant(spec: dict) -> str:
    """The row name of a run: its method, plus ``+key=value`` for every hyperparameter the
    grid set (`Grid.hparams`), e.g. ``ns+residual=coupled``."""
    hp = spec.get("hparams") or {}
    return spec["method"] + "".join(f"+{k}={v}" for k, v in sorted(hp.items()))


def run_name(spec: dict) -> str:
    """The file name of a run: ``<model>-<scale>-<variant>-macs<budget>-seed<seed>.json``
    (the variant is the method's name unless the grid sets hyperparameters, see `variant`; the
    budget as Python's shortest exact float repr, so two budgets never share a name)."""
    return (f"{spec['model']}-{spec['scale']}-{variant(spec)}-macs{float(spec['budget'])!r}"
            f"-seed{int(spec['seed'])}.json")


@dataclass
class Planned:
    """A run of the grid: its spec, its file, and whether that file already finishes it
    (`why` says why not: 'missing' or the reason the file is not a complete result)."""
    spec: dict
    path: Path
    finished: bool
    why: str = ""


def _same(a: Any, b: Any) -> bool:
    """Equality of JSON-like values after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def plan(grid: Grid, folder: str | Path) -> list[Planned]:
    """Every run of `grid` with its file under `folder` and whether it is finished.

    Raises SweepError when a complete result file under a run's name was made with another
    spec (other settings): rerunning would overwrite it, skipping it would mix protocols."""
    from .report import ResultError, read_result
    out = []
    for spec in grid.specs():
        path = Path(folder) / run_name(spec)
        if not path.exists():
            out.append(Planned(spec, path, False, "missing"))
            continue
        try:
            res = read_result(path)
        except ResultError as e:
            out.append(Planned(spec, path, False, f"unusable file, run again ({e})"))
            continue
        if not _same(res.get("run"), spec):
            diff = _spec_diff(res.get("run"), spec)
            raise SweepError(f"{path} holds a run with other settings ({diff}); use another "
                             f"results folder, or remove that file to run it again")
        out.append(Planned(spec, path, True))
    return out


def _same_baseline(folder: str | Path, model: str, info: dict | None) -> None:
    """SweepError when a result of `model` already in `folder` (any method, budget or seed:
    finished or from another grid) started from another dense baseline than the one just
    loaded (`info['accuracy']`): the folder would hold two baselines' runs. Files of other
    models and unreadable files are not this check's business."""
    from .report import ResultError, read_result
    acc = (info or {}).get("accuracy")
    for path in sorted(Path(folder).glob(f"{model}-*.json")):
        try:
            res = read_result(path)
        except ResultError:
            continue
        old = (res.get("baseline") or {}).get("accuracy")
        if res.get("model") == model and not _same(old, acc):
            raise SweepError(f"{path} was made from a dense baseline at {old}%, the baseline "
                             f"loaded now ({(info or {}).get('path')}) is at {acc}%; use another "
                             f"results folder, or point PRUNELIB_CACHE at that run's baseline")


def _spec_diff(old: Any, new: dict) -> str:
    """Which fields of two specs differ, as 'key: old -> new' (settings flattened)."""
    if not isinstance(old, dict):
        return "no 'run' spec in the file"

    def flat(d: dict) -> dict:
        return {**{k: v for k, v in d.items() if k != "settings"},
                **{f"settings.{k}": v for k, v in (d.get("settings") or {}).items()}}
    a, b = flat(old), flat(new)
    keys = [k for k in sorted(set(a) | set(b)) if not _same(a.get(k), b.get(k))]
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4]) or "?"


def git_commit(where: str | Path | None = None) -> dict | None:
    """{'commit': sha, 'dirty': bool} of the git checkout prunelib runs from (or `where`);
    None when it is not a git checkout or git is not available. Never raises."""
    root = Path(where) if where is not None else Path(__file__).resolve().parents[1]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None                     # prunelib is installed inside some other repo
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _label(spec: dict) -> str:
    return f"{variant(spec)} macs {spec['budget']:g} seed {spec['seed']}"


@dataclass
class SweepResult:
    """What a sweep did: files written, runs skipped (already finished), runs that failed."""
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)    # (run label, error)


def sweep(grid: Grid, folder: str | Path, load_data: Callable[[int], Any],
          load_model: Callable[[Any], tuple[Any, dict]], device: Any = None,
          command: str | None = None, quiet: bool = True, measure_latency: bool = True,
          log: Callable[[str], None] = print) -> SweepResult:
    """Run every unfinished run of `grid`, writing `<folder>/<run_name>` for each.

    `load_data(seed)` returns the data of a seed (called once per seed that has work);
    `load_model(data)` returns (dense model, info) and is called once, when the first run
    starts; their errors end the sweep. A progress line per run says runs done, skipped and
    failed, and the ETA (mean time of the runs done so far times the runs left). Exceptions of
    a run (other than KeyboardInterrupt) are logged with their traceback, recorded in `failed`,
    and the sweep goes on; the run's file is not written, so the next sweep retries it."""
    import torch

    from . import methods
    from .pipeline import run
    from .select import Budget
    runs = plan(grid, folder)
    todo = [p for p in runs if not p.finished]
    out = SweepResult(skipped=[p.path for p in runs if p.finished])
    log(f"# sweep: {len(runs)} runs ({len(grid.methods)} methods x {len(grid.budgets)} budgets "
        f"x {len(grid.seeds)} seeds, {grid.model}, scale {grid.scale}) into {folder}: "
        f"{len(out.skipped)} finished, {len(todo)} to run")
    meta = {"grid": {**asdict(grid), "methods": list(grid.methods),
                     "budgets": list(grid.budgets), "seeds": list(grid.seeds)},
            "command": command, "commit": git_commit()}
    model = info = None
    data_seed, data, dense_acc = None, None, None
    times: list[float] = []
    for i, p in enumerate(todo, 1):
        spec = p.spec
        log(f"[{i}/{len(todo)}] {_label(spec)}: running ({p.why})")
        if data_seed != spec["seed"]:         # data and model errors end the sweep
            data, data_seed, dense_acc = load_data(spec["seed"]), spec["seed"], None
        if model is None:
            model, info = load_model(data)
            _same_baseline(folder, grid.model, info)
        t0 = time.time()
        try:
            method = (methods.get(spec["method"], **spec["hparams"]) if spec.get("hparams")
                      else spec["method"])
            _, res = run(method, model, data, Budget(macs=spec["budget"]),
                         scale=grid.settings(), device=device, quiet=quiet, seed=spec["seed"],
                         measure_latency=measure_latency, dense_accuracy=dense_acc)
        except Exception as e:  # noqa: BLE001 -- one failed run must not end a long sweep
            log(f"[{i}/{len(todo)}] {_label(spec)}: FAILED: {type(e).__name__}: {e}\n"
                + traceback.format_exc(limit=6))
            out.failed.append((_label(spec), f"{type(e).__name__}: {e}"))
            continue
        dense_acc = res["accuracy"]["dense"]
        res["seconds"]["total"] = time.time() - t0
        if spec.get("hparams"):
            res["variant"] = variant(spec)
        res = {"model": grid.model, **res,
               "baseline": {k: info[k] for k in ("path", "accuracy") if k in (info or {})},
               "run": spec, **meta, "threads": torch.get_num_threads()}
        atomic_write_text(p.path, json.dumps(res, indent=2, default=str))
        out.written.append(p.path)
        times.append(res["seconds"]["total"])
        left = len(todo) - i
        acc = res["accuracy"]
        eta = _duration(sum(times) / len(times) * left) if left else "0 s"
        log(f"[{i}/{len(todo)}] {_label(spec)}: dense {acc['dense']:.2f} -> removed "
            f"{acc['removed']:.2f} -> tuned {acc['finetuned']:.2f} at MACs "
            f"{res['pruned']['macs_ratio']:.3f} in {_duration(times[-1])} | done "
            f"{len(out.written)}, skipped {len(out.skipped)}, failed {len(out.failed)}, "
            f"left {left}, ETA {eta}")
    log(f"# sweep finished: {len(out.written)} written, {len(out.skipped)} skipped, "
        f"{len(out.failed)} failed")
    return out
