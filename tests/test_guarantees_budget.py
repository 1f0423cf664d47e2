"""Budget and counting guarantees: exact counts under ties, validated fields, checked inputs."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import prunelib as pl
from prunelib.models import get_model
from prunelib.select import Budget, select_keep

X = torch.randn(2, 3, 8, 8)


def two_groups():
    """Two internal groups of 40 and 60 channels: 100 scored channels."""
    model = nn.Sequential(nn.Conv2d(3, 40, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(40, 60, 3, padding=1), nn.ReLU(), nn.Conv2d(60, 2, 1)).eval()
    groups = pl.channel_groups(model, X)
    assert [g.size for g in groups] == [40, 60]
    return model, groups


def removed(groups, keep):
    return sum(g.size - len(keep[g.index]) for g in groups)


def test_percent_with_all_scores_tied_removes_exactly_the_fraction():
    model, groups = two_groups()
    tied = {g.index: torch.ones(g.size) for g in groups}
    for p, n in [(0.5, 50), (0.29, 29), (0.01, 1), (0.0, 0), (0.98, 98)]:
        keep = select_keep(model, groups, tied, Budget(percent=p), X)
        assert removed(groups, keep) == n, p
    keep = select_keep(model, groups, tied, Budget(percent=0.5), X)
    small = pl.remove_channels(model, groups, keep)
    assert (small[0].out_channels, small[2].out_channels) == (1, 49)   # the guard keeps 1
    assert small(X).shape == (2, 2, 8, 8)


def test_percent_ties_are_broken_by_group_then_channel_and_the_guard_passes_them_on():
    model, groups = two_groups()
    tied = {g.index: torch.zeros(g.size) for g in groups}
    keep = select_keep(model, groups, tied, Budget(percent=0.3), X, min_keep=0.5)
    assert torch.equal(keep[0], torch.arange(20, 40))       # group 0 down to its floor of 20
    assert torch.equal(keep[1], torch.arange(10, 60))       # the other 10 from group 1
    keep = select_keep(model, groups, tied, Budget(percent=0.5), X, min_keep=0.9)
    assert removed(groups, keep) == 4 + 6                    # every group at its floor


def test_percent_removes_the_globally_lowest_scores():
    model, groups = two_groups()
    gen = torch.Generator().manual_seed(0)
    scores = {g.index: torch.rand(g.size, generator=gen) for g in groups}
    keep = select_keep(model, groups, scores, Budget(percent=0.37), X)
    flat = torch.cat([scores[0], scores[1]])
    cut = flat.sort().values[36]                             # the 37th lowest is removed
    for i, s in scores.items():
        assert torch.equal(keep[i], torch.nonzero(s > cut).flatten())


def test_numpy_integer_group_keys_are_accepted():
    model, groups = two_groups()
    scores = {np.int64(0): torch.arange(40.0), np.int64(1): torch.arange(60.0)}
    keep = select_keep(model, groups, scores, Budget(percent=0.5), X)
    assert torch.equal(keep[0], torch.arange(25, 40)) and torch.equal(keep[1], torch.arange(25, 60))


def test_threshold_removes_every_tied_score_at_or_below_it():
    model, groups = two_groups()
    scores = {0: torch.tensor([0.0, 1.0] * 20), 1: torch.tensor([0.0, 0.5, 2.0] * 20)}
    keep = select_keep(model, groups, scores, Budget(threshold=0.5), X)
    assert torch.equal(keep[0], torch.arange(1, 40, 2))
    assert torch.equal(keep[1], torch.arange(2, 60, 3))
    keep = select_keep(model, groups, scores, Budget(threshold=-1), X)
    assert removed(groups, keep) == 0


def test_macs_budget_with_tied_scores_is_met_and_deterministic():
    model = get_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    groups = pl.channel_groups(model, x)
    tied = {g.index: torch.ones(g.size) for g in groups if not g.coupled}
    a = select_keep(model, groups, tied, Budget(macs=0.6), x)
    b = select_keep(model, groups, tied, Budget(macs=0.6), x)
    assert all(torch.equal(a[i], b[i]) for i in a)
    macs0, _ = pl.count(model, x)
    macs1, _ = pl.count(pl.remove_channels(model, groups, a), x)
    assert 0.59 * macs0 < macs1 <= 0.6 * macs0


@pytest.mark.parametrize("field", ["macs", "percent", "threshold"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_budget_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"Budget\({field}=(nan|inf|-inf)\): {field} must be"):
        Budget(**{field: value})


@pytest.mark.parametrize("field", ["macs", "percent", "threshold"])
@pytest.mark.parametrize("value", [True, "0.5", None, [0.5], torch.tensor(0.5)])
def test_wrong_budget_types_are_refused_naming_the_field_and_range(field, value):
    if value is None:
        with pytest.raises(ValueError, match="exactly one of macs/percent/threshold"):
            Budget(**{field: value})
        return
    with pytest.raises(TypeError, match=rf"Budget\({field}=.*\): {field} must be a real number "
                                        r"in (\(0, 1\]|\[0, 1\)|any finite number)"):
        Budget(**{field: value})


@pytest.mark.parametrize("kw, allowed", [({"macs": 0}, r"\(0, 1\]"), ({"macs": 1.01}, r"\(0, 1\]"),
                                         ({"percent": 1}, r"\[0, 1\)"),
                                         ({"percent": -0.1}, r"\[0, 1\)")])
def test_out_of_range_budget_values_say_the_allowed_range(kw, allowed):
    with pytest.raises(ValueError, match=allowed):
        Budget(**kw)


def test_budget_values_are_stored_as_floats():
    b = Budget(percent=np.float32(0.25))
    assert type(b.percent) is float and b.percent == 0.25
    assert Budget(macs=1).macs == 1.0 and Budget(threshold=-3).threshold == -3.0


def test_select_keep_checks_its_guard_arguments():
    model, groups = two_groups()
    scores = {0: torch.rand(40)}
    with pytest.raises(ValueError, match=r"min_keep=1.5.*\[0, 1\]"):
        select_keep(model, groups, scores, Budget(percent=0.5), X, min_keep=1.5)
    with pytest.raises(ValueError, match=r"min_channels=-1"):
        select_keep(model, groups, scores, Budget(percent=0.5), X, min_channels=-1)
    with pytest.raises(ValueError, match=r"scores has key 7"):
        select_keep(model, groups, {7: torch.rand(3)}, Budget(percent=0.5), X)
    with pytest.raises(TypeError, match="must be a prunelib.select.Budget"):
        select_keep(model, groups, scores, 0.5, X)


def test_count_rejects_unbatched_and_empty_inputs_and_batch_one_counts_the_same():
    model = get_model("resnet20").eval()
    one = pl.count(model, torch.randn(1, 3, 32, 32))
    assert one == pl.count(model, torch.randn(5, 3, 32, 32))
    assert one[0] == pl.count(model, (torch.randn(1, 3, 32, 32),))[0]
    with pytest.raises(ValueError, match=r"count: layer 'conv1' \(Conv2d\) received an unbatched "
                                         r"3-D input of shape \(3, 32, 32\)"):
        pl.count(model, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"count: example_inputs is an empty batch"):
        pl.count(model, torch.randn(0, 3, 32, 32))
    for nothing in ((), None, [1, 2]):
        with pytest.raises(ValueError, match="count: example_inputs holds no tensor"):
            pl.count(model, nothing)
    mlp = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    assert pl.count(mlp, torch.randn(1, 6)) == (6 * 4 + 4 * 2, 6 * 4 + 4 + 4 * 2 + 2)
    with pytest.raises(ValueError, match=r"'0' \(Linear\) received an unbatched 1-D input"):
        pl.count(mlp, torch.randn(6))


@pytest.mark.parametrize("value", [True, 8.0, "8", np.float64(8)])
def test_multiple_that_is_not_an_integer_is_refused_naming_it(value):
    with pytest.raises(TypeError, match=r"Budget\(multiple=.*\): multiple must be an integer"):
        Budget(macs=0.5, multiple=value)


@pytest.mark.parametrize("value", [0, -8])
def test_multiple_below_one_is_refused_naming_it(value):
    with pytest.raises(ValueError, match=rf"Budget\(multiple={value}\): multiple must be an "
                                         r"integer >= 1"):
        Budget(percent=0.5, multiple=value)


def test_multiple_is_stored_as_int_and_one_changes_nothing():
    b = Budget(macs=0.5, multiple=np.int64(8))
    assert type(b.multiple) is int and b.multiple == 8
    model, groups = two_groups()
    scores = {g.index: torch.rand(g.size, generator=torch.Generator().manual_seed(1))
              for g in groups}
    for kw in ({"percent": 0.37}, {"threshold": 0.3}, {"macs": 0.4}):
        plain = select_keep(model, groups, scores, Budget(**kw), X)
        one = select_keep(model, groups, scores, Budget(**kw, multiple=1), X)
        assert all(torch.equal(plain[i], one[i]) for i in plain)


@pytest.mark.parametrize("kw", [{"percent": 0.37}, {"threshold": 0.3}])
def test_multiple_rounds_kept_counts_up_and_keeps_the_highest_scores(kw):
    model, groups = two_groups()
    scores = {g.index: torch.rand(g.size, generator=torch.Generator().manual_seed(1))
              for g in groups}
    plain = select_keep(model, groups, scores, Budget(**kw), X)
    keep = select_keep(model, groups, scores, Budget(**kw, multiple=8), X)
    for g in groups:
        n = len(keep[g.index])
        assert n % 8 == 0 or n == g.size
        assert len(plain[g.index]) <= n < len(plain[g.index]) + 8
        assert set(plain[g.index].tolist()) <= set(keep[g.index].tolist())
        top = torch.argsort(scores[g.index], descending=True)[:n]
        assert set(top.tolist()) == set(keep[g.index].tolist())
