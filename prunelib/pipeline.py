"""One protocol for every method: dense baseline -> regularize -> remove -> fine-tune.

    data = load_data("quick")                                  # the scale's subsets and seed
    model, info = load_baseline("resnet20", data)              # committed / cached / trained
    pruned, result = run("ns", model, data, scale="quick")      # the scale's target: 50% MACs

The phases and what `result` records (also the JSON written by `prunelib run`):
  dense         accuracy, MACs, params of the baseline;
  regularized   accuracy at the end of the method's sparse phase (gates still attached);
  removed       accuracy right after the channels are physically removed (no training yet):
                a regularizer earns its name when this is close to `regularized`;
  recalibrated  the removed model after its BatchNorm statistics are re-estimated from
                `recal_batches` training batches (no gradient step): a large gain over `removed`
                means stale statistics, no gain and a low value a destroyed function;
  finetuned     accuracy after plain fine-tuning of the smaller model (started from the
                recalibrated one, after `calibrate.restore_bn_input_norms`, which scales conv
                rows a strong sparse phase shrank back to the dense layer's RMS norm: the same
                function, a sane effective learning rate).
plus `strength` (the rule that set the regularizer's strength, `prunelib.strength`), latency of
both models (median ms at batch 1 and 64, on the run's device), wall time of every phase, the
method's hyperparameters, the layer widths before and after, torch version and device.

Scales: every setting of the book's one protocol lives in `SCALES`, and every chapter reads it
from there (training subset, test subset, epochs of both phases, target, seed, recalibration
batches). 'quick' is minutes on a 2-core CPU (a 10k-image class-balanced training subset, 5k test
images, 2 + 2 epochs from the committed baseline; a model without a committed or cached baseline
gets a weak 15-epoch one on that subset, said in the log); 'full' is the papers' schedule for a GPU
(full training set and test set, 160 epochs of sparse training and 160 of fine-tuning, lr 0.1 with
steps at 50% / 75%, as NS's official code); 'bench' is the comparison's (`prunelib sweep`):
the full training and test sets, 3 + 3 epochs at lr 0.01 from the committed baseline, about
17 min of CPU per ResNet-20 run in one thread (see its entry). At every scale but 'full', a method
whose strength is still the paper's default gets it from the target-drift rule
(`prunelib.strength`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import methods as _methods
from .graph import channel_groups
from .export import for_inference
from .measure import count, latency
from .methods.base import Context, Method
from .select import Budget


@dataclass(frozen=True)
class Scale:
    """All settings of one scale. Epochs may be fractional."""
    name: str
    subset: int | None          # training images (None = all 50k minus holdout)
    holdout: int                # held-out training images (EagleEye / GBN calibration)
    batch_size: int
    reg_epochs: float           # sparse-training phase
    reg_lr: float
    ft_epochs: float            # fine-tuning phase
    ft_lr: float
    schedule: str               # 'cosine' or 'step' (x0.1 at 50% and 75%)
    weight_decay: float
    baseline_epochs: int        # dense training when no baseline checkpoint exists
    baseline_lr: float
    test_subset: int | None = None   # test images (None = all 10k)
    target_macs: float = 0.5         # the protocol's budget: fraction of dense MACs kept
    seed: int = 0                    # subsets, shuffling, augmentation, initial RNG state
    recal_batches: int = 20          # training batches for the BN-recalibrated accuracy
    strength_margin: float = 2.0     # target-drift rule (prunelib.strength): drift = margin * D
    strength_quantile: float = 0.9   # ... D = this quantile of the to-be-removed magnitudes
    restore_norms: bool = True       # calibrate.restore_bn_input_norms before fine-tuning

    def budget(self) -> Budget:
        """The protocol's budget: Budget(macs=target_macs)."""
        return Budget(macs=self.target_macs)


SCALES: dict[str, Scale] = {
    "quick": Scale("quick", subset=10_000, holdout=1_000, batch_size=128, reg_epochs=2,
                   reg_lr=0.02, ft_epochs=2, ft_lr=0.02, schedule="cosine", weight_decay=5e-4,
                   baseline_epochs=15, baseline_lr=0.1, test_subset=5_000),
    "full": Scale("full", subset=None, holdout=5_000, batch_size=64, reg_epochs=160,
                  reg_lr=0.1, ft_epochs=160, ft_lr=0.1, schedule="step", weight_decay=1e-4,
                  baseline_epochs=160, baseline_lr=0.1, recal_batches=100),
    # 'bench': the comparison of `prunelib sweep` (book chapter 5), sized for a 2-core CPU. All
    # 50k training images (49k trained on, 1k held out for EagleEye's / GBN's scoring), all 10k
    # test images, 3 epochs of sparse training and 3 of fine-tuning at lr 0.01, cosine, from the
    # committed 91.2% ResNet-20 (book/baselines): the reference schedule (5 + 5) shortened.
    # Cost of one ResNet-20 run, measured in CPU seconds with PRUNELIB_THREADS=1 on the shared
    # 2-core CPU: a training step of 128 images 0.40 s, a forward-only batch 0.13 s, so 3 + 3
    # epochs of 383 steps ~16 min, plus ~1 min for four 10k-image evaluations, BN recalibration
    # and latency: ~17 min of CPU per run. A sparse-phase step costs 1.0-1.15x a plain one for
    # most methods, 1.33x for BAR and GAL (teacher), 1.8x for SCOP (knockoffs); l1 has no sparse
    # phase (~8 min); EagleEye's search (100 candidates x 100 adaptive-BN batches) ~22 min (~30
    # min per run). With 2 idle threads an epoch is 55-80 s (book/baselines), ~0.4-0.5x these.
    "bench": Scale("bench", subset=None, holdout=1_000, batch_size=128, reg_epochs=3,
                   reg_lr=0.01, ft_epochs=3, ft_lr=0.01, schedule="cosine", weight_decay=5e-4,
                   baseline_epochs=40, baseline_lr=0.1, test_subset=None),
}


def get_scale(scale: str | Scale) -> Scale:
    if isinstance(scale, Scale):
        return scale
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    return SCALES[scale]


def load_data(scale: str | Scale = "quick", root: Any = None,
              device: str | torch.device = "cpu", download: bool = False, **overrides: Any):
    """CIFAR-10 with the scale's training subset, held-out images, test subset, batch size and
    seed (`overrides` replace scale fields, e.g. test_subset=2000)."""
    from .data import cifar10
    sc = get_scale(scale)
    if overrides:
        sc = Scale(**{**asdict(sc), **overrides})
    return cifar10(root, batch_size=sc.batch_size, subset=sc.subset, test_subset=sc.test_subset,
                   holdout=sc.holdout, device=device, seed=sc.seed, download=download)


def baseline_paths(model_name: str) -> list[Path]:
    """Where a dense CIFAR-10 baseline is looked for: the cache, then the book's committed one."""
    from .data import cache_dir
    fname = f"{model_name}_cifar10.pt"
    return [cache_dir() / "baselines" / fname,
            Path(__file__).resolve().parents[1] / "book" / "baselines" / fname]


def load_baseline(model_name: str, data: Any = None, device: str | torch.device = "cpu",
                  scale: str | Scale = "quick", quiet: bool = True,
                  train_if_missing: bool = True) -> tuple[nn.Module, dict]:
    """The dense baseline for `model_name`: loaded if cached or committed, else trained on
    `data.train` for `scale.baseline_epochs` and saved (atomically) to the cache. Returns
    (model, meta).

    A baseline file that exists but cannot be loaded (truncated, corrupt, another architecture:
    `train.CheckpointError`) is skipped with a warning that names it, why, and the file used
    instead (the next of `baseline_paths`, or the newly trained one, saved over the cached path).
    """
    import warnings

    from .models import get_model
    from .train import CheckpointError, fit, load_checkpoint, save_checkpoint
    paths = baseline_paths(model_name)
    unusable: list[str] = []
    for path in paths:
        if not path.is_file():
            continue
        model = get_model(model_name)           # fresh: a failed load may have set some weights
        try:
            meta = load_checkpoint(model, path)
        except CheckpointError as e:
            unusable.append(str(e))
            continue
        if unusable:
            warnings.warn(f"skipped unusable baseline(s): {'; '.join(unusable)}. Loaded {path} "
                          f"instead", stacklevel=2)
        return model.to(device), {**meta, "path": str(path)}
    if not train_if_missing or data is None:
        raise FileNotFoundError(
            f"no usable baseline for {model_name} in {', '.join(map(str, paths))}"
            f"{' (' + '; '.join(unusable) + ')' if unusable else ''}; train one with "
            f"`prunelib train --model {model_name} --out <one of these paths>`")
    if unusable:
        warnings.warn(f"skipped unusable baseline(s): {'; '.join(unusable)}. Training a new one, "
                      f"saved to {paths[0]}", stacklevel=2)
    model = get_model(model_name)
    sc = get_scale(scale)
    t0 = time.time()
    fit(model, data.train, epochs=sc.baseline_epochs, lr=sc.baseline_lr,
        weight_decay=sc.weight_decay, schedule="cosine", device=device, quiet=quiet)
    from .train import evaluate
    meta = {"model": model_name, "epochs": sc.baseline_epochs, "seconds": time.time() - t0,
            "accuracy": evaluate(model, data.test, device=device)}
    path = paths[0]
    save_checkpoint(model, path, **meta)        # atomic: never a half-written cached baseline
    return model, {**meta, "path": str(path)}


def make_method(method: str | Method, **hparams: Any) -> Method:
    return _methods.get(method, **hparams) if isinstance(method, str) else method


def run(method: str | Method, model: nn.Module, data: Any, budget: Budget | str | None = None,
        scale: str | Scale = "quick", device: str | torch.device | None = None,
        quiet: bool = True, seed: int | None = None, example_inputs: torch.Tensor | None = None,
        measure_latency: bool = True, dense_accuracy: float | None = None,
        strength: str | dict | None = "auto",
        on_sparse: Callable[[nn.Module, Method], None] | None = None,
        **overrides: Any) -> tuple[nn.Module, dict]:
    """Prune a copy of `model` with `method` under `budget`; return (pruned model, result).

    `budget` defaults to the scale's (`Scale.budget()`: 50% of the dense MACs); 'own' lets the
    method decide by its own rule (`finish(model, None)`: RSNLI's and OTO's exact zeros, PR's
    valley, ...), while the strength rule still sizes the penalty for the scale's budget.
    `seed` defaults to the scale's. `overrides` replace fields of the scale (e.g. reg_epochs=1,
    ft_lr=0.01). Methods that plan their sparse phase around the target (GBN's tick-tock, GREG's
    preset pruned set) read it from `method.ctx.extra['budget']`. `dense_accuracy`, when the
    caller already measured it on `data.test`, skips that evaluation.

    strength: 'auto' applies the target-drift rule (`prunelib.strength`) at every scale but
    'full', when the method has a rule and its strength parameters are at their defaults;
    'rule' applies it whatever the scale; 'method' (or None) keeps the method's values; a dict
    {param: value} sets them. `result['strength']` records what was used and why.
    `on_sparse(model, method)`, when given, is called at the end of the sparse phase, before
    removal (e.g. to keep a copy of the sparse model, or to look at its scores).
    `result['widths']` gives the output channels of every conv / linear layer of the pruned
    model, `result['dense_widths']` those of the baseline.
    """
    from . import strength as _strength
    from .calibrate import recalibrate_bn, restore_bn_input_norms
    from .train import evaluate, fit, seed_everything
    sc = get_scale(scale)
    if overrides:
        sc = Scale(**{**asdict(sc), **overrides})
    own = isinstance(budget, str)
    if own and budget != "own":
        raise ValueError(f"budget must be a Budget, None (the scale's) or 'own', got {budget!r}")
    budget = sc.budget() if budget is None or own else budget
    seed = sc.seed if seed is None else seed
    if strength not in ("auto", "rule", "method", None) and not isinstance(strength, dict):
        raise ValueError(f"strength must be 'auto', 'rule', 'method', None or a dict of "
                         f"hyperparameters, got {strength!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seed_everything(seed)
    m = make_method(method)
    x = example_inputs if example_inputs is not None else torch.randn(1, 3, 32, 32)
    x = x.to(device)
    dense = copy.deepcopy(model).to(device).eval()
    res: dict[str, Any] = {"method": m.name, "scale": sc.name, "seed": seed,
                           "target": {**asdict(budget), "own_rule": own},
                           "settings": asdict(sc),
                           "test_images": int(getattr(data.test, "num_images", 0)) or None,
                           "torch": torch.__version__, "device": str(device), "seconds": {}}
    macs0, params0 = count(dense, x)
    t = time.time()
    acc0 = (evaluate(dense, data.test, device=device) if dense_accuracy is None
            else float(dense_accuracy))
    res["seconds"]["evaluate"] = time.time() - t
    work = copy.deepcopy(dense)
    groups = channel_groups(work, x)
    m.ctx = Context(example_inputs=x, train_loader=data.train,
                    calib_loader=getattr(data, "calib", None), device=device,
                    epochs=sc.reg_epochs, lr=sc.reg_lr, weight_decay=sc.weight_decay,
                    schedule=sc.schedule, quiet=quiet, extra={"budget": budget})
    if isinstance(strength, dict):
        _strength.apply(m, {"params": strength})
        res["strength"] = {"rule": "given", "params": dict(strength)}
    elif (_strength.has_rule(m) and sc.reg_epochs > 0
          and (strength == "rule" or (strength == "auto" and sc.name != "full"
                                      and _strength.uses_defaults(m)))):
        rec = _strength.target_drift(m, work, groups, budget, m.ctx, sc.strength_quantile,
                                     sc.strength_margin)
        _strength.apply(m, rec)
        res["strength"] = rec
    else:
        why = ("no rule: the method plans its own phase" if not _strength.has_rule(m)
               else "the paper's values (full scale)" if sc.name == "full"
               else "set by the caller")
        res["strength"] = {"rule": "method", "why": why}
    t = time.time()
    work = m.attach(work, groups)
    work = m.regularize(work, m.ctx)
    res["seconds"]["regularize"] = time.time() - t
    acc_reg = evaluate(work, data.test, device=device)
    if on_sparse is not None:
        on_sparse(work, m)
    t = time.time()
    pruned = m.finish(work, None if own else budget)
    res["seconds"]["remove"] = time.time() - t
    acc_rm = evaluate(pruned, data.test, device=device)
    t = time.time()
    recalibrate_bn(pruned, data.train, sc.recal_batches)
    acc_cal = evaluate(pruned, data.test, device=device)
    res["seconds"]["recalibrate"] = time.time() - t
    res["rescaled_rows"] = (sum(restore_bn_input_norms(pruned, dense).values())
                            if sc.restore_norms else 0)
    t = time.time()
    if sc.ft_epochs > 0:
        fit(pruned, data.train, epochs=sc.ft_epochs, lr=sc.ft_lr,
            weight_decay=sc.weight_decay, schedule=sc.schedule, device=device, quiet=quiet)
    res["seconds"]["finetune"] = time.time() - t
    acc_ft = evaluate(pruned, data.test, device=device)
    macs1, params1 = count(pruned, x)
    res["dense"] = {"accuracy": acc0, "macs": macs0, "params": params0}
    res["pruned"] = {"accuracy": acc_ft, "macs": macs1, "params": params1,
                     "macs_ratio": macs1 / macs0, "params_ratio": params1 / params0}
    res["accuracy"] = {"dense": acc0, "regularized": acc_reg, "removed": acc_rm,
                       "recalibrated": acc_cal, "finetuned": acc_ft}
    res["hparams"] = m.hparams()
    res["dense_widths"], res["widths"] = widths(dense), widths(pruned)
    if measure_latency:
        res["latency"] = latency_table(dense, pruned, device)
    return pruned.eval(), res


def widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer, by module name."""
    return {n: int(mod.weight.shape[0]) for n, mod in model.named_modules()
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear))}


def latency_table(dense: nn.Module, pruned: nn.Module, device: str | torch.device,
                  batches: tuple[int, ...] = (1, 64), reps: int = 20) -> dict:
    """Median forward ms of both models at each batch size on `device`, each run by prunelib's
    recommended inference path (`export.for_inference`: BN folded, in place, channels_last)."""
    out: dict[str, Any] = {"device": str(device), "path": "export.for_inference"}
    x1 = torch.randn(1, 3, 32, 32, device=device)
    dense, pruned = (for_inference(m, x1, strict=False) for m in (dense, pruned))
    for b in batches:
        xb = torch.randn(b, 3, 32, 32, device=device)
        d, p = latency(dense, xb, reps=reps), latency(pruned, xb, reps=reps)
        out[f"batch{b}"] = {"dense_ms": d, "pruned_ms": p, "speedup": d / p}
    return out
