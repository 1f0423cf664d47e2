"""Filter group sparsity (SSL, OICSR, OTO, GREG): every update against an oracle.

Oracles: autograd of the group-lasso sums written out slice by slice by hand (not through
prunelib's groups), a hand-computed half-space test, the surgery invariant (removing zero
groups leaves the output unchanged), and a hand count of GREG's regularization schedule.
"""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelib as pl
from prunelib.data import Batches
from prunelib.methods import get
from prunelib.methods.base import Context
from prunelib.methods.greg import GReg, n_pruned
from prunelib.methods.oto import OTO
from prunelib.methods.ssl import SSL
from prunelib.models import get_model
from prunelib.select import Budget


class Tiny(nn.Module):
    """A residual add (c1 + c2 share channels), a concat (c3 | c4 -> c5), a flatten (-> fc)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c3, self.c4 = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 2, 3, padding=1)
        self.b34 = nn.BatchNorm2d(5)
        self.c5 = nn.Conv2d(5, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.b1(self.c1(x)))
        r = F.relu(self.b2(self.c2(a)) + a)
        z = F.relu(self.b34(torch.cat([self.c3(r), self.c4(r)], 1)))
        y = F.adaptive_avg_pool2d(F.relu(self.c5(z)), 2).flatten(1)
        return self.fc(y)


def tiny(device, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = Tiny().to(device=device, dtype=dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 8, 8, device=device, dtype=dtype)
    return model, x


# hand-written groups of Tiny: producer rows ('out') and consumer slices ('in') of channel k
OUT = {
    "res": lambda m, k: [m.c1.weight[k], m.c1.bias[k], m.c2.weight[k], m.c2.bias[k]],
    "c3": lambda m, k: [m.c3.weight[k], m.c3.bias[k]],
    "c4": lambda m, k: [m.c4.weight[k], m.c4.bias[k]],
    "c5": lambda m, k: [m.c5.weight[k], m.c5.bias[k]],
}
IN = {
    "res": lambda m, k: [m.c2.weight[:, k], m.c3.weight[:, k], m.c4.weight[:, k]],
    "c3": lambda m, k: [m.c5.weight[:, k]],
    "c4": lambda m, k: [m.c5.weight[:, 3 + k]],                # offset through the concat
    "c5": lambda m, k: [m.fc.weight[:, 4 * k:4 * k + 4]],      # 2x2 positions via flatten
}


def out_rows(m, name, k):
    return OUT[name](m, k)


def in_slices(m, name, k):
    return IN[name](m, k)


SIZES = {"res": 4, "c3": 3, "c4": 2, "c5": 6}
BN_OF = {"res": [("b1", None), ("b2", None)], "c3": [("b34", 0)], "c4": [("b34", 3)], "c5": []}


def nrm(ts):
    return torch.sqrt(sum(t.pow(2).sum() for t in ts))


def attach(method, model, x):
    method.ctx = Context(example_inputs=x[:1])
    groups = pl.channel_groups(model, x)
    method.attach(model, groups)
    return method, groups


def lasso_grads(model, method):
    """p.grad after `after_backward` on zero task gradients."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    method.after_backward(model)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_match(model, got, oracle):
    params = dict(model.named_parameters())
    want = torch.autograd.grad(oracle, list(params.values()), allow_unused=True)
    for (n, p), w in zip(params.items(), want):
        w = torch.zeros_like(p) if w is None else w
        assert torch.allclose(got[n], w, atol=1e-10, rtol=1e-8), n


# ---------------------------------------------------------------------------------- SSL
@pytest.mark.parametrize("residual", ["internal", "coupled"])
def test_ssl_gradient_is_autograd_of_separate_filter_and_channel_norms(device, residual):
    model, x = tiny(device)
    ssl, _ = attach(SSL(lam_filter=0.3, lam_channel=0.7, residual=residual), model, x)
    got = lasso_grads(model, ssl)
    names = ["c3", "c4", "c5"] + (["res"] if residual == "coupled" else [])
    oracle = 0
    for name in names:
        for k in range(SIZES[name]):
            outs = [t for t in out_rows(model, name, k) if t.dim() > 0]    # weights, no bias
            oracle = oracle + 0.3 * sum(t.norm() for t in outs)
            oracle = oracle + 0.7 * sum(t.norm() for t in in_slices(model, name, k))
    assert_grads_match(model, got, oracle)
    assert torch.allclose(ssl.penalty(model), oracle)


def test_ssl_resnet_rule_shape_and_depth_groups_match_autograd():
    model = get_model("resnet20").double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ssl, _ = attach(SSL(lam_filter=1e-2, lam_channel=2e-2, lam_shape=3e-2, lam_depth=5e-2),
                    model, x)
    got = lasso_grads(model, ssl)
    oracle = 0
    for stage in (model.layer1, model.layer2, model.layer3):
        for blk in stage:                                 # only convs between shortcut ends
            w1, w2 = blk.conv1.weight, blk.conv2.weight
            oracle = oracle + 1e-2 * w1.flatten(1).norm(dim=1).sum()
            oracle = oracle + 2e-2 * w2.transpose(0, 1).flatten(1).norm(dim=1).sum()
            oracle = oracle + 3e-2 * sum(w.pow(2).sum(0).sqrt().sum() for w in (w1, w2))
            oracle = oracle + 5e-2 * nrm([w1, w2])
    assert_grads_match(model, got, oracle)


def test_ssl_zero_rule_removes_exactly_channels_with_a_zero_filter_or_channel_group(device):
    model, x = tiny(device)
    ssl, groups = attach(SSL(), model, x)
    with torch.no_grad():
        model.c5.weight[2] = 1e-5                         # below zerout: becomes exactly zero
        model.c5.weight[:, 1] = 0.0                       # channel 1 of c3 is never used
    ssl.after_step(model)
    assert model.c5.weight[2].abs().sum() == 0
    small = ssl.finish(model)
    assert small.c5.out_channels == 5 and small.c3.out_channels == 2
    assert small.c4.out_channels == 2 and small.c1.out_channels == 4
    assert torch.equal(small.c3.weight, model.c3.weight[[0, 2]])


def test_ssl_shape_columns_stay_zero_and_masked_during_fine_tuning(device):
    model = get_model("resnet20").to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    ssl, _ = attach(SSL(lam_shape=1e-3), model, x)
    with torch.no_grad():
        model.layer1[0].conv1.weight[:, 3, 0, 0] = 0.0
    small = ssl.finish(model, Budget(macs=0.7))
    conv = small.layer1[0].conv1
    before = conv.weight.detach().clone()
    zero_cols = before.abs().sum(0) == 0
    assert zero_cols.any()
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8, generator=gen)
    data = Batches(imgs, torch.randint(0, 10, (32,), generator=gen), 16, device=device)
    from prunelib.train import fit
    fit(small, data, epochs=1, lr=0.1, weight_decay=5e-4, quiet=True)
    small(x)                                               # the pre-hook re-applies the mask
    after = conv.weight.detach()
    assert (after[:, zero_cols] == 0).all()
    assert not torch.equal(after[:, ~zero_cols], before[:, ~zero_cols])
    assert "ssl_shape_mask" not in small.state_dict() and "layer1.0.conv1.ssl_shape_mask" \
        not in small.state_dict()


# ---------------------------------------------------------------------------------- OICSR
def test_oicsr_gradient_is_autograd_of_joint_out_in_norm_through_add_and_concat(device):
    model, x = tiny(device)
    oicsr, groups = attach(get("oicsr", lam=0.5, residual="coupled"), model, x)
    got = lasso_grads(model, oicsr)
    oracle = 0
    for name, size in SIZES.items():
        for k in range(size):
            oracle = oracle + 0.5 * nrm(out_rows(model, name, k) + in_slices(model, name, k))
    assert_grads_match(model, got, oracle)
    assert torch.allclose(oicsr.penalty(model), oracle)
    energy = oicsr.scores(model)
    res = next(g for g in groups if g.coupled)
    want = torch.stack([nrm(out_rows(model, "res", k) + in_slices(model, "res", k)) ** 2
                        for k in range(4)])
    assert torch.allclose(energy[res.index].to(want.dtype), want)


def test_oicsr_internal_policy_leaves_the_residual_group_alone(device):
    model, x = tiny(device)
    oicsr, groups = attach(get("oicsr", lam=0.5), model, x)
    got = lasso_grads(model, oicsr)
    assert got["c1.weight"].abs().sum() == 0 and got["c1.bias"].abs().sum() == 0
    assert got["c3.weight"].abs().sum() > 0                # c3 rows and its in-slices of c2
    assert {g.index for g in oicsr.groups} == {g.index for g in groups if not g.coupled}


def test_oicsr_removes_lowest_energy_channels_under_a_macs_budget(device):
    model = get_model("resnet20").to(device)
    x = torch.randn(1, 3, 32, 32, device=device)
    oicsr, _ = attach(get("oicsr"), model, x)
    e = oicsr.scores(model)
    small = oicsr.finish(model, Budget(macs=0.6))
    assert pl.count(small, x)[0] <= 0.6 * pl.count(model, x)[0]
    i = oicsr.groups[-1].index                             # layer3.2's internal group
    kept = small.layer3[2].conv1.out_channels
    top = torch.argsort(e[i], descending=True)[:kept].sort().values
    want = model.layer3[2].conv1.weight[top.to(device)]
    assert torch.equal(small.layer3[2].conv1.weight, want)


# ---------------------------------------------------------------------------------- OTO
def zig_rows(model, name, k):
    rows = out_rows(model, name, k)
    for bn, off in BN_OF[name]:
        mod = getattr(model, bn)
        j = k if off is None else off + k
        rows = rows + [mod.weight[j], mod.bias[j]]
    return rows


def test_oto_projection_zeroes_exactly_the_groups_failing_the_half_space_test(device):
    model, x = tiny(device)
    lam, eps, lr = 0.05, 0.3, 0.5
    oto, groups = attach(OTO(lam=lam, eps=eps, n_p=0.0), model, x)
    with torch.no_grad():                                  # some small groups, one zero group
        for name in ("c3", "c5"):
            for t in zig_rows(model, name, 0) + zig_rows(model, name, 1):
                t.mul_(0.02)
        for t in zig_rows(model, "c4", 1):
            t.zero_()
    opt = torch.optim.SGD(oto.param_groups(model, lr, 5e-4), lr=lr, momentum=0.9)
    model(x).pow(2).mean().backward()
    gf = {n: p.grad.clone() for n, p in model.named_parameters()}
    x0 = copy.deepcopy(model)
    oto.after_backward(model)
    opt.step()
    oto.after_step(model)
    g0 = copy.deepcopy(x0)
    for n, p in g0.named_parameters():
        p.grad = gf[n]
    projected = kept = 0
    for name, size in SIZES.items():
        for k in range(size):
            xs = [t.detach() for t in zig_rows(x0, name, k)]
            gs = [t for t in zig_rows_grad(g0, name, k)]
            norm = nrm(xs)
            if norm == 0:
                hat = [torch.zeros_like(t) for t in xs]
                want_zero = True
            else:
                hat = [a - lr * (b + lam * a / norm) for a, b in zip(xs, gs)]
                dot = sum((h * a).sum() for h, a in zip(hat, xs))
                want_zero = bool(dot < eps * norm ** 2)
            now = [t.detach() for t in zig_rows(model, name, k)]
            if want_zero:
                assert all((t == 0).all() for t in now), (name, k)
                projected += norm > 0
            else:
                assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(now, hat))
                kept += 1
    assert projected > 0 and kept > 0


def zig_rows_grad(model, name, k):
    """The same slices as `zig_rows`, of the gradients (stored in p.grad)."""
    g = SimpleNamespace(**{n: SimpleNamespace(weight=m.weight.grad, bias=m.bias.grad)
                           for n, m in model.named_children()})
    return zig_rows(g, name, k)


def scale_channel_(g, model, k, factor):
    """Multiply every producer parameter of channel k of group g by `factor`."""
    with torch.no_grad():
        for m in g.by_role("out", "affine"):
            t = m.tensor(model)
            pos = m.idx[k].to(t.device)
            t.index_copy_(m.dim, pos, t.index_select(m.dim, pos) * factor)


class _Recorder(OTO):
    def after_step(self, model):
        super().after_step(model)
        self.masks.append(torch.cat([m for m in self._zero_masks().values()]).cpu())


def test_oto_zero_groups_are_never_revived_by_momentum_or_weight_decay(device):
    model = get_model("resnet20").to(device)
    rec = _Recorder(lam=0.05, momentum=0.9, n_p=0.0, log_every=1)
    rec.masks = []
    x = torch.randn(1, 3, 32, 32, device=device)
    _, groups = attach(rec, model, x)
    for g in groups:                                       # a zero and a tiny channel each
        g.zero_([0], model)
        scale_channel_(g, model, 1, 1e-3)
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=gen)
    data = Batches(imgs, torch.randint(0, 10, (64,), generator=gen), 16, device=device,
                   augment=True)
    from prunelib.train import fit
    fit(model, data, epochs=2, lr=0.5, weight_decay=5e-3, momentum=0.9, hooks=rec, quiet=True)
    masks = torch.stack(rec.masks)
    assert masks[0].sum() >= len(groups)
    assert (masks[1:] >= masks[:-1]).all()                 # once zero, zero for ever
    assert masks[-1].sum() > len(groups)                   # the projection made new zeros
    assert rec.sparsity_history()[-1][1] == pytest.approx(
        float(masks[-1].sum()) / sum(g.size for g in rec.groups))


def test_oto_removing_zero_groups_leaves_the_output_unchanged(device):
    model = get_model("resnet20").to(device)
    oto = OTO(lam=0.05, n_p=0.0)
    x = torch.randn(4, 3, 32, 32, device=device)
    _, groups = attach(oto, model, x)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    for g in groups:
        g.zero_(torch.arange(0, g.size, 3), model)         # a third of every group, trunk too
    imgs = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8, generator=gen)
    data = Batches(imgs, torch.randint(0, 10, (32,), generator=gen), 16, device=device)
    from prunelib.train import fit
    fit(model, data, epochs=1, lr=0.2, hooks=oto, quiet=True)
    model.eval()
    with torch.no_grad():
        y0 = model(x)
    small = oto.finish(model).eval()
    with torch.no_grad():
        y1 = small(x)
    assert torch.allclose(y0, y1, atol=1e-4 * y0.abs().max().item())
    removed = sum(g.size for g in groups) - sum(
        int((s > 0).sum()) for s in oto.scores(model).values())
    assert removed >= sum(len(range(0, g.size, 3)) for g in groups)
    assert small.layer1[0].conv1.out_channels < 16 and small.conv1.out_channels < 16
    assert pl.count(small, x)[0] < pl.count(model, x)[0]


def test_oto_stage_switch_needs_the_phase_length():
    model, x = tiny("cpu")
    oto, _ = attach(OTO(n_p=0.5), model, x)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="total_steps"):
        oto.after_backward(model)
    oto.total_steps = 4
    assert not oto.half_space
    oto.step = 2
    assert oto.half_space


# ---------------------------------------------------------------------------------- GREG
def test_greg1_lambda_grows_on_schedule_only_on_the_preset_pruned_set(device):
    model, x = tiny(device)
    delta, tau, k_u = 0.02, 0.05, 3
    greg, groups = attach(GReg(pr=0.5, delta=delta, tau=tau, k_u=k_u,
                               mag_ratio_limit=math.inf), model, x)
    internal = [g for g in groups if not g.coupled]
    mags = {"c3": model.c3.weight, "c4": model.c4.weight, "c5": model.c5.weight}
    want_pruned = {}
    for name, w in mags.items():                           # smallest mean |w|, ceil(0.5 n)
        m = w.detach().abs().mean(dim=(1, 2, 3))
        want_pruned[name] = set(torch.argsort(m)[:n_pruned(len(m), 0.5)].tolist())
    by_name = {g.sources[0]: g.index for g in internal}
    for name, idx in by_name.items():
        assert set(torch.nonzero(greg.pruned[idx]).flatten().tolist()) == want_pruned[name]
    for t in range(12):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        w_before = {n: mags[n].detach().clone() for n in mags}
        greg.after_backward(model)
        n_up = min(t // k_u + 1, 3)                        # 0.02, 0.04, 0.06 > tau: stop
        for name, idx in by_name.items():
            lam = greg.lam[idx]
            mask = greg.pruned[idx]
            assert torch.allclose(lam[mask], torch.full_like(lam[mask], delta * n_up))
            assert (lam[~mask] == 0).all()
            grad = mags[name].grad
            want = lam.view(-1, 1, 1, 1).to(grad.dtype) * w_before[name]
            assert torch.allclose(grad, want)
        greg.after_step(model)
        with torch.no_grad():
            for w in mags.values():
                w.mul_(0.99)
    assert all(greg.done.values())


def test_greg_group_scope_pulls_every_slice_of_a_pruned_channel_and_filters_scope_its_rows(
        device):
    bn = {"c3": lambda m, k: [m.b34.weight[k], m.b34.bias[k]],
          "c4": lambda m, k: [m.b34.weight[3 + k], m.b34.bias[3 + k]], "c5": lambda m, k: []}
    for scope in ("filters", "group"):
        model, x = tiny(device)
        greg, groups = attach(GReg(scope=scope, pr=0.5, delta=0.5, tau=1.0, k_u=1,
                                   mag_ratio_limit=math.inf), model, x)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        greg.after_backward(model)                       # lam = 0.5 on the pruned channels
        # oracle: grad = L * w, L summing lam_k over every hand-written slice of channel k
        lam_sum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for g in (g for g in groups if not g.coupled):
            name = g.sources[0]
            for k in torch.nonzero(greg.pruned[g.index]).flatten().tolist():
                pulled = [model.get_parameter(f"{name}.weight")[k]]
                if scope == "group":
                    pulled += OUT[name](model, k)[1:] + bn[name](model, k) + IN[name](model, k)
                for t in pulled:
                    _same_slice(lam_sum, model, t).add_(0.5)
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, lam_sum[n] * p.detach()), (scope, n)
        if scope == "filters":
            assert (model.b34.weight.grad == 0).all() and (model.c5.bias.grad == 0).all()
        else:
            assert (model.b34.weight.grad != 0).any() and (model.fc.weight.grad != 0).any()


def _same_slice(tensors, model, t):
    """The slice of tensors[name] at the place of the parameter slice `t` (same strides)."""
    for n, p in model.named_parameters():
        if p.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            return tensors[n].as_strided(t.shape, t.stride(), t.storage_offset())
    raise LookupError("not a parameter slice")


def test_greg2_grows_uniformly_then_picks_by_magnitude_and_recovers_the_kept(device):
    model, x = tiny(device)
    greg, _ = attach(GReg(variant="greg2", pr=0.5, k_u=1, delta_pick=0.01, tau_pick=0.025,
                          delta=0.1, lam_recover=-1e-3), model, x)
    assert greg.pruned is None
    for t in range(3):
        greg.after_backward(model)
        greg.after_step(model)
        if t < 2:
            assert greg.pruned is None
            assert all(torch.allclose(v, torch.full_like(v, 0.01 * (t + 1)))
                       for v in greg.lam.values())
    assert greg.pruned is not None
    mags = greg.magnitude(model)
    for i, mask in greg.pruned.items():
        k = int(mask.sum())
        assert set(torch.nonzero(mask).flatten().tolist()) == \
            set(torch.argsort(mags[i])[:k].tolist())
    greg.after_backward(model)
    for i, mask in greg.pruned.items():
        assert torch.allclose(greg.lam[i][mask], torch.full_like(greg.lam[i][mask], 0.13))
        assert (greg.lam[i][~mask] == -1e-3).all()


def test_greg_macs_target_sets_uniform_ratios_and_finish_removes_the_preset_set(device):
    model = get_model("resnet20").to(device)
    x = torch.randn(1, 3, 32, 32, device=device)
    greg, _ = attach(GReg(macs=0.5), model, x)
    ratios = set(greg.ratios.values())
    assert len(ratios) == 1 and 0 < ratios.pop() < 1
    small = greg.finish(model)
    frac = pl.count(small, x)[0] / pl.count(model, x)[0]
    assert 0.45 < frac <= 0.5
    for g in greg.groups:
        mod = model.get_submodule(g.sources[0])
        kept = torch.nonzero(~greg.pruned[g.index]).flatten()
        assert torch.equal(small.get_submodule(g.sources[0]).weight, mod.weight[kept])


def test_greg_takes_the_macs_target_from_a_budget_in_the_context():
    model = get_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    greg = GReg(macs=0.5)
    greg.ctx = Context(example_inputs=x, extra={"budget": Budget(macs=0.75)})
    greg.attach(model, pl.channel_groups(model, x))
    frac = pl.count(greg.finish(model), x)[0] / pl.count(model, x)[0]
    assert 0.7 < frac <= 0.75


def test_greg_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="variant"):
        GReg(variant="greg3")
    with pytest.raises(ValueError, match="pr"):
        GReg(pr=1.5)
    with pytest.raises(ValueError, match="MACs target"):
        GReg(pr=None, macs=None)


# ---------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("name", ["ssl", "oicsr", "oto", "greg"])
def test_each_method_runs_through_the_pipeline_and_meets_the_macs_budget(name, device):
    from prunelib.pipeline import run
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (48, 32, 32, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (48,), generator=gen)
    data = SimpleNamespace(train=Batches(imgs, labels, 16, device=device, augment=True),
                           test=Batches(imgs[:16], labels[:16], 16, device=device), calib=None)
    model = get_model("resnet20").to(device)
    pruned, res = run(name, model, data, Budget(macs=0.6), reg_epochs=1, ft_epochs=0.5,
                      measure_latency=False)
    assert res["pruned"]["macs_ratio"] <= 0.6
    assert res["method"] == name
    assert pruned(torch.randn(2, 3, 32, 32, device=device)).shape == (2, 10)


# ------------------------------------------------------------------- scores(model)
@pytest.mark.parametrize("name, kw", [("ssl", {}), ("oicsr", {}), ("oto", {}),
                                      ("greg", {"pr": 0.5})])
def test_scores_are_of_the_model_passed_not_of_the_attached_one(name, kw, device):
    model, x = tiny(device)
    meth, _ = attach(get(name, **kw), model, x)
    own = {i: s.clone() for i, s in meth.scores(model).items()}
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():                               # every weight changed, differently
        for p in other.parameters():
            p.mul_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype).to(device))
    ref, _ = attach(get(name, **kw), other, x)          # oracle: a method attached to the copy
    got, want = meth.scores(other), ref.scores(other)
    assert got.keys() == want.keys() == own.keys()
    for i in got:
        torch.testing.assert_close(got[i], want[i])
        assert not torch.allclose(got[i], own[i])
    for i, s in meth.scores(model).items():             # the attached model is untouched
        torch.testing.assert_close(s, own[i])
    if hasattr(meth, "penalty"):
        torch.testing.assert_close(meth.penalty(other), ref.penalty(other))
