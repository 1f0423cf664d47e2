"""Magnitude baselines: 'l1' (Li et al.: one pruning rate for every layer, lowest-L1 filters of
each layer) and 'l1_global' (one global L1 ranking). Oracles: filter norms and widths read
from the model's own weights, MACs counted on the pruned model."""
import math

import pytest
import torch

import prunelib as pl
from prunelib import methods
from prunelib.methods.base import Context
from prunelib.models import get_model
from prunelib.select import Budget, select_keep

X = torch.randn(1, 3, 32, 32)


def attached(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = get_model("resnet20")
    m = methods.get(name)
    m.ctx = Context(example_inputs=X)
    m.attach(model, pl.channel_groups(model, X))
    return m, model


def l1_of(model, layer: str) -> torch.Tensor:
    """||W_k||_1 of every filter of a conv, straight from its weight."""
    return model.get_submodule(layer).weight.detach().abs().sum((1, 2, 3))


def widths(m, small) -> dict[str, tuple[int, int]]:
    """(kept, dense) output channels of every prunable group's producing conv."""
    return {g.sources[0]: (small.get_submodule(g.sources[0]).out_channels, g.size)
            for g in m.groups}


def macs_ratio(model, small) -> float:
    return pl.count(small, X)[0] / pl.count(model, X)[0]


def test_l1_removes_the_same_fraction_of_every_prunable_group():
    m, model = attached("l1")
    assert len({g.size for g in m.groups}) == 3                     # 16, 32 and 64 channels
    small = m.finish(model, Budget(macs=0.5))
    for layer, (kept, size) in widths(m, small).items():
        assert abs((size - kept) - m.rate * size) <= 1, layer      # one rate, +-1 rounding
        assert size - kept == math.floor(m.rate * size + 1e-9)
    small = m.finish(model, Budget(percent=0.3))
    assert m.rate == 0.3
    assert {layer: kept for layer, (kept, _) in widths(m, small).items()} == \
        {g.sources[0]: g.size - math.floor(0.3 * g.size) for g in m.groups}    # 12, 23, 45


def test_l1_meets_a_macs_budget_on_resnet20_with_the_smallest_common_rate():
    m, model = attached("l1")
    small = m.finish(model, Budget(macs=0.5))
    assert 0.45 <= macs_ratio(model, small) <= 0.5
    # the rate is the smallest that meets the target: any lower common rate misses it
    assert macs_ratio(model, m.finish(model, Budget(percent=m.rate - 1e-3))) > 0.5
    with pytest.raises(ValueError, match="cannot be met by a uniform per-layer rate"):
        m.finish(model, Budget(macs=0.05))


def test_l1_keeps_the_highest_l1_filters_of_each_layer_and_their_input_slices():
    m, model = attached("l1")
    small = m.finish(model, Budget(macs=0.5))
    for g in m.groups:
        conv1 = g.sources[0]
        n = small.get_submodule(conv1).out_channels
        top = torch.argsort(l1_of(model, conv1), descending=True)[:n].sort().values
        assert torch.equal(small.get_submodule(conv1).weight,
                           model.get_submodule(conv1).weight[top])
        conv2 = conv1[:-1] + "2"                         # the block's second conv reads them
        assert torch.equal(small.get_submodule(conv2).weight,
                           model.get_submodule(conv2).weight[:, top])


def test_l1_global_ranks_raw_norms_across_layers_as_before():
    m, model = attached("l1_global")
    norms = {g.index: l1_of(model, g.sources[0]) for g in m.groups}
    # one global threshold over the raw norms of all layers, each layer keeping its guard
    t = float(torch.cat(list(norms.values())).quantile(0.4))
    small = m.finish(model, Budget(threshold=t))
    assert {g.sources[0]: small.get_submodule(g.sources[0]).out_channels for g in m.groups} == \
        {g.sources[0]: max(math.ceil(0.1 * g.size), int((norms[g.index] > t).sum()))
         for g in m.groups}
    # percent and MACs budgets: the global rule of prunelib.select on those norms
    for budget in (Budget(percent=0.4), Budget(macs=0.5)):
        want = select_keep(model, m.all_groups, norms, budget, X, m.min_keep, m.min_channels)
        small = m.finish(model, budget)
        for g in m.groups:
            assert torch.equal(small.get_submodule(g.sources[0]).weight,
                               model.get_submodule(g.sources[0]).weight[want[g.index]])
    # the fan-in bias the per-layer rule avoids: at He initialization ||W_k||_1 ~ sqrt(fan-in),
    # so the global ranking empties stage 1 (fan-in 144) before stage 3 (fan-in 576)
    assert macs_ratio(model, small) <= 0.5
    kept = {layer: k / size for layer, (k, size) in widths(m, small).items()}
    assert max(kept[f"layer1.{b}.conv1"] for b in range(3)) < \
        min(kept[f"layer3.{b}.conv1"] for b in (1, 2))


def test_group_l2_importance_is_the_mean_squared_norm_of_every_slice_a_channel_owns():
    torch.manual_seed(0)
    model = get_model("resnet20")
    m = methods.get("l1_global", importance="group_l2")
    m.ctx = Context(example_inputs=X)
    m.attach(model, pl.channel_groups(model, X))
    g = next(g for g in m.groups if g.sources == ["layer2.1.conv1"])
    w1, w2 = model.layer2[1].conv1.weight, model.layer2[1].conv2.weight
    gamma = model.layer2[1].bn1.weight
    want = (w1.pow(2).sum((1, 2, 3)) + gamma.pow(2) + w2.pow(2).sum((0, 2, 3))) / 3
    torch.testing.assert_close(m.scores(model)[g.index], want.detach())


def test_normalize_mean_makes_the_global_ranking_blind_to_a_layers_scale():
    def kept(normalize: str, scale: float) -> dict[str, int]:
        m, model = attached("l1_global")
        m.set_hparams(normalize=normalize)
        with torch.no_grad():                       # BN follows: the function is unchanged
            model.layer1[0].conv1.weight.mul_(scale)
        if normalize == "mean":
            assert all(abs(float(s.mean()) - 1) < 1e-6 for s in m.scores(model).values())
        return {k: v for k, (v, _) in widths(m, m.finish(model, Budget(macs=0.5))).items()}
    assert kept("mean", 100.0) == kept("mean", 1.0)
    raw, scaled = kept("none", 1.0), kept("none", 100.0)
    assert scaled["layer1.0.conv1"] == 16 > raw["layer1.0.conv1"]
    per_layer, model = attached("l1")               # a per-layer ranking: the same widths
    plain = widths(per_layer, per_layer.finish(model, Budget(macs=0.5)))
    per_layer.set_hparams(normalize="mean")
    assert widths(per_layer, per_layer.finish(model, Budget(macs=0.5))) == plain
    with pytest.raises((TypeError, ValueError), match="normalize='max'.*'none', 'mean'"):
        methods.get("l1_global", normalize="max")


def test_l1_threshold_budget_is_the_same_rule_as_l1_global():
    per_layer, model = attached("l1")
    glob, _ = attached("l1_global")
    t = float(torch.cat(list(per_layer.scores(model).values())).median())
    a, b = per_layer.finish(model, Budget(threshold=t)), glob.finish(model, Budget(threshold=t))
    assert widths(per_layer, a) == widths(glob, b)


@pytest.mark.parametrize("multiple", [4, 8])
def test_l1_with_multiple_keeps_multiples_at_one_rate_and_meets_the_macs_target(multiple):
    m, model = attached("l1")
    small = m.finish(model, Budget(macs=0.5, multiple=multiple))
    assert macs_ratio(model, small) <= 0.5
    for layer, (kept, size) in widths(m, small).items():
        assert kept % multiple == 0 or kept == size, layer
        raw = size - math.floor(m.rate * size + 1e-9)                 # the rate's own count
        assert raw <= kept < raw + multiple, layer
    # the rate is the smallest that meets the target with rounded counts
    lower = m.finish(model, Budget(percent=m.rate - 1e-3, multiple=multiple))
    assert macs_ratio(model, lower) > 0.5


def test_l1_with_a_multiple_too_coarse_for_the_target_says_so():
    m, model = attached("l1")
    with pytest.raises(ValueError, match="cannot be met.*rounded to multiples"):
        m.finish(model, Budget(macs=0.5, multiple=16))


@pytest.mark.parametrize("name", ["l1", "l1_global"])
def test_train_first_trains_the_phase_without_a_penalty_and_the_default_trains_nothing(name):
    import numpy as np
    from prunelib.data import Batches
    rng = np.random.default_rng(0)
    loader = Batches(rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8), np.arange(32) % 10,
                     16, augment=False, seed=0)
    for train_first in (False, True):
        m, model = attached(name)
        m.set_hparams(train_first=train_first)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ctx = Context(example_inputs=X, train_loader=loader, epochs=1.0, lr=0.05, quiet=True)
        assert m.regularize(model, ctx) is model and m.loss_term(model) is None
        moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert bool(moved) == train_first                  # conv weights and BN stats move
    with pytest.raises(TypeError, match="train_first='yes'.*True or False"):
        methods.get(name, train_first="yes")
