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
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

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
    return _REGISTRY[key](**hparams)


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

    Subclasses set `residual` and override the hooks they need. `self.groups` holds the groups
    the method may prune (already filtered by the residual policy) after `attach`.
    """
    name = "base"
    residual = "internal"

    def __init__(self, residual: str | None = None, min_keep: float = 0.1,
                 min_channels: int = 1) -> None:
        if residual is not None:
            if residual not in ("internal", "coupled"):
                raise ValueError(f"residual must be 'internal' or 'coupled', got {residual!r}")
            self.residual = residual
        self.min_keep = min_keep            # fraction of each group that is always kept
        self.min_channels = min_channels    # and at least this many channels
        self.groups: list[ChannelGroup] = []
        self.all_groups: list[ChannelGroup] = []
        self.ctx: Context | None = None

    # -- hooks -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, groups: list[ChannelGroup]) -> nn.Module:
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
