"""The book's one protocol: strength rule, BN recalibration, row-norm restore, results helper."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import prunelib as pl
from prunelib import methods, strength
from prunelib.calibrate import conv_bn_pairs, recalibrate_bn, restore_bn_input_norms
from prunelib.data import Batches
from prunelib.methods.base import Context
from prunelib.methods.ns import group_gamma
from prunelib.models import get_model
from prunelib.pipeline import SCALES, get_scale, run
from prunelib.results import PHASES, phase_figure, standard_error, table, width_figure
from prunelib.select import Budget, select_keep
from prunelib.train import evaluate


class Tiny:
    def __init__(self, n=128):
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n)
        self.train = Batches(x, y, 32, augment=True)
        self.test = Batches(x, y, 64, shuffle=False)
        self.calib = Batches(x, y, 64, shuffle=True)


def _varied(seed=0):
    """A ResNet-20 whose BN gammas differ (a fresh one has all gamma = 1)."""
    torch.manual_seed(seed)
    model = get_model("resnet20")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.05, 1.0)
    return model


def _ctx(model, x, loader, epochs=2.0, lr=0.02):
    return Context(example_inputs=x, train_loader=loader, epochs=epochs, lr=lr)


# -- BN recalibration -------------------------------------------------------------------------
def test_recalibrate_bn_gives_the_plain_mean_and_variance_of_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    batches = [(torch.randn(8, 3, 6, 6) * (i + 1), None) for i in range(3)]
    model[1].momentum = 0.3
    recalibrate_bn(model, batches, n_batches=3)
    with torch.no_grad():
        outs = [model[0](x) for x, _ in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs])
    varis = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs])
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(model[1].running_var, varis.mean(0), rtol=1e-4)
    assert model[1].momentum == 0.3 and not model.training        # mode and momentum restored
    assert int(model[1].num_batches_tracked) == 3


def test_recalibrate_bn_changes_no_weight_and_refuses_bad_counts():
    model = get_model("resnet20")
    before = {k: v.clone() for k, v in model.named_parameters()}
    recalibrate_bn(model, Tiny().train, 2)
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    with pytest.raises(ValueError, match="n_batches"):
        recalibrate_bn(model, Tiny().train, 0)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [], 3)


# -- row-norm restore -------------------------------------------------------------------------
def test_restore_bn_input_norms_keeps_the_eval_output_and_restores_the_norms():
    torch.manual_seed(0)
    dense = get_model("resnet20")
    recalibrate_bn(dense, Tiny().train, 2)
    dense.eval()
    shrunk = copy.deepcopy(dense)
    conv = shrunk.layer2[0].conv1
    with torch.no_grad():                       # a sparse phase shrank some rows ...
        conv.weight[:5] *= 0.05
        conv.weight[5] = 0.0                    # ... and zeroed one
        bn = shrunk.layer2[0].bn1               # the BN statistics follow the shrink
        bn.running_mean[:5] *= 0.05
        bn.running_var[:5] = bn.running_var[:5] * 0.05 ** 2
    x = torch.randn(4, 3, 32, 32)
    ref_out = shrunk(x)
    done = restore_bn_input_norms(shrunk, dense)
    assert torch.allclose(shrunk(x), ref_out, atol=1e-4, rtol=1e-4)
    r = float(dense.layer2[0].conv1.weight.detach().pow(2).sum() / conv.weight.shape[0]) ** 0.5
    norms = conv.weight.detach().flatten(1).norm(dim=1)
    assert torch.all(norms[:5] >= r * (1 - 1e-5)) and norms[5] == 0
    assert done["layer2.0.conv1"] >= 5


def test_conv_bn_pairs_finds_every_conv_bn_of_resnet20():
    pairs = dict(conv_bn_pairs(get_model("resnet20")))
    assert len(pairs) == 19 and pairs["layer1.0.conv1"] == "layer1.0.bn1"


# -- strength rule ----------------------------------------------------------------------------
def test_target_drift_sets_ns_lam_from_the_channels_the_budget_removes():
    model = _varied()
    x = torch.randn(1, 3, 32, 32)
    groups = pl.channel_groups(model, x)
    ns = methods.get("ns")
    ctx = _ctx(model, x, Tiny().train)
    rec = strength.target_drift(ns, model, groups, Budget(macs=0.5), ctx, quantile=0.9,
                                margin=1.5)
    # the oracle: rank |gamma| of the prunable groups ourselves
    probe = methods.get("ns")
    probe.ctx = ctx
    probe.attach(copy.deepcopy(model), groups)
    gam = {g.index: group_gamma(model, g) for g in probe.groups if g.bns()}
    keep = select_keep(model, groups, gam, Budget(macs=0.5), example_inputs=x,
                       min_keep=probe.min_keep)
    gone = torch.cat([s[~torch.isin(torch.arange(len(s)), keep[i])] for i, s in gam.items()])
    lrs = strength.phase_lrs(ctx, len(ctx.train_loader))
    want = 1.5 * float(torch.quantile(gone, 0.9)) / strength.sgd_displacement(lrs, 0.9)
    assert rec["params"]["lam"] == pytest.approx(want, rel=1e-6)
    assert rec["removed"] == len(gone) and ns.lam == 1e-5         # nothing changed in place


@pytest.mark.parametrize("name", ["ssl", "oicsr", "oto"])
def test_group_norm_rules_drift_by_d_whatever_the_margin(name):
    # their groups are mostly conv rows feeding a BN: nothing resists the push, no margin
    model = _varied()
    x = torch.randn(1, 3, 32, 32)
    groups = pl.channel_groups(model, x)
    ctx = _ctx(model, x, Tiny().train)
    rec = {m: strength.target_drift(methods.get(name), model, groups, Budget(macs=0.5), ctx,
                                    margin=m) for m in (1.0, 2.0)}
    assert rec[2.0]["params"] == rec[1.0]["params"]
    assert rec[2.0]["margin"] == 1.0 and rec[2.0]["resisted"] is False
    lam = next(iter(rec[2.0]["params"].values()))
    assert lam * rec[2.0]["unit"] == pytest.approx(rec[2.0]["D"], rel=1e-9)
    ns = {m: strength.target_drift(methods.get("ns"), model, groups, Budget(macs=0.5), ctx,
                                   margin=m) for m in (1.0, 2.0)}
    assert ns[2.0]["params"]["lam"] == pytest.approx(2 * ns[1.0]["params"]["lam"], rel=1e-9)
    assert ns[2.0]["resisted"] is True


def test_target_drift_grows_with_how_much_the_budget_removes():
    model = _varied()
    x = torch.randn(1, 3, 32, 32)
    groups = pl.channel_groups(model, x)
    ctx = _ctx(model, x, Tiny().train)
    lam = {r: strength.target_drift(methods.get("ns"), model, groups, Budget(macs=r),
                                    ctx)["params"]["lam"] for r in (0.8, 0.5)}
    assert lam[0.5] > lam[0.8]


def test_ns_drift_per_unit_lam_is_what_sgd_with_momentum_moves_gamma():
    # gamma under the penalty alone: SGD (Nesterov, mu 0.9) with grad = lam sign(gamma)
    ctx = Context(example_inputs=None, train_loader=range(100), epochs=2.0, lr=0.02)
    lrs = strength.phase_lrs(ctx, 100)
    unit = strength.RULES["ns"].unit(methods.get("ns"), lrs, 0.9, None)
    g = nn.Parameter(torch.tensor([100.0]))
    opt = torch.optim.SGD([g], lr=1.0, momentum=0.9, nesterov=True)
    for lr in lrs:
        opt.param_groups[0]["lr"] = lr
        g.grad = torch.sign(g.detach())
        opt.step()
    assert 100.0 - float(g.detach()) == pytest.approx(unit, rel=1e-4)
    assert unit < sum(lrs) / (1 - 0.9)                  # the steady-state bound


def test_greg1_delta_makes_lam_reach_tau_at_half_of_the_phase():
    x = torch.randn(1, 3, 32, 32)
    ctx = Context(example_inputs=x, train_loader=range(79), epochs=2.0, lr=0.02)
    greg = methods.get("greg")
    rec = strength.target_drift(greg, get_model("resnet20"), [], Budget(macs=0.5), ctx)
    delta = rec["params"]["delta"]
    updates_to_tau = math.ceil(greg.tau / delta)                   # lam += delta every k_u
    assert updates_to_tau * greg.k_u == pytest.approx(rec["steps"] / 2, abs=greg.k_u)
    assert not strength.has_rule(methods.get("greg", variant="greg2"))


def test_momentum_free_methods_get_the_same_push_as_the_others():
    lrs = [0.01] * 50
    u = {n: strength.RULES[n].unit(methods.get(n), lrs, 0.9, None) for n in ("ns", "oto")}
    assert u["oto"] == u["ns"] == pytest.approx(strength.sgd_displacement(lrs, 0.9))
    rs = methods.get("rsnli")                # warm-up at rho_warmup / rho of the push
    w = [rs.rho_warmup / rs.rho if t < math.ceil(rs.warmup * 50) else 1.0 for t in range(50)]
    assert strength.RULES["rsnli"].unit(rs, lrs, 0.9, None) == pytest.approx(
        strength.sgd_displacement([0.01 * v for v in w], 0.9))


def _scale_method(name, **hp):
    torch.manual_seed(0)
    model, x = get_model("resnet20"), torch.randn(1, 3, 32, 32)
    m = methods.get(name, **hp)
    m.ctx = Context(example_inputs=x, lr=0.02)
    return m, m.attach(model, pl.channel_groups(model, x))


def test_sss_drift_per_unit_gamma_is_what_its_apg_moves_a_scale_without_task_gradient():
    lrs = strength.phase_lrs(Context(None, train_loader=range(79), epochs=2.0, lr=0.02), 79)
    sss, model = _scale_method("sss", gamma=1e-2)
    for lr in lrs:                       # the APG step with g = 0: only the L1 term pushes
        sss.param_groups(model, lr, 0.0)
        sss.lam.grad = torch.zeros_like(sss.lam)
        sss.after_backward(model)
        sss.after_step(model)
    unit = strength.RULES["sss"].unit(sss, lrs, 0.9, model)
    assert 1.0 - sss.lam.detach() == pytest.approx(torch.full_like(sss.lam, 1e-2 * unit),
                                                   rel=1e-4)


def test_gal_drift_per_unit_lam_is_what_its_fista_moves_a_mask_under_the_l1_term():
    lrs = strength.phase_lrs(Context(None, train_loader=range(79), epochs=2.0, lr=0.02), 79)
    gal, model = _scale_method("gal", lam=1e-2, mask_step=3)
    for lr in lrs:                       # g = the L1 term's gradient lam sign(m) alone
        gal.param_groups(model, lr, 0.0)
        gal.loss_term(model).backward()
        gal.after_backward(model)
        gal.after_step(model)
    unit = strength.RULES["gal"].unit(gal, lrs, 0.9, model)
    assert 1.0 - gal.m.detach() == pytest.approx(torch.full_like(gal.m, 1e-2 * unit), rel=1e-4)
    assert strength.fista_displacement(lrs, 3) < strength.fista_displacement(lrs, 1)


def test_scale_rules_reach_margin_times_the_initial_scale_whatever_the_budget():
    x = torch.randn(1, 3, 32, 32)
    ctx = Context(example_inputs=x, train_loader=range(79), epochs=2.0, lr=0.02)
    for name, param in (("sss", "gamma"), ("gal", "lam")):
        recs = [strength.target_drift(methods.get(name), get_model("resnet20"), [],
                                      Budget(macs=r), ctx, margin=2.0) for r in (0.3, 0.7)]
        assert recs[0]["params"] == recs[1]["params"]
        assert recs[0]["D"] == 1.0 and recs[0]["margin"] == 2.0
        assert recs[0]["params"][param] * recs[0]["unit"] == pytest.approx(2.0)
    assert not strength.has_rule(methods.get("gal", mask_init="normal"))


def test_uses_defaults_tells_a_paper_value_from_a_given_one():
    assert strength.uses_defaults(methods.get("ns"))
    assert not strength.uses_defaults(methods.get("ns", lam=1e-3))
    assert not strength.uses_defaults(methods.get("l1"))            # no rule for L1
    assert set(strength.RULES) <= set(methods.names())


# -- pipeline ---------------------------------------------------------------------------------
def test_scales_hold_the_whole_protocol():
    for sc in SCALES.values():
        assert sc.budget() == Budget(macs=sc.target_macs)
        assert sc.recal_batches >= 1 and sc.strength_margin > 0
    assert get_scale("quick").test_subset == 5_000 and get_scale("full").test_subset is None


def test_run_records_every_phase_and_the_strength_it_used():
    model = get_model("resnet20")
    pruned, res = run("ns", model, Tiny(), Budget(macs=0.6), reg_epochs=0.25, ft_epochs=0.25,
                      recal_batches=2, measure_latency=False)
    assert set(res["accuracy"]) == set(PHASES)
    assert res["strength"]["rule"] == "target drift"
    assert res["hparams"]["lam"] == pytest.approx(res["strength"]["params"]["lam"])
    assert res["pruned"]["macs_ratio"] <= 0.6 and res["test_images"] == 128
    _, res2 = run(methods.get("ns", lam=1e-3), model, Tiny(), Budget(macs=0.6), reg_epochs=0.25,
                  ft_epochs=0, recal_batches=2, measure_latency=False)
    assert res2["strength"]["rule"] == "method" and res2["hparams"]["lam"] == 1e-3
    _, res3 = run("ns", model, Tiny(), Budget(macs=0.6), scale="full", reg_epochs=0.25,
                  ft_epochs=0, recal_batches=2, measure_latency=False)
    assert res3["hparams"]["lam"] == 1e-5                  # the paper's value at full scale
    with pytest.raises(ValueError, match="strength"):
        run("ns", model, Tiny(), strength="strong")


# -- results helper ---------------------------------------------------------------------------
def _fake(label, acc):
    return {"method": label, "test_images": 2000,
            "accuracy": dict(zip(PHASES, acc)),
            "pruned": {"macs": 2e7, "macs_ratio": 0.5, "params": 1e5, "params_ratio": 0.4},
            "dense_widths": {"conv1": 16, "fc": 10}, "widths": {"conv1": 8, "fc": 10},
            "strength": {"params": {"lam": 0.02}}}


def test_table_has_a_row_per_method_with_every_phase_and_the_standard_error():
    rows = {"NS": _fake("ns", (90, 85, 20, 80, 86)), "L1": _fake("l1", (90, 90, 10, 60, 85))}
    text = table(rows, latency=False)
    lines = text.splitlines()
    assert lines[0].count("|") == 10 and "recal." in lines[0]       # 9 columns
    assert lines[2].startswith("| NS | 90.00 | 85.00 | 20.00 | 80.00 | 86.00 | 20.00M (0.50)")
    assert "lam 0.02" in lines[2]
    assert f"{standard_error(90, 2000):.2f}" in text


def test_table_names_where_a_strength_came_from_when_no_rule_set_it():
    own = {**_fake("gbn", (90, 85, 85, 85, 86)),
           "strength": {"rule": "method", "why": "no rule: the method plans its own phase"}}
    full = {**_fake("ns", (90, 85, 20, 80, 86)),
            "strength": {"rule": "method", "why": "the paper's values (full scale)"}}
    lines = table({"GBN": own, "NS": full}, latency=False).splitlines()
    assert lines[2].endswith("| own plan |") and lines[3].endswith("| paper's |")


def test_standard_error_is_binomial():
    assert standard_error(50, 10_000) == pytest.approx(0.5)
    assert standard_error(90, 2_000) == pytest.approx(100 * math.sqrt(0.09 / 2000))
    with pytest.raises(ValueError):
        standard_error(50, 0)


def test_figures_draw_one_bar_set_per_phase_and_one_line_per_method():
    import matplotlib
    matplotlib.use("Agg")
    rows = {"NS": _fake("ns", (90, 85, 20, 80, 86)), "L1": _fake("l1", (90, 90, 10, 60, 85))}
    ax = phase_figure(rows)
    assert len(ax.patches) == 2 * (len(PHASES) - 1)
    ax = width_figure(rows)
    assert len(ax.lines) == 2 and [p.get_height() for p in ax.patches] == [16, 10]


def test_own_rule_removes_only_what_the_method_zeroed_and_keeps_the_function():
    model = get_model("resnet20")
    pruned, res = run("oto", model, Tiny(), budget="own", reg_epochs=0.5, ft_epochs=0,
                      recal_batches=1, measure_latency=False)
    assert res["target"]["own_rule"] and res["strength"]["rule"] == "target drift"
    assert res["accuracy"]["removed"] == pytest.approx(res["accuracy"]["regularized"], abs=1e-9)
    with pytest.raises(ValueError, match="own"):
        run("oto", model, Tiny(), budget="mine")


def test_on_sparse_sees_the_model_at_the_end_of_the_sparse_phase():
    seen = {}

    def keep(model, method):
        seen["model"], seen["scores"] = copy.deepcopy(model), method.scores(model)

    _, res = run("ns", get_model("resnet20"), Tiny(), reg_epochs=0.25, ft_epochs=0,
                 recal_batches=1, measure_latency=False, on_sparse=keep)
    assert len(seen["scores"]) == 9
    assert res["accuracy"]["regularized"] == pytest.approx(
        evaluate(seen["model"], Tiny().test))


# -- conv -> BatchNorm pairs through BatchNorm subclasses (timm's BatchNormAct2d) --------------
class _BNAct(nn.BatchNorm2d):
    """A BatchNorm subclass whose forward calls F.batch_norm, then a ReLU (like timm's
    BatchNormAct2d): torch.fx traces through it."""

    def forward(self, x):
        x = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                           self.bias, self.training, self.momentum, self.eps)
        return torch.relu(x)


class _ConvBNAct(nn.Module):
    def __init__(self, bn=_BNAct):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 4, 1, bias=False), bn(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))


def _shrunk_copy(dense, pairs, k=3, a=0.05):
    """A copy of `dense` whose first k rows of each paired conv a sparse phase shrank a times
    (the BN statistics following them)."""
    shrunk = copy.deepcopy(dense)
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = shrunk.get_submodule(conv_name), shrunk.get_submodule(bn_name)
            conv.weight[:k] *= a
            if conv.bias is not None:
                conv.bias[:k] *= a
            bn.running_mean[:k] *= a
            bn.running_var[:k] *= a ** 2
    return shrunk


def _check_restore(dense, pairs, x, shrink, k=3):
    """Shrink rows of the `shrink` pairs, restore: every row of a paired conv below the dense
    layer's RMS row norm r (and not 0) is scaled up to r, and the eval output is unchanged."""
    shrunk = _shrunk_copy(dense, shrink, k)
    rms, low = {}, {}
    for conv_name, _ in pairs:
        w0 = dense.get_submodule(conv_name).weight.detach()
        rms[conv_name] = float(w0.pow(2).sum() / w0.shape[0]) ** 0.5
        norms = shrunk.get_submodule(conv_name).weight.detach().flatten(1).norm(dim=1)
        low[conv_name] = (norms > 0) & (norms < rms[conv_name])
    with torch.no_grad():
        before = shrunk(x)
        done = restore_bn_input_norms(shrunk, dense)
        after = shrunk(x)
    assert done == {c: int(m.sum()) for c, m in low.items() if m.any()}
    assert all(low[c][:k].all() for c, _ in shrink)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5 * before.abs().max().item())
    for conv_name, _ in pairs:
        norms = shrunk.get_submodule(conv_name).weight.detach().flatten(1).norm(dim=1)
        assert torch.all(norms[low[conv_name]] >= rms[conv_name] * (1 - 1e-5)), conv_name


def test_restore_bn_input_norms_finds_a_batchnorm_subclass_calling_f_batch_norm():
    torch.manual_seed(0)
    dense = _ConvBNAct().eval()
    with torch.no_grad():
        for bn in (dense.bn1, dense.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    pairs = conv_bn_pairs(dense)
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2")]
    _check_restore(dense, pairs, torch.randn(2, 3, 8, 8), shrink=pairs)


def test_restore_bn_input_norms_on_timm_batchnormact2d():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    dense = timm.create_model("gernet_s", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    pairs = conv_bn_pairs(dense)
    expected = [(f"{n}.conv", f"{n}.bn") for n, m in dense.named_modules()   # ConvNormAct
                if isinstance(getattr(m, "conv", None), nn.Conv2d) and m.conv.groups == 1
                and type(getattr(m, "bn", None)).__name__ == "BatchNormAct2d"]
    assert len(expected) > 30 and sorted(pairs) == sorted(expected)
    _check_restore(dense, expected, torch.randn(1, 3, 64, 64), shrink=expected[:4])


def test_conv_bn_pairs_says_what_it_cannot_pair():
    class ByHand(nn.BatchNorm2d):                   # a BatchNorm computed without F.batch_norm
        def forward(self, x):
            v = (self.running_var + self.eps).rsqrt()
            return (x - self.running_mean[:, None, None]) * (self.weight * v)[:, None, None] \
                + self.bias[:, None, None]

    with pytest.warns(UserWarning, match=r"not paired: bn1, bn2"):
        assert conv_bn_pairs(_ConvBNAct(ByHand)) == []

    class Branchy(_ConvBNAct):                      # data-dependent control flow: no trace
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else super().forward(-x)

    with pytest.warns(UserWarning, match="cannot trace Branchy"):
        assert restore_bn_input_norms(Branchy(), Branchy()) == {}


def test_conv_bn_pairs_leaves_out_a_batchnorm_called_twice():
    class Shared(nn.Module):                        # one BN after two convs: one scale per row
        def __init__(self):                         # cannot fit both
            super().__init__()
            self.c1, self.c2, self.c3 = (nn.Conv2d(3, 4, 1) for _ in range(3))
            self.bn, self.bn3 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.c1(x)) + self.bn(self.c2(x)) + self.bn3(self.c3(x))

    with pytest.warns(UserWarning, match=r"more than once are not paired: bn$"):
        assert conv_bn_pairs(Shared()) == [("c3", "bn3")]
