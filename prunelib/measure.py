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
"""
from __future__ import annotations

import statistics
import time
from typing import Any

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
            device: str | torch.device | None = None, channels_last: bool = True) -> float:
    """Median milliseconds of one forward pass on `example_inputs` (eval, inference mode)."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    inputs = tuple(x.to(device) for x in inputs)
    if channels_last and inputs[0].dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
    cuda = device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(*inputs)
            if cuda:
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)
