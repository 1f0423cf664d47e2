"""Benchmarks: speed and cost measured in one run, printed as a table (`prunelib bench`).

Every ratio is against a baseline measured in the same run on the same device:
  train      images/s of `train.fit` vs a minimal hand-written SGD loop (same model, data,
             optimizer settings, channels_last); target >= 0.9x
  data       images/s of the batched augmentation pipeline (`data.Batches`)
  graph      seconds of `channel_groups` and `remove_channels` on torchvision's resnet50
  latency    dense vs pruned ResNet-56 and ResNet-20 at 50% MACs (L1 scores, internal
             groups), plain and with counts rounded to multiples of 8, eager and exported
             (`export.for_inference`, the recommended inference path), batch 1 and 64, next to
             the MACs ratio, median [min, max] over interleaved rounds; target at batch 64:
             exported pruned vs exported dense >= 0.8 x MACs ratio
  profile    (python -m prunelib.bench --section profile) per-layer and per-op times of dense
             vs pruned ResNet-56 (`measure.profile_layers`)
  overhead   per-step cost of each registered method's hooks on ResNet-56 relative to a plain
             step (and, for ResRep and SCOP, to the paper's own forward built as modules),
             median and spread over interleaved rounds; target <= 2% (`prunelib.hookcost`)
"""
from __future__ import annotations

import copy
import os
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
from .hookcost import bench_overhead, overhead_rows, random_images
from .hookcost import timed as _timed
from .export import for_inference
from .hookcost import quantiles
from .measure import count, latency, profile_layers, profile_table
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
    x, y = random_images(bs * steps)
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
    x, y = random_images(n)
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


VARIANTS = ("dense", "dense export", "pruned", "pruned export", "rounded", "rounded export")


def latency_models(name: str, device: torch.device, target: float = 0.5, multiple: int = 8,
                   jit: bool = False) -> dict[str, tuple[nn.Module, float]]:
    """The models the latency section times, variant -> (model, dense MACs / its MACs).

    dense: `name` (random weights, eval); pruned: L1 scores at Budget(macs=target), internal
    groups; rounded: the same with multiple=`multiple`; '... export': `for_inference` of it
    (BN folded, in place, channels_last), '... jit' (with `jit`) its 'jit' backend.
    """
    torch.manual_seed(0)
    dense = get_model(name).to(device).eval()
    x = torch.randn(1, 3, 32, 32, device=device)
    base = {"dense": dense}
    for tag, mult in (("pruned", None), ("rounded", multiple)):
        m = methods.get("l1")
        m.ctx = Context(example_inputs=x, device=device)
        m.attach(dense, channel_groups(dense, x))
        base[tag] = m.finish(dense, Budget(macs=target, multiple=mult)).eval()
    out = {}
    for tag, model in base.items():
        ratio = count(dense, x)[0] / count(model, x)[0]
        out[tag] = (model, ratio)
        out[tag + " export"] = (for_inference(model, x), ratio)
        if jit:
            out[tag + " jit"] = (for_inference(model, x, backend="jit"), ratio)
    return out


def bench_latency(device: torch.device, reps: int = 10, rounds: int = 5,
                  models: tuple[str, ...] = ("resnet56", "resnet20"),
                  batches: tuple[int, ...] = (1, 64), target: float = 0.5, multiple: int = 8,
                  jit: bool = False, clock: Callable[[], float] = time.perf_counter
                  ) -> list[dict]:
    """Dense vs pruned forward latency, eager and exported, next to the MACs ratios.

    Per model and batch size, every variant of `latency_models` is timed by `measure.latency`
    (median of `reps` passes after one warm-up, channels_last input, by `clock`: wall time, or
    `time.process_time` for one thread on a shared CPU) once per round, for
    `rounds` interleaved rounds (the variants' order rotates each round, so load that comes and
    goes hits all alike). Per round, speedup = dense ms / variant ms, against the eager dense
    model ('vs_dense') and against the dense model run the same way ('same_path': export vs
    dense export, jit vs dense jit). Rows: {'model', 'batch', 'variant', 'ms' (median over the
    rounds), 'macs_ratio', 'vs_dense', 'same_path'} with the speedups as quantiles
    ({'median', 'q1', 'q3', 'min', 'max'}).
    """
    rows = []
    for name in models:
        variants = latency_models(name, device, target, multiple, jit)
        names = list(variants)
        for b in batches:
            xb = torch.randn(b, 3, 32, 32, device=device)
            ms: dict[str, list[float]] = {v: [] for v in names}
            for r in range(rounds):
                for v in names[r % len(names):] + names[:r % len(names)]:
                    ms[v].append(latency(variants[v][0], xb, reps=reps, warmup=1,
                                         clock=clock))
            for v in names:
                ref = "dense" + v[len(v.split(" ")[0]):]           # same path's dense model
                rows.append({"model": name, "batch": b, "variant": v,
                             "ms": float(np.median(ms[v])), "macs_ratio": variants[v][1],
                             "vs_dense": quantiles([d / t for d, t in zip(ms["dense"], ms[v])]),
                             "same_path": quantiles([d / t for d, t in zip(ms[ref], ms[v])]),
                             "rounds": rounds})
    return rows


def latency_rows(rows: list[dict], target: float = 0.8) -> list[str]:
    """Table lines of `bench_latency`: ms, MACs ratio and both speedups as median [min, max];
    the exported pruned model at the largest batch carries the target (>= `target` x MACs
    ratio against the dense model run the same way)."""
    def q(v: dict) -> str:
        return f"{v['median']:5.2f} [{v['min']:4.2f}, {v['max']:4.2f}]"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out = [f"# latency: median ms of each variant, speedups median [min, max] over "
           f"{rows[0]['rounds'] if rows else 0} interleaved rounds; load (1, 5, 15 min) {load}",
           f"{'model':9s} {'batch':>5s} {'variant':15s} {'ms':>8s} {'MACs ratio':>10s} "
           f"{'speedup vs dense':>18s} {'vs dense, same path':>20s}  target"]
    big = max((r["batch"] for r in rows), default=0)
    for r in rows:
        aim = (f">= {target * r['macs_ratio']:.2f}" if r["variant"] == "pruned export"
               and r["batch"] == big else "")
        out.append(f"{r['model']:9s} {r['batch']:5d} {r['variant']:15s} {r['ms']:8.2f} "
                   f"{r['macs_ratio']:10.2f} {q(r['vs_dense']):>18s} {q(r['same_path']):>20s}"
                   f"  {aim}")
    return out


def profile_rows(device: torch.device, name: str = "resnet56", batch: int = 64,
                 reps: int = 3, rounds: int = 3, top: int = 12) -> list[str]:
    """Where the time goes: `measure.profile_layers` tables (by layer, by op) of the dense vs
    the L1-pruned model (50% MACs), eager and exported."""
    v = latency_models(name, device)
    xb = torch.randn(batch, 3, 32, 32, device=device)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    out = []
    for path in ("", " export"):
        layers, ops = profile_layers(v["dense" + path][0], v["pruned" + path][0], xb, reps=reps,
                                     rounds=rounds)
        out.append(f"# profile {name} batch {batch}, dense vs pruned{path or ' (eager)'}, "
                   f"{torch.get_num_threads()} threads, load {load}")
        out += profile_table(layers, top) + profile_table(ops, top)
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
    for row in latency_rows(res["latency"]):
        out(row)
    ov = bench_overhead(device, max(2, steps // 5))
    res["overhead"] = ov
    out(f"# hook overhead on {device}, {torch.get_num_threads()} threads, resnet56 batch 64, "
        f"{'process CPU time' if device.type == 'cpu' else 'wall time'}")
    for row in overhead_rows(ov):
        out(row)
    return res


def main(argv: list[str] | None = None) -> None:
    """`python -m prunelib.bench [--section overhead|latency|profile] [options]`: one section
    of the table (default: the hook overhead; the full table: `prunelib bench`).

    Latency alone, as the README reports it (about 2 minutes on an idle 2-core CPU):
    `python -m prunelib.bench --section latency`."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m prunelib.bench", description=main.__doc__)
    p.add_argument("--section", choices=("overhead", "latency", "profile"), default="overhead")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=4, help="overhead: steps per round")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (default: overhead 9, latency 5, profile 3)")
    p.add_argument("--methods", default=None, help="overhead: comma-separated names (all)")
    p.add_argument("--reps", type=int, default=10, help="latency: timed passes per round")
    p.add_argument("--models", default="resnet56,resnet20", help="latency: comma-separated")
    p.add_argument("--batches", default="1,64", help="latency: comma-separated batch sizes")
    p.add_argument("--multiple", type=int, default=8, help="latency: rounded variants' multiple")
    p.add_argument("--jit", action="store_true", help="latency: add the 'jit' backend")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="latency: wall time, or process CPU time (one thread, shared CPU)")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"# prunelib bench --section {a.section} on {device} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    if a.section == "latency":
        rows = bench_latency(device, a.reps, a.rounds or 5, tuple(a.models.split(",")),
                             tuple(int(b) for b in a.batches.split(",")),
                             multiple=a.multiple, jit=a.jit,
                             clock=time.process_time if a.clock == "cpu" else time.perf_counter)
        print(f"# clock: {'process CPU time' if a.clock == 'cpu' else 'wall time'}")
        print("\n".join(latency_rows(rows)))
        return
    if a.section == "profile":
        print("\n".join(profile_rows(device, rounds=a.rounds or 3)))
        return
    ov = bench_overhead(device, a.steps, rounds=a.rounds or 9,
                        names=a.methods.split(",") if a.methods else None)
    print(f"# hook overhead on {device} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), resnet56 batch 64, "
          f"{'process CPU time' if device.type == 'cpu' else 'wall time'}")
    for row in overhead_rows(ov):
        print(row)


if __name__ == "__main__":
    main()
