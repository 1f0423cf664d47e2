"""Benchmarks: speed and cost measured in one run, printed as a table (`prunelib bench`).

Every ratio is against a baseline measured in the same run on the same device:
  train      images/s of `train.fit` vs a minimal hand-written SGD loop (same model, data,
             optimizer settings, channels_last); target >= 0.9x
  data       images/s of the batched augmentation pipeline (`data.Batches`)
  graph      seconds of `channel_groups` and `remove_channels` on torchvision's resnet50
  latency    dense vs pruned ResNet-56 at 50% MACs (L1 scores, internal groups), batch 1 and
             64, next to the MACs ratio; target at batch 64: speedup >= 0.8 x MACs ratio
  overhead   per-step cost of each registered method's hooks on ResNet-56 relative to a plain
             step (and, for ResRep and SCOP, to the paper's own forward built as modules),
             median and spread over interleaved rounds; target <= 2% (`prunelib.hookcost`)
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from . import methods
from .data import Batches
from .graph import channel_groups
from .hookcost import _images, bench_overhead, overhead_rows
from .hookcost import timed as _timed
from .measure import count, latency
from .methods.base import Context
from .models import get_model
from .select import Budget
from .surgery import remove_channels
from .train import fit


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
