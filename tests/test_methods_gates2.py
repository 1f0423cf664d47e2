"""Methods with extra learnable parameters, second batch (BAR): the Hard-Concrete gates against
the formulas by hand, the budget barrier and its gradient by hand, the expected cost against
pl.count, the fold against the eval output, the finished model (plain, smaller) through save /
load and under its budget."""
import copy
import math

import pytest
import torch
from torch import nn

import prunelib as pl
from prunelib import methods
from prunelib.data import Batches
from prunelib.methods.bar import hard_concrete_eval, hard_concrete_sample, p_open
from prunelib.methods.structures import Structures
from prunelib.models import CifarResNet
from prunelib.select import Budget

from test_methods_gates import attached, batch, no_hooks, tiny_resnet
from test_surgery import randomize_bn


def gated_copy(method, model: nn.Module, x: torch.Tensor, z: torch.Tensor) -> nn.Module:
    """A hook-free copy of `model` whose channels are multiplied by the fixed gates `z`."""
    plain = copy.deepcopy(model)
    method.st.strip(plain)
    st = Structures(plain, method.groups, "channels", x[:1], "oracle")
    st.install(plain, z.detach().clone(), lambda t: t)
    return plain


# --- BAR: Hard-Concrete gates -------------------------------------------------------------------
def test_bar_finish_before_attach_says_to_attach_first():
    with pytest.raises(RuntimeError, match=r"call attach\(model, groups\) first"):
        methods.get("bar").finish(tiny_resnet(), Budget(macs=0.5))


def test_hard_concrete_sample_eval_and_p_open_equal_the_formulas_by_hand():
    la = [-3.0, -0.5, 0.0, 0.7, 2.5]
    u = [0.01, 0.3, 0.5, 0.8, 0.999]
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    for a, v in zip(la, u):
        s = 1 / (1 + math.exp(-(math.log(v) - math.log(1 - v) + a) / beta))
        z = min(1.0, max(0.0, s * (zeta - gamma) + gamma))
        got = hard_concrete_sample(torch.tensor([a], dtype=torch.float64),
                                   torch.tensor([v], dtype=torch.float64))
        assert float(got) == pytest.approx(z, rel=1e-12, abs=1e-15)
        ev = min(1.0, max(0.0, (1 / (1 + math.exp(-a))) * (zeta - gamma) + gamma))
        assert float(hard_concrete_eval(torch.tensor([a], dtype=torch.float64))) == \
            pytest.approx(ev, rel=1e-12, abs=1e-15)
        p = 1 / (1 + math.exp(-(a - beta * math.log(-gamma / zeta))))
        assert float(p_open(torch.tensor([a], dtype=torch.float64))) == pytest.approx(p, 1e-12)
    # the eval gate is exactly 0 iff sigmoid(log_alpha) <= 1/12, exactly 1 iff >= 11/12
    edge = torch.tensor([math.log(1 / 11) - 1e-3, math.log(1 / 11) + 1e-3,
                         math.log(11) - 1e-3, math.log(11) + 1e-3], dtype=torch.float64)
    z = hard_concrete_eval(edge)
    assert z[0] == 0 and 0 < z[1] < z[2] < 1 and z[3] == 1


def test_hard_concrete_open_frequency_is_p_open():
    la = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, 3, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    freq = (hard_concrete_sample(la, u) > 0).double().mean(0)
    torch.testing.assert_close(freq, p_open(la), rtol=0, atol=4e-3)


def test_bar_gates_are_sampled_in_training_and_deterministic_at_eval():
    model, (x, _) = tiny_resnet(), batch()
    bar, model = attached("bar", model, x)
    with torch.no_grad():
        bar.log_alpha.copy_(torch.linspace(-3, 3, bar.st.n))
    model.train()
    torch.manual_seed(5)
    with torch.no_grad():
        y = model(x)
    torch.manual_seed(5)
    u = torch.rand(bar.st.n).clamp(1e-6, 1 - 1e-6)
    la = bar.log_alpha.detach()
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + la) / (2 / 3))
    z = (s * 1.2 - 0.1).clamp(0, 1)
    oracle = gated_copy(bar, model, x, z).train()
    with torch.no_grad():
        torch.testing.assert_close(y, oracle(x), rtol=1e-5, atol=1e-6)
        model.eval()
        z_eval = (torch.sigmoid(la) * 1.2 - 0.1).clamp(0, 1)
        torch.testing.assert_close(model(x), gated_copy(bar, model, x, z_eval).eval()(x),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), model(x))          # eval: no noise


# --- BAR: budget barrier ------------------------------------------------------------------------
def test_bar_barrier_values_by_hand():
    from prunelib.methods.bar import barrier
    a, b, f_max = 0.5, 0.9, 1e4
    v = torch.tensor([0.3, 0.5, 0.6, 0.8, 0.8999, 0.9, 1.2], dtype=torch.float64)
    want = []
    for x in v.tolist():
        r = (x - a) / (b - a)
        want.append(0.0 if r <= 0 else (min(r * r / (1 - r), f_max) if r < 1 else f_max))
    torch.testing.assert_close(barrier(v, a, b, f_max), torch.tensor(want, dtype=torch.float64))


def test_bar_budget_term_gradient_is_lam_f_dv_dp_times_dp_dlog_alpha():
    model, (x, _) = tiny_resnet("B"), batch()
    bar, model = attached("bar", model, x, lam=3.0, macs=0.4, residual="coupled")
    with torch.no_grad():
        bar.log_alpha.copy_(torch.linspace(-1.5, 2.5, bar.st.n))
    bar.b = 0.95                                  # inside the barrier: 0 < r < 1
    term = bar.loss_term(model)
    term.backward()
    la = bar.log_alpha.detach()
    p = (1 / (1 + torch.exp(-(la.double() - (2 / 3) * math.log(0.1 / 1.1)))))
    p_leaf = p.clone().requires_grad_(True)
    v = bar.mac.macs(torch.zeros(len(bar.all_groups), dtype=torch.float64).index_add(
        0, bar.st.group_of, 1 - p_leaf)) / bar.mac.dense
    v.backward()
    a = 0.4 - 1e-4 * 1.01
    r = (float(v.detach()) - a) / (0.95 - a)
    assert 0 < r < 1
    f = r * r / (1 - r)
    assert float(term.detach()) == pytest.approx(3.0 * f * float(v.detach()), rel=1e-5)
    want = 3.0 * f * p_leaf.grad * p * (1 - p)
    torch.testing.assert_close(bar.log_alpha.grad.double(), want, rtol=1e-4, atol=1e-9)
    assert (bar.log_alpha.grad > 0).all()        # every gate is pushed toward closing


def test_bar_expected_cost_of_binary_probabilities_is_the_count_of_the_pruned_model():
    model, (x, _) = tiny_resnet("A"), batch()
    bar, model = attached("bar", model, x)
    gen = torch.Generator().manual_seed(2)
    m = (torch.rand(bar.st.n, generator=gen) > 0.4).float()
    with torch.no_grad():
        bar.log_alpha.copy_(torch.where(m > 0, 8.0, -8.0))    # eval gates exactly 1 / 0
    small = bar.finish(model, None)
    assert bar.gates_off == int((m == 0).sum()) > 0
    assert float(bar.expected_macs(m)) == pl.count(small, x[:1])[0]
    assert float(bar.expected_macs(torch.ones(bar.st.n))) == pl.count(model, x[:1])[0]


def test_bar_bound_anneals_along_the_sigmoid_progress_by_hand():
    model, (x, y) = tiny_resnet(), batch()
    bar, model = attached("bar", model, x, anneal_steps=4, macs=0.3, sigmoid_slope=10.0)
    assert bar.b == pytest.approx(1.01) and bar.a == pytest.approx(0.3 - 1e-4 * 1.01)
    opt = torch.optim.SGD(bar.param_groups(model, 0.1, 5e-4), lr=0.1, momentum=0.9)
    model.train()
    lo = 1 / (1 + math.exp(5))
    for t in range(1, 6):
        opt.zero_grad(set_to_none=True)
        (nn.functional.cross_entropy(model(x), y) + bar.loss_term(model)).backward()
        bar.after_backward(model)
        opt.step()
        bar.after_step(model)
        s = (1 / (1 + math.exp(-10 * (min(t / 4, 1) - 0.5))) - lo) / (1 - 2 * lo)
        assert bar.b == pytest.approx((1 - s) * 1.01 + s * 0.3)
    assert bar.b == pytest.approx(0.3)


# --- BAR: fold, removal, budget, phase ----------------------------------------------------------
@pytest.mark.parametrize("shortcut,residual", [("A", "internal"), ("B", "coupled")])
def test_bar_fold_and_removal_are_exact_and_round_trip(shortcut, residual, tmp_path):
    model, (x, _) = tiny_resnet(shortcut), batch()
    bar, model = attached("bar", model, x, residual=residual)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        bar.log_alpha.copy_(torch.rand(bar.st.n, generator=gen) * 8 - 4)
        y = model(x)
    small = bar.finish(model, None).eval()
    assert no_hooks(small) and bar.gates_off == int((bar.gates() == 0).sum()) > 0
    with torch.no_grad():
        torch.testing.assert_close(small(x), y, rtol=1e-5, atol=1e-5)
    assert pl.count(small, x)[0] < pl.count(model, x)[0]
    pl.save_pruned(small, tmp_path / "b.pt")
    loaded, _ = pl.load_pruned(CifarResNet(8, shortcut=shortcut, width=4), tmp_path / "b.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), small(x), rtol=0, atol=0)
    budget = bar.finish(model, Budget(macs=0.4))
    assert no_hooks(budget)
    assert pl.count(budget, x[:1])[0] <= 0.4 * pl.count(model, x[:1])[0]


def test_bar_regularize_distills_from_a_frozen_teacher_and_closes_gates():
    model, _ = tiny_resnet(), batch()
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (32, 8, 8, 3), dtype=torch.uint8, generator=gen)
    data = Batches(imgs, torch.randint(0, 10, (32,), generator=gen), batch_size=8)
    x = torch.randn(1, 3, 8, 8)
    bar = methods.get("bar", lam=50.0, gate_lr=2.0, log_alpha_init=1.0)
    bar.ctx = methods.Context(example_inputs=x, train_loader=data, epochs=2, lr=0.01,
                              quiet=True, extra={"budget": Budget(macs=0.5)})
    dense = copy.deepcopy(model)
    model = bar.attach(model, pl.channel_groups(model, x))
    ratio0 = float(bar.expected_macs().detach() / bar.mac.dense)
    bar.regularize(model, bar.ctx)
    assert bar.step == 8 and bar.b == pytest.approx(0.5)
    assert all(not p.requires_grad for p in bar.teacher.parameters())
    for (k, t), d in zip(bar.teacher.state_dict().items(), dense.state_dict().values()):
        torch.testing.assert_close(t, d, msg=k)                   # the teacher is untouched
    assert no_hooks(bar.teacher)
    assert float(bar.expected_macs().detach() / bar.mac.dense) < ratio0
    small = bar.finish(model, Budget(macs=0.5))
    assert no_hooks(small) and pl.count(small, x)[0] <= 0.5 * pl.count(dense, x)[0]


# --- GAL: FISTA on masks, adversarial losses, label-free phase ----------------------------------
def vgg_tiny() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10))
    randomize_bn(model, torch.Generator().manual_seed(0))
    return model.eval()


def loader(n: int = 32, seed: int = 0, labels_seed: int = 0) -> Batches:
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(labels_seed))
    return Batches(imgs, labels, batch_size=8)


def test_gal_finish_before_attach_says_to_attach_first():
    with pytest.raises(RuntimeError, match=r"call attach\(model, groups\) first"):
        methods.get("gal").finish(tiny_resnet(), Budget(macs=0.5))


@pytest.mark.parametrize("structure,mask_step", [("blocks", 1), ("channels", 2)])
def test_gal_fista_step_by_hand(structure, mask_step):
    model, (x, y) = tiny_resnet(), batch()
    lam, lr = 0.3, 0.2
    gal, model = attached("gal", model, x, lam=lam, structure=structure, mask_step=mask_step)
    assert gal.st.n == (3 if structure == "blocks" else
                        sum(g.size for g in gal.groups if g.bns()))
    with torch.no_grad():
        gal.m.copy_(torch.linspace(0.01, 1.4, gal.st.n))
    opt = torch.optim.SGD(gal.param_groups(model, lr, 0.0), lr=lr, momentum=0.9)
    model.train()
    m = gal.m.detach().clone()
    m_prev, t, k = m.clone(), 1.0, 0
    for step in range(1, 7):
        loss = nn.functional.cross_entropy(model(x), y) + gal.loss_term(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        g = gal.m.grad.detach().clone()
        gal.after_backward(model)
        opt.step()
        torch.testing.assert_close(gal.m.detach(), m)             # SGD does not step m
        gal.after_step(model)
        if step % mask_step == 0:                                 # fista.py by hand
            if k == 0:
                yk = m.clone()
            else:
                t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
                yk = m + (t - 1) / t_new * (m - m_prev)
                t = t_new
            m_prev = m.clone()
            z = yk - lr * g
            m = torch.clamp(torch.sign(z) * torch.clamp(z.abs() - lr * lam, min=0), min=0)
            k += 1
        torch.testing.assert_close(gal.m.detach(), m, rtol=1e-6, atol=1e-7)
    assert gal.fista_steps == k == 6 // mask_step
    assert (m == 0).any() and (m > 0).any()


def test_gal_losses_equal_the_official_formulas_by_hand():
    model, (x, _) = tiny_resnet(), batch()
    gal, model = attached("gal", model, x, mu=0.7)
    gen = torch.Generator().manual_seed(3)
    real, fake = torch.randn(4, 10, generator=gen), torch.randn(4, 10, generator=gen)
    dr, df = gal.disc(real), gal.disc(fake)
    assert dr.shape == (4, 128)

    def bce(logit, label):                         # -[l log sigmoid + (1 - l) log(1 - sigmoid)]
        p = 1 / (1 + torch.exp(-logit))
        return -(label * torch.log(p) + (1 - label) * torch.log(1 - p)).mean()
    want_d = bce(dr, 1.0) + bce(df, 0.0) + bce(df, 1.0)
    want_g = bce(df, 1.0) + 0.7 * ((fake - real) ** 2).mean()
    torch.testing.assert_close(gal.disc_loss(real, fake), want_d)
    torch.testing.assert_close(gal.gen_loss(real, fake), want_g)
    with torch.no_grad():
        gal.m.copy_(torch.tensor([0.5, 0.0, 2.0]))
    assert float(gal.loss_term(model).detach()) == pytest.approx(0.6 * 2.5)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_gal_blocks_fold_and_removal_are_exact_and_round_trip(shortcut, tmp_path):
    model, (x, _) = tiny_resnet(shortcut), batch()
    gal, model = attached("gal", model, x)
    assert gal.st.kind == "blocks"
    with torch.no_grad():
        gal.m.copy_(torch.tensor([0.0, 0.6, 1.3]))
        y = model(x)
    small = gal.finish(model, None).eval()
    assert no_hooks(small) and gal.mask_zeros == 1
    assert pl.surgery.removed_branches(small) == ["layer1.0.bn2"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), y, rtol=1e-5, atol=1e-5)
    assert pl.count(small, x)[0] < pl.count(model, x)[0]
    pl.save_pruned(small, tmp_path / "g.pt")
    loaded, _ = pl.load_pruned(CifarResNet(8, shortcut=shortcut, width=4), tmp_path / "g.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), small(x), rtol=0, atol=0)
    budget = gal.finish(model, Budget(macs=0.6))
    assert gal.target_reached and pl.count(budget, x[:1])[0] <= 0.6 * pl.count(model, x[:1])[0]


def test_gal_channels_on_vgg_fold_and_removal_are_exact_and_meet_the_budget():
    model, (x, _) = vgg_tiny(), batch()
    gal, model = attached("gal", model, x)
    assert gal.st.kind == "channels" and gal.st.n == 16
    with torch.no_grad():
        gal.m.copy_(torch.rand(16, generator=torch.Generator().manual_seed(1)) + 0.2)
        gal.m[[0, 3, 9]] = 0.0
        y = model(x)
    small = gal.finish(model, None).eval()
    assert no_hooks(small)
    assert small[0].out_channels == 6 and small[3].out_channels == 7
    with torch.no_grad():
        torch.testing.assert_close(small(x), y, rtol=1e-5, atol=1e-5)
    budget = gal.finish(model, Budget(macs=0.5))
    assert pl.count(budget, x[:1])[0] <= 0.5 * pl.count(model, x[:1])[0]


def test_gal_phase_is_label_free_keeps_the_teacher_and_counts_fista_steps():
    x = torch.randn(1, 3, 8, 8)
    runs = []
    for labels_seed in (0, 1):                         # different labels, same images
        model = tiny_resnet()
        dense = copy.deepcopy(model)
        gal = methods.get("gal", lam=0.5)
        gal.ctx = methods.Context(example_inputs=x, train_loader=loader(labels_seed=labels_seed),
                                  epochs=2, lr=0.05, quiet=True)
        model = gal.attach(model, pl.channel_groups(model, x))
        torch.manual_seed(0)
        gal.regularize(model, gal.ctx)
        assert gal.step == 8 and gal.fista_steps == 8 and gal._every == 1
        assert math.isfinite(gal.loss_d) and math.isfinite(gal.loss_g)
        for t, d in zip(gal.teacher.state_dict().values(), dense.state_dict().values()):
            torch.testing.assert_close(t, d)
        assert all(not p.requires_grad for p in gal.teacher.parameters())
        runs.append(gal.m.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert (runs[0] < 1).all()                          # the L1 term shrank every mask
