"""Methods with extra learnable parameters (SSS, ResRep, GDP, DMC): each update step against a
hand or autograd computation of the paper's formula, folds / conversions against the eval output,
budgets against pl.count, and the finished model (plain, smaller) through save / load."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import prunelib as pl
from prunelib import methods
from prunelib.models import CifarResNet, get_model
from prunelib.select import Budget
from prunelib.surgery import removed_branches

from test_surgery import randomize_bn

GATE_METHODS = ["sss", "resrep", "gdp", "dmc"]


def tiny_resnet(shortcut: str = "A", seed: int = 0) -> CifarResNet:
    """ResNet-8 with stages 4/8/16 (one block each), non-trivial BN statistics, eval mode."""
    torch.manual_seed(seed)
    model = CifarResNet(8, shortcut=shortcut, width=4)
    randomize_bn(model, torch.Generator().manual_seed(seed))
    return model.eval()


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def attached(name: str, model: nn.Module, x: torch.Tensor, **hp):
    m = methods.get(name, **hp)
    m.ctx = methods.Context(example_inputs=x[:1], lr=0.1)
    return m, m.attach(model, pl.channel_groups(model, x[:1]))


def no_hooks(model: nn.Module) -> bool:
    return all(not mod._forward_hooks and not mod._forward_pre_hooks
               for mod in model.modules())


def round_trip(small: nn.Module, dense: nn.Module, x: torch.Tensor, path) -> None:
    """save_pruned / load_pruned into a fresh dense architecture gives the same outputs."""
    pl.save_pruned(small, path)
    loaded, _ = pl.load_pruned(dense, path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), small.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", GATE_METHODS)
def test_finish_before_attach_says_to_attach_first(name):
    with pytest.raises(RuntimeError, match=r"call attach\(model, groups\) first"):
        methods.get(name).finish(tiny_resnet(), Budget(macs=0.5))


# --- SSS ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["blocks", "channels"])
def test_sss_apg_step_equals_the_nag_form_by_hand(structure):
    model, (x, y) = tiny_resnet(), batch()
    gamma, mu, lr, wd = 0.5, 0.9, 0.1, 0.1
    sss, model = attached("sss", model, x, gamma=gamma, momentum=mu, structure=structure)
    internal = sum(g.size for g in sss.groups if g.bns())      # channels of internal groups
    assert sss.st.n == (3 if structure == "blocks" else internal)
    with torch.no_grad():
        sss.lam.copy_(torch.linspace(0.02, 1.5, sss.st.n))
    opt = torch.optim.SGD(sss.param_groups(model, lr, wd), lr=lr, momentum=0.9,
                          weight_decay=wd)
    model.train()
    lam, v = sss.lam.detach().clone(), torch.zeros(sss.st.n)
    for step in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        g = sss.lam.grad.detach().clone()
        assert g.abs().sum() > 0
        sss.after_backward(model)
        opt.step()
        torch.testing.assert_close(sss.lam.detach(), lam)       # SGD does not step lambda
        sss.after_step(model)
        z = lam - lr * g                                       # the paper's eqs. 10-12 by hand
        z = torch.where(z.abs() > lr * gamma, z - lr * gamma * torch.sign(z),
                        torch.zeros_like(z))
        v = mu * v + (z - lam)
        lam = torch.clamp(z + mu * v, min=0.0)
        torch.testing.assert_close(sss.lam.detach(), lam, rtol=1e-6, atol=1e-7)
    assert (lam == 0).any() and (lam > 0).any()       # the threshold reached some, not all


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_sss_blocks_fold_and_removal_are_exact_and_round_trip(shortcut, tmp_path):
    model, (x, _) = tiny_resnet(shortcut), batch()
    sss, model = attached("sss", model, x)
    assert sss.st.kind == "blocks"
    with torch.no_grad():
        sss.lam.copy_(torch.tensor([0.0, 0.7, 0.0]))
        y = model(x)
    small = sss.finish(model, None).eval()
    assert no_hooks(small) and removed_branches(small) == ["layer1.0.bn2", "layer3.0.bn2"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), y)               # the attached model still works
    assert pl.count(small, x)[0] < pl.count(model, x)[0]
    round_trip(small, CifarResNet(8, shortcut=shortcut, width=4), x, tmp_path / "s.pt")


def test_sss_channels_fold_and_removal_are_exact(tmp_path):
    model, (x, _) = tiny_resnet(), batch()
    sss, model = attached("sss", model, x, structure="channels")
    with torch.no_grad():
        sss.lam.copy_(torch.rand(sss.st.n, generator=torch.Generator().manual_seed(0)))
        sss.lam[[0, 1, 5, 9, 20]] = 0.0
        y = model(x)
    small = sss.finish(model, None).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), y, rtol=1e-5, atol=1e-5)
    assert no_hooks(small)
    lam, zeros = sss.lam.detach(), {}
    for i, sl in sss.st.slices.items():                    # every lambda = 0 channel is gone
        conv = sss.all_groups[i].by_role("out")[0].module
        zeros[conv] = zeros.get(conv, 0) + int((lam[sl] == 0).sum())
    for conv, n in zeros.items():
        assert (model.get_submodule(conv).out_channels - small.get_submodule(conv).out_channels
                == n)
    assert sum(zeros.values()) == 5
    round_trip(small, CifarResNet(8, width=4), x, tmp_path / "c.pt")


@pytest.mark.parametrize("structure", ["blocks", "channels"])
def test_sss_budget_is_met(structure):
    model, (x, _) = tiny_resnet(), batch()
    sss, model = attached("sss", model, x, structure=structure)
    with torch.no_grad():
        sss.lam.copy_(torch.rand(sss.st.n, generator=torch.Generator().manual_seed(1)) + 0.1)
    dense = pl.count(model, x[:1])[0]
    small = sss.finish(model, Budget(macs=0.6))
    assert pl.count(small, x[:1])[0] <= 0.6 * dense
    if structure == "blocks":
        assert sss.target_reached is True


# --- ResRep -------------------------------------------------------------------------------------
def perturbed_compactors(rr, zero_rows: int = 1, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in rr.Q:
            q.add_(0.2 * torch.randn(q.shape, generator=gen))
            q[:zero_rows] = 0.0


def test_resrep_gradient_reset_equals_mask_times_grad_plus_row_lasso_by_hand():
    model, (x, y) = tiny_resnet(), batch()
    lam = 0.05
    rr, model = attached("resrep", model, x, lam=lam)
    assert [c for _, c, _ in rr.comp] == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]
    perturbed_compactors(rr)
    for m in rr.mask:
        m[1::2] = 0.0
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    sizes = [q.shape[0] for q in rr.Q]
    raw = [rr.P.grad[k, :n, :n].clone() for k, n in enumerate(sizes)]
    rr.after_backward(model)
    for k, (q, m, g) in enumerate(zip(rr.Q, rr.mask, raw)):
        assert g.abs().sum() > 0
        w, grad = q.detach(), rr.P.grad[k, :sizes[k], :sizes[k]]
        for i in range(w.shape[0]):                                  # row by row, by hand
            norm = sum(float(v) ** 2 for v in w[i]) ** 0.5
            want = m[i] * g[i] + (lam * w[i] / norm if norm > 0 else 0 * w[i])
            torch.testing.assert_close(grad[i], want, rtol=1e-5, atol=1e-7)
    pad = torch.ones_like(rr.P, dtype=torch.bool)          # the padding of P stays exactly 0
    for k, n in enumerate(sizes):
        pad[k, :n, :n] = False
    assert (rr.P.grad[pad] == 0).all() and (rr.P.detach()[pad] == 0).all()
    groups = rr.param_groups(model, 0.1, 5e-4)
    assert groups[1]["params"] == [rr.P] and groups[1]["momentum"] == 0.99
    assert groups[1]["weight_decay"] == 0.0
    assert not any(p is rr.P for p in groups[0]["params"])


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resrep_conversion_is_exact_and_removes_the_zero_rows(shortcut, tmp_path):
    model, (x, _) = tiny_resnet(shortcut), batch()
    rr, model = attached("resrep", model, x)
    perturbed_compactors(rr, zero_rows=2)
    with torch.no_grad():
        rr.Q[2][5] = 1e-7                                   # below the conversion threshold
        y = model(x)
        merged = rr.merged(model).eval()
        torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    small = rr.finish(model, None).eval()
    assert no_hooks(small) and no_hooks(merged)
    assert [small.get_submodule(c).out_channels for _, c, _ in rr.comp] == [2, 6, 13]
    with torch.no_grad():
        torch.testing.assert_close(small(x), y, rtol=1e-5, atol=1e-5)
    assert pl.count(small, x)[0] < pl.count(model, x)[0]
    round_trip(small, CifarResNet(8, shortcut=shortcut, width=4), x, tmp_path / "r.pt")


def test_resrep_masks_grow_by_granularity_along_the_global_norm_order_to_the_target():
    model, (x, _) = tiny_resnet(), batch()
    rr, model = attached("resrep", model, x, granularity=3, macs=0.6)
    perturbed_compactors(rr, zero_rows=0, seed=3)
    norms = torch.cat([n.cpu() for n in rr.row_norms()])
    order = torch.argsort(norms)
    masked = []
    for _ in range(20):
        rr.update_masks()
        now = torch.cat([(m == 0).cpu() for m in rr.mask])
        masked.append(int(now.sum()))
        k = masked[-1]                                   # the k globally smallest rows (floors
        assert set(torch.nonzero(now).flatten().tolist()) <= set(order[:k + 8].tolist())
        if rr.target_reached:
            break
    assert masked[:3] == [3, 6, 9] and rr.target_reached
    small = rr.finish(model, Budget(macs=0.6))
    assert pl.count(small, x[:1])[0] <= 0.6 * pl.count(model, x[:1])[0]


def test_resrep_short_phase_decays_masked_rows_only_by_the_lasso_gradient():
    from prunelib.data import Batches
    model, _ = tiny_resnet(), batch()
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (32, 8, 8, 3), dtype=torch.uint8, generator=gen)
    data = Batches(imgs, torch.randint(0, 10, (32,), generator=gen), batch_size=8)
    rr = methods.get("resrep", lam=0.5, mask_interval=1, warmup=0.0, granularity=2)
    rr.ctx = methods.Context(example_inputs=torch.randn(1, 3, 8, 8), train_loader=data,
                             epochs=2, lr=0.05, quiet=True)
    model = rr.attach(model, pl.channel_groups(model, rr.ctx.example_inputs))
    before = [n.clone() for n in rr.row_norms()]
    rr.regularize(model, rr.ctx)
    assert rr.step == 8 and rr.mask_updates == 8
    for m, b, a in zip(rr.mask, before, rr.row_norms()):
        off = m == 0
        if off.any():
            assert (a[off] < b[off]).all()                   # masked rows shrink


def test_resrep_default_mask_interval_is_the_official_200_scaled_to_the_phase():
    from prunelib.data import Batches
    from prunelib.methods.resrep import OFFICIAL_MASK_INTERVAL, OFFICIAL_STEPS
    assert (OFFICIAL_MASK_INTERVAL, OFFICIAL_STEPS) == (200, 480 * 782)  # 480 ep, batch 64
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (32, 8, 8, 3), dtype=torch.uint8, generator=gen)
    data = Batches(imgs, torch.randint(0, 10, (32,), generator=gen), batch_size=8)
    rr = methods.get("resrep", warmup=0.0)
    assert rr.mask_interval is None and methods.get("resrep", mask_interval=3).mask_interval == 3
    rr.ctx = methods.Context(example_inputs=torch.randn(1, 3, 8, 8), train_loader=data,
                             epochs=2, lr=0.05, quiet=True)
    model = tiny_resnet()
    model = rr.attach(model, pl.channel_groups(model, rr.ctx.example_inputs))
    rr.regularize(model, rr.ctx)
    assert rr._every == 1 and rr.mask_updates == rr.step == 8      # a short phase: every step


# --- GDP and DMC: gates on channels -------------------------------------------------------------
def gate_grad_oracle(method, model: nn.Module, x, y, gate_values: torch.Tensor) -> torch.Tensor:
    """dL/dg by autograd: a hook-free copy of the model gated by a leaf tensor g (identity fn),
    L = CE + the method's resource / FLOPs term written with g."""
    from prunelib.methods.structures import Structures
    plain = copy.deepcopy(model)
    method.st.strip(plain)
    g = gate_values.detach().clone().requires_grad_(True)
    st = Structures(plain, method.groups, "channels", x[:1], "oracle")
    st.install(plain, g, lambda t: t)
    loss = nn.functional.cross_entropy(plain(x), y)
    ratio = st.soft_macs(method.mac, g) / method.mac.dense
    if method.name == "gdp":
        loss = loss + method.lam * torch.relu(ratio - method.target)
    else:
        loss = loss + method.lam * torch.log(torch.clamp(ratio, min=method.target)
                                             / method.target)
    loss.backward()
    return g.grad


def test_gdp_gate_gradient_is_dl_dg_times_the_smoothed_l0_derivative():
    model, (x, y) = tiny_resnet("B"), batch()
    gdp, model = attached("gdp", model, x, lam=3.0, macs=0.3)
    assert any(g.coupled for g in gdp.groups)          # trunk channels share one gate
    eps = 0.05
    gdp.eps = eps
    with torch.no_grad():
        gdp.theta.copy_(torch.linspace(-0.6, 0.9, gdp.st.n))
    model.train()
    loss = nn.functional.cross_entropy(model(x), y) + gdp.loss_term(model)
    loss.backward()
    th = gdp.theta.detach()
    g = th ** 2 / (th ** 2 + eps)
    dg = gate_grad_oracle(gdp, model, x, y, g)
    assert gdp.loss_term(model) > 0                     # the FLOPs term is active
    torch.testing.assert_close(gdp.theta.grad, dg * 2 * th * eps / (th ** 2 + eps) ** 2,
                               rtol=1e-4, atol=1e-7)


def test_bilinear_macs_of_binary_gates_equal_the_count_of_the_pruned_model():
    model, (x, _) = tiny_resnet("A"), batch()
    gdp, model = attached("gdp", model, x)
    gen = torch.Generator().manual_seed(2)
    g = (torch.rand(gdp.st.n, generator=gen) > 0.4).float()
    with torch.no_grad():
        gdp.theta.copy_(g)                                     # theta = 0 -> gate exactly 0
    small = gdp.finish(model, None)
    assert float(gdp.st.soft_macs(gdp.mac, g)) == pl.count(small, x[:1])[0]


def test_gdp_sgd_step_zero_crossing_and_annealing_by_hand():
    model, (x, y) = tiny_resnet(), batch()
    gdp, model = attached("gdp", model, x, anneal_steps=4, gate_lr=4.0, lam=5.0,
                          eps_start=1e-2, eps_end=1e-4)
    with torch.no_grad():
        gdp.theta.copy_(torch.linspace(-0.3, 0.3, gdp.st.n) + 0.0123)
    groups = gdp.param_groups(model, 0.1, 5e-4)
    assert groups[1] == {"params": [gdp.theta], "lr": 4.0, "weight_decay": 0.0,
                         "momentum": 0.9}
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    th = gdp.theta.detach().clone()
    buf, dead = None, torch.zeros_like(th, dtype=torch.bool)
    for t in range(1, 5):
        opt.zero_grad(set_to_none=True)
        (nn.functional.cross_entropy(model(x), y) + gdp.loss_term(model)).backward()
        grad = gdp.theta.grad.clone()
        assert (grad[dead] == 0).all()                        # g'(0) = 0
        gdp.after_backward(model)
        opt.step()
        gdp.after_step(model)
        buf = grad if buf is None else 0.9 * buf + grad          # heavy ball, by hand
        new = th - 4.0 * buf
        dead |= new * th <= 0                                    # reached or crossed 0
        th = torch.where(dead, torch.zeros_like(new), new)
        torch.testing.assert_close(gdp.theta.detach(), th, rtol=1e-5, atol=1e-6)
        assert gdp.eps == pytest.approx(1e-2 * (1e-2) ** (t / 4))
    assert dead.any() and (~dead).any() and (gdp.theta.detach()[dead] == 0).all()
    assert gdp.eps == pytest.approx(1e-4)


@pytest.mark.parametrize("name", ["gdp", "dmc"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_gate_fold_and_removal_are_exact_and_round_trip(name, shortcut, tmp_path):
    model, (x, _) = tiny_resnet(shortcut), batch()
    m, model = attached(name, model, x, residual="coupled")
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        m.theta.copy_(torch.rand(m.st.n, generator=gen) * 2 - 0.5)
        if name == "gdp":
            m.theta[m.theta < 0] = 0.0                         # dead gates: exactly 0
        y = model(x)
    small = m.finish(model, None).eval()
    assert no_hooks(small)
    with torch.no_grad():
        torch.testing.assert_close(small(x), y, rtol=1e-5, atol=1e-5)
    off = int((m.gates() == 0).sum())
    assert off > 0
    assert pl.count(small, x)[0] < pl.count(model, x)[0]
    round_trip(small, CifarResNet(8, shortcut=shortcut, width=4), x, tmp_path / "g.pt")
    budget = m.finish(model, Budget(macs=0.4))
    assert pl.count(budget, x[:1])[0] <= 0.4 * pl.count(model, x[:1])[0]


def activated_gate_grad_oracle(dmc, model: nn.Module, x, y, g: torch.Tensor) -> torch.Tensor:
    """dL/dg for gates on the *activated* channels, z = g relu(u): a hook-free copy whose
    conv2 inputs (relu(bn1)) or, for channels a block's conv2 adds to a zero-padded shortcut,
    block outputs are multiplied by a leaf g,
    L = CE + lam log(max(T, pT0) / pT0)."""
    plain = copy.deepcopy(model)
    dmc.st.strip(plain)
    g = g.detach().clone().requires_grad_(True)
    ext = torch.cat([g, g.new_ones(1)])                 # index n: a channel without a gate
    inner = 0
    for bn, idx in dmc.st._bn_index.items():
        f = lambda idx=idx: ext[idx].view(1, -1, 1, 1)  # noqa: E731
        if bn.endswith("bn1"):                          # relu(bn1) feeds conv2: gate its input
            inner += 1
            plain.get_submodule(bn[:-3] + "conv2").register_forward_pre_hook(
                lambda _m, a, f=f: (a[0] * f(),))
        else:     # a block's bn2 on option-A pad channels: the shortcut adds 0 there, so
            # relu(g bn2 + 0) = g relu(bn2): gate the block's output
            assert bn.endswith("bn2")
            plain.get_submodule(bn[:-4]).register_forward_hook(
                lambda _m, _a, out, f=f: out * f())
    assert inner >= 2
    ratio = dmc.st.soft_macs(dmc.mac, g) / dmc.mac.dense
    loss = nn.functional.cross_entropy(plain(x), y) + dmc.lam * torch.log(
        torch.clamp(ratio, min=dmc.target) / dmc.target)
    loss.backward()
    return g.grad


def test_dmc_gates_are_binary_and_the_ste_gradient_is_dl_dg_inside_the_window():
    model, (x, y) = tiny_resnet(), batch()
    dmc, model = attached("dmc", model, x, lam=2.0, macs=0.5)
    with torch.no_grad():
        perm = torch.randperm(dmc.st.n, generator=torch.Generator().manual_seed(0))
        dmc.theta.copy_(torch.linspace(-0.4, 1.5, dmc.st.n)[perm])
    assert all((dmc.theta[sl] > 0).any() for sl in dmc.st.slices.values())
    model.train()
    (nn.functional.cross_entropy(model(x), y) + dmc.loss_term(model)).backward()
    th = dmc.theta.detach()
    g = (th > 0).float()
    dg = activated_gate_grad_oracle(dmc, model, x, y, g)
    assert dmc.loss_term(model) > 0
    torch.testing.assert_close(dmc.theta.grad, dg * (th.abs() <= 1).float(),
                               rtol=1e-4, atol=1e-7)
    # an off gate still hears the loss (a gate folded before the ReLU would get exactly 0)
    off = (th <= 0) & (th >= -1)
    assert off.any() and (dmc.theta.grad[off] != 0).all()
    dmc.lam = 0.0                                       # the loss's part alone
    assert (gate_grad_oracle(dmc, model, x, y, g)[th <= 0] == 0).all()
    # the resource term by hand from the count of the hard-gated, pruned model
    t = pl.count(dmc.finish(model, None), x[:1])[0]
    p_t0 = 0.5 * pl.count(model, x[:1])[0]
    assert float(dmc.resource().detach()) == pytest.approx(math.log(max(t, p_t0) / p_t0), rel=1e-6)


def test_dmc_trains_only_the_gates():
    from prunelib.data import Batches
    model = tiny_resnet()
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (32, 8, 8, 3), dtype=torch.uint8, generator=gen)
    data = Batches(imgs, torch.randint(0, 10, (32,), generator=gen), batch_size=8)
    dmc = methods.get("dmc", lam=5.0, macs=0.2)
    dmc.ctx = methods.Context(example_inputs=torch.randn(1, 3, 8, 8), train_loader=data,
                              epochs=2, lr=0.5, quiet=True)
    model = dmc.attach(model, pl.channel_groups(model, dmc.ctx.example_inputs))
    weights = {k: v.clone() for k, v in model.named_parameters()}
    theta = dmc.theta.detach().clone()
    dmc.regularize(model, dmc.ctx)
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert not torch.equal(dmc.theta.detach(), theta) and (dmc.gates() == 0).any()


# --- per-step cost and device / dtype moves (the harness of tests/test_hook_cost.py) --------------
STEP_CONFIGS = {"sss": {}, "sss_channels": {"structure": "channels"}, "resrep": {},
                "gdp": {"anneal_steps": 100}, "dmc": {}}


def hooked_gate(name: str, model_name: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = get_model(model_name).to(dtype)
    x, y = torch.randn(2, 3, 32, 32, dtype=dtype), torch.randint(0, 10, (2,))
    m = methods.get(name.split("_")[0], **STEP_CONFIGS[name])
    m.ctx = methods.Context(example_inputs=x[:1], quiet=True)
    model = m.attach(model, pl.channel_groups(model, x[:1]))
    opt = torch.optim.SGD(m.param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9)
    return m, model, opt, (x, y)


def extra_params(m) -> torch.Tensor:
    return {"sss": lambda: m.lam, "resrep": lambda: m.P, "gdp": lambda: m.theta,
            "dmc": lambda: m.theta}[m.name]().detach()


@pytest.mark.parametrize("name", sorted(STEP_CONFIGS))
def test_gate_hooks_run_a_fixed_number_of_ops_and_read_nothing_back(name):
    from test_hook_cost import SYNC, Ops, step
    counts = {}
    for model_name in ("resnet20", "resnet56"):
        m, model, opt, batch = hooked_gate(name, model_name)
        step(m, model, opt, batch)                            # first step: lazy set-up
        ops = Ops()
        step(m, model, opt, batch, ops, hooks_only=True)
        counts[model_name] = sorted(ops.names)
        whole = Ops()
        step(m, model, opt, batch, whole)
        assert len(whole.names) > 100 and SYNC.isdisjoint(whole.names), \
            sorted(SYNC & set(whole.names))
    assert counts["resnet20"] == counts["resnet56"]


@pytest.mark.parametrize("name", sorted(STEP_CONFIGS))
def test_a_gate_method_attached_then_moved_steps_as_one_attached_after_the_move(name):
    from test_hook_cost import step
    m, model, _, batch = hooked_gate(name, "resnet20")
    model.double()
    opt = torch.optim.SGD(m.param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9)
    ref_m, ref, ref_opt, ref_batch = hooked_gate(name, "resnet20", torch.float64)
    for _ in range(2):
        step(m, model, opt, ref_batch)
        step(ref_m, ref, ref_opt, ref_batch)
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    for k in got:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    assert extra_params(m).dtype == torch.float64       # (DMC's theta_init 0.1 was rounded
    torch.testing.assert_close(extra_params(m), extra_params(ref_m),   # to float32 at attach)
                               rtol=1e-7 if name == "dmc" else 1e-12, atol=1e-12)


class _OwnForwardBN(nn.BatchNorm2d):
    """A BatchNorm with its own forward (as timm's): Structures must scale its output."""
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, 0.1, self.eps)


@pytest.mark.parametrize("name", ["gdp", "bar"])
def test_factor_folded_into_bn_affine_equals_scaling_its_output(name):
    # BN(x; f gamma, f beta) = f BN(x; gamma, beta): same outputs and gradients as the hook
    x, _ = batch(8)
    ref = tiny_resnet()
    own = copy.deepcopy(ref)
    for mod_name, mod in list(own.named_modules()):
        if isinstance(mod, nn.BatchNorm2d):
            new = _OwnForwardBN(mod.num_features)
            new.load_state_dict(mod.state_dict())
            parent, _, leaf = mod_name.rpartition(".")
            setattr(own.get_submodule(parent) if parent else own, leaf, new)
    outs, grads = [], []
    for model in (ref, own):
        torch.manual_seed(0)
        m, model = attached(name, model, x)
        with torch.no_grad():
            p = m.theta if name == "gdp" else m.log_alpha
            p.copy_(torch.linspace(-1.5, 2.0, p.numel()))
        model.eval()
        y = model(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append((p.grad.clone(), model.layer1[0].bn1.weight.grad.clone()))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    weight = ref.layer1[0].bn1._parameters["weight"]
    assert isinstance(weight, nn.Parameter)          # restored after the call
