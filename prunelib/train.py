"""Training and evaluation loops, with the method hooks of `prunelib.methods.base.Method`.

`fit` runs SGD (momentum, optional Nesterov) with a per-step learning-rate schedule and calls a
method's hooks in this order every step (design.md, "The method interface")::

    out = model(x); loss = CE(out, y)            # or the distillation mix, see `fit`
    t = hooks.loss_term(model); loss += t        # when t is not None
    opt.zero_grad(set_to_none=True); loss.backward()
    hooks.after_backward(model); opt.step(); hooks.after_step(model)

Both `fit` and `evaluate` move the model to the requested device and, when it has 2-D
convolutions, to the channels_last memory format (in place), and feed it channels_last inputs.

Per-step losses are kept as a device tensor and read back only every `sync_every` steps
(progress bar, divergence check), so the loop adds no host-device synchronisation per step.

Checkpoints (`save_checkpoint` / `load_checkpoint`) hold only tensors and plain Python values,
are written atomically (`prunelib.fileio`) and load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fileio import atomic_torch_save

__all__ = ["seed_everything", "default_device", "evaluate", "fit", "lr_factor",
           "save_checkpoint", "load_checkpoint", "CheckpointError"]

SCHEDULES = ("cosine", "step", "constant", "triangular")


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _prepare(model: nn.Module, device: str | torch.device | None) -> tuple[torch.device, bool]:
    """Move `model` to `device` (default: where it already is); channels_last if it has convs."""
    dev = torch.device(device) if device is not None else _model_device(model)
    cl = _has_conv2d(model)
    model.to(dev)
    if cl:
        model.to(memory_format=torch.channels_last)
    return dev, cl


def _to(x: torch.Tensor, dev: torch.device, cl: bool) -> torch.Tensor:
    x = x.to(dev, non_blocking=True)
    if cl and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: str | torch.device | None = None,
             quiet: bool = True) -> float:
    """Top-1 accuracy in percent of `model` over the (x, y) `batches` (eval mode, no grad).

    The model's train/eval mode is restored afterwards. Raises ValueError on an empty loader.
    """
    from tqdm.auto import tqdm
    dev, cl = _prepare(model, device)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=dev)
    total = 0
    try:
        for x, y in tqdm(batches, desc="eval", disable=quiet, leave=False):
            x, y = _to(x, dev, cl), y.to(dev, non_blocking=True)
            correct += (model(x).argmax(1) == y).sum()
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluate() got no batches")
    return 100.0 * correct.item() / total


def lr_factor(step: int, total: int, schedule: str | Callable[[int, int], float] = "cosine",
              milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1,
              warmup: int = 0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based) of `total` steps.

    cosine: 0.5 (1 + cos(pi s / total)); step: gamma ** (number of milestones, given as
    fractions of `total`, that are <= s / total); constant: 1; triangular: gamma + (1 - gamma)
    (1 - |2 s / total - 1|), i.e. linear from gamma up to 1 at mid-run and back (Gate
    Decorator's tock: 1e-3 -> 1e-2 -> 1e-3 with gamma = 0.1); a callable is called as
    schedule(step, total). During the first `warmup` steps the factor is additionally ramped
    linearly from 1/warmup to 1.
    """
    if callable(schedule):
        f = float(schedule(step, total))
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"schedule({step}, {total}) returned {f}; need a finite value >= 0")
    elif schedule == "triangular":
        f = gamma + (1.0 - gamma) * (1.0 - abs(2.0 * step / max(total, 1) - 1.0))
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
    elif schedule == "step":
        f = gamma ** sum(step >= m * total for m in milestones)
    elif schedule == "constant":
        f = 1.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup > 0 and step < warmup:
        f *= (step + 1) / warmup
    return f


def fit(model: nn.Module, batches: Iterable, epochs: float, lr: float,
        weight_decay: float = 5e-4, momentum: float = 0.9, nesterov: bool = True,
        schedule: str | Callable[[int, int], float] = "cosine",
        milestones: tuple[float, ...] = (0.5, 0.75), hooks: Any = None,
        device: str | torch.device | None = None, quiet: bool = False,
        distill_from: nn.Module | None = None, distill_T: float = 4.0,
        distill_alpha: float = 0.9, max_steps: int | None = None, warmup: float = 0.0,
        gamma: float = 0.1, sync_every: int = 20,
        on_epoch: Callable[[int, float], None] | None = None,
        diverge_factor: float | None = 1e3) -> dict[str, Any]:
    """Train `model` in place with SGD for `epochs` passes over `batches`; return a history.

    Args:
        batches: re-iterable of (x, y) with ``len()`` (a list, a DataLoader, `data.Batches`);
            ``len(batches)`` steps make one epoch. Not a generator or other one-shot iterator.
        epochs: a finite number > 0, may be fractional: ``ceil(epochs * len(batches))``
            optimizer steps in total (capped by `max_steps`); the loader is re-iterated as often
            as needed.
        lr, weight_decay, momentum, nesterov: SGD settings (lr finite and >= 0; Nesterov needs
            momentum > 0).
        schedule: 'cosine' (to 0), 'step' (x `gamma` at each fraction in `milestones`),
            'constant', 'triangular' (gamma -> 1 -> gamma) or a callable (step, total) ->
            factor; applied per step, as a multiplier of every param group's own lr.
        warmup: epochs of linear lr warm-up at the start (0 = none).
        hooks: a `prunelib.methods.base.Method`-like object or None; supplies `param_groups`
            and `loss_term` / `after_backward` / `after_step` (order: module docstring).
        device: where to train (default: where the model's parameters are).
        distill_from: teacher; then loss = alpha * T^2 * KL(p_teacher^T || p_student^T)
            + (1 - alpha) * CE, with softmax temperature `distill_T` and weight `distill_alpha`.
        quiet: disable the tqdm progress bar.
        on_epoch: called as ``on_epoch(epoch, mean_loss)`` after each complete pass over
            `batches` (epoch counts from 1), e.g. to evaluate or log; the model is in train
            mode when it returns.
        sync_every: steps between read-backs of the loss (progress bar, divergence checks).
        diverge_factor: the loss has diverged when one step's loss exceeds `diverge_factor`
            times the reference max(mean loss of the steps before the first check, ln(number
            of classes), 1). Normal training starts near ln(classes) and falls, so 1e3 is three
            orders of magnitude above anything it reaches; None turns this check off (the
            NaN/inf check stays).

    Returns:
        {'loss': mean training loss (incl. loss_term) per epoch, the last one possibly
        partial; 'steps': optimizer steps; 'seconds': wall time; 'images': images seen;
        'images_per_s': throughput; 'lr': final learning rate of the first group}.

    Raises:
        FloatingPointError when the loss becomes NaN/inf or diverges (see `diverge_factor`):
        names the step and the value and suggests a lower lr or regularization strength;
        checked every `sync_every` steps, before `on_epoch` and at the end.
        ValueError on epochs / lr / sync_every / diverge_factor out of range, an empty loader,
        or a pass over `batches` that yields nothing (an exhausted one-shot iterator).
        TypeError when `batches` has no ``len()``.
    """
    from tqdm.auto import tqdm
    if not math.isfinite(epochs) or epochs <= 0:
        raise ValueError(f"fit(): epochs must be a finite number > 0, got {epochs}")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"fit(): lr must be a finite number >= 0, got {lr}")
    if sync_every < 1:
        raise ValueError(f"fit(): sync_every must be an integer >= 1, got {sync_every}")
    if diverge_factor is not None and not diverge_factor > 1:
        raise ValueError(f"fit(): diverge_factor must be > 1 (or None to turn the check off), "
                         f"got {diverge_factor}")
    try:
        steps_per_epoch = len(batches)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"fit() needs a re-iterable loader with len() (a list of (x, y) "
                        f"batches, a DataLoader, prunelib.data.Batches), got "
                        f"{type(batches).__name__}; a generator can be iterated only once"
                        ) from None
    if steps_per_epoch == 0:
        raise ValueError("fit() got an empty loader (len(batches) == 0)")
    total = math.ceil(epochs * steps_per_epoch)
    if max_steps is not None:
        total = min(total, max_steps)
    dev, cl = _prepare(model, device)
    if distill_from is not None:
        _prepare(distill_from, dev)
        distill_from.eval()

    groups = (hooks.param_groups(model, lr, weight_decay) if hooks is not None
              else [{"params": [p for p in model.parameters() if p.requires_grad],
                     "lr": lr, "weight_decay": weight_decay}])
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                          nesterov=nesterov and momentum > 0)
    warm = round(warmup * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, schedule, milestones, gamma, warm))

    losses = torch.zeros(max(total, 1), device=dev)
    checked, ref, classes = 0, None, 2

    def check(upto: int) -> None:
        """Read back the losses of steps [checked, upto) (one sync); raise if they diverged."""
        nonlocal checked, ref
        if upto <= checked:
            return
        window = losses[checked:upto].cpu()
        bad = ~torch.isfinite(window)
        if bad.any():
            step = checked + int(bad.nonzero()[0, 0])
            raise FloatingPointError(
                f"loss became {losses[step].item()} at step {step} (epoch "
                f"{step / steps_per_epoch:.2f}); lower the learning rate (lr={lr}) or the "
                f"regularization strength")
        if diverge_factor is not None:
            if ref is None:
                ref = max(float(window.mean()), math.log(max(classes, 2)), 1.0)
            over = window > diverge_factor * ref
            if over.any():
                step = checked + int(over.nonzero()[0, 0])
                raise FloatingPointError(
                    f"loss diverged at step {step} (epoch {step / steps_per_epoch:.2f}): "
                    f"{losses[step].item():.4g} is more than {diverge_factor:g}x the reference "
                    f"{ref:.4g} (the first steps' mean loss, at least ln(classes) and 1); lower "
                    f"the learning rate (lr={lr}) or the regularization strength")
        checked = upto

    was_training = model.training
    model.train()
    step, images, epoch, t0 = 0, 0, 0, time.perf_counter()
    bar = tqdm(total=total, disable=quiet, desc="fit", leave=False)
    try:
        while step < total:
            seen = 0
            for x, y in batches:
                if step >= total:
                    break
                seen += 1
                x, y = _to(x, dev, cl), y.to(dev, non_blocking=True)
                out = model(x)
                classes = out.shape[-1]
                loss = F.cross_entropy(out, y)
                if distill_from is not None:
                    with torch.no_grad():
                        t_out = distill_from(x)
                    kd = F.kl_div(F.log_softmax(out / distill_T, 1),
                                  F.log_softmax(t_out / distill_T, 1),
                                  reduction="batchmean", log_target=True)
                    loss = distill_alpha * distill_T ** 2 * kd + (1 - distill_alpha) * loss
                if hooks is not None:
                    term = hooks.loss_term(model)
                    if term is not None:
                        loss = loss + term
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if hooks is not None:
                    hooks.after_backward(model)
                opt.step()
                if hooks is not None:
                    hooks.after_step(model)
                sched.step()
                losses[step] = loss.detach()
                step += 1
                images += len(y)
                if step % sync_every == 0 or step == total:
                    check(step)
                    bar.update(step - bar.n)
                    if not quiet:
                        recent = float(losses[max(step - sync_every, 0):step].mean())
                        bar.set_postfix(loss=f"{recent:.3f}",
                                        lr=f"{opt.param_groups[0]['lr']:.4f}")
            else:                                   # a complete pass over the loader
                if seen == 0:
                    raise ValueError(
                        f"fit(): pass {epoch + 1} over `batches` yielded no batches although "
                        f"len(batches) = {steps_per_epoch}: it looks like a one-shot iterator or "
                        f"generator that is exhausted; pass a re-iterable loader (a list, a "
                        f"DataLoader, prunelib.data.Batches)")
                epoch += 1
                if on_epoch is not None:
                    check(step)
                    on_epoch(epoch, float(losses[step - steps_per_epoch:step].mean()))
                    model.train()
        check(step)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - t0
    per_epoch = [float(losses[i:min(i + steps_per_epoch, step)].mean())
                 for i in range(0, step, steps_per_epoch)]
    return {"loss": per_epoch, "steps": step, "seconds": seconds, "images": images,
            "images_per_s": images / max(seconds, 1e-9), "lr": opt.param_groups[0]["lr"]}


def _plain(obj: Any, key: str = "meta") -> Any:
    """Check that `obj` is made of plain Python values (weights_only-loadable); paths -> str."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None:
        return obj
    for t in (bool, int, float, str):               # exact types: str/int subclasses such as
        if isinstance(obj, t):                      # torch.__version__ would not unpickle
            return t(obj)
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, key) for v in obj)
    if isinstance(obj, dict):
        return {k: _plain(v, f"{key}[{k!r}]") for k, v in obj.items()}
    raise TypeError(f"checkpoint {key} must hold plain Python values (None, bool, int, float, "
                    f"str, list, tuple, dict), got {type(obj).__name__}")


class CheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be used: unreadable or truncated, not written by
    `save_checkpoint`, or not matching the model it is loaded into."""


def save_checkpoint(model: nn.Module, path: str | os.PathLike, /, **meta: Any) -> None:
    """Save ``{'state_dict': ..., 'meta': meta}`` to `path` atomically (parent folders created;
    an interrupted save leaves the previous file, or none).

    Tensors are stored contiguous on CPU; `meta` must be plain Python so that the file loads
    with ``torch.load(path, weights_only=True)``.
    """
    meta = _plain(meta)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": sd, "meta": meta}, path)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict:
    """Load weights saved by `save_checkpoint` into `model` (in place); return the meta dict.

    Reads with ``torch.load(weights_only=True)``: no code in the file is run. Every error names
    `path`: FileNotFoundError when it does not exist; `CheckpointError` when it cannot be read
    (truncated, corrupt), is not a prunelib checkpoint, or its state_dict does not match `model`
    (then `model` may be partly overwritten: build a fresh one before trying another file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist"
                                + (" (it is a directory)" if path.is_dir() else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # truncated zip, garbage, refused pickle: each fails differently
        raise CheckpointError(f"{path}: not a readable checkpoint, maybe truncated or corrupt "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
                              f" delete it or save it again") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a prunelib checkpoint (expected a dict with a "
                              f"'state_dict' dict, as save_checkpoint writes)")
    try:
        model.load_state_dict(ckpt["state_dict"], strict=strict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())                   # torch lists every key: cut it
        detail = detail if len(detail) <= 400 else detail[:400] + " ..."
        raise CheckpointError(f"{path} does not match the {type(model).__name__} it is loaded "
                              f"into (another architecture or width?): {detail}") from e
    return dict(ckpt.get("meta") or {})
