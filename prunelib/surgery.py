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
from the dense architecture (`save_pruned`, written atomically); `load_pruned` checks the file
against a freshly built dense architecture (modules, tensors, shapes, attributes), then shrinks
its tensors to those shapes and loads the weights; on any error the model is left unchanged and
the message names the file. No code is pickled, so the file loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import copy
import io
import numbers
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .fileio import atomic_torch_save
from .graph import ChannelGroup
from .models import ChannelPad

_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features",
          "num_features", "num_parameters", "left", "right")


def remove_channels(model: nn.Module, groups: list[ChannelGroup],
                    keep: Mapping[int, Any]) -> nn.Module:
    """A smaller copy of `model` keeping, for each group index i in `keep`, channels keep[i].

    keep[i] holds integer channel indices of group i (a LongTensor, list or array, any order,
    flattened), distinct, in [0, size), at least one. A bad key (not an index of `groups`) is an
    IndexError, non-integer values a TypeError, and out-of-range, duplicated or no indices a
    ValueError, each naming the group. Groups not in `keep` keep all their channels. `model`
    itself is not changed.
    """
    drop: dict[tuple[str, str, int], list[torch.Tensor]] = {}
    pads: dict[str, list[torch.Tensor]] = {}              # ChannelPad -> removed slot positions
    for i, kept in keep.items():
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < len(groups):
            raise IndexError(f"keep has group index {i!r}, but there are {len(groups)} groups "
                             f"(indices 0..{len(groups) - 1})")
        g = groups[i]
        kept = _keep_indices(g, kept)
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


def _keep_indices(g: ChannelGroup, kept: Any) -> torch.Tensor:
    """keep[g.index] checked and flattened to a LongTensor of distinct indices in [0, size)."""
    what = f"keep[{g.index}] (group {g.index}, {g.size} channels, out: " \
           f"{', '.join(dict.fromkeys(m.module for m in g.by_role('out'))) or '-'})"
    try:
        t = kept.detach().cpu() if isinstance(kept, torch.Tensor) else torch.as_tensor(kept)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{what}: expected integer channel indices, got "
                        f"{type(kept).__name__} ({e})") from None
    t = t.reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{what} is empty: the group would lose all its channels; keep at "
                         "least one (or leave the group out of keep to keep all)")
    if t.dtype == torch.bool:
        raise TypeError(f"{what} is a bool tensor; give the kept channel indices, e.g. "
                        "torch.nonzero(mask).flatten()")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{what} holds {t.dtype} values; give integer channel indices "
                        "(a LongTensor)")
    t = t.long()
    bad = t[(t < 0) | (t >= g.size)]
    if bad.numel():
        raise ValueError(f"{what} has indices out of range [0, {g.size}): "
                         f"{bad[:8].tolist()}")
    if t.unique().numel() != t.numel():
        values, counts = t.unique(return_counts=True)
        raise ValueError(f"{what} repeats indices {values[counts > 1][:8].tolist()}: each kept "
                         "channel must be listed once (indices must be distinct)")
    return t


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


_FORMAT = "prunelib.pruned"                               # marker of save_pruned's files


def save_pruned(model: nn.Module, path: str | Path, /, **meta: Any) -> None:
    """Save a (pruned) model as tensors + shapes + layer attributes; no pickled code.

    The file is written atomically (temporary file + rename: an interrupted save leaves the old
    file or none, never a partial one). `meta` values must load with
    `torch.load(weights_only=True)` (None, bool, int, float, str, tensors, and lists / tuples /
    dicts of them): TypeError naming the key otherwise, before anything is written.
    """
    for key, value in meta.items():
        buf = io.BytesIO()
        try:
            torch.save(value, buf)
            buf.seek(0)
            torch.load(buf, weights_only=True)
        except Exception:
            raise TypeError(f"save_pruned: meta {key}={type(value).__name__} cannot be stored "
                            "without pickling code; use plain data (None, bool, int, float, "
                            "str, tensors, lists / tuples / dicts of them)") from None
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    attrs = {}
    for name, mod in model.named_modules():
        a = {k: int(getattr(mod, k)) for k in _ATTRS if _is_int(getattr(mod, k, None))}
        if a:
            attrs[name] = a
    atomic_torch_save({"format": _FORMAT, "state_dict": sd,
                       "shapes": {k: list(v.shape) for k, v in sd.items()},
                       "attrs": attrs, "meta": meta}, path)


def load_pruned(dense: nn.Module, path: str | Path, map_location: str | torch.device = "cpu"
                ) -> tuple[nn.Module, dict]:
    """Shrink `dense` (a freshly built dense architecture) to the saved shapes and load weights.

    Parameters that the dense model has as None (a conv bias created by RSNLI's folding) are
    created. Returns (model, meta). Loads with torch.load(weights_only=True).

    The whole file is checked against `dense` before anything is changed, so on any error
    `dense` is left exactly as it was. Every error names the file: FileNotFoundError (no such
    file); ValueError when it is not a file written by `save_pruned` (corrupt, truncated, pickled
    code, other content) or does not fit the architecture (modules or tensors the model lacks
    or has in addition, a tensor larger than the dense one or with another kernel, a layer
    attribute that does not fit).
    """
    path = Path(path)
    blob = _read_pruned(path, map_location)
    plan, attrs = _fit(dense, blob, path)
    undo: list[tuple[nn.Module, str, Any]] = []
    try:
        for mod, attr, shape, dtype in plan:
            dev = next((p.device for p in mod.parameters()), torch.device("cpu"))
            t = getattr(mod, attr, None)
            undo.append((mod, attr, t))
            if t is None and attr in mod._parameters:      # e.g. a bias created by folding
                mod.register_parameter(attr, nn.Parameter(torch.empty(shape, dtype=dtype,
                                                                      device=dev)))
            elif t is None:
                mod.register_buffer(attr, torch.empty(shape, dtype=dtype, device=dev))
            else:
                _set_tensor(mod, attr, torch.empty(shape, dtype=t.dtype, device=t.device))
        for mod, k, v in attrs:
            undo.append((mod, k, getattr(mod, k)))
            setattr(mod, k, v)
        dense.load_state_dict(blob["state_dict"])
    except BaseException:                                  # not expected after _fit: undo
        for mod, k, old in reversed(undo):
            if k in mod._parameters:
                mod._parameters[k] = old
            elif k in mod._buffers:
                mod._buffers[k] = old
            else:
                setattr(mod, k, old)
        raise
    return dense, blob["meta"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_pruned(path: Path, map_location: Any) -> dict:
    """The content of a save_pruned file, its structure checked; errors name the file."""
    where = f"load_pruned: {str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such file")
    if path.is_dir():
        raise ValueError(f"{where} is a directory, not a file written by prunelib.save_pruned")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:     # weights_only: code (a global) or garbage
        if "global" in str(e).lower():
            raise ValueError(f"{where} is not a file written by prunelib.save_pruned: it holds "
                             "pickled objects that torch.load(weights_only=True) refuses (a "
                             "whole saved nn.Module?)") from None
        raise ValueError(f"{where} is corrupt or not a torch file (its pickle data cannot be "
                         "read); write it again with prunelib.save_pruned") from None
    except Exception as e:                  # zip / pickle / EOF / OS errors of a broken file
        raise ValueError(f"{where} cannot be read: the file is corrupt or truncated, or not a "
                         f"torch file ({_reason(e)}); write it again with "
                         "prunelib.save_pruned") from None
    keys = ("state_dict", "shapes", "attrs", "meta")
    if not isinstance(blob, dict) or not all(isinstance(blob.get(k), dict) for k in keys):
        got = (f"a dict with keys {sorted(map(str, blob))[:6]}" if isinstance(blob, dict)
               else f"a {type(blob).__name__}")
        raise ValueError(f"{where} is not a file written by prunelib.save_pruned: it holds {got}, "
                         f"not the {', '.join(keys)} that save_pruned writes (a plain "
                         "state_dict loads with model.load_state_dict)")
    if blob.get("format", _FORMAT) != _FORMAT:
        raise ValueError(f"{where}: unknown format {blob['format']!r} (expected {_FORMAT!r})")
    sd, shapes = blob["state_dict"], blob["shapes"]
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
           or not isinstance(shapes.get(k), (list, tuple)) or list(shapes[k]) != list(v.shape)]
    bad += [k for k in shapes if k not in sd]
    bad += [m for m, a in blob["attrs"].items() if not isinstance(m, str)
            or not isinstance(a, dict) or not all(_is_int(v) for v in a.values())]
    if bad:
        raise ValueError(f"{where} is inconsistent (its shapes / attributes do not describe its "
                         f"tensors: {', '.join(map(str, bad[:6]))}); write it again with "
                         "prunelib.save_pruned")
    return blob


def _reason(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:120]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _fit(dense: nn.Module, blob: dict, path: Path
         ) -> tuple[list[tuple[nn.Module, str, list[int], torch.dtype]],
                    list[tuple[nn.Module, str, int]]]:
    """Check the file against the architecture without changing it; return the tensors to
    (re)create as (module, name, shape, dtype) and the attributes to set as (module, name, v)."""
    where = f"load_pruned: {str(path)!r}"
    arch = type(dense).__name__
    said = blob["meta"].get("model")
    hint = ((f" (the file says model={said!r})" if isinstance(said, str) else "")
            + "; build the architecture the file was saved from and pass it as `dense`")
    modules = dict(dense.named_modules())
    shapes, attrs = blob["shapes"], blob["attrs"]
    lacking = sorted(({k.rpartition(".")[0] for k in shapes} | set(attrs)) - set(modules))
    if lacking:
        raise ValueError(f"{where} needs modules that {arch} lacks: {_few(lacking)}{hint}")
    have = dense.state_dict()
    extra = [k for k in have if k not in shapes]
    if extra:
        raise ValueError(f"{where} lacks tensors that {arch} has: {_few(extra)}{hint}")
    plan, problems = [], []
    for name, shape in shapes.items():
        module, _, attr = name.rpartition(".")
        mod = modules[module]
        t = getattr(mod, attr, None)
        dtype = blob["state_dict"][name].dtype
        if t is None and (attr in mod._parameters or attr in mod._buffers):
            if len(shape) != 1:
                problems.append(f"{name} {tuple(shape)} (the model has no such tensor to shape)")
            else:
                plan.append((mod, attr, list(shape), dtype))
            continue
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name} (the model does not define it)")
            continue
        kernel = isinstance(mod, nn.modules.conv._ConvNd) and attr == "weight"
        fits = len(shape) == t.dim() and all(           # channels shrink; kernels stay
            s == d if kernel and i >= 2 else s <= d for i, (s, d) in enumerate(zip(shape, t.shape)))
        if not fits:
            problems.append(f"{name} {tuple(shape)} vs {tuple(t.shape)} in the model")
        elif list(shape) != list(t.shape):
            plan.append((mod, attr, list(shape), dtype))
    todo = []
    for module, a in attrs.items():
        mod = modules[module]
        for k, v in a.items():
            now = getattr(mod, k, None)
            low = 1 if k == "groups" else 0
            if k not in _ATTRS or not _is_int(now) or not low <= v <= now:
                problems.append(f"{module or '<root>'}.{k}={v} (the model has {now!r})")
            else:
                todo.append((mod, k, v))
    if problems:
        raise ValueError(f"{where} does not fit {arch}: {_few(problems)}{hint}")
    return plan, todo


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
