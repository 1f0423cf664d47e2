"""Benchmarks: speed and cost measured in one run, printed as a table (`prunelib bench`).

Every ratio is against a baseline measured in the same run on the same device:
  train      images/s of `train.fit` vs a minimal hand-written SGD loop (same model, data,
             optimizer settings, channels_last); target >= 0.9x
  data       images/s of the batched augmentation pipeline (`data.Batches`)
  graph      seconds of `channel_groups` and `remove_channels` on torchvision's resnet50
  latency    dense vs pruned ResNet-56 at 50% MACs (L1 scores, internal groups), batch 1 and
             64, next to the MACs ratio; target at batch 64: speedup >= 0.8 x MACs ratio
  overhead   per-step cost of each registered method's hooks on ResNet-56 relative to a plain
             step; target < 5%
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


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


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


def bench_overhead(device: torch.device, steps: int, bs: int = 64, rounds: int = 3,
                   model_name: str = "resnet56") -> dict[str, Any]:
    """Per-step time of each method's hooks relative to a plain step on ResNet-56 (sparse-phase
    steps; plain and hooked runs interleaved, the best of `rounds` each)."""
    x, y = _images(bs * 4)
    batches = Batches(x, y, bs, shuffle=False, augment=False, device=device)
    data = list(batches)
    ex = data[0][0][:1]
    out: dict[str, Any] = {}

    def steps_time(model: nn.Module, hooks: Any) -> float:
        opt = torch.optim.SGD(hooks.param_groups(model, 0.01, 5e-4) if hooks else
                              model.parameters(), lr=0.01, momentum=0.9)
        def run() -> None:
            for i in range(steps):
                xb, yb = data[i % len(data)]
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
        run()                                                         # warm-up
        return _timed(run, device)

    base_model = get_model(model_name).to(device).to(memory_format=torch.channels_last)
    plain_model = copy.deepcopy(base_model)
    plains = []
    for name in methods.names():
        m = methods.get(name)
        model = copy.deepcopy(base_model)
        m.ctx = Context(example_inputs=ex, train_loader=batches, calib_loader=batches,
                        device=device, quiet=True, epochs=1.0)
        try:
            model = m.attach(model, channel_groups(model, ex)).to(device)
            if hasattr(m, "total_steps"):     # OTO: phase length known, time its HSPG stage
                m.total_steps = 1
            # plain and hooked steps interleaved, best of `rounds` each
            t_plain, t_hook = math.inf, math.inf
            for _ in range(rounds):
                t_plain = min(t_plain, steps_time(plain_model, None))
                t_hook = min(t_hook, steps_time(model, m))
            plains.append(t_plain)
            out[name] = t_hook / t_plain - 1
        except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
            out[name] = f"n/a ({type(e).__name__}: {e})"[:70]
    out["plain_ms"] = 1000 * min(plains, default=math.nan) / steps
    return out


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
    ov = bench_overhead(device, max(5, steps // 2))
    res["overhead"] = ov
    out(f"{'plain resnet56 step, batch 64 (ms)':44s} {ov['plain_ms']:12.1f}")
    for name, v in ov.items():
        if name == "plain_ms":
            continue
        val = f"{100 * v:11.1f}%" if isinstance(v, float) else v
        out(f"{'  hook overhead ' + name:44s} {val:>12s}{'':21s}  < 5%")
    return res
