"""MAC counting against torch's FlopCounterMode; budgets against brute-force counts."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import prunelib as pl
from prunelib.models import get_model
from prunelib.select import Budget, select_keep


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "mobilenetv2"])
def test_macs_are_half_the_flops_of_torch_flop_counter(name):
    model = get_model(name).eval()
    x = torch.randn(3, 3, 32, 32)
    macs, params = pl.count(model, x)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    assert fc.get_total_flops() == 2 * macs * 3          # count() is per sample
    assert params == sum(p.numel() for p in model.parameters())


def test_resnet56_matches_the_papers_size():
    macs, params = pl.count(get_model("resnet56"), torch.randn(1, 3, 32, 32))
    assert abs(params / 0.85e6 - 1) < 0.03 and abs(macs / 125e6 - 1) < 0.03


def test_torchvision_resnet50_macs():
    macs, _ = pl.count(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))
    assert abs(macs / 4.11e9 - 1) < 0.01


def _setup(name="resnet20"):
    model = get_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    groups = pl.channel_groups(model, x)
    gen = torch.Generator().manual_seed(0)
    scores = {g.index: torch.rand(g.size, generator=gen) for g in groups if not g.coupled}
    return model, x, groups, scores


@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_macs_budget_is_met_and_predicted_exactly(target):
    model, x, groups, scores = _setup()
    keep = select_keep(model, groups, scores, Budget(macs=target), x, min_keep=0.1)
    small = pl.remove_channels(model, groups, keep)
    macs0, _ = pl.count(model, x)
    macs1, _ = pl.count(small, x)
    assert macs1 <= target * macs0
    assert macs1 > target * macs0 - 0.01 * macs0          # stops as soon as it is met


def test_min_keep_guard_and_unreachable_budget():
    model, x, groups, scores = _setup()
    keep = select_keep(model, groups, scores, Budget(percent=0.95), x, min_keep=0.25)
    assert all(len(keep[i]) >= -(-groups[i].size // 4) for i in keep)
    with pytest.raises(ValueError, match="cannot be met"):
        select_keep(model, groups, scores, Budget(macs=0.05), x, min_keep=0.5)


def test_threshold_and_percent_keep_the_highest_scores():
    model, x, groups, scores = _setup()
    keep = select_keep(model, groups, scores, Budget(threshold=0.5), x)
    for i, k in keep.items():
        expect = torch.nonzero(scores[i] > 0.5).flatten()
        assert torch.equal(k, expect) or (len(expect) == 0 and len(k) == 1)
    flat = torch.cat(list(scores.values()))
    keep = select_keep(model, groups, scores, Budget(percent=0.5), x)
    assert abs(sum(len(k) for k in keep.values()) - flat.numel() // 2) <= len(scores)


def test_budget_needs_exactly_one_rule():
    with pytest.raises(ValueError):
        Budget()
    with pytest.raises(ValueError):
        Budget(macs=0.5, percent=0.5)
    with pytest.raises(ValueError):
        Budget(macs=1.5)


@pytest.mark.parametrize("value,expect", [("1", "1"), ("0", "positive integer"),
                                          ("two", "positive integer")])
def test_prunelib_threads_env_switch(value, expect):
    env = {**os.environ, "PRUNELIB_THREADS": value}
    proc = subprocess.run([sys.executable, "-c", "import prunelib, torch; "
                           "print(torch.get_num_threads())"], env=env, capture_output=True,
                          text=True)
    assert expect in (proc.stdout + proc.stderr)


@pytest.mark.parametrize("multiple", [4, 8])
@pytest.mark.parametrize("target", [0.7, 0.5])
def test_macs_budget_with_multiple_keeps_multiples_and_meets_the_target(multiple, target):
    model, x, groups, scores = _setup()
    keep = select_keep(model, groups, scores, Budget(macs=target, multiple=multiple), x)
    assert all(len(k) % multiple == 0 or len(k) == groups[i].size for i, k in keep.items())
    small = pl.remove_channels(model, groups, keep)
    macs0, macs1 = pl.count(model, x)[0], pl.count(small, x)[0]
    assert target - 0.05 < macs1 / macs0 <= target          # met, and not by far


def test_macs_budget_with_a_multiple_too_coarse_to_meet_says_so():
    model, x, groups, scores = _setup()
    with pytest.raises(ValueError, match="cannot be met.*multiples of 16"):
        select_keep(model, groups, scores, Budget(macs=0.5, multiple=16), x)


def test_profile_layers_splits_time_by_layer_and_op_and_matches_the_macs():
    from prunelib import methods
    from prunelib.measure import profile_layers, profile_table
    from prunelib.methods.base import Context
    torch.manual_seed(0)
    model = get_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    m = methods.get("l1")
    m.ctx = Context(example_inputs=x)
    m.attach(model, pl.channel_groups(model, x))
    small = m.finish(model, Budget(percent=0.5)).eval()
    layers, ops = profile_layers(model, small, torch.randn(2, 3, 32, 32), reps=1, rounds=1)
    rows = {r["layer"]: r for r in layers}
    assert {"layer1.*.conv1", "layer3.*.bn2", "layer2.* (own)", "fc"} <= set(rows)
    assert rows["layer1.*.conv1"]["macs_ratio"] == 2.0 and rows["fc"]["macs_ratio"] == 1.0
    assert math.isnan(rows["layer2.* (own)"]["macs_ratio"])       # adds and ReLUs: no MACs
    assert all(r["dense_ms"] >= 0 and r["pruned_ms"] >= 0 for r in layers)
    assert [r["dense_ms"] for r in layers] == sorted((r["dense_ms"] for r in layers),
                                                     reverse=True)
    assert any(r["op"] == "aten::mkldnn_convolution" or "conv" in r["op"] for r in ops)
    lines = profile_table(layers, top=5)
    assert len(lines) == 7 and lines[-1].startswith("total (")


def test_hooked_names_the_modules_a_method_left_hooks_on():
    import prunelib as pl
    from prunelib import methods
    from prunelib.models import get_model
    from prunelib.select import Budget
    model, x = get_model("resnet20"), torch.randn(1, 3, 32, 32)
    assert pl.hooked(model) == []
    m = methods.get("gdp")
    m.ctx = methods.Context(example_inputs=x)
    attached = m.attach(model, pl.channel_groups(model, x))
    assert "" in pl.hooked(attached) and len(pl.hooked(attached)) > 1
    assert pl.hooked(m.finish(attached, Budget(macs=0.6))) == []
