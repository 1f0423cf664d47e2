"""Command-line interface: ``prunelib <command> ...`` or ``python -m prunelib <command> ...``.

Commands (one ``cmd_<name>(args) -> int`` function each, registered in `main`):

    train    train a dense CIFAR-10 baseline and save a checkpoint with its metadata
    run      prune a baseline with one method under a budget; write the result as JSON
    methods  list the registered methods
    bench    print the benchmark table (training speed, data, surgery, latency, overhead)
    sweep    run a grid of `run`s (methods x budgets x seeds) into a results folder; resumes
    report   aggregate result JSONs: mean ± std and n per method and budget, and figures

User errors (a bad flag or value, an unknown method or hyperparameter, an invalid budget, an
unwritable output, a missing or unusable data set) print ``prunelib: error: <message>`` on
stderr and exit with code 2, without a traceback; they are found before any data is loaded or
any training starts wherever the arguments alone decide them. A training run that diverges
prints its message the same way and exits with code 1. Output files are written atomically.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence


class UsageError(Exception):
    """A user error found by a command: reported as ``prunelib: error: <message>``, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with prunelib's error format: ``prunelib: error: <message>`` on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"prunelib: error: {message}\n(see `{self.prog} --help`)\n")


def _number(cast: type, ok: Callable[[Any], bool], allowed: str) -> Callable[[str], Any]:
    """argparse type: `cast(text)`, finite and accepted by `ok`, else an error saying `allowed`."""
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value
    return parse


_POSITIVE = _number(float, lambda v: v > 0, "a finite number > 0")
_NONNEG = _number(float, lambda v: v >= 0, "a finite number >= 0")
_FINITE = _number(float, lambda v: True, "a finite number")
_COUNT = _number(int, lambda v: v >= 1, "an integer >= 1")
_NATURAL = _number(int, lambda v: v >= 0, "an integer >= 0")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _device(text: str | None) -> Any:
    """torch.device from --device (default: cuda if any); UsageError if it cannot be used."""
    import torch

    from .train import default_device
    if text is None:
        return default_device()
    try:
        dev = torch.device(text)
    except RuntimeError as e:
        raise UsageError(f"--device {text!r} is not a device ({e}); use cpu, cuda or cuda:N"
                         ) from None
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {text}: no such CUDA device here "
                         f"({torch.cuda.device_count()} visible); use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available here; use --device cpu")
    return dev


def _output(path: str | Path, flag: str) -> Path:
    """`path` after checking that a file can be written there (UsageError naming `flag`)."""
    from .fileio import check_writable
    try:
        return check_writable(path, flag)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _data_root(args: argparse.Namespace) -> None:
    if args.data is not None and not args.download and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data} is not a folder; point it at the folder holding "
                         f"cifar10_train.npz / cifar10_test.npz, or add --download")


def _load_data(**kw: Any) -> Any:
    """`prunelib.data.cifar10(**kw)`; missing or unusable data (or a subset larger than the
    data) becomes a UsageError with the loader's message."""
    from . import data
    try:
        return data.cifar10(**kw)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    """Train `args.model` on CIFAR-10 with SGD + cosine schedule, evaluate, save checkpoint."""
    import torch

    from .data import cache_dir
    from .models import get_model
    from .train import evaluate, fit, save_checkpoint, seed_everything

    device = _device(args.device)
    out = _output(args.out if args.out else (
        cache_dir() / "baselines" / f"{args.model}_cifar10_s{args.seed}.pt"),
        "--out" if args.out else "the default checkpoint path (set PRUNELIB_CACHE or --out)")
    _data_root(args)
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "prunelib " + " ".join(shlex.quote(a) for a in args.argv)
    _log(f"# {command}")
    _log(f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    data = _load_data(root=args.data, batch_size=args.batch_size, subset=args.subset,
                      test_subset=args.test_subset, device=device, seed=args.seed,
                      download=args.download)
    model = get_model(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"# model {args.model}: {n_params / 1e6:.3f} M params; "
         f"{data.train.num_images} train / {data.test.num_images} test images")
    quiet = args.quiet or not sys.stderr.isatty()
    t0 = time.perf_counter()
    evals: list[list[float]] = []

    def on_epoch(epoch: int, loss: float) -> None:
        line = f"epoch {epoch:3d}/{args.epochs:g}  loss {loss:.4f}  " \
               f"time {time.perf_counter() - t0:7.1f}s"
        if args.eval_every > 0 and epoch % args.eval_every == 0 and epoch < args.epochs:
            acc = evaluate(model, data.test, device)
            evals.append([epoch, acc])
            line += f"  test acc {acc:.2f}%"
        _log(line)

    hist = fit(model, data.train, epochs=args.epochs, lr=args.lr, weight_decay=args.wd,
               momentum=args.momentum, nesterov=True, schedule=args.schedule,
               warmup=args.warmup, device=device, quiet=quiet, on_epoch=on_epoch)
    seconds = time.perf_counter() - t0
    acc = evaluate(model, data.test, device)
    evals.append([args.epochs, acc])
    _log(f"final test accuracy {acc:.2f}%  ({hist['steps']} steps, {seconds:.0f} s, "
         f"{hist['images_per_s']:.0f} train images/s)")
    save_checkpoint(model, out, model=args.model, dataset="cifar10", epochs=args.epochs,
                    accuracy=acc, evals=evals, seconds=seconds, steps=hist["steps"],
                    loss=hist["loss"], lr=args.lr, weight_decay=args.wd,
                    batch_size=args.batch_size, schedule=args.schedule, warmup=args.warmup,
                    seed=args.seed, subset=args.subset, command=command,
                    torch=torch.__version__, device=str(device),
                    threads=torch.get_num_threads())
    _log(f"saved {out}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .models import MODELS
    p = sub.add_parser("train", help="train a dense CIFAR-10 baseline",
                       description="Train a dense CIFAR-10 baseline (SGD, Nesterov momentum, "
                                   "per-step schedule, batched crop+flip augmentation).")
    p.add_argument("--model", default="resnet20", choices=MODELS)
    p.add_argument("--epochs", type=_POSITIVE, default=40)
    p.add_argument("--lr", type=_POSITIVE, default=0.1)
    p.add_argument("--batch-size", type=_COUNT, default=128)
    p.add_argument("--wd", type=_NONNEG, default=5e-4, help="weight decay")
    p.add_argument("--momentum", type=_number(float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
                   default=0.9)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    p.add_argument("--warmup", type=_NONNEG, default=1.0, help="epochs of linear lr warm-up")
    p.add_argument("--seed", type=_NATURAL, default=0)
    p.add_argument("--out", default=None,
                   help="checkpoint path (default: $PRUNELIB_CACHE/baselines/...)")
    p.add_argument("--data", default=None, help="data root (default: $PRUNELIB_DATA)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--subset", type=_COUNT, default=None, help="number of training images")
    p.add_argument("--test-subset", type=_COUNT, default=None, help="number of test images")
    p.add_argument("--eval-every", type=_NATURAL, default=5,
                   help="epochs between test evals (0: only at the end)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    p.add_argument("--threads", type=_COUNT, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is robust on a busy CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _value(text: str):
    """'3' -> 3, '1e-4' -> 0.0001, 'true'/'false'/'none' -> True/False/None, else the text."""
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(text)
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _hparams(items: Sequence[str]) -> dict[str, Any]:
    """--hp KEY=VALUE items as a dict; UsageError for a malformed, repeated or non-finite one."""
    hp: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError(f"--hp expects KEY=VALUE, got {item!r}")
        if key in hp:
            raise UsageError(f"--hp {key} is given twice")
        hp[key] = _value(text)
        if isinstance(hp[key], float) and not math.isfinite(hp[key]):
            raise UsageError(f"--hp {item}: hyperparameters must be finite numbers")
    return hp


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The scale fields the command line replaces: --reg-epochs, --ft-epochs and
    --no-restore-norms (restore_norms=False)."""
    out = {k: v for k, v in (("reg_epochs", args.reg_epochs), ("ft_epochs", args.ft_epochs))
           if v is not None}
    if args.no_restore_norms:
        out["restore_norms"] = False
    return out


def _method(args: argparse.Namespace) -> Any:
    """The method named by --method, built with the --hp values; UsageError if it cannot be."""
    from . import methods
    hp = _hparams(args.hp)
    try:
        return methods.get(args.method, **hp)
    except KeyError as e:
        raise UsageError(f"--method {args.method}: {e.args[0] if e.args else e}") from None
    except (TypeError, ValueError) as e:
        raise UsageError(f"--method {args.method} {' '.join('--hp ' + h for h in args.hp)}: "
                         f"{e}") from None


def _budget(args: argparse.Namespace) -> Any:
    """The Budget of --target-macs / --percent / --threshold (at most one; default macs 0.5),
    with --multiple's rounding of the kept channels when given."""
    from .select import Budget
    given = {k: v for k, v in (("macs", args.target_macs), ("percent", args.percent),
                               ("threshold", args.threshold)) if v is not None}
    rounding = {"multiple": args.multiple} if getattr(args, "multiple", None) else {}
    try:
        return Budget(**(given or {"macs": 0.5}), **rounding)
    except ValueError as e:
        raise UsageError(f"budget: {e}") from None


def cmd_run(args: argparse.Namespace) -> int:
    """Dense baseline -> method's sparse phase -> removal -> fine-tune; JSON with every phase.

    Everything the arguments decide is checked before data is loaded: the method and its
    hyperparameters, the budget, the numeric flags, the device, --out / --save and (when the
    baseline has to be trained) the baseline cache.
    """
    import json

    from .fileio import atomic_write_text
    from .pipeline import baseline_paths, get_scale, load_baseline, run
    from .surgery import save_pruned
    from .train import seed_everything

    method = _method(args)
    budget = _budget(args)
    scale = get_scale(args.scale)
    overrides = _overrides(args)
    device = _device(args.device)
    out = _output(args.out, "--out") if args.out else None
    save = _output(args.save, "--save") if args.save else None
    if out is not None and save is not None and out.resolve() == save.resolve():
        raise UsageError(f"--out and --save are the same file {out}; give two paths")
    paths = baseline_paths(args.model)
    if not any(p.is_file() for p in paths):
        _output(paths[0], "the baseline cache (to be trained; set PRUNELIB_CACHE)")
    _data_root(args)
    seed_everything(args.seed)
    data = _load_data(root=args.data, batch_size=scale.batch_size, subset=scale.subset,
                      test_subset=scale.test_subset, holdout=scale.holdout, device=device,
                      seed=args.seed, download=args.download)
    model, info = load_baseline(args.model, data, device=device, scale=scale,
                                quiet=args.quiet)
    _log(f"# baseline {args.model}: {info.get('accuracy', float('nan')):.2f}% ({info['path']})")
    pruned, res = run(method, model, data, budget, scale=scale, device=device,
                      quiet=args.quiet, seed=args.seed, **overrides)
    res = {"model": args.model, **res, "baseline": {k: info[k] for k in ("path", "accuracy")
                                                   if k in info}}
    acc = res["accuracy"]
    _log(f"{res['method']}: MACs {res['pruned']['macs_ratio']:.3f} of dense, params "
         f"{res['pruned']['params_ratio']:.3f}; accuracy dense {acc['dense']:.2f} -> "
         f"regularized {acc['regularized']:.2f} -> removed {acc['removed']:.2f} -> "
         f"fine-tuned {acc['finetuned']:.2f}")
    if out is not None:
        atomic_write_text(out, json.dumps(res, indent=2))
        _log(f"wrote {out}")
    if save is not None:
        save_pruned(pruned, save, model=args.model, method=res["method"])
        _log(f"saved pruned model to {save} (load with prunelib.load_pruned)")
    return 0


def _add_run(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .models import MODELS
    from .pipeline import SCALES
    p = sub.add_parser("run", help="prune a baseline with one method under a budget",
                       description="Load (or train) the dense baseline, run the method's "
                                   "sparse phase, remove channels to the budget, fine-tune, "
                                   "and write every phase's numbers as JSON.")
    p.add_argument("--method", required=True, help="a name from `prunelib methods`")
    p.add_argument("--model", default="resnet20", choices=MODELS)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-macs", type=_FINITE, default=None,
                        help="fraction of the dense MACs to keep, in (0, 1] (default 0.5)")
    budget.add_argument("--percent", type=_FINITE, default=None,
                        help="instead: remove this fraction of the scored channels, in [0, 1)")
    budget.add_argument("--threshold", type=_FINITE, default=None,
                        help="instead: remove channels whose score is <= this")
    p.add_argument("--multiple", type=_COUNT, default=None,
                   help="every pruned layer keeps a multiple of this many channels (or all), "
                        "e.g. 8 for faster kernels")
    p.add_argument("--scale", default="quick", choices=list(SCALES))
    p.add_argument("--reg-epochs", type=_NONNEG, default=None,
                   help="override the scale's (0: no sparse phase)")
    p.add_argument("--ft-epochs", type=_NONNEG, default=None,
                   help="override the scale's (0: no fine-tuning)")
    p.add_argument("--no-restore-norms", action="store_true",
                   help="fine-tune without first scaling shrunk conv rows back to the dense "
                        "norm (calibrate.restore_bn_input_norms): the ablation of that step")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyperparameter, e.g. --hp lam=1e-4 (repeatable)")
    p.add_argument("--seed", type=_NATURAL, default=0)
    p.add_argument("--out", default=None, help="JSON result path")
    p.add_argument("--save", default=None, help="save the pruned model here")
    p.add_argument("--data", default=None, help="data root (default: $PRUNELIB_DATA)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def cmd_methods(args: argparse.Namespace) -> int:
    from . import methods
    for name in methods.names():
        cls = type(methods.get(name))
        doc = (cls.__doc__ or "").strip().splitlines()
        _log(f"{name:10s} {cls.__name__:24s} {doc[0] if doc else ''}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import run_bench
    from .fileio import atomic_write_text
    _device(args.device)
    out = _output(args.out, "--out") if args.out else None
    res = run_bench(args.device, steps=args.steps, reps=args.reps)
    if out is not None:
        atomic_write_text(out, json.dumps(res, indent=2, default=str))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="print the benchmark table")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=_COUNT, default=20, help="training steps timed per loop")
    p.add_argument("--reps", type=_COUNT, default=20, help="timed forward passes per latency")
    p.add_argument("--out", default=None, help="also write the numbers as JSON")
    return p


def _unique(values: Sequence[Any], flag: str) -> None:
    seen: set = set()
    for v in values:
        if v in seen:
            raise UsageError(f"{flag} {v} is given twice")
        seen.add(v)


def _folder(path: str | Path, flag: str) -> Path:
    """`path` as an output folder (created if missing) after checking a file can be written in
    it; UsageError naming `flag` otherwise."""
    import os
    import tempfile
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{flag} {str(folder)!r} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".prunelib.", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"{flag} {str(folder)!r} is not writable ({e.strerror or e}); choose "
                         "another folder") from None
    return folder


def cmd_sweep(args: argparse.Namespace) -> int:
    """Every run of the grid through `pipeline.run`, one JSON per run in --out (`prunelib.sweep`).

    Checked before any data is loaded: the methods, budgets and seeds (known, in range, not
    repeated), the device, the folder (writable, and no result in it made with other settings),
    the baseline cache when a baseline must be trained, the data root. Exits 1 when runs
    failed, 130 when interrupted (Ctrl-C), without a traceback.
    """
    from . import methods, sweep
    from .pipeline import baseline_paths, load_baseline
    from .select import Budget
    registered = methods.names()
    names = registered if args.methods == ["all"] else args.methods
    for name in names:
        if name not in registered:
            raise UsageError(f"--methods {name}: unknown method {name!r}; registered: "
                             f"{', '.join(registered)} (or all)")
    _unique(names, "--methods")
    _unique(args.budgets, "--budgets")
    _unique(args.seeds, "--seeds")
    for b in args.budgets:
        try:
            Budget(macs=b)
        except ValueError as e:
            raise UsageError(f"--budgets: {e}") from None
    hp = _hparams(args.hp)
    for name in names:                  # every method of the grid must take the --hp values
        try:
            methods.get(name, **hp)
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"--methods {name} {' '.join('--hp ' + h for h in args.hp)}: "
                             f"{e.args[0] if isinstance(e, KeyError) and e.args else e}"
                             ) from None
    overrides = _overrides(args)
    grid = sweep.Grid(tuple(names), tuple(args.budgets), tuple(args.seeds), args.model,
                      args.scale, overrides, hp)
    scale = grid.settings()
    device = _device(args.device)
    folder = _folder(args.out, "--out")
    paths = baseline_paths(args.model)
    if not any(p.is_file() for p in paths):
        _output(paths[0], "the baseline cache (to be trained; set PRUNELIB_CACHE)")
    _data_root(args)
    try:
        planned = sweep.plan(grid, folder)
    except sweep.SweepError as e:
        raise UsageError(str(e)) from None
    if args.dry_run:
        for p in planned:
            _log(f"{'finished' if p.finished else 'to run':8s}  {p.path.name}"
                 + ("" if p.finished else f"  ({p.why})"))
        return 0
    quiet = args.quiet or not sys.stderr.isatty()

    def load_data(seed: int) -> Any:
        return _load_data(root=args.data, batch_size=scale.batch_size, subset=scale.subset,
                          test_subset=scale.test_subset, holdout=scale.holdout, device=device,
                          seed=seed, download=args.download)

    def load_model(data: Any) -> tuple[Any, dict]:
        model, info = load_baseline(args.model, data, device=device, scale=scale, quiet=quiet)
        _log(f"# baseline {args.model}: {info.get('accuracy', float('nan')):.2f}% "
             f"({info['path']})")
        return model, info

    try:
        done = sweep.sweep(grid, folder, load_data, load_model, device=device,
                           command="prunelib " + " ".join(shlex.quote(a) for a in args.argv),
                           quiet=quiet, log=_log)
    except sweep.SweepError as e:               # e.g. a folder made from another baseline
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        print("prunelib: interrupted; the finished runs are kept in their files (the current "
              "one is not). Rerun the same command to resume.", file=sys.stderr)
        return 130
    if done.failed:
        print(f"prunelib: error: {len(done.failed)} of {len(planned)} runs failed: "
              + "; ".join(f"{label} ({err})" for label, err in done.failed)
              + ". Rerun the same command to retry them (finished runs are skipped).",
              file=sys.stderr)
        return 1
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .models import MODELS
    from .pipeline import SCALES
    p = sub.add_parser("sweep", help="run a grid of methods x budgets x seeds; resumable",
                       description="Run every (method, budget, seed) of the grid through the "
                                   "same protocol as `prunelib run`, writing one result JSON "
                                   "per run into --out (atomically). Runs whose file is "
                                   "already complete are skipped, so rerunning the command "
                                   "resumes an interrupted sweep.")
    p.add_argument("--methods", nargs="+", required=True, metavar="NAME",
                   help="names from `prunelib methods`, or all")
    p.add_argument("--budgets", nargs="+", default=[0.5], metavar="MACS",
                   type=_number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
                   help="fractions of the dense MACs to keep (default 0.5)")
    p.add_argument("--seeds", nargs="+", type=_NATURAL, default=[0], metavar="SEED")
    p.add_argument("--model", default="resnet20", choices=MODELS)
    p.add_argument("--scale", default="bench", choices=list(SCALES))
    p.add_argument("--reg-epochs", type=_NONNEG, default=None,
                   help="override the scale's (0: no sparse phase)")
    p.add_argument("--ft-epochs", type=_NONNEG, default=None,
                   help="override the scale's (0: no fine-tuning)")
    p.add_argument("--no-restore-norms", action="store_true",
                   help="fine-tune without first scaling shrunk conv rows back to the dense "
                        "norm (calibrate.restore_bn_input_norms): the ablation of that step")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter for every method of the grid (repeatable): the runs "
                        "are a variant, e.g. ns+residual=coupled, reported as a row of its own")
    p.add_argument("--out", required=True, metavar="FOLDER", help="results folder")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs, finished or to run, and stop")
    p.add_argument("--data", default=None, help="data root (default: $PRUNELIB_DATA)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bars inside runs")
    return p


def cmd_report(args: argparse.Namespace) -> int:
    """Table of mean ± std and n per method and budget, then the choices table (residual
    policy, strength, decision rule, ...) and with --reported the papers' reported results
    for the methods in RESULTS (stdout, and --out/report.md or .txt); with --out also the
    four figures of `prunelib.report` as PNG."""
    from . import report
    from .fileio import atomic_write_text
    out = _folder(args.out, "--out") if args.out else None
    try:
        results = report.load_results(args.results)
    except report.ResultError as e:
        raise UsageError(str(e)) from None
    rows = report.aggregate(results)
    parts = [report.table(rows, args.format),
             report.choices_table(report.choices(results), args.format)]
    if args.reported:
        parts.append(report.reported_table(args.format, {r["method"] for r in results},
                                           caveats=True))
    text = "\n\n".join(parts)
    _log(text)
    if out is not None:
        path = out / f"report.{'md' if args.format == 'markdown' else 'txt'}"
        atomic_write_text(path, text + "\n")
        figures = report.write_figures(rows, out)
        _log(f"wrote {path} and {', '.join(f.name for f in figures)} ({len(results)} results)")
    return 0


def _add_report(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="aggregate result JSONs into tables and figures",
                       description="Read result JSONs (folders of them, or files; JSON only), "
                                   "print mean ± std and n per method and budget and the "
                                   "choices that explain the differences (residual policy, "
                                   "strength, decision rule, BN-recalibration gain, "
                                   "sparse-phase cost, realized speedup), and with --out "
                                   "write the tables and four figures there.")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="result folders or JSON files")
    p.add_argument("--out", default=None, metavar="FOLDER",
                   help="write report.md (or .txt) and the figures (PNG) here")
    p.add_argument("--format", default="markdown", choices=["markdown", "text"])
    p.add_argument("--reported", action="store_true",
                   help="append the results the papers report for these methods (verified "
                        "sources only; not measured by prunelib)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen command; return its exit code.

    User errors raise SystemExit(2) after printing ``prunelib: error: <message>`` to stderr (the
    argparse convention, also for errors a command finds: `UsageError`); a diverging training
    run raises SystemExit(1) with its message.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(prog="prunelib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: dict[str, tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser],
                              Callable[[argparse.Namespace], int]]] = {
        "train": (_add_train, cmd_train),
        "run": (_add_run, cmd_run),
        "methods": (lambda sub: sub.add_parser("methods", help="list registered methods"),
                    cmd_methods),
        "bench": (_add_bench, cmd_bench),
        "sweep": (_add_sweep, cmd_sweep),
        "report": (_add_report, cmd_report),
    }
    parsers = {name: adder(sub) for name, (adder, _) in commands.items()}
    for name, (_, func) in commands.items():
        parsers[name].set_defaults(func=func)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        parsers[args.command].error(str(e))
    except FloatingPointError as e:
        parser.exit(1, f"prunelib: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
