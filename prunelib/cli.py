"""Command-line interface: ``prunelib <command> ...`` or ``python -m prunelib <command> ...``.

Commands (one ``cmd_<name>(args) -> int`` function each, registered in `main`):

    train   train a dense CIFAR-10 baseline and save a checkpoint with its metadata
"""
from __future__ import annotations

import argparse
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
                    torch=torch.__version__, device=str(device))
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the chosen command; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="prunelib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands: dict[str, tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser],
                              Callable[[argparse.Namespace], int]]] = {
        "train": (_add_train, cmd_train),
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
