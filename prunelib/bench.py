"""Benchmarks: speed and cost measured in one run, printed as a table (`prunelib bench`).

Every ratio is against a baseline measured in the same run on the same device:
  train      images/s of `train.fit` vs a minimal hand-written SGD loop (same model, data,
             optimizer settings, channels_last); target >= 0.9x
  data       images/s of the batched augmentation pipeline (`data.Batches`)
  graph      seconds of `channel_groups` and `remove_channels` on torchvision's resnet50
  latency    dense vs pruned ResNet-56 at 50% MACs (L1 scores, internal groups), batch 1 and
             64, next to the MACs ratio; target at batch 64: speedup >= 0.8 x MACs ratio
  overhead   per-step cost of each registered method's hooks on ResNet-56 relative to a plain
             step, median and spread over interleaved rounds; target <= 2%
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from . import methods
from .data import Batches
from .graph import channel_groups
from .measure import count, latency
from .methods.base import Context
from .models import get_model
from .select import Budget
from .surgery import remove_channels
from .train import fit


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64))


def _timed(fn: Callable[[], Any], device: torch.device,
           clock: Callable[[], float] = time.perf_counter) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - t


def hand_loop(model: nn.Module, batches: Batches, steps: int, lr: float = 0.05) -> None:
    """The minimal PyTorch training loop the library's `fit` is compared against."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    it = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(batches)
            x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def bench_train(name: str, device: torch.device, steps: int, bs: int = 128) -> dict:
    x, y = _images(bs * steps)
    batches = Batches(x, y, bs, shuffle=True, augment=True, device=device)
    model = get_model(name).to(device).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    hand_loop(copy.deepcopy(model), batches, 3)                      # warm-up
    t_hand = _timed(lambda: hand_loop(ref, batches, steps), device)
    fit(copy.deepcopy(model), batches, epochs=1, lr=0.05, quiet=True, max_steps=3)
    t_fit = _timed(lambda: fit(model, batches, epochs=1, lr=0.05, quiet=True,
                               max_steps=steps), device)
    return {"hand": bs * steps / t_hand, "fit": bs * steps / t_fit}


def bench_data(device: torch.device, n: int = 20_000, bs: int = 128) -> float:
    x, y = _images(n)
    batches = Batches(x, y, bs, shuffle=True, augment=True, device=device)
    return n / _timed(lambda: [None for _ in batches], device)


def bench_graph() -> dict:
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    t = time.perf_counter()
    groups = channel_groups(model, x)
    t_groups = time.perf_counter() - t
    keep = {g.index: torch.arange(0, g.size, 2) for g in groups}
    t = time.perf_counter()
    remove_channels(model, groups, keep)
    return {"groups": t_groups, "remove": time.perf_counter() - t, "n": len(groups)}


def bench_latency(device: torch.device, reps: int, rounds: int = 3) -> list[dict]:
    model = get_model("resnet56").to(device).eval()
    x = torch.randn(1, 3, 32, 32, device=device)
    m = methods.get("l1")
    m.ctx = Context(example_inputs=x, device=device)
    m.attach(model, channel_groups(model, x))
    pruned = m.finish(model, Budget(macs=0.5))
    ratio = count(model, x)[0] / count(pruned, x)[0]
    rows = []
    for b in (1, 64):
        xb = torch.randn(b, 3, 32, 32, device=device)
        # interleaved rounds, best median of each: robust to load that comes and goes
        d, p = math.inf, math.inf
        for _ in range(rounds):
            d = min(d, latency(model, xb, reps=reps))
            p = min(p, latency(pruned, xb, reps=reps))
        rows.append({"batch": b, "dense_ms": d, "pruned_ms": p, "speedup": d / p,
                     "macs_ratio": ratio})
    return rows


def _quantiles(v: list[float]) -> dict[str, float]:
    q = np.quantile(np.asarray(v, dtype=float), [0.0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(("min", "q1", "median", "q3", "max"), map(float, q)))


def bench_overhead(device: torch.device, steps: int, bs: int = 64, rounds: int = 9,
                   model_name: str = "resnet56", names: list[str] | None = None
                   ) -> dict[str, Any]:
    """Per-step cost of each method's hooks relative to a plain step (sparse-phase steps).

    Per method, a plain copy and a hooked copy of the model take one warm-up step each, then
    `rounds` rounds of `steps` steps each, alternated step by step (plain first in even rounds,
    hooked first in odd ones), so that load on a shared machine hits both alike. A round's
    overhead is o_r = sum(t_hooked) / sum(t_plain) - 1 over its steps; the result per method
    is the median of o_r with its quartiles and min / max over the rounds (name ->
    {'median', 'q1', 'q3', 'min', 'max', 'rounds'}), or 'n/a (error)' if a method failed.
    `plain_ms` is the median plain step. The clock is the process's CPU time on CPU
    (`time.process_time`: time that other jobs take from a shared machine's cores does not
    count) and wall time with synchronization on CUDA. Both optimizers have the same settings
    (SGD, momentum 0.9, weight decay 5e-4); a method's own `param_groups` are part of its cost.
    OTO is timed in its HSPG (half-space) stage, annealing methods anneal over the timed steps.
    """
    x, y = _images(bs * 4)
    batches = Batches(x, y, bs, shuffle=False, augment=False, device=device)
    data = list(batches)
    ex = data[0][0][:1]
    out: dict[str, Any] = {}

    def stepper(model: nn.Module, hooks: Any) -> Callable[[], float]:
        opt = torch.optim.SGD(hooks.param_groups(model, 0.01, 5e-4) if hooks else
                              model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

        def step() -> None:
            xb, yb = data[state[0] % len(data)]
            state[0] += 1
            loss = F.cross_entropy(model(xb), yb)
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
        state = [0]
        return lambda: _timed(step, device, clock)

    # on CPU the process's CPU time: what other jobs take from the cores does not count
    clock = time.process_time if device.type == "cpu" else time.perf_counter

    base_model = get_model(model_name).to(device).to(memory_format=torch.channels_last)
    plain = stepper(copy.deepcopy(base_model), None)
    plain_times: list[float] = []
    for name in names if names is not None else methods.names():
        model = copy.deepcopy(base_model)
        try:
            m = methods.get(name)
            if "anneal_steps" in type(m).HPARAMS:     # annealed over the timed steps
                m = methods.get(name, anneal_steps=1 + rounds * steps)
            m.ctx = Context(example_inputs=ex, train_loader=batches, calib_loader=batches,
                            device=device, quiet=True, epochs=1.0)
            model = m.attach(model, channel_groups(model, ex)).to(device)
            if hasattr(m, "total_steps"):     # OTO: phase length known, time its HSPG stage
                m.total_steps = 1
            hooked = stepper(model, m)
            plain(), hooked()                                         # warm-up
            ratios = []
            for r in range(rounds):
                tp = th = 0.0
                for _ in range(steps):
                    if r % 2:
                        th += hooked()
                        tp += plain()
                    else:
                        tp += plain()
                        th += hooked()
                plain_times.append(tp / steps)
                ratios.append(th / tp - 1)
            out[name] = {**_quantiles(ratios), "rounds": rounds}
        except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
            out[name] = f"n/a ({type(e).__name__}: {e})"[:70]
    out["plain_ms"] = 1000 * float(np.median(plain_times)) if plain_times else math.nan
    return out


def overhead_rows(ov: dict[str, Any], target: float = 0.02) -> list[str]:
    """Table lines of `bench_overhead`'s result: median [q1, q3] (min .. max) per method."""
    rows = [f"{'plain step (ms), median':26s} {ov['plain_ms']:8.1f}",
            f"{'hook overhead':26s} {'median':>8s} {'[q1, q3]':>16s} {'(min .. max)':>18s}"
            f"  rounds  target"]
    for name, v in ov.items():
        if name == "plain_ms":
            continue
        if not isinstance(v, dict):
            rows.append(f"{'  ' + name:26s} {v}")
            continue
        p = {k: 100 * v[k] for k in ("median", "q1", "q3", "min", "max")}
        rows.append(f"{'  ' + name:26s} {p['median']:7.2f}% [{p['q1']:6.2f}, {p['q3']:6.2f}] "
                    f"({p['min']:6.2f} .. {p['max']:6.2f})  {v['rounds']:6d}  "
                    f"<= {100 * target:g}%")
    return rows


def run_bench(device: str | torch.device | None = None, steps: int = 20, reps: int = 20,
              out: Callable[[str], None] = print) -> dict:
    """Run every benchmark and print the table; returns the raw numbers."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    res: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                           "threads": torch.get_num_threads()}
    out(f"# prunelib bench on {device} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)")
    out(f"{'measure':44s} {'value':>12s} {'baseline':>12s} {'ratio':>7s}  target")
    for name in ("resnet20", "resnet56"):
        r = bench_train(name, device, steps)
        res[f"train_{name}"] = r
        out(f"{'train img/s ' + name + ' (fit vs hand loop)':44s} {r['fit']:12.0f} "
            f"{r['hand']:12.0f} {r['fit'] / r['hand']:7.2f}  >= 0.90")
    res["data_img_s"] = bench_data(device)
    out(f"{'data pipeline img/s (augment on)':44s} {res['data_img_s']:12.0f}")
    g = bench_graph()
    res["graph"] = g
    out(f"{'channel_groups resnet50 224px (s)':44s} {g['groups']:12.2f}   ({g['n']} groups)")
    out(f"{'remove_channels resnet50 half of all (s)':44s} {g['remove']:12.2f}")
    res["latency"] = bench_latency(device, reps)
    for r in res["latency"]:
        out(f"{'latency resnet56 @50% MACs, batch ' + str(r['batch']) + ' (ms)':44s} "
            f"{r['pruned_ms']:12.2f} {r['dense_ms']:12.2f} {r['speedup']:7.2f}  "
            f">= {0.8 * r['macs_ratio']:.2f} (0.8 x MACs ratio {r['macs_ratio']:.2f})")
    ov = bench_overhead(device, max(2, steps // 5))
    res["overhead"] = ov
    out(f"# hook overhead on {device}, {torch.get_num_threads()} threads, resnet56 batch 64, "
        f"{'process CPU time' if device.type == 'cpu' else 'wall time'}")
    for row in overhead_rows(ov):
        out(row)
    return res


def main(argv: list[str] | None = None) -> None:
    """`python -m prunelib.bench [--device D] [--steps N] [--rounds R] [--methods a,b]`: the
    hook-overhead table alone (the full table: `prunelib bench`)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m prunelib.bench", description=main.__doc__)
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=4, help="steps per round")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--methods", default=None, help="comma-separated names (default: all)")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ov = bench_overhead(device, a.steps, rounds=a.rounds,
                        names=a.methods.split(",") if a.methods else None)
    print(f"# hook overhead on {device} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), resnet56 batch 64, "
          f"{'process CPU time' if device.type == 'cpu' else 'wall time'}")
    for row in overhead_rows(ov):
        print(row)


if __name__ == "__main__":
    main()
