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

Residual branches (block removal). In a residual add y = F(x) + s(x), a branch F whose output
is exactly 0 (SSS's or GAL's block scale at 0, its last BN's gamma and beta at 0) leaves
y = s(x). `remove_branches(model, ends)` removes such branches physically: the module whose
forward does the add (the block) is traced with torch.fx, the add is replaced by its other
operand s(x), and the nodes and submodules only F used are deleted; the block becomes a
`torch.fx.GraphModule` that computes the rest of its forward (e.g. relu(s(x)) for a CIFAR
BasicBlock), whose parameters keep their names. Exact when F(x) = 0 (eval mode), counted by
`count` (F's convs are gone), and recorded by `save_pruned` (the removed branches' end modules)
so that `load_pruned` removes them from the dense architecture before loading.
`residual_branches(model, example_inputs)` lists the removable branches (`Branch`).
"""
from __future__ import annotations

import copy
import io
import numbers
import operator
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .fileio import atomic_torch_save
from .graph import ChannelGroup, _LeafTracer
from .measure import example_tuple
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
    dicts of them): TypeError naming the key otherwise, before anything is written. A model
    with removed residual branches (`remove_branches`) also stores their end modules under
    'branches' (`load_pruned` removes them first).
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
    blob = {"format": _FORMAT, "state_dict": sd,
            "shapes": {k: list(v.shape) for k, v in sd.items()}, "attrs": attrs, "meta": meta}
    branches = removed_branches(model)
    if branches:                          # only then: other files keep the original format
        blob["branches"] = branches
    atomic_torch_save(blob, path)


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

    Residual branches that the saved model lacks (`remove_branches`) are removed first: their
    blocks are replaced in `dense` by the same GraphModules (a branch of the root module's own
    forward: the returned model is a new GraphModule). Files without the 'branches' entry
    (older files) remove none.
    """
    path = Path(path)
    blob = _read_pruned(path, map_location)
    cut: list[tuple[nn.Module, str, nn.Module]] = []
    if blob["branches"]:                                  # removed residual branches first
        try:
            dense, cut = _cut(dense, blob["branches"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"load_pruned: {str(path)!r} does not fit "
                             f"{type(dense).__name__}: {e}") from None
    try:
        plan, attrs = _fit(dense, blob, path)
    except BaseException:
        for parent, name, old in reversed(cut):
            setattr(parent, name, old)
        raise
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
        for parent, name, old in reversed(cut):
            setattr(parent, name, old)
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
    blob.setdefault("branches", [])
    if not isinstance(blob["branches"], list) or not all(
            isinstance(b, str) for b in blob["branches"]):
        raise ValueError(f"{where} is inconsistent (its 'branches' entry is not a list of "
                         "module names); write it again with prunelib.save_pruned")
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


# --- residual branches (block removal) ---------------------------------------------------------
_ADDS = (operator.add, operator.iadd, torch.add)
_CUT = "prunelib_removed_branches"          # GraphModule.meta key: the block's removed ends


@dataclass(frozen=True)
class Branch:
    """The residual function F of one residual add y = F(x) + s(x) (s: the shortcut).

    block:   qualified name of the module whose forward does the add ('' = the model);
    end:     the module whose output is the operand F(x), e.g. 'layer1.0.bn2';
    modules: the modules only F uses (removed with it), in call order.
    """
    block: str
    end: str
    modules: tuple[str, ...]


def _is_add(n: fx.Node) -> bool:
    """A two-operand tensor addition (no alpha): y = a + b."""
    add = ((n.op == "call_function" and n.target in _ADDS)
           or (n.op == "call_method" and n.target in ("add", "add_")))
    return (add and len(n.args) == 2 and not n.kwargs
            and all(isinstance(a, fx.Node) for a in n.args) and n.args[0] is not n.args[1])


def _own(anc: dict, o: fx.Node, other: fx.Node) -> set:
    """Nodes that compute operand `o` and not operand `other`."""
    return (anc[o] | {o}) - anc[other] - {other}


def _operands(graph: fx.Graph) -> dict[fx.Node, tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """{end: (add, other operand, F's own nodes in graph order)} for every operand `end` of a
    residual add that is a module call used by the add only, computed by nodes that nothing
    outside them (but the add) uses, none of them a graph input."""
    anc: dict[fx.Node, set] = {}
    for n in graph.nodes:
        anc[n] = set().union(*(anc[a] | {a} for a in n.all_input_nodes))
    out = {}
    for add in graph.nodes:
        if not _is_add(add):
            continue
        a, b = add.args
        for o, other in ((a, b), (b, a)):
            if o.op != "call_module" or len(o.users) != 1:
                continue
            own = _own(anc, o, other)
            if any(n.op == "placeholder" for n in own) or any(
                    u not in own and u is not add for n in own for u in n.users):
                continue
            out[o] = (add, other, [n for n in graph.nodes if n in own])
    return out


def _n_params(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> int:
    mods = {n.target for n in nodes if n.op == "call_module"}
    return sum(p.numel() for m in mods for p in gm.get_submodule(m).parameters())


def _block_of(add: fx.Node, modules: list[str]) -> str:
    """The innermost module whose forward does `add` and holds every module of the branch."""
    stack = [v[0] if isinstance(v, tuple) else k
             for k, v in add.meta.get("nn_module_stack", {}).items()]
    for path in reversed(stack):
        if all(m.startswith(path + ".") for m in modules):
            return path
    return ""


def residual_branches(model: nn.Module, example_inputs: Any) -> list[Branch]:
    """The residual functions F of every residual add y = F(x) + s(x) of `model` that
    `remove_branches` can remove: F(x) is a module's output used only by the add, F's nodes feed
    nothing else, y has F(x)'s and s(x)'s shape (no broadcasting: y = s(x) exactly once
    F(x) = 0), and F has more parameters than the shortcut s's own part (identity, option-A pad:
    none; a projection shortcut is the other operand). One per add, in graph order."""
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_tuple(example_inputs, "residual_branches"))
    finally:
        model.train(was)
    found = _operands(gm.graph)
    anc: dict[fx.Node, set] = {}
    for n in gm.graph.nodes:
        anc[n] = set().union(*(anc[a] | {a} for a in n.all_input_nodes))

    def shape(n: fx.Node) -> Any:
        tm = n.meta.get("tensor_meta")
        return (tuple(tm.shape), tm.dtype) if tm is not None and hasattr(tm, "shape") else None
    best: dict[fx.Node, tuple[int, fx.Node, list[fx.Node]]] = {}
    for end, (add, other, own) in found.items():
        if shape(add) is None or shape(add) != shape(other) or shape(add) != shape(end):
            continue
        size = _n_params(gm, own)
        if size <= _n_params(gm, _own(anc, other, end)):
            continue                          # the shortcut, or two equal branches
        if add not in best or size > best[add][0]:
            best[add] = (size, end, own)
    out = []
    for add in gm.graph.nodes:
        if add in best:
            _, end, own = best[add]
            mods = tuple(dict.fromkeys(n.target for n in own if n.op == "call_module"))
            out.append(Branch(_block_of(add, list(mods)), end.target, mods))
    return out


def remove_branches(model: nn.Module, ends: Iterable[str | Branch]) -> nn.Module:
    """A copy of `model` without the residual branches ending at `ends` (module names such as
    'layer1.0.bn2', or `Branch`es from `residual_branches`): each residual add F(x) + s(x) is
    replaced by s(x), and F's modules are gone. Exact when F's output is 0 (e.g. its last BN's
    gamma and beta are 0, in eval mode); the caller asserts that, as with `remove_channels`.
    A name that is not the end of a removable branch is a ValueError that lists the removable
    ones. `model` itself is not changed."""
    return _cut(copy.deepcopy(model), [e.end if isinstance(e, Branch) else e for e in ends])[0]


def removed_branches(model: nn.Module) -> list[str]:
    """The end modules of the branches `remove_branches` removed from `model` (saved by
    `save_pruned`)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, fx.GraphModule):
            out += [f"{name}.{e}" if name else e for e in mod.meta.get(_CUT, ())]
    return out


def _cut(model: nn.Module, ends: list[str]
         ) -> tuple[nn.Module, list[tuple[nn.Module, str, nn.Module]]]:
    """Remove the branches ending at `ends` from `model` in place (blocks replaced by
    GraphModules; a root block returns a new root). Returns (model, [(parent, name, old block)])
    to undo. Every name is checked before anything changes."""
    ends = list(dict.fromkeys(ends))
    bad = [e for e in ends if not isinstance(e, str)]
    if bad:
        raise TypeError(f"remove_branches: branch ends must be module names (str) or Branch, "
                        f"got {bad[:4]!r}")
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    found = {n.target: v for n, v in _operands(gm.graph).items()}
    blocks: dict[str, list[str]] = {}
    for e in ends:
        if e not in found:
            raise ValueError(f"remove_branches: {e!r} is not the end of a removable residual "
                             f"branch (a module whose output is only an operand of a residual "
                             f"add); removable: {_few(sorted(found)) or 'none'}")
        add, _, own = found[e]
        mods = [n.target for n in own if n.op == "call_module"]
        blocks.setdefault(_block_of(add, mods), []).append(e)
    undo = []
    for block, block_ends in blocks.items():
        old = model.get_submodule(block)
        local = [e[len(block) + 1:] if block else e for e in block_ends]
        new = _cut_block(old, local)
        if not block:
            model = new
            continue
        parent_name, _, attr = block.rpartition(".")
        parent = model.get_submodule(parent_name)
        undo.append((parent, attr, old))
        setattr(parent, attr, new)
    return model, undo


def _cut_block(block: nn.Module, ends: list[str]) -> fx.GraphModule:
    """`block` traced, each add fed by a local end replaced by its other operand, dead nodes
    and unused submodules dropped."""
    graph = _LeafTracer().trace(block)
    found = {n.target: v for n, v in _operands(graph).items()}
    for e in ends:
        add, other, _ = found[e]
        add.replace_all_uses_with(other)
        graph.erase_node(add)
    new = fx.GraphModule(block, graph, class_name=type(block).__name__)
    new.graph.eliminate_dead_code()
    new.delete_all_unused_submodules()
    new.recompile()
    before = block.meta.get(_CUT, ()) if isinstance(block, fx.GraphModule) else ()
    new.meta[_CUT] = tuple(before) + tuple(ends)
    new.train(block.training)
    return new


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
