"""Command-line interface: ``prunelib <command> ...`` or ``python -m prunelib <command> ...``.

Commands (one ``cmd_<name>(args) -> int`` function each, registered in `main`):

    train    train a dense CIFAR-10 baseline and save a checkpoint with its metadata
    run      prune a baseline with one method under a budget; write the result as JSON
    methods  list the registered methods
    bench    print the benchmark table (training speed, data, surgery, latency, overhead)
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence


def _log(msg: str) -> None:
    print(msg, flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    """Train `args.model` on CIFAR-10 with SGD + cosine schedule, evaluate, save checkpoint."""
    import torch

    from .data import cache_dir, cifar10
    from .models import get_model
    from .train import default_device, evaluate, fit, save_checkpoint, seed_everything

    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    out = Path(args.out) if args.out else (
        cache_dir() / "baselines" / f"{args.model}_cifar10_s{args.seed}.pt")
    command = "prunelib " + " ".join(shlex.quote(a) for a in args.argv)
    _log(f"# {command}")
    _log(f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    data = cifar10(args.data, batch_size=args.batch_size, subset=args.subset,
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
    p.add_argument("--epochs", type=float, default=40)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step", "constant"])
    p.add_argument("--warmup", type=float, default=1.0, help="epochs of linear lr warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="checkpoint path (default: $PRUNELIB_CACHE/baselines/...)")
    p.add_argument("--data", default=None, help="data root (default: $PRUNELIB_DATA)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    p.add_argument("--subset", type=int, default=None, help="number of training images")
    p.add_argument("--test-subset", type=int, default=None, help="number of test images")
    p.add_argument("--eval-every", type=int, default=5, help="epochs between test evals")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if any)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is robust on a busy CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _value(text: str):
    """'3' -> 3, '1e-4' -> 0.0001, 'true'/'false'/'none' -> True/False/None, else the text."""
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(text)
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def cmd_run(args: argparse.Namespace) -> int:
    """Dense baseline -> method's sparse phase -> removal -> fine-tune; JSON with every phase."""
    import json

    import torch

    from . import methods
    from .data import cifar10
    from .pipeline import get_scale, load_baseline, run
    from .select import Budget
    from .surgery import save_pruned
    from .train import default_device, seed_everything

    hp = {}
    for item in args.hp:
        if "=" not in item:
            raise SystemExit(f"--hp expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        hp[k] = _value(v)
    try:
        method = methods.get(args.method, **hp)
    except KeyError as e:
        raise SystemExit(str(e).strip('"'))
    budget = (Budget(percent=args.percent) if args.percent is not None else
              Budget(threshold=args.threshold) if args.threshold is not None else
              Budget(macs=args.target_macs))
    scale = get_scale(args.scale)
    overrides = {k: v for k, v in (("reg_epochs", args.reg_epochs),
                                   ("ft_epochs", args.ft_epochs)) if v is not None}
    seed_everything(args.seed)
    device = torch.device(args.device) if args.device else default_device()
    data = cifar10(args.data, batch_size=scale.batch_size, subset=scale.subset,
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
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        _log(f"wrote {args.out}")
    if args.save:
        save_pruned(pruned, args.save, model=args.model, method=res["method"])
        _log(f"saved pruned model to {args.save} (load with prunelib.load_pruned)")
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
    p.add_argument("--target-macs", type=float, default=0.5,
                   help="fraction of the dense MACs to keep (default 0.5)")
    p.add_argument("--percent", type=float, default=None,
                   help="instead: remove this fraction of the scored channels")
    p.add_argument("--threshold", type=float, default=None,
                   help="instead: remove channels whose score is <= this")
    p.add_argument("--scale", default="quick", choices=list(SCALES))
    p.add_argument("--reg-epochs", type=float, default=None, help="override the scale's")
    p.add_argument("--ft-epochs", type=float, default=None, help="override the scale's")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyperparameter, e.g. --hp lam=1e-4 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
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
    res = run_bench(args.device, steps=args.steps, reps=args.reps)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="print the benchmark table")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=20, help="training steps timed per loop")
    p.add_argument("--reps", type=int, default=20, help="timed forward passes per latency")
    p.add_argument("--out", default=None, help="also write the numbers as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen command; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="prunelib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: dict[str, tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser],
                              Callable[[argparse.Namespace], int]]] = {
        "train": (_add_train, cmd_train),
        "run": (_add_run, cmd_run),
        "methods": (lambda sub: sub.add_parser("methods", help="list registered methods"),
                    cmd_methods),
        "bench": (_add_bench, cmd_bench),
    }
    for adder, func in commands.values():
        adder(sub).set_defaults(func=func)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
