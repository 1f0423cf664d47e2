"""Every registered method validates its hyperparameters where they enter and refuses its hooks
until it is attached (prunelib.methods.base: HParam, Method.set_hparams, the attach guard).

The parameters are read from each constructor's signature (following **kw to the base class),
so a new method or a new hyperparameter is covered without editing this file.
"""
import inspect
import math
import re
import warnings

import pytest
import torch
from torch import nn

import prunelib as pl
from prunelib import methods
from prunelib.data import Batches
from prunelib.methods.base import HOOKS, Context, Method, _REGISTRY
from prunelib.models import get_model
from prunelib.select import Budget

NAMES = methods.names()


def ctor_params(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters `cls(...)` accepts, following **kw up the MRO to Method.__init__."""
    out: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        for p in params:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                out.setdefault(p.name, p)
        if klass is Method or not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return out


def is_numeric(p: inspect.Parameter) -> bool:
    """A number is due: a numeric default, or None with int/float in the annotation."""
    if isinstance(p.default, bool):
        return False
    if isinstance(p.default, (int, float)):
        return True
    return p.default is None and re.search(r"\b(int|float)\b", str(p.annotation)) is not None


NUMERIC = [(n, k) for n in NAMES for k, p in ctor_params(_REGISTRY[n]).items() if is_numeric(p)]


def outside(spec) -> list[float]:
    """Values just outside each declared bound of a numeric HParam."""
    bad = []
    if spec.lo is not None:
        bad.append(spec.lo if spec.lo_open else spec.lo - 1)
    if spec.hi is not None:
        bad.append(spec.hi if spec.hi_open else spec.hi + 1)
    return bad


def tiny() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def loader(n: int = 16, size: int = 8, bs: int = 8) -> Batches:
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)
    return Batches(imgs, torch.randint(0, 10, (n,), generator=gen), batch_size=bs)


# --- construction ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_default_construction_works_and_every_constructor_argument_is_declared(name):
    m = methods.get(name)
    assert m.name == name and isinstance(m.hparams(), dict)
    assert set(ctor_params(type(m))) == set(type(m).HPARAMS)
    for key, p in ctor_params(type(m)).items():          # the defaults satisfy their own spec
        assert type(m).HPARAMS[key].check(name, key, p.default) == p.default


@pytest.mark.parametrize("name,param", NUMERIC)
def test_wrong_types_raise_type_error_naming_method_parameter_and_value(name, param):
    none_ok = _REGISTRY[name].HPARAMS[param].none
    assert none_ok or ctor_params(_REGISTRY[name])[param].default is not None
    bad = ["0.1", True, [0.1], torch.tensor(0.1)] + ([] if none_ok else [None])
    for value in bad:
        with pytest.raises(TypeError) as e:
            methods.get(name, **{param: value})
        msg = str(e.value)
        assert f"({name!r})" in msg and f"{param}={value!r}" in msg and "must be" in msg


@pytest.mark.parametrize("name,param", NUMERIC)
def test_non_finite_and_out_of_range_values_raise_value_error(name, param):
    spec = _REGISTRY[name].HPARAMS[param]
    assert outside(spec), f"{name}.{param} declares no range"
    non_finite = [math.nan, -math.inf] + ([] if spec.inf else [math.inf])
    for value in non_finite + outside(spec):
        # a non-finite value for an integer parameter is not an integer: a TypeError
        exc = TypeError if spec.kind is int and value in non_finite else ValueError
        with pytest.raises(exc) as e:
            methods.get(name, **{param: value})
        msg = str(e.value)
        assert f"({name!r})" in msg and f"{param}={value!r}" in msg
        assert spec.allowed() in msg


@pytest.mark.parametrize("name,param", [(n, k) for n, k in NUMERIC
                                        if _REGISTRY[n].HPARAMS[k].kind is int])
def test_integer_parameters_refuse_fractions_and_store_ints(name, param):
    spec = _REGISTRY[name].HPARAMS[param]
    with pytest.raises(TypeError, match=rf"{param}=.*must be an integer"):
        methods.get(name, **{param: spec.lo + 1.5})
    m = methods.get(name, **{param: float(spec.lo + 1)})     # 2.0 is an integer: stored as int
    assert type(getattr(m, param)) is int and getattr(m, param) == spec.lo + 1


# documented ranges, written out by hand (independent of the HPARAMS tables)
DOCUMENTED = [
    ("ns", {"lam": -1e-5}, ValueError, "lam=-1e-05 is not allowed: lam must be a finite "
     "number >= 0 (a negative lam inverts the penalty)"),
    ("ns", {"min_keep": 1.0}, ValueError, "min_keep=1.0"),
    ("ns", {"min_keep": -0.1}, ValueError, "min_keep=-0.1"),
    ("l1", {"min_channels": 0}, ValueError, "min_channels=0"),
    ("l1", {"min_channels": 1.5}, TypeError, "min_channels=1.5"),
    ("gbn", {"residual": "trunk"}, ValueError, "residual='trunk'"),
    ("pr", {"t": 2.0}, ValueError, "t >= 2 sends every factor to 0"),
    ("pr", {"gamma_init": 1.5}, ValueError, "gamma_init must be at most clamp=1"),
    ("rsnli", {"warmup": 1.5}, ValueError, "warmup=1.5"),
    ("rsnli", {"fold": 1}, TypeError, "fold=1"),
    ("scp", {"tau": 0}, ValueError, "tau=0"),
    ("gbn", {"target_macs": 0}, ValueError, "target_macs=0"),
    ("gbn", {"ticks_per_tock": 0}, ValueError, "ticks_per_tock=0"),
    ("eagleeye", {"max_rate": 0.7, "min_rate": 0.4}, ValueError, "min_rate + max_rate"),
    ("eagleeye", {"n_candidates": 2.5}, TypeError, "n_candidates=2.5"),
    ("greg", {"k_u": 2.5}, TypeError, "k_u=2.5"),
    ("greg", {"pr": {"layer1": 1.0}}, ValueError, "pr['layer1']=1.0"),
    ("greg", {"pr": None, "macs": None}, ValueError, "MACs target"),
    ("greg", {"lam_recover": 1e-4}, ValueError, "lam_recover=0.0001"),
    ("oto", {"eps": 1.0}, ValueError, "eps=1.0"),
    ("oto", {"log_every": -1}, ValueError, "log_every=-1"),
    ("ssl", {"zerout": -1e-4}, ValueError, "zerout=-0.0001"),
    ("oicsr", {"lam": "3e-3"}, TypeError, "lam='3e-3'"),
]


@pytest.mark.parametrize("name,kw,exc,text", DOCUMENTED)
def test_documented_ranges_are_enforced_with_a_message_saying_what_is_allowed(name, kw, exc,
                                                                              text):
    with pytest.raises(exc) as e:
        methods.get(name, **kw)
    assert text in str(e.value) and f"({name!r})" in str(e.value)


def test_unknown_hyperparameter_lists_the_known_ones():
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) lamda; known: .*lam"):
        methods.get("ns", lamda=1e-4)


def test_inf_is_allowed_only_where_declared():
    assert methods.get("greg", mag_ratio_limit=math.inf).mag_ratio_limit == math.inf
    with pytest.raises(ValueError, match="tau=inf"):
        methods.get("greg", tau=math.inf)


# --- checks that need the model ----------------------------------------------------------------
def test_ssl_zerout_that_would_zero_a_whole_layer_is_refused_at_attach():
    model, x = tiny(), torch.randn(1, 3, 8, 8)
    top = float(model[3].weight.detach().abs().max())
    ssl = methods.get("ssl", zerout=top)
    with pytest.raises(ValueError, match=r"zerout=.*would zero every weight of '3'"):
        ssl.attach(model, pl.channel_groups(model, x))
    methods.get("ssl", zerout=0.5 * top).attach(model, pl.channel_groups(model, x))


def test_greg_pr_key_that_matches_no_prunable_layer_is_refused_at_attach():
    model, x = get_model("resnet20"), torch.randn(1, 3, 32, 32)
    groups = pl.channel_groups(model, x)
    with pytest.raises(ValueError, match=r"pr key 'layer9' matches no layer.*layer1\.0\.conv1"):
        methods.get("greg", pr={"layer1": 0.5, "layer9": 0.5}).attach(model, groups)
    with pytest.raises(ValueError, match=r"pr key 'conv1' \(ratio 0.5\) matches conv1, none "
                                         r"of which this method prunes \(residual='internal'\)"):
        methods.get("greg", pr={"conv1": 0.5}).attach(model, groups)      # conv1: the trunk
    greg = methods.get("greg", pr={"conv1": 0.0, "layer2": 0.5})         # ratio 0: harmless
    greg.attach(model, groups)
    ratios = {g.sources[0]: greg.ratios[g.index] for g in greg.groups}
    assert ratios == {n: 0.5 if n.startswith("layer2.") else 0.0 for n in ratios}
    methods.get("greg", pr={"conv1": 0.5}, residual="coupled").attach(model, groups)


def test_greg2_too_short_for_its_pick_warns_and_records_it():
    model, x = tiny(), torch.randn(1, 3, 8, 8)
    greg = methods.get("greg", variant="greg2", pr=0.5)        # defaults: ~10k steps to pick
    greg.ctx = Context(example_inputs=x, train_loader=loader(), epochs=1, lr=0.01, quiet=True)
    greg.attach(model, pl.channel_groups(model, x))
    assert greg.pick_steps() == 999 * 10 + 1
    with pytest.warns(UserWarning, match=r"will not reach its pick.*phase has 2 steps, the "
                                         r"pick needs about 9991"):
        greg.regularize(model, greg.ctx)
    assert greg.pick_reached is False and greg.hparams()["pick_reached"] is False
    mags = greg.magnitude(model)
    for i, mask in greg.pruned.items():                      # picked by the magnitudes as they are
        assert set(torch.nonzero(mask).flatten().tolist()) == \
            set(torch.argsort(mags[i])[:int(mask.sum())].tolist())
    fast = methods.get("greg", variant="greg2", pr=0.5, k_u=1, delta_pick=0.01, tau_pick=0.01)
    fast.ctx = Context(example_inputs=x, train_loader=loader(), epochs=1, lr=0.01, quiet=True)
    fast.attach(model, pl.channel_groups(model, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast.regularize(model, fast.ctx)
    assert fast.pick_reached is True


# --- hooks before attach -----------------------------------------------------------------------
def call(method: Method, hook: str, model: nn.Module):
    x = torch.randn(1, 3, 8, 8)
    args = {"param_groups": (model, 0.1, 0.0), "regularize": (model, Context(x)),
            "finish": (model, Budget(macs=0.5))}.get(hook, (model,))
    return getattr(method, hook)(*args)


@pytest.mark.parametrize("name", NAMES)
def test_every_hook_before_attach_says_to_call_attach_first(name):
    m = methods.get(name)
    for hook in HOOKS:
        with pytest.raises(RuntimeError, match=rf"\({name!r}\): {hook}\(\) was called before .*"
                                               r"call attach\(model, groups\) first"):
            call(m, hook, tiny())


@pytest.mark.parametrize("name", NAMES)
def test_after_attach_the_hooks_are_the_class_methods_with_no_wrapper(name):
    model, x = tiny(), torch.randn(1, 3, 8, 8)
    m = methods.get(name)
    m.ctx = Context(example_inputs=x)
    m.attach(model, pl.channel_groups(model, x))
    for hook in HOOKS:
        assert hook not in vars(m) and getattr(m, hook).__func__ is getattr(type(m), hook)


def test_a_hook_looked_up_before_attach_runs_once_attached():
    import prunelib as pl
    from prunelib.models import get_model
    from prunelib.select import Budget
    model, x = get_model("resnet20"), torch.randn(1, 3, 32, 32)
    m = methods.get("l1")
    m.ctx = methods.Context(example_inputs=x)
    small = m.finish(m.attach(model, pl.channel_groups(model, x)), Budget(macs=0.6))
    assert pl.count(small, x)[0] <= 0.6 * pl.count(model, x)[0]
