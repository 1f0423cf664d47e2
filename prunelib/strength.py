"""One rule for a regularizer's strength at a schedule the paper did not use: the target drift.

The papers tune their strength (NS's lam = 1e-5, RSNLI's rho, OTO's lam, ...) for 160+ epochs.
On a shorter schedule the same value barely moves anything. The rule asks how far the penalty
*alone* must be able to move a channel's magnitude x_c (|gamma| for the BN-based methods, the
group norm for the group-sparsity ones) during the sparse phase, and sets the strength so that:

    drift(s) = s * u(schedule) = D,     D = Q_q({x_c : c in R}),

where R is the set of channels the budget removes when x is ranked at the start of the phase
(the channels the penalty must reach first to meet the budget; for most methods x orders the
channels as the method's own scores do, for RSNLI it is |gamma| per unit of its channel cost;
so D grows with how much the target removes: a rule that ignores the
target, e.g. "the 10% quantile of |gamma|", leaves most of the removed channels out of the
penalty's reach), Q_q is the q-quantile (q = 0.9: robust to a few outliers in R), and u is the
movement per unit strength over the phase's learning rates eta_t, *carried by the training
optimizer's momentum mu* (0.9). A constant unit gradient moves a parameter by
V(eta, mu) = sum_t eta_t v_t under `fit`'s SGD with Nesterov momentum (b_t = mu b_(t-1) + 1,
v_t = 1 + mu b_t; about sum(eta) / (1 - mu) once the momentum has built up;
`sgd_displacement` computes it exactly):

    NS        grad(gamma) += lam sign(gamma)              u = V(eta, mu)
    PR        lam (t |g| - |g - mean|), below the mean    u = (t + 1) V(eta, mu)
    RSNLI     prox: |gamma| -= eta rho lam_l              u = V(eta w, mu), x = |gamma| / lam_l
              (w_t = rho_warmup / rho during the warm-up; rho_warmup keeps its ratio to rho)
    SCP       lam * sum P_on; at z = 0 beta moves by lam phi(0) / gamma_med per unit lr
                                                          u = phi(0) V(eta, mu) / gamma_med
    OTO       grad(x_g) += lam x_g / ||x_g||              u = V(eta, mu)
    SSL       the same on filters and channels (lam_filter = lam_channel = s)
    OICSR     the same on out-in-channels (scores are squared norms: x = sqrt(score))
    SSS       APG on the scales: z = S_(eta gamma)(lam - eta g), NAG momentum mu
                                                          u = `apg_displacement`(eta, mu)
    GAL       FISTA on the masks every mask_step steps, lam sign(m) in g and the soft
              threshold eta lam: 2 eta lam per step, FISTA's momentum (no restart)
                                                          u = `fista_displacement`(eta, k)
    SSS's scales and GAL's masks all start at the same value (1), so D is that value whatever
    the budget (no ranking: `Rule.start`); both are resisted (margin applies).

So every method gets the same *per-step push* for the same D: s eta_t per step, against a task
gradient of the same size. For the methods whose penalized parameters take their steps
without momentum, as in their official optimizers (RSNLI's gamma, OTO's zero-invariant groups),
the penalty is not carried by momentum, so its reach over the phase is only about (1 - mu)
of the others' (margin * D / 10); giving them the same *reach* instead would make their push
10x stronger relative to the task gradient than NS's (measured on ResNet-20, quick scale: the
sparse phase then ends at 28% (RSNLI) and 17% (OTO) accuracy, against 74-77% for NS, PR, SCP).

GREG has a rule of its own kind: its penalty grows by delta every k_u steps up to tau, only on
the channels it will remove; delta is set so that lam reaches tau after half of the phase
(the rest is GREG's stabilization), delta = tau k_u / (steps / 2).

`margin` (default 1 here; the protocol's `Scale.strength_margin` is 2) multiplies D where the
task gradient resists the push: the BN-based rules move gamma, which the loss is not invariant
to (measured on ResNet-20 at the quick scale, NS with margin 1 still removes channels that carry
signal: 10% accuracy right after removal, 23% after BN recalibration, against 24.5% and 74.4%
with margin 2). The group-norm rules (SSL, OICSR, OTO) are `resisted=False`: their group norms
are mostly conv rows that feed a BatchNorm, along which the loss is scale-invariant
(<grad f, w_k> = 0), so nothing resists the radial push and the drift is D itself, whatever
the margin: a drift of 2D empties the rows of every layer, kept or not, and the rows' effective
learning rate (prop. to 1 / ||w_k||^2) explodes (measured, same setting: SSL at 2D ends its
sparse phase at 46% and is fine-tuned to 54%; at D, 83% and 83%, l1 84.8). Methods not in
`RULES` (GBN, EagleEye, GReg-2, L1; DMC, GDP, BAR and ResRep, whose pressure is the budget
itself; SCOP, which has no strength) plan their own phase and keep their values.
`pipeline.run` applies the rule at every scale but 'full' when the method's strength
parameters are still at their defaults (the papers' values), and writes the returned record
into `result['strength']`.
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .methods.base import Context, Method
from .select import Budget

__all__ = ["RULES", "Rule", "has_rule", "phase_lrs", "sgd_displacement", "target_drift", "apply",
           "uses_defaults"]

_PHI0 = 1.0 / math.sqrt(2.0 * math.pi)      # standard normal density at 0


@dataclass(frozen=True)
class Rule:
    """params: hyperparameters set to the strength; unit(method, lrs, momentum, model): drift
    per unit strength; magnitude(method, model): per-group x_c (default: the method's scores)."""
    params: tuple[str, ...]
    unit: Callable[[Method, list[float], float, nn.Module], float]
    magnitude: Callable[[Method, nn.Module], dict[int, torch.Tensor]] | None = None
    tied: dict[str, str] = field(default_factory=dict)     # param -> param it keeps a ratio to
    schedule: Callable[[Method, list[float]], dict[str, float]] | None = None  # not drift-based
    applies: Callable[[Method], bool] = lambda m: True
    resisted: bool = True        # False: nothing resists the push, the drift is D (no margin)
    start: Callable[[Method], float] | None = None   # every factor starts here: D, any budget


def sgd_displacement(lrs: list[float], momentum: float, nesterov: bool = True) -> float:
    """How far SGD (torch's momentum / Nesterov recurrence) moves a parameter whose gradient is
    constantly 1 over steps with learning rates `lrs`."""
    buf, total = 0.0, 0.0
    for lr in lrs:
        buf = momentum * buf + 1.0
        total += lr * (1.0 + momentum * buf if nesterov and momentum > 0 else buf)
    return total


def apg_displacement(lrs: list[float], momentum: float) -> float:
    """How far SSS's APG (NAG form: z = lam - eta g; v = mu v + (z - lam); lam = z + mu v)
    moves a scale under a constant unit push over steps with learning rates `lrs`."""
    lam = v = 0.0
    for eta in lrs:
        z = lam + eta
        v = momentum * v + (z - lam)
        lam = z + momentum * v
    return lam


def fista_displacement(lrs: list[float], every: int, per_step: float = 2.0) -> float:
    """How far GAL's FISTA (a step every `every` iterations, t' = (1 + sqrt(1 + 4 t^2)) / 2,
    y = m + ((t - 1) / t')(m - m_prev), m = y - eta g) moves a mask under a constant push of
    `per_step` per unit strength and unit lr (2: lam sign(m) in g plus the soft threshold)."""
    m = prev = 0.0
    t, k = 1.0, 0
    for i, eta in enumerate(lrs, 1):
        if i % every:
            continue
        y = m
        if k:
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = m + (t - 1) / t_new * (m - prev)
            t = t_new
        prev, m, k = m, y + per_step * eta, k + 1
    return m


def _gal_unit(m: Method, lrs: list[float], mu: float, model: nn.Module) -> float:
    from .methods.gal import OFFICIAL_MASK_STEP, OFFICIAL_STEPS
    every = m.mask_step or max(1, round(OFFICIAL_MASK_STEP * len(lrs) / OFFICIAL_STEPS))
    return fista_displacement(lrs, every)


def _gamma_of(method: Method, model: nn.Module) -> dict[int, torch.Tensor]:
    from .methods.ns import group_gamma
    return {g.index: group_gamma(model, g).cpu() for g in method.groups if g.bns()}


def _rsnli_x(method: Method, model: nn.Module) -> dict[int, torch.Tensor]:
    from .methods.rsnli import channel_cost
    cost = channel_cost(model, method.all_groups, method.ctx.example_inputs)
    return {i: s / cost[i] for i, s in _gamma_of(method, model).items()}


def _rsnli_unit(m: Method, lrs: list[float], mu: float, model: nn.Module) -> float:
    warm = math.ceil(m.warmup * len(lrs))
    ratio = m.rho_warmup / m.rho if m.rho else 1.0
    return sgd_displacement([lr * (ratio if t < warm else 1.0) for t, lr in enumerate(lrs)], mu)


def _scp_unit(m: Method, lrs: list[float], mu: float, model: nn.Module) -> float:
    gam = torch.cat(list(_gamma_of(m, model).values()))
    return _PHI0 * sgd_displacement(lrs, mu) / float(gam.median())


RULES: dict[str, Rule] = {
    "ns": Rule(("lam",), lambda m, lrs, mu, _: sgd_displacement(lrs, mu), _gamma_of),
    "pr": Rule(("lam",), lambda m, lrs, mu, _: (m.t + 1) * sgd_displacement(lrs, mu),
               _gamma_of),
    "rsnli": Rule(("rho",), _rsnli_unit, _rsnli_x, tied={"rho_warmup": "rho"}),
    "scp": Rule(("lam",), _scp_unit, _gamma_of),
    "oto": Rule(("lam",), lambda m, lrs, mu, _: sgd_displacement(lrs, mu), resisted=False),
    "ssl": Rule(("lam_filter", "lam_channel"), lambda m, lrs, mu, _: sgd_displacement(lrs, mu),
                resisted=False),
    "oicsr": Rule(("lam",), lambda m, lrs, mu, _: sgd_displacement(lrs, mu),
                  lambda m, model: {i: s.sqrt() for i, s in m.scores(model).items()},
                  resisted=False),
    "sss": Rule(("gamma",), lambda m, lrs, mu, _: apg_displacement(lrs, m.momentum),
                start=lambda m: m.lam_init),
    "gal": Rule(("lam",), _gal_unit, start=lambda m: 1.0,
                applies=lambda m: m.mask_init == "ones"),
    "greg": Rule(("delta",), lambda m, lrs, mu, _: 1.0,
                 schedule=lambda m, lrs: {"delta": m.tau * m.k_u / max(len(lrs) / 2, 1)},
                 applies=lambda m: m.variant == "greg1"),
}


def has_rule(method: Method) -> bool:
    """True when a strength rule exists for `method` (its name and, for GREG, GReg-1)."""
    rule = RULES.get(method.name)
    return rule is not None and rule.applies(method)


def phase_lrs(ctx: Context, steps_per_epoch: int) -> list[float]:
    """The learning rate of every step of the sparse phase described by `ctx`."""
    from .train import lr_factor
    total = math.ceil(ctx.epochs * steps_per_epoch)
    return [ctx.lr * lr_factor(s, total, ctx.schedule) for s in range(total)]


def uses_defaults(method: Method) -> bool:
    """True when every strength parameter of `method` still has its constructor default."""
    rule = RULES.get(method.name)
    if rule is None or not rule.applies(method):
        return False
    sig = inspect.signature(type(method).__init__).parameters
    return all(p in sig and getattr(method, p) == sig[p].default
               for p in (*rule.params, *rule.tied))


def target_drift(method: Method, model: nn.Module, groups: list, budget: Budget, ctx: Context,
                 quantile: float = 0.9, margin: float = 1.0) -> dict[str, Any]:
    """The strength the target-drift rule gives `method` (not applied; see `apply`).

    Works on copies: `model` and `method` are not changed. Returns a JSON-able record
    {'rule', 'params': {name: value}, 'D', 'unit', 'removed', 'prunable', 'quantile', 'margin',
    'resisted', 'steps', 'sum_lr'}; 'margin' is the one used: 1 for an unresisted rule.
    """
    rule = RULES.get(method.name)
    if rule is None or not rule.applies(method):
        raise KeyError(f"no strength rule for method {method.name!r} (as configured); rules "
                       f"exist for {', '.join(sorted(RULES))} (GREG: variant 'greg1')")
    if not (0 < quantile <= 1 and math.isfinite(margin) and margin > 0):
        raise ValueError(f"need 0 < quantile <= 1 and margin > 0, got {quantile}, {margin}")
    if rule.schedule is not None:
        lrs = phase_lrs(ctx, len(ctx.train_loader))
        return {"rule": "schedule", "params": rule.schedule(method, lrs), "steps": len(lrs),
                "sum_lr": sum(lrs)}
    lrs = phase_lrs(ctx, len(ctx.train_loader))
    if rule.start is not None:          # every factor starts at D: no ranking, any budget
        d, margin = float(rule.start(method)), margin if rule.resisted else 1.0
        unit = rule.unit(method, lrs, ctx.momentum, model)
        return {"rule": "target drift", "params": {p: margin * d / unit for p in rule.params},
                "D": d, "unit": unit, "removed": None, "prunable": None,
                "quantile": quantile, "margin": margin, "resisted": rule.resisted,
                "steps": len(lrs), "sum_lr": sum(lrs)}
    probe, work = copy.deepcopy(method), copy.deepcopy(model)
    probe.ctx = ctx
    probe.attach(work, groups)
    mags = (rule.magnitude or (lambda m, mod: m.scores(mod)))(probe, work)
    keep = probe.select(work, budget, scores=mags)
    gone = []
    for i, x in mags.items():
        mask = torch.ones(x.numel(), dtype=torch.bool)
        if i in keep:
            mask[keep[i].cpu()] = False
        gone.append(x.detach().float().cpu().reshape(-1)[mask])
    gone_t = torch.cat(gone) if gone else torch.zeros(0)
    prunable = sum(int(x.numel()) for x in mags.values())
    if gone_t.numel() == 0:
        raise ValueError(f"{method.name}: the budget {budget} removes no channel the method "
                         "penalizes, so no strength can be derived; give the strength yourself")
    unit = rule.unit(probe, lrs, ctx.momentum, work)
    d = float(torch.quantile(gone_t, quantile))
    margin = margin if rule.resisted else 1.0
    value = margin * d / unit
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{method.name}: the strength rule gave {value} (D={d}, unit={unit})")
    params = {p: value for p in rule.params}
    for p, base in rule.tied.items():
        params[p] = value * getattr(method, p) / getattr(method, base)
    return {"rule": "target drift", "params": params, "D": d, "unit": unit,
            "removed": int(gone_t.numel()), "prunable": prunable, "quantile": quantile,
            "margin": margin, "resisted": rule.resisted, "steps": len(lrs), "sum_lr": sum(lrs)}


def apply(method: Method, record: dict[str, Any]) -> Method:
    """Set the strength parameters of `record['params']` on `method` (in place); return it."""
    for p, v in record["params"].items():
        setattr(method, p, float(v))
    return method
