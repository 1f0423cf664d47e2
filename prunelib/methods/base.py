"""The common interface of every pruning method, and the registry that names them.

A method acts on a model through five hooks that the training loop calls (design.md):

    attach(model, groups)  -> model to train (gates, compactors, ... inserted)
    loss_term(model)       -> differentiable penalty added to the task loss, or None
    after_backward(model)  -> edit gradients in place (NS: grad(gamma) += lam * sign(gamma))
    after_step(model)      -> proximal / projection / clamp step after optimizer.step()
    scores(model)          -> {group index: per-channel importance, higher = keep}
    finish(model, budget)  -> a smaller plain nn.Module (gates folded, channels removed)

`regularize(model, ctx)` is the sparse-training phase. Its default runs `prunelib.train.fit`
with the hooks above; methods whose phase is not plain SGD (GBN's tick-tock, EagleEye's search)
override it. `param_groups` lets a method give its own parameters their own lr / weight decay.

Residual policy (`residual`): which channel groups a method may prune.
  'internal' - only groups with a single source layer (trunk of a ResNet untouched: NS, GREG,
               ResRep, OTO v1, SSL, EagleEye);
  'coupled'  - also groups coupled through residual adds (GBN sums scores over coupled BNs).

Hyperparameters are validated once, where they enter: every class declares each constructor
argument in `HPARAMS` (an `HParam`: type, range, whether None is allowed; merged with the base
class's), and its `__init__` stores them through `set_hparams`, which raises TypeError for a
wrong type (bool/str/None where a number is due, a non-integer where an integer is due) and
ValueError for a value outside the declared range, naming the method, the parameter, the value
and what is allowed. `get` rejects unknown names. Until `attach` runs, every hook raises a
RuntimeError that says to call attach(model, groups) first (a stand-in callable on the
instance that `attach` removes: nothing is added to the per-step path).
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ..graph import ChannelGroup
from ..select import Budget, select_keep
from ..surgery import remove_channels

_REGISTRY: dict[str, type["Method"]] = {}


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    """Class decorator: make a method selectable by `name` (CLI, `prunelib.methods.get`)."""
    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method name {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def names() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **hparams: Any) -> "Method":
    """Instantiate the method registered as `name` with keyword hyperparameters."""
    key = name.lower()
    if key not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(names())}")
    cls = _REGISTRY[key]
    unknown = sorted(set(hparams) - set(cls.HPARAMS))
    if unknown:
        raise TypeError(f"{cls.__name__} ({key!r}): unknown hyperparameter(s) "
                        f"{', '.join(unknown)}; known: {', '.join(cls.HPARAMS)}")
    return cls(**hparams)


@dataclass(frozen=True)
class HParam:
    """The declared type and range of one hyperparameter.

    kind:    float (any real number, ints accepted), int (integers; an integer-valued float such
             as 10.0 is accepted and stored as int), bool, or str (one of `choices`);
    lo, hi:  bounds of a number (None: unbounded), open when `lo_open` / `hi_open`;
    none:    None is allowed (e.g. "not set: derive it");
    mapping: a {str: value} mapping of such values is allowed too (GREG's per-layer `pr`);
    inf:     +inf is allowed (e.g. "never stop on this criterion"); otherwise numbers must be
             finite;
    note:    why the range, appended to the error message.
    """
    kind: type = float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    none: bool = False
    mapping: bool = False
    inf: bool = False
    choices: tuple = ()
    note: str = ""

    def allowed(self) -> str:
        """What is allowed, in words (used in every error message)."""
        if self.kind is bool:
            text = "True or False"
        elif self.kind is str:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = "an integer" if self.kind is int else "a finite number"
            if self.lo is not None and self.hi is not None:
                text += (f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                         f"{')' if self.hi_open else ']'}")
            elif self.lo is not None:
                text += f" {'>' if self.lo_open else '>='} {self.lo:g}"
            elif self.hi is not None:
                text += f" {'<' if self.hi_open else '<='} {self.hi:g}"
        if self.inf:
            text += ", or inf"
        if self.mapping:
            text += ", or a {layer-name prefix: value} mapping of such values"
        if self.none:
            text += ", or None"
        return text + (f" ({self.note})" if self.note else "")

    def check(self, owner: str, name: str, value: Any) -> Any:
        """`value` converted to `kind` (float / int), or TypeError / ValueError saying why not."""
        if value is None and self.none:
            return None
        if self.mapping and isinstance(value, Mapping):
            bad = [k for k in value if not isinstance(k, str)]
            if bad:
                raise TypeError(f"{owner}: {name} has non-string key(s) {bad!r}; {name} must "
                                f"be {self.allowed()}")
            return {k: self.check(owner, f"{name}[{k!r}]", v) for k, v in value.items()}
        if self.kind in (bool, str):
            if not isinstance(value, self.kind):
                raise TypeError(f"{owner}: {name}={value!r} ({type(value).__name__}) is not "
                                f"allowed: {name} must be {self.allowed()}")
            if self.choices and value not in self.choices:
                raise ValueError(f"{owner}: {name}={value!r} is not allowed: {name} must be "
                                 f"{self.allowed()}")
            return value
        integral = isinstance(value, numbers.Integral) or (
            isinstance(value, float) and value.is_integer())
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or (self.kind is int and not integral)):
            raise TypeError(f"{owner}: {name}={value!r} ({type(value).__name__}) is not "
                            f"allowed: {name} must be {self.allowed()}")
        v = int(value) if self.kind is int else float(value)
        if not (math.isfinite(v) or (self.inf and v == math.inf)) or not self.contains(v):
            raise ValueError(f"{owner}: {name}={value!r} is not allowed: {name} must be "
                             f"{self.allowed()}")
        return v

    def contains(self, v: float) -> bool:
        """True when the number `v` lies within [lo, hi] (open ends excluded)."""
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))


# hooks that raise a clear error until `attach` has run (see `_NotAttached`)
HOOKS = ("param_groups", "loss_term", "after_backward", "after_step", "scores", "regularize",
         "finish")


class _NotAttached:
    """Stands in for a hook on a method instance until `attach` runs (then it is removed, so
    the hooks of an attached method are the class's own: no per-step check)."""
    __slots__ = ("owner", "hook", "method")

    def __init__(self, owner: str, hook: str, method: Any = None) -> None:
        self.owner, self.hook, self.method = owner, hook, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        m = self.method
        if m is not None and self.hook not in m.__dict__:    # attached since it was looked up,
            return getattr(m, self.hook)(*args, **kwargs)   # as in m.finish(m.attach(...), b)
        raise RuntimeError(f"{self.owner}: {self.hook}() was called before the method was "
                           "attached to a model: call attach(model, groups) first")


@dataclass
class Context:
    """What a method may need besides the model: set by the pipeline before `attach`.

    example_inputs: a batch used for tracing and MAC counting (on `device`).
    train_loader:   iterable of (x, y) batches for the regularization phase.
    calib_loader:   held-out training batches (EagleEye's adaptive BN, GBN's scores).
    epochs, lr, weight_decay, momentum: the regularization-phase schedule.
    extra:          anything else; the pipeline puts the Budget under 'budget'.
    """
    example_inputs: torch.Tensor
    train_loader: Any = None
    calib_loader: Any = None
    device: torch.device | str = "cpu"
    epochs: float = 1.0
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    quiet: bool = False
    extra: dict = field(default_factory=dict)


class Method(ABC):
    """Base class: every hook is a no-op; a subclass defines at least `scores`.

    Subclasses set `residual`, declare their constructor arguments in `HPARAMS` (merged with
    this class's: residual, min_keep, min_channels), store them with `set_hparams`, and
    override the hooks they need. `self.groups` holds the groups the method may prune (already
    filtered by the residual policy) after `attach`.
    """
    name = "base"
    residual = "internal"
    HPARAMS: ClassVar[dict[str, HParam]] = {
        "residual": HParam(str, choices=("internal", "coupled"), none=True,
                           note="None: the method's default"),
        "min_keep": HParam(float, 0.0, 1.0, hi_open=True,
                           note="fraction of every group that is always kept"),
        "min_channels": HParam(int, lo=1, note="channels every group always keeps"),
    }

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        merged: dict[str, HParam] = {}
        for klass in reversed(cls.__mro__):
            merged.update(klass.__dict__.get("HPARAMS", {}))
        cls.HPARAMS = merged

    def __init__(self, residual: str | None = None, min_keep: float = 0.1,
                 min_channels: int = 1) -> None:
        for hook in HOOKS:
            setattr(self, hook, _NotAttached(self.owner(), hook, self))
        if self.HPARAMS["residual"].check(self.owner(), "residual", residual) is not None:
            self.residual = residual
        # min_keep: fraction of each group that is always kept, and at least min_channels
        self.set_hparams(min_keep=min_keep, min_channels=min_channels)
        self.groups: list[ChannelGroup] = []
        self.all_groups: list[ChannelGroup] = []
        self.ctx: Context | None = None

    # -- hyperparameters ---------------------------------------------------------------------
    def owner(self) -> str:
        """'ClassName ('registered name')', the prefix of every error message of the method."""
        return f"{type(self).__name__} ({self.name!r})"

    def set_hparams(self, **values: Any) -> None:
        """Check every value against its `HPARAMS` entry and store it as an attribute."""
        for key, value in values.items():
            setattr(self, key, self.HPARAMS[key].check(self.owner(), key, value))

    def invalid(self, name: str, value: Any, allowed: str) -> ValueError:
        """The ValueError for a value that passes its own range but not a joint condition."""
        return ValueError(f"{self.owner()}: {name}={value!r} is not allowed: {allowed}")

    # -- hooks -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
        for hook in HOOKS:
            self.__dict__.pop(hook, None)
        self.all_groups = list(groups)
        self.groups = self.prunable(groups)
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "lr": lr, "weight_decay": weight_decay}]

    def loss_term(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module) -> None:
        return None

    def after_step(self, model: nn.Module) -> None:
        return None

    @abstractmethod
    def scores(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """Per-channel importance of every prunable group, keyed by group index."""

    def regularize(self, model: nn.Module, ctx: Context) -> nn.Module:
        """The sparse-training phase: plain SGD with this method's hooks, `ctx.epochs` long."""
        from ..train import fit
        if ctx.epochs <= 0:
            return model
        fit(model, ctx.train_loader, epochs=ctx.epochs, lr=ctx.lr,
            weight_decay=ctx.weight_decay, momentum=ctx.momentum, schedule=ctx.schedule,
            hooks=self, device=ctx.device, quiet=ctx.quiet)
        return model

    def finish(self, model: nn.Module, budget: Budget | None) -> nn.Module:
        """Default decision rule: rank `scores` under `budget`, then remove the channels.

        Methods with a decision rule of their own (RSNLI's zeros, PR's valley, SCP's P_off,
        GBN's masks, OTO's zero groups) accept budget=None; the default rule needs a Budget.
        """
        if budget is None:
            raise ValueError(f"{type(self).__name__} has no decision rule of its own: pass a "
                             "Budget (e.g. Budget(macs=0.5)) to finish()")
        keep = self.select(model, budget)
        return remove_channels(model, self.all_groups, keep)

    # -- shared helpers ----------------------------------------------------------------------
    def prunable(self, groups: list[ChannelGroup]) -> list[ChannelGroup]:
        """Groups this method may prune under its residual policy."""
        if self.residual == "coupled":
            return list(groups)
        return [g for g in groups if not g.coupled]

    def select(self, model: nn.Module, budget: Budget,
               scores: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """Keep-indices per group index (into `self.all_groups`) for `budget`."""
        scores = self.scores(model) if scores is None else scores
        ex = self.ctx.example_inputs if self.ctx is not None else None
        return select_keep(model, self.all_groups, scores, budget, example_inputs=ex,
                           min_keep=self.min_keep, min_channels=self.min_channels)

    def gidx(self, g: ChannelGroup) -> int:
        """Index of group `g` in `self.all_groups` (the key used by scores and keep dicts)."""
        return g.index

    def hparams(self) -> dict[str, Any]:
        """Hyperparameters worth recording in a result JSON."""
        return {k: v for k, v in vars(self).items()
                if isinstance(v, (int, float, str, bool, tuple)) and not k.startswith("_")}
