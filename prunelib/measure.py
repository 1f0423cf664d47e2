"""Cost of a model: MACs, parameters, measured latency.

Convention (one for every method and table in the book): MACs = multiply-accumulates of the
convolution and linear layers for ONE input sample (the batch of `example_inputs` is divided
out); FLOPs = 2 x MACs when a paper counts both the multiply and the add. BN, activations, pooling
and additions are not counted. Parameters = every element of `model.parameters()`.

`example_inputs` (here and in `channel_groups`) is a batch: a tensor or a tuple of model
arguments whose first tensor has the batch dimension first (batch size 1 is fine). An empty batch,
no tensor, or an unbatched sample (a 3-D image for a 2-D convolution) is a ValueError.

Latency = median wall time of `reps` timed forward passes after `warmup` untimed ones, in eval
mode under `torch.inference_mode`, with `torch.cuda.synchronize` around each pass on CUDA.
`profile_layers` splits a dense and a pruned model's time by layer and by op
(`torch.profiler`), to see where a pruned model's time goes.
"""
from __future__ import annotations

import math
import re
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
           nn.ConvTranspose3d, nn.Linear)


def example_tuple(example_inputs: Any, who: str) -> tuple:
    """`example_inputs` as a tuple of model arguments, checked: it must hold a tensor, and its
    first tensor must have a non-empty batch dimension. `who` names the caller in errors."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    first = next(iter(flat_tensors(inputs)), None)
    if first is None:
        raise ValueError(f"{who}: example_inputs holds no tensor (got "
                         f"{type(example_inputs).__name__}); give a batch of inputs, e.g. "
                         "torch.randn(1, 3, 32, 32)")
    if first.dim() == 0 or first.shape[0] == 0:
        raise ValueError(f"{who}: example_inputs is an empty batch (shape {tuple(first.shape)}); "
                         "give at least one sample, batch dimension first, e.g. "
                         "torch.randn(1, 3, 32, 32)")
    return inputs


def check_batched(name: str, mod: nn.Module, x: Any, who: str) -> None:
    """ValueError when a conv / linear layer receives an unbatched input (PyTorch accepts one,
    but then dim 0 is not the batch and channels and MACs are misread)."""
    if not isinstance(x, torch.Tensor):
        return
    if isinstance(mod, nn.modules.conv._ConvNd):
        want = len(mod.kernel_size) + 2
    elif isinstance(mod, nn.Linear):
        want = 2
    else:
        return
    if x.dim() < want:
        raise ValueError(
            f"{who}: layer '{name}' ({type(mod).__name__}) received an unbatched {x.dim()}-D "
            f"input of shape {tuple(x.shape)}; example_inputs must have a batch dimension "
            f"first (at least {want}-D here): for a single sample use x.unsqueeze(0)")


def flat_tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) tensor / list / tuple / dict, in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in flat_tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in flat_tensors(v)]
    return []


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, tuple[int, int, int, int]]:
    """Per conv/linear layer: (macs, a, d0, d1) with macs = a * d0 * d1 per sample.

    d0, d1 are the weight's first two dims and a = (output positions) * (kernel size) for
    convolutions, (rows of the input) for linear layers. `prunelib.select` uses this factored
    form to predict MACs after removing channels without running the model.
    """
    inputs = example_tuple(example_inputs, "count")
    batch = flat_tensors(inputs)[0].shape[0]
    out: dict[str, tuple[int, int, int, int]] = {}
    hooks = []

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple, y: torch.Tensor) -> None:
            check_batched(name, mod, args[0] if args else None, "count")
            w = mod.weight
            if isinstance(mod, nn.Linear):
                a = y.numel() // batch // w.shape[0]
            elif mod.transposed:                           # weight (in, out/g, k...)
                a = (args[0].numel() // batch // args[0].shape[1]) * w[0, 0].numel()
            else:                                          # weight (out, in/g, k...)
                a = (y.numel() // batch // y.shape[1]) * w[0, 0].numel()
            prev = out.get(name, (0, a, w.shape[0], w.shape[1]))
            out[name] = (prev[0] + a * w.shape[0] * w.shape[1], a, w.shape[0], w.shape[1])
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, _LAYERS):
            hooks.append(mod.register_forward_hook(hook(name)))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out


def count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(MACs per sample of conv + linear layers, number of parameters).

    `example_inputs` must be a non-empty batch (see the module docstring): ValueError otherwise.
    """
    macs = sum(v[0] for v in layer_macs(model, example_inputs).values())
    return int(macs), int(sum(p.numel() for p in model.parameters()))


def latency(model: nn.Module, example_inputs: Any, reps: int = 30, warmup: int = 5,
            device: str | torch.device | None = None, channels_last: bool = True,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Median milliseconds of one forward pass on `example_inputs` (eval, inference mode), of
    `model` as given (channels_last with `channels_last`). prunelib's recommended inference
    path times `export.for_inference(model, x)` instead (what `pipeline.latency_table` does).
    `clock`: wall time by default; `time.process_time` counts only this process's CPU time (on
    a shared CPU with one thread, what other jobs take from the core does not count)."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    first = next(iter(model.parameters()), None)          # a frozen TorchScript module has none
    device = torch.device(device) if device is not None else (
        first.device if first is not None else inputs[0].device)
    scripted = isinstance(model, torch.jit.ScriptModule)      # already placed and frozen
    model = model.eval() if scripted else model.to(device).eval()
    inputs = tuple(x.to(device) for x in inputs)
    if channels_last and inputs[0].dim() == 4:
        if not scripted:
            model = model.to(memory_format=torch.channels_last)
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
    cuda = device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = clock()
            model(*inputs)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(clock() - t0)
    return 1000.0 * statistics.median(times)


def _collapse(name: str) -> str:
    """'layer1.3.conv1' -> 'layer1.*.conv1': the same layer of every block of a stage."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def module_times(model: nn.Module, example_inputs: Any, reps: int = 5, warmup: int = 2,
                 channels_last: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """Per-forward milliseconds measured with `torch.profiler` (eval, inference mode).

    Returns (layers, ops). layers: for every leaf module its total time, for every other module
    the time of its own ops (the functional adds, ReLUs, slices of its forward, i.e. its total
    minus its submodules'), keyed by module name ('(model)' for the root). ops: self time per
    aten op ('aten::add', ...). Averages over `reps` profiled passes after `warmup`.
    """
    inputs = example_tuple(example_inputs, "module_times")
    model = model.eval()
    if channels_last and inputs[0].dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
    names = {mod: name or "(model)" for name, mod in model.named_modules()}  # first name
    open_: dict[str, list] = {}

    def pre(mod: nn.Module, args: tuple) -> None:
        rf = torch.profiler.record_function("mod::" + names[mod])
        rf.__enter__()
        open_.setdefault(names[mod], []).append(rf)

    def post(mod: nn.Module, args: tuple, out: Any) -> None:
        open_[names[mod]].pop().__exit__(None, None, None)

    hooks = [h for mod in names for h in (mod.register_forward_pre_hook(pre),
                                          mod.register_forward_hook(post))]
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(*inputs)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                for _ in range(reps):
                    model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    total: dict[str, float] = {}
    for e in p.events():
        if e.name.startswith("mod::"):
            total[e.name[5:]] = total.get(e.name[5:], 0.0) + e.cpu_time_total / 1000 / reps
    layers = dict(total)             # own time: minus the nearest timed submodules' totals
    for name, t in total.items():
        if name != "(model)":
            parent = name
            while parent:
                parent = parent.rpartition(".")[0]
                if (parent or "(model)") in total:
                    layers[parent or "(model)"] -= t
                    break
    ops = {a.key: a.self_cpu_time_total / 1000 / reps for a in p.key_averages()
           if not a.key.startswith("mod::")}
    return {k: v for k, v in layers.items() if v > 0}, ops


def profile_layers(dense: nn.Module, pruned: nn.Module, example_inputs: Any, reps: int = 5,
                   rounds: int = 3, collapse: bool = True) -> tuple[list[dict], list[dict]]:
    """Where a pruned model's time goes: per-layer and per-op milliseconds of `dense` and
    `pruned` from `module_times`, side by side.

    The two models are profiled alternately for `rounds` rounds (load on a shared machine hits
    both alike); each entry is the median over the rounds. Returns (layers, ops). layers: one
    row per module name (with `collapse`, the same layer of every block of a stage together:
    'layer1.*.conv1'; 'name (own)' is a module's own functional ops), {'layer', 'dense_ms',
    'pruned_ms', 'speedup' (dense / pruned), 'macs_ratio' (dense / pruned conv + linear MACs of
    those layers, nan where none)}. ops: the same per aten op. Rows sorted by dense time,
    largest first; the models are matched by module name (as `remove_channels` and
    `export.for_inference` keep them).
    """
    key = _collapse if collapse else (lambda n: n)
    runs: dict[str, dict[str, list[dict[str, float]]]] = {"layer": {}, "op": {}}
    macs: dict[str, dict[str, int]] = {}
    for tag, model in (("dense", dense), ("pruned", pruned)):
        per = macs.setdefault(tag, {})
        for name, v in layer_macs(model, example_inputs).items():
            per[key(name)] = per.get(key(name), 0) + v[0]
    for _ in range(rounds):
        for tag, model in (("dense", dense), ("pruned", pruned)):
            layers, ops = module_times(model, example_inputs, reps=reps)
            sums: dict[str, float] = {}
            for name, ms in layers.items():
                own = any(True for _ in model.get_submodule(
                    "" if name == "(model)" else name).children())
                k = key(name) + (" (own)" if own else "")
                sums[k] = sums.get(k, 0.0) + ms
            runs["layer"].setdefault(tag, []).append(sums)
            runs["op"].setdefault(tag, []).append(ops)

    def table(label: str) -> list[dict]:
        keys = {k for tag in runs[label].values() for r in tag for k in r}
        out = []
        for k in keys:
            d, p = (statistics.median(r.get(k, 0.0) for r in runs[label][t])
                    for t in ("dense", "pruned"))
            dm, pm = macs["dense"].get(k, 0), macs["pruned"].get(k, 0)
            out.append({label: k, "dense_ms": d, "pruned_ms": p,
                        "speedup": d / p if p > 0 else math.nan,
                        "macs_ratio": dm / pm if pm > 0 else math.nan})
        return sorted(out, key=lambda r: -r["dense_ms"])
    return table("layer"), table("op")


def profile_table(rows: list[dict], top: int | None = None) -> list[str]:
    """Lines of a `profile_layers` table (layer or op, dense ms, pruned ms, speedup, MACs
    ratio), the `top` largest rows and a total of all rows."""
    label = "layer" if rows and "layer" in rows[0] else "op"
    shown = rows[:top] if top else rows
    lines = [f"{label:34s} {'dense ms':>9s} {'pruned ms':>9s} {'speedup':>8s} {'MACs ratio':>10s}"]
    for r in shown:
        lines.append(f"{r[label][:34]:34s} {r['dense_ms']:9.2f} {r['pruned_ms']:9.2f} "
                     f"{r['speedup']:8.2f} {r['macs_ratio']:10.2f}")
    d, p = sum(r["dense_ms"] for r in rows), sum(r["pruned_ms"] for r in rows)
    lines.append(f"{'total (' + str(len(rows)) + ' rows)':34s} {d:9.2f} {p:9.2f} "
                 f"{d / p if p else math.nan:8.2f}")
    return lines


def hooked(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that carry forward hooks or forward pre-hooks ('' the
    model itself): empty for a plain network, e.g. after a method's `finish`."""
    return [name for name, mod in model.named_modules()
            if mod._forward_hooks or mod._forward_pre_hooks]
