"""Physically remove channels: a genuinely smaller nn.Module, not a mask.

`remove_channels(model, groups, keep)` copies the model and, for every member of every group,
keeps only the positions of the kept channels (`index_select` along the member's dim), then fixes
the layer attributes (in/out channels, groups of depthwise convs, num_features, ...). A 'pad'
member (a `ChannelPad`, the option-A shortcut) has no tensor: its `left` / `right` widths drop by
the number of removed padded positions on each side.

Invariant (tests/test_surgery.py, every supported model): if the removed channels' producers were
zeroed first (`ChannelGroup.zero_`), the eval-mode output of the smaller model equals the output
of the zeroed one.

A pruned model is saved as a plain state_dict plus the shapes and layer attributes that differ
from the dense architecture (`save_pruned`); `load_pruned` rebuilds the dense architecture,
shrinks its tensors to those shapes and loads the weights. No code is pickled, so the file loads
with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .graph import ChannelGroup
from .models import ChannelPad

_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features",
          "num_features", "num_parameters", "left", "right")


def remove_channels(model: nn.Module, groups: list[ChannelGroup],
                    keep: Mapping[int, Any]) -> nn.Module:
    """A smaller copy of `model` keeping, for each group index i in `keep`, channels keep[i].

    Groups not in `keep` keep all their channels. `model` itself is not changed.
    """
    drop: dict[tuple[str, str, int], list[torch.Tensor]] = {}
    pads: dict[str, list[torch.Tensor]] = {}              # ChannelPad -> removed slot positions
    for i, kept in keep.items():
        if not 0 <= i < len(groups):
            raise IndexError(f"keep has group index {i}, but there are {len(groups)} groups")
        g = groups[i]
        kept = torch.as_tensor(kept, dtype=torch.long).reshape(-1).cpu()
        if kept.numel() == 0:
            raise ValueError(f"group {i} would lose all {g.size} channels: keep at least one")
        if kept.unique().numel() != kept.numel() or kept.min() < 0 or kept.max() >= g.size:
            raise ValueError(f"keep[{i}] must be distinct indices in [0, {g.size})")
        mask = torch.ones(g.size, dtype=torch.bool)
        mask[kept] = False
        if not mask.any():
            continue
        for m in g.members:
            parts = (pads.setdefault(m.module, []) if m.role == "pad"
                     else drop.setdefault((m.module, m.param, m.dim), []))
            parts.append(m.idx[mask].reshape(-1))
    small = copy.deepcopy(model)
    for module, parts in pads.items():
        _narrow_pad(small.get_submodule(module), torch.cat(parts))
    touched = set()
    for (module, param, dim), parts in drop.items():
        mod = small.get_submodule(module)
        t = getattr(mod, param)
        gone = torch.zeros(t.shape[dim], dtype=torch.bool)
        gone[torch.cat(parts)] = True
        kept_pos = torch.nonzero(~gone).flatten().to(t.device)
        _set_tensor(mod, param, t.detach().index_select(dim, kept_pos).clone())
        touched.add(module)
    for module in touched:
        _fix_attrs(small.get_submodule(module))
    return small


def _narrow_pad(mod: ChannelPad, gone: torch.Tensor) -> None:
    """Remove padded positions `gone` of a ChannelPad (slot position p < left: left side)."""
    gone = gone.unique()
    n_left = int((gone < mod.left).sum())
    mod.left, mod.right = mod.left - n_left, mod.right - (gone.numel() - n_left)


def _set_tensor(mod: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(mod, name)
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=old.requires_grad))
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        setattr(mod, name, value)


def _fix_attrs(mod: nn.Module) -> None:
    """Make a layer's attributes agree with its (new) tensor shapes."""
    if isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed:
        w = mod.weight
        if mod.in_channels // mod.groups == 1 and w.shape[1] == 1 and mod.groups > 1:
            mult = mod.out_channels // mod.in_channels               # depthwise multiplier
            mod.out_channels = w.shape[0]
            mod.in_channels = mod.groups = w.shape[0] // mult
        else:
            mod.out_channels = w.shape[0]
            mod.in_channels = w.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        t = mod.weight if mod.weight is not None else mod.running_mean
        mod.num_features = t.shape[0]
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = mod.weight.numel()


def save_pruned(model: nn.Module, path: str | Path, /, **meta: Any) -> None:
    """Save a (pruned) model as tensors + shapes + layer attributes; no pickled code."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    attrs = {}
    for name, mod in model.named_modules():
        a = {k: int(getattr(mod, k)) for k in _ATTRS if isinstance(getattr(mod, k, None), int)}
        if a:
            attrs[name] = a
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "shapes": {k: list(v.shape) for k, v in sd.items()},
                "attrs": attrs, "meta": meta}, path)


def load_pruned(dense: nn.Module, path: str | Path, map_location: str | torch.device = "cpu"
                ) -> tuple[nn.Module, dict]:
    """Shrink `dense` (a freshly built dense architecture) to the saved shapes and load weights.

    Parameters that the dense model has as None (a conv bias created by RSNLI's folding) are
    created. Returns (model, meta). Loads with torch.load(weights_only=True).
    """
    blob = torch.load(path, map_location=map_location, weights_only=True)
    for name, shape in blob["shapes"].items():
        module, _, attr = name.rpartition(".")
        mod = dense.get_submodule(module)
        t = getattr(mod, attr, None)
        new = dict(dtype=blob["state_dict"][name].dtype,
                   device=next((p.device for p in mod.parameters()), "cpu"))
        if t is None and attr in mod._parameters:      # e.g. a bias created by folding
            mod.register_parameter(attr, nn.Parameter(torch.empty(shape, **new)))
        elif t is None and attr in mod._buffers:
            mod.register_buffer(attr, torch.empty(shape, **new))
        elif t is None:
            raise KeyError(f"{path}: the saved model has '{name}', which {type(dense).__name__} "
                           "does not define; build the same architecture as the saved one")
        elif list(t.shape) != list(shape):
            _set_tensor(mod, attr, torch.empty(shape, dtype=t.dtype, device=t.device))
    for name, a in blob["attrs"].items():
        mod = dense.get_submodule(name)
        for k, v in a.items():
            setattr(mod, k, v)
    dense.load_state_dict(blob["state_dict"])
    return dense, blob["meta"]
