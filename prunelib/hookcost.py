"""What a method's hooks cost per training step (`prunelib bench`, `python -m prunelib.bench`).

Every ratio is against steps measured in the same run, alternated step by step:

  plain      the dense model, plain SGD: what the step costs without the method;
  hooked     the same model with the method attached (`attach`, `param_groups`, `loss_term`,
             `after_backward`, `after_step`), the sparse phase's step of `train.fit`;
  reference  for the methods whose paper changes the forward pass itself, that forward built
             the paper's way, as modules (no hooks): ResRep's compactor, a 1x1 conv after the
             BN of every pruned conv (+5.7% of ResNet-56's MACs, memory-bound on the CPU);
             SCOP's Kf_Conv2d, a conv that mixes the knockoff half of a [x; x~] batch into the
             real half (the whole step on twice the images). The arithmetic the paper
             prescribes, so `hooked / reference - 1` is what prunelib's hook implementation adds.

overhead = t_hooked / t_plain - 1 (the method's whole per-step cost); for ResRep and SCOP also
vs_reference = t_hooked / t_reference - 1. The target (<= 2%) is for the hooks: overhead where
the forward is unchanged, vs_reference where the paper changes it. GAL's and BAR's own loops
also run the dense teacher's forward (and GAL's discriminator), which their papers prescribe
and which is not a hook: they are timed here through their hooks only.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import methods
from .data import Batches
from .graph import channel_groups
from .methods.base import Context, Method
from .models import get_model


def random_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 CIFAR-shaped images (n, 32, 32, 3) and labels: timing needs no data."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64))


def timed(fn: Callable[[], Any], device: torch.device,
          clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds `fn()` takes by `clock`, with CUDA synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - t


def quantiles(v: list[float]) -> dict[str, float]:
    """min, q1, median, q3, max of `v`."""
    q = np.quantile(np.asarray(v, dtype=float), [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "q1", "median", "q3", "max"), map(float, q)))


def _set(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, mod)


class _Compacted(nn.Sequential):
    """ResRep as its paper builds it: BN followed by a 1x1 conv compactor (identity init)."""

    def __init__(self, bn: nn.Module, d: int) -> None:
        q = nn.Conv2d(d, d, 1, bias=False)
        with torch.no_grad():
            q.weight.copy_(torch.eye(d).view(d, d, 1, 1))
        super().__init__(bn, q)


class _KfConv(nn.Module):
    """SCOP's Kf_Conv2d: the conv's output on a [real; knockoff] batch, the real half mixed
    lambda A + (1 - lambda) A~ per filter, the knockoff half unchanged."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.lam = nn.Parameter(torch.full((conv.out_channels, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        real, kf = a[:len(a) // 2], a[len(a) // 2:]
        return torch.cat([kf + self.lam * (real - kf), kf])


def reference(m: Method, base: nn.Module) -> tuple[nn.Module, Callable | None] | None:
    """The paper's own forward for an attached `m` whose paper changes it (ResRep, SCOP):
    (model, make_input(x) -> input batch), or None for the other methods."""
    if m.name == "resrep":
        ref = copy.deepcopy(base)
        for g, _, bn in m.comp:
            _set(ref, bn, _Compacted(ref.get_submodule(bn), g.size))
        return ref, None
    if m.name == "scop":
        ref = copy.deepcopy(base).requires_grad_(False)
        for name in m.mixed_convs():
            _set(ref, name, _KfConv(ref.get_submodule(name)))
        return ref, lambda x: torch.cat([x, m.knockoffs(x)])
    return None


def bench_overhead(device: torch.device, steps: int, bs: int = 64, rounds: int = 9,
                   model_name: str = "resnet56", names: list[str] | None = None
                   ) -> dict[str, Any]:
    """Per-step cost of each method's hooks (module docstring), sparse-phase steps.

    Per method, the plain, hooked (and reference) copies of the model take one warm-up step
    each, then `rounds` rounds of `steps` steps each, alternated step by step (the order
    rotates from round to round), so that load on a shared machine hits all alike. A round's
    overhead is o_r = sum(t_hooked) / sum(t_plain) - 1 over its steps; the result per method
    is the median of o_r with its quartiles and min / max over the rounds (name ->
    {'median', 'q1', 'q3', 'min', 'max', 'rounds'[, 'vs_reference': the same for
    t_hooked / t_reference - 1]}), or 'n/a (error)' if a method failed. `plain_ms` is the
    median plain step. The clock is the process's CPU time on CPU (`time.process_time`: time
    that other jobs take from a shared machine's cores does not count) and wall time with
    synchronization on CUDA. Every optimizer is SGD (momentum 0.9, weight decay 5e-4); a
    method's own `param_groups` are part of its cost. OTO is timed in its HSPG (half-space)
    stage, annealing methods anneal over the timed steps, SCOP samples its knockoffs from a
    generator fitted on the bench's batches.
    """
    x, y = random_images(bs * 4)
    batches = Batches(x, y, bs, shuffle=False, augment=False, device=device)
    data = list(batches)
    ex = data[0][0][:1]
    out: dict[str, Any] = {}
    clock = time.process_time if device.type == "cpu" else time.perf_counter

    def stepper(model: nn.Module, hooks: Any = None,
                make_input: Callable | None = None) -> Callable[[], float]:
        params = (hooks.param_groups(model, 0.01, 5e-4) if hooks else
                  [p for p in model.parameters() if p.requires_grad])
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        state = [0]

        def step() -> None:
            xb, yb = data[state[0] % len(data)]
            state[0] += 1
            out_ = model(make_input(xb) if make_input else xb)[:len(xb)]
            loss = F.cross_entropy(out_, yb)
            t = hooks.loss_term(model) if hooks else None
            if t is not None:
                loss = loss + t
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hooks:
                hooks.after_backward(model)
            opt.step()
            if hooks:
                hooks.after_step(model)
        return lambda: timed(step, device, clock)

    base = get_model(model_name).to(device).to(memory_format=torch.channels_last).train()
    plain = stepper(copy.deepcopy(base))
    plain_times: list[float] = []
    for name in names if names is not None else methods.names():
        model = copy.deepcopy(base)
        try:
            m = methods.get(name)
            if "anneal_steps" in type(m).HPARAMS:     # annealed over the timed steps
                m = methods.get(name, anneal_steps=1 + rounds * steps)
            m.ctx = Context(example_inputs=ex, train_loader=batches, calib_loader=batches,
                            device=device, quiet=True, epochs=1.0)
            model = m.attach(model, channel_groups(model, ex)).to(device)
            if hasattr(m, "total_steps"):     # OTO: phase length known, time its HSPG stage
                m.total_steps = 1
            if hasattr(m, "fit_generator"):   # SCOP: knockoffs need a generator
                m.fit_generator(batches)
            runs = {"plain": plain, "hooked": stepper(model, m)}
            ref = reference(m, base)
            if ref is not None:
                runs["reference"] = stepper(ref[0].to(device), make_input=ref[1])
            for run in runs.values():                                   # warm-up
                run()
            order, ratios, vs_ref = list(runs), [], []
            for r in range(rounds):
                t = dict.fromkeys(runs, 0.0)
                for _ in range(steps):
                    for k in order[r % len(order):] + order[:r % len(order)]:
                        t[k] += runs[k]()
                plain_times.append(t["plain"] / steps)
                ratios.append(t["hooked"] / t["plain"] - 1)
                if "reference" in t:
                    vs_ref.append(t["hooked"] / t["reference"] - 1)
            out[name] = {**quantiles(ratios), "rounds": rounds}
            if vs_ref:
                out[name]["vs_reference"] = quantiles(vs_ref)
        except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
            out[name] = f"n/a ({type(e).__name__}: {e})"[:70]
    out["plain_ms"] = 1000 * float(np.median(plain_times)) if plain_times else math.nan
    return out


def overhead_rows(ov: dict[str, Any], target: float = 0.02) -> list[str]:
    """Table lines of `bench_overhead`'s result: median [q1, q3] (min .. max) per method, and
    for ResRep and SCOP a second line against the paper's own forward."""
    rows = [f"{'plain step (ms), median':26s} {ov['plain_ms']:8.1f}",
            f"{'hook overhead':26s} {'median':>8s} {'[q1, q3]':>16s} {'(min .. max)':>18s}"
            f"  rounds  target"]

    def line(label: str, v: dict, rounds: int) -> str:
        p = {k: 100 * v[k] for k in ("median", "q1", "q3", "min", "max")}
        return (f"{label:26s} {p['median']:7.2f}% [{p['q1']:6.2f}, {p['q3']:6.2f}] "
                f"({p['min']:6.2f} .. {p['max']:6.2f})  {rounds:6d}  ")
    for name, v in ov.items():
        if name == "plain_ms":
            continue
        if not isinstance(v, dict):
            rows.append(f"{'  ' + name:26s} {v}")
            continue
        ref = v.get("vs_reference")
        rows.append(line("  " + name, v, v["rounds"])
                    + ("(whole step; the paper's forward below)" if ref
                       else f"<= {100 * target:g}%"))
        if ref:
            rows.append(line("    vs the paper's forward", ref, v["rounds"])
                        + f"<= {100 * target:g}%")
    return rows
