"""BN-based methods (RSNLI, PR, SCP, GBN, EagleEye): each update against an independent oracle,
and every method end to end (smaller model, budget met, exact removal where claimed)."""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.special import ndtr

import prunelib as pl
from prunelib import pipeline
from prunelib.data import Batches
from prunelib.methods import get
from prunelib.methods.base import Context
from prunelib.methods.eagleeye import adaptive_bn
from prunelib.select import MacModel
from prunelib.methods.pr import valley_threshold
from prunelib.methods.rsnli import channel_cost
from prunelib.models import get_model
from prunelib.select import Budget


def tiny(c: int = 8) -> nn.Sequential:
    """conv3x3 -> BN -> ReLU -> conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> pool -> fc.

    Group 0 feeds a 1x1 conv, group 1 a padded 3x3 conv, group 2 the linear layer.
    """
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10))


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.3 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))


def batches(device, n: int = 32, size: int = 16, bs: int = 16, seed: int = 0) -> Batches:
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return Batches(imgs, labels, batch_size=bs, device=device, seed=seed)


def setup(name, model, x, device, epochs=1.0, **kw):
    model = model.to(device)
    meth = get(name, **kw)
    data = batches(device, size=x.shape[-1])
    meth.ctx = Context(example_inputs=x, train_loader=data, calib_loader=data, device=device,
                       epochs=epochs, lr=0.05, quiet=True)
    return meth, meth.attach(model, pl.channel_groups(model, x)), data


def out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


# --- RSNLI ---------------------------------------------------------------------------------------
def test_rsnli_step_is_soft_threshold_of_a_plain_gradient_step(device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, data = setup("rsnli", tiny(), x, device, cost="uniform", rho=0.3,
                              rho_warmup=0.1, warmup=0.5)
    meth._total, lr = 4, 0.2
    opt = torch.optim.SGD(meth.param_groups(model, lr, 5e-4), lr=lr, momentum=0.9,
                          nesterov=True, weight_decay=5e-4)
    gammas = [p for _, p in meth.gammas()]
    for step, (xb, yb) in enumerate(list(data) * 2):
        g0 = [p.detach().clone() for p in gammas]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        grads = [p.grad.detach().clone() for p in gammas]
        opt.step()
        meth.after_step(model)
        rho = 0.1 if step < 2 else 0.3                      # warm-up: first half of 4 steps
        for p, g, gr in zip(gammas, g0, grads):
            z = g - lr * gr                                  # no momentum, no weight decay
            want = torch.sign(z) * torch.clamp(z.abs() - lr * rho, min=0)
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6)


def test_rsnli_gammas_are_the_models_decisive_bn_weights_with_their_channel_weights(device):
    x = torch.randn(2, 3, 16, 16, device=device)
    model = tiny()
    meth = get("rsnli")
    with pytest.raises(RuntimeError, match=r"call attach\(model, groups\) first"):
        meth.gammas()
    meth.ctx = Context(example_inputs=x)
    groups = pl.channel_groups(model.to(device), x)
    model = meth.attach(model, groups)
    named = meth.gammas()
    assert [n for n, _ in named] == ["1", "4", "7"]
    assert all(p is model.get_submodule(n).weight for n, p in named)   # the model's own
    cost = channel_cost(model, groups, x)
    weights = meth.channel_weights()
    for g, (n, _) in zip(groups, named):
        torch.testing.assert_close(weights[n], torch.full((g.size,), cost[g.index]).to(weights[n]))
    weights["1"].zero_()                                  # a copy: the method is unchanged
    assert float(meth.channel_weights()["1"].min()) == pytest.approx(cost[0])


def test_rsnli_memory_cost_matches_hand_count():
    x = torch.randn(1, 3, 16, 16)
    model = tiny(8)
    groups = pl.channel_groups(model, x)
    cost = channel_cost(model, groups, x)
    # group 0: producer 3x3 conv of 3 inputs at 16x16, consumer 1x1 conv with 16 outputs
    assert cost[0] == pytest.approx((16 * 16 + 3 * 9 + 16 * 1) / 256)
    # group 1: producer 1x1 conv of 8 inputs, consumer 3x3 conv with 16 outputs
    assert cost[1] == pytest.approx((16 * 16 + 8 + 16 * 9) / 256)


def test_rsnli_zero_gamma_removal_is_exact_for_1x1_and_linear_consumers(device):
    x = torch.randn(4, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, _ = setup("rsnli", model, x, device, decision="zeros")
    with torch.no_grad():
        model[1].weight[[0, 3, 5]] = 0.0            # group 0 -> 1x1 consumer
        model[7].weight[[1, 2]] = 0.0               # group 2 -> linear consumer
        model[7].bias[1] = 0.7                      # a positive constant ReLU(beta) to fold
    y0 = out(model, x)
    small = meth.finish(model, None)
    y1 = out(small, x)
    assert small[0].out_channels == 5 and small[6].out_channels == 14
    assert (y0 - y1).abs().max() < 1e-5 * (1 + y0.abs().max())


def test_rsnli_fold_is_exact_inside_a_padded_conv_and_off_at_its_border(device):
    x = torch.randn(4, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, _ = setup("rsnli", model, x, device, decision="zeros")
    with torch.no_grad():
        model[4].weight[[0, 4, 9]] = 0.0            # group 1 -> padded 3x3 consumer
        model[4].bias[[0, 4, 9]] = torch.tensor([0.8, 0.5, -0.2])
    feats = {}
    hook = lambda name: (lambda m, a, o: feats.__setitem__(name, o.detach()))
    model[7].register_forward_hook(hook("dense"))
    y0 = out(model, x)
    small = meth.finish(model, None)
    small[7]._forward_hooks.clear()
    small[7].register_forward_hook(hook("small"))
    out(small, x)
    d, s = feats["dense"], feats["small"]
    inner = (d - s)[..., 1:-1, 1:-1].abs().max()
    border = (d - s).abs().max()
    assert inner < 1e-5 * (1 + d.abs().max())
    assert border > 1e-3                             # zero padding saw 0, not the constant
    assert y0.shape == out(small, x).shape


def test_rsnli_unfolded_removal_changes_the_output(device):
    x = torch.randn(4, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, _ = setup("rsnli", model, x, device, decision="zeros", fold=False)
    with torch.no_grad():
        model[1].weight[[0, 3]] = 0.0
        model[1].bias[[0, 3]] = 0.9
    y0 = out(model, x)
    y1 = out(meth.finish(model, None), x)
    assert (y0 - y1).abs().max() > 1e-3              # the folding above is what makes it exact


def test_rsnli_rescaling_keeps_the_function_and_is_undone(device):
    x = torch.randn(4, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    y0 = out(model.to(device), x)
    gamma0 = model[1].weight.detach().clone()
    meth, model, _ = setup("rsnli", model, x, device, alpha=0.01)
    assert torch.allclose(model[1].weight, 0.01 * gamma0)
    torch.testing.assert_close(out(model, x), y0, rtol=1e-4, atol=1e-5)
    small = meth.finish(model, Budget(macs=1.0))
    assert torch.allclose(model[1].weight, gamma0, rtol=1e-5)
    torch.testing.assert_close(out(small, x), y0, rtol=1e-4, atol=1e-5)


# --- PR ------------------------------------------------------------------------------------------
def test_pr_gradient_equals_autograd_of_the_formula(device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, _ = setup("pr", tiny(), x, device, lam=1e-2, t=1.3)
    gammas = [p for _, p in meth.gammas()]
    with torch.no_grad():
        for i, p in enumerate(gammas):
            p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(i)))
            p[0] = 0.0                                   # clamped factors sit exactly at 0
    flat = torch.cat([p.detach().reshape(-1) for p in gammas]).requires_grad_(True)
    r = 1e-2 * (1.3 * flat.abs() - (flat - flat.mean()).abs()).sum()
    (want,) = torch.autograd.grad(r, flat)
    for p in gammas:
        p.grad = torch.zeros_like(p)
    meth.after_backward(model)
    got = torch.cat([p.grad.reshape(-1) for p in gammas])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert meth.penalty(model).item() == pytest.approx(r.item(), rel=1e-5)


@pytest.mark.parametrize("penalize", ["all", "prunable"])
def test_pr_gammas_name_the_polarized_bns_of_the_model(penalize):
    x = torch.randn(1, 3, 32, 32)
    model = get_model("resnet20")
    meth = get("pr", penalize=penalize)
    with pytest.raises(RuntimeError, match=r"call attach\(model, groups\) first"):
        meth.gammas()
    meth.ctx = Context(example_inputs=x)
    meth.attach(model, pl.channel_groups(model, x))
    named = meth.gammas()
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    want = bns if penalize == "all" else [n for n in bns if n.endswith(".bn1")]
    assert sorted(n for n, _ in named) == sorted(want) and len(want) == (19 if penalize ==
                                                                          "all" else 9)
    assert all(p is model.get_submodule(n).weight for n, p in named)
    with torch.no_grad():                                 # gamma_bar: the mean of all of them
        flat = torch.cat([p.reshape(-1) for _, p in named])
        want_r = meth.lam * (meth.t * flat.abs() - (flat - flat.mean()).abs()).sum()
    assert meth.penalty(model).item() == pytest.approx(want_r.item(), rel=1e-6)


def test_pr_clamps_gamma_into_zero_a(device):
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, _ = setup("pr", tiny(), x, device, clamp=0.8)
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(-1, 2, model[1].weight.numel()))
    meth.after_step(model)
    w = model[1].weight.detach()
    assert w.min() == 0 and w.max().item() == pytest.approx(0.8)
    inside = torch.linspace(-1, 2, w.numel())
    torch.testing.assert_close(w, inside.clamp(0, 0.8).to(w))


@pytest.mark.parametrize("t", [0.6, 1.4, 1.8])
def test_pr_split_global_minimizer_vs_where_subgradient_descent_stops(t):
    """The module docstring's split: on [0, 1]^n the minimizers of R_s put 1/2 + t/4 at 0;
    projected subgradient descent on R_s alone (prunelib's update and clamp) from uniform gamma
    stops at a local minimum with max(1/2, t/2) at 0."""
    n = 1000
    model = nn.Sequential(nn.Conv2d(1, n, 1, bias=False), nn.BatchNorm2d(n), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(n, 2))
    x = torch.randn(1, 1, 2, 2)
    meth = get("pr", lam=1.0, t=t)
    meth.ctx = Context(example_inputs=x)
    meth.attach(model, pl.channel_groups(model, x))
    gamma = model[1].weight
    # global minimizer: R_s is concave, so only vertices count; a vertex is fixed by the number
    # k of factors at 1 (penalty evaluated by prunelib on each of them)
    vals = []
    with torch.no_grad():
        for k in range(n + 1):
            gamma.copy_((torch.arange(n) < k).float())
            vals.append(meth.penalty(model).item())
    k_best = int(torch.tensor(vals).argmin())
    assert abs((n - k_best) / n - (0.5 + t / 4)) <= 1.5 / n
    # projected subgradient descent from uniform random gamma, task loss 0
    with torch.no_grad():
        gamma.copy_(torch.rand(n, generator=torch.Generator().manual_seed(0)))
    for _ in range(2000):
        gamma.grad = torch.zeros_like(gamma)
        meth.after_backward(model)
        with torch.no_grad():
            gamma.sub_(2e-3 * gamma.grad)
        meth.after_step(model)
    g = gamma.detach()
    at_zero = float((g == 0).float().mean())
    assert at_zero == pytest.approx(max(0.5, t / 2), abs=0.02)
    assert (g[g > 0] > g.mean()).all()                  # every survivor sits above the mean
    assert meth.penalty(model).item() > vals[k_best]    # a local, not the global, minimum


def test_pr_valley_threshold_matches_hand_histogram():
    zeros_then_gap = torch.cat([torch.zeros(30), 0.5 + 0.1 * torch.rand(20)])
    assert valley_threshold(zeros_then_gap) == pytest.approx(0.01)
    # bins of width 0.01: counts 5, 3, 1, 2, ... -> first i with d[i] <= 0 <= d[i+1] is 1
    vals = torch.cat([torch.full((5,), 0.005), torch.full((3,), 0.015),
                      torch.full((1,), 0.025), torch.full((2,), 0.035)])
    assert valley_threshold(vals) == pytest.approx(0.02)
    # counts 0, 1, 2, ..., 7 then empty bins: the first "valley" is the empty tail at bin 8
    rising = torch.cat([torch.full((k,), 0.005 + 0.01 * k) for k in range(1, 8)])
    assert valley_threshold(rising) == pytest.approx(0.08)
    everywhere = torch.cat([torch.full((k + 1,), 0.005 + 0.01 * k) for k in range(100)])
    assert valley_threshold(everywhere) == 0.0             # no valley: prune nothing


def test_pr_valley_decision_removes_per_layer(device):
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, _ = setup("pr", tiny(), x, device, decision="valley")
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.0, 0.0, 0.0, 0.9, 0.8, 0.85, 0.95, 0.0]))
    small = meth.finish(model, Budget(macs=0.5))
    assert small[0].out_channels == 4                      # gamma <= 0.01 removed in layer 0


# --- SCP -----------------------------------------------------------------------------------------
def test_scp_off_probability_matches_monte_carlo_bn_relu(device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, _ = setup("scp", tiny(4), x, device, eps=0.1)
    bn = nn.BatchNorm2d(4).to(device).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, -2.0, 0.3]))
        bn.bias.copy_(torch.tensor([0.2, -0.5, 1.0, 0.0]))
    feats = 3.0 * torch.randn(4096, 4, 4, 4, device=device) + 1.0
    with torch.no_grad():
        y = F.relu(bn(feats))
    mc = (y <= 0.1).float().mean((0, 2, 3))
    p_off = ndtr(-meth.margin(bn).detach())
    torch.testing.assert_close(p_off, mc, rtol=0, atol=0.01)


def test_scp_relaxed_mask_is_on_with_the_keep_probability(device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, _ = setup("scp", tiny(4), x, device, mask="concrete")
    bn = model[1].train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0, 0.3]))
        bn.bias.copy_(torch.tensor([0.2, -0.5, 1.0, 0.0]))
    m = meth.channel_mask(bn, torch.ones(20000, 4, 1, 1, device=device))
    assert m.shape == (20000, 4, 1, 1)                  # one sample per image and channel
    keep = ndtr(meth.margin(bn).detach())
    torch.testing.assert_close((m > 0.5).float().mean((0, 2, 3)), keep, rtol=0, atol=0.015)
    assert ((m > 0.05) & (m < 0.95)).float().mean() > 0.05  # relaxed, not binary


def test_scp_channel_mask_is_what_the_forward_pass_multiplies_by(device):
    x = torch.randn(4, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, _ = setup("scp", model, x, device)
    bn = model[4]
    seen = {}
    bn.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o.detach()))
    out(model, x)
    plain = nn.BatchNorm2d(16).to(device).eval()         # the same BN without the mask
    plain.load_state_dict(bn.state_dict())
    with torch.no_grad():
        y_plain = plain(seen["x"])
    m = meth.channel_mask(bn, y_plain)
    assert m.shape == (1, 16, 1, 1)                      # eval / soft: 1 - P_off per channel
    torch.testing.assert_close(m.detach().flatten(), ndtr(meth.margin(bn)).detach())
    torch.testing.assert_close(seen["y"], y_plain * m.detach())
    m.sum().backward()                                   # differentiable in gamma and beta
    assert bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="carries a mask"):
        meth.channel_mask(plain, y_plain)


def test_scp_masks_made_once_per_forward_equal_those_of_a_bn_called_alone(device):
    x = torch.randn(4, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, _ = setup("scp", model, x, device)
    bn = model[4].train()
    seen = {}
    bn.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o))
    model(x)                                             # masks of all BNs made at once
    inside = seen["y"]
    alone = bn(seen["x"])                                # its own mask, outside the forward
    assert alone.grad_fn is not inside.grad_fn
    torch.testing.assert_close(alone, inside, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(inside.pow(2).sum(), [bn.weight, bn.bias]),
                    torch.autograd.grad(alone.pow(2).sum(), [bn.weight, bn.bias])):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_scp_sparsity_term_is_lam_times_expected_active_channels(device):
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, _ = setup("scp", tiny(4), x, device, lam=0.5)
    want = sum(ndtr(model[i].bias / model[i].weight.abs()).sum() for i in (1, 4, 7))
    assert meth.loss_term(model).item() == pytest.approx(0.5 * want.item(), rel=1e-5)


def test_scp_folded_masks_reproduce_the_inference_network(device):
    x = torch.randn(4, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, _ = setup("scp", model, x, device)
    y0 = out(model, x)                               # inference: soft masks 1 - P_off
    assert (y0 - out(meth.detach(copy.deepcopy(model)), x)).abs().max() > 1e-3
    small = meth.finish(model, Budget(macs=1.0))     # nothing removed, masks folded into BN
    torch.testing.assert_close(out(small, x), y0, rtol=1e-5, atol=1e-6)


def test_scp_off_decision_removes_the_likely_off_channels(device):
    x = torch.randn(4, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, _ = setup("scp", model, x, device, decision="off")
    with torch.no_grad():
        model[4].bias[:] = 0.3
        model[4].bias[[1, 2, 3, 7]] = -10.0          # P_off ~ 1: removed, mask ~ 0
        model[7].bias[:] = 0.2                       # likely on: kept
        model[1].bias[:] = -10.0                     # all off: the floor keeps one
    y0 = out(model, x)
    small = meth.finish(model, None)
    assert small[3].out_channels == 12 and small[0].out_channels == 1
    assert small[6].out_channels == 16
    torch.testing.assert_close(out(small, x), y0, rtol=1e-5, atol=1e-6)


# --- GBN -----------------------------------------------------------------------------------------
def test_gbn_gates_keep_the_function_and_melt_back(device):
    x = torch.randn(4, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    y0 = out(model.to(device), x)
    gamma0 = model[1].weight.detach().clone()
    meth, model, _ = setup("gbn", model, x, device)
    w1 = model[1].parametrizations.weight.original              # BN weight: 1, frozen
    assert torch.all(w1 == 1) and not w1.requires_grad
    torch.testing.assert_close(model[1].gbn_gate.detach(), gamma0)
    torch.testing.assert_close(out(model, x), y0, rtol=1e-5, atol=1e-6)
    plain = meth.melt(copy.deepcopy(model))
    assert not hasattr(plain[1], "gbn_gate") and not hasattr(plain[1], "parametrizations")
    assert type(plain[1]) is type(tiny()[1]) and plain[1].weight.requires_grad
    torch.testing.assert_close(out(model, x), y0, rtol=1e-5, atol=1e-6)   # original still gated
    assert meth.taylor(model) and model[1].parametrizations.weight.original.shape == (8,)
    torch.testing.assert_close(out(plain, x), y0, rtol=1e-5, atol=1e-6)


def test_gbn_gates_made_once_per_forward_equal_those_of_a_bn_called_alone(device):
    x = torch.randn(4, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, _ = setup("gbn", model, x, device)
    bn = model[4].train()
    bn.gbn_mask[[2, 5]] = 0.0
    seen = {}
    bn.register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), y=o))
    model(x)                                             # phi * mask of all BNs made at once
    inside = seen["y"]
    alone = bn(seen["x"])                                # its own, outside the forward
    assert alone.grad_fn is not inside.grad_fn and not hasattr(bn, "_gbn_scale")
    torch.testing.assert_close(alone, inside, rtol=1e-5, atol=1e-6)
    assert (inside[:, [2, 5]] == 0).all()
    beta = bn.parametrizations.bias.original
    for a, b in zip(torch.autograd.grad(inside.pow(2).sum(), [bn.gbn_gate, beta]),
                    torch.autograd.grad(alone.pow(2).sum(), [bn.gbn_gate, beta])):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gbn_score_is_accumulated_abs_gate_times_gradient(device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, data = setup("gbn", model, x, device)
    bn = model[4]
    bn.gbn_mask[3] = 0.0
    seen = {}
    beta = bn.parametrizations.bias.original

    def record(m, a, o):            # the ungated BN(x) (batch statistics) and dL/d(output)
        xin = a[0].detach()
        mu, var = xin.mean((0, 2, 3), keepdim=True), xin.var((0, 2, 3), False, keepdim=True)
        seen["pre"] = (xin - mu) / torch.sqrt(var + m.eps) + beta.detach().view(1, -1, 1, 1)
        o.register_hook(lambda g: seen.update(grad=g.detach()))
    bn.register_forward_hook(record)
    want = torch.zeros_like(bn.gbn_gate)
    model.train()
    with meth.collecting():
        for xb, yb in list(data) * 2:
            model.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            meth.after_backward(model)
            # chain rule by hand: gated = BN(x) * phi * mask => dL/dphi = sum(dL/dgated * BN(x))
            dphi = (seen["grad"] * seen["pre"]).sum((0, 2, 3)) * bn.gbn_mask
            want += (dphi * bn.gbn_gate.detach()).abs()
    torch.testing.assert_close(bn.gbn_score, want, rtol=1e-4, atol=1e-7)
    assert bn.gbn_score[3] == 0 and (bn.gbn_score > 0).sum() == bn.gbn_score.numel() - 1


def test_gbn_collecting_scores_and_drops_the_penalty_only_inside_the_block(device):
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, data = setup("gbn", tiny(), x, device, lam=0.1)
    xb, yb = next(iter(data))
    model.train()

    def step():
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        meth.after_backward(model)
        return torch.cat([model[i].gbn_score.clone() for i in (1, 4, 7)])

    assert float(step().abs().sum()) == 0.0             # outside: a tock, nothing collected
    assert meth.loss_term(model) is not None
    with meth.collecting() as same:
        assert same is meth and meth.loss_term(model) is None
        first = step()
        second = step()                                 # accumulated, not overwritten
    assert float(first.min()) > 0 and torch.all(second >= first) and torch.any(second > first)
    torch.testing.assert_close(meth.taylor(model)[1], second[8:24].cpu())
    torch.testing.assert_close(step(), second)          # off again after the block
    with pytest.raises(KeyError):
        with meth.collecting():
            raise KeyError("inside")
    assert meth.loss_term(model) is not None            # restored after an exception


def test_gbn_tick_tock_reaches_the_target_and_masked_removal_is_exact(device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, _ = setup("gbn", tiny(), x, device, epochs=2, target_macs=0.5,
                           ticks_per_tock=2)
    model = meth.regularize(model, meth.ctx)
    assert meth.ticks_done >= 1 and meth.log[-1]["macs_ratio"] <= 0.5
    y0 = out(model, x)
    small = meth.finish(model, None)
    dense = pl.count(tiny().to(device), x)[0]
    assert pl.count(small, x)[0] == pytest.approx(meth.log[-1]["macs_ratio"] * dense)
    torch.testing.assert_close(out(small, x), y0, rtol=1e-4, atol=1e-5)


def test_gbn_stops_as_soon_as_the_target_is_met(device):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, _ = setup("gbn", tiny(), x, device, epochs=2, target_macs=0.9, p=0.5,
                           ticks_per_tock=2, rounds=2)
    meth.regularize(model, meth.ctx)
    assert meth.history == ["tock", "tick"]              # no tock or tick after the target
    assert (meth.ticks_done, meth.tocks_done, meth.target_reached) == (1, 1, True)
    assert len(meth.log) == 1 and meth.log[0]["macs_ratio"] <= 0.9


def test_gbn_says_so_when_the_ticks_run_out_before_the_target(device):
    x = torch.randn(2, 3, 16, 16, device=device)
    meth, model, _ = setup("gbn", tiny(), x, device, epochs=1, target_macs=0.3, p=0.01,
                           ticks_per_tock=1, rounds=1)
    with pytest.warns(UserWarning, match=r"MACs target 0.3 was not reached in 1 ticks"):
        meth.regularize(model, meth.ctx)
    assert meth.history == ["tock", "tick", "tock"] and meth.log[-1]["macs_ratio"] > 0.3
    assert meth.target_reached is False and meth.hparams()["target_reached"] is False


# --- EagleEye ------------------------------------------------------------------------------------
def test_mac_model_predicts_the_removed_model_exactly():
    x = torch.randn(1, 3, 32, 32)
    model = get_model("resnet20")
    groups = pl.channel_groups(model, x)
    gen = torch.Generator().manual_seed(0)
    keep = {g.index: torch.randperm(g.size, generator=gen)[:max(1, g.size // 3)].sort().values
            for g in groups}
    removed = torch.tensor([g.size - len(keep[g.index]) for g in groups])
    small = pl.remove_channels(model, groups, keep)
    assert MacModel(model, groups, x).macs(removed).item() == pl.count(small, x)[0]


def test_adaptive_bn_changes_only_running_statistics(device):
    model = tiny().to(device)
    randomize_bn(model)
    model.to(device)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
    adaptive_bn(model.eval(), batches(device), n=2)
    assert not model.training
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k])
    changed = [k for k, v in model.named_buffers() if not torch.equal(v, bufs[k])]
    assert changed and all(k.split(".")[-1] in ("running_mean", "running_var",
                                                  "num_batches_tracked") for k in changed)


def test_eagleeye_candidates_hit_the_macs_window_and_state_is_restored(device):
    x = torch.randn(2, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, _ = setup("eagleeye", model, x, device, n_candidates=4, abn_batches=2,
                           window=0.02)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small = meth.finish(model, Budget(macs=0.6))
    assert len(meth.candidates) == 4
    assert all(abs(c["macs_ratio"] - 0.6) <= 0.02 for c in meth.candidates)
    assert all(0 <= c["score"] <= 100 for c in meth.candidates)
    dense = pl.count(model, x)[0]
    assert pl.count(small, x)[0] / dense == pytest.approx(meth.best["macs_ratio"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="MACs target"):
        meth.finish(model, Budget(percent=0.3))


def test_eagleeye_min_rate_alone_sets_the_lower_end_of_every_strategy(device):
    x = torch.randn(2, 3, 16, 16, device=device)
    model = tiny()
    randomize_bn(model)
    meth, model, _ = setup("eagleeye", model, x, device, n_candidates=4, abn_batches=1,
                           window=0.03, min_rate=0.2)
    meth.finish(model, Budget(macs=0.6))
    lo, hi = meth.rate_range
    assert lo == 0.2 and 0.2 < hi <= 1 - meth.min_keep
    assert all((c["rates"] >= 0.2).all() and (c["rates"] <= hi).all() for c in meth.candidates)
    assert all(abs(c["macs_ratio"] - 0.6) <= 0.03 for c in meth.candidates)
    # the interval is centred on the uniform rate that meets the target
    dense = pl.count(model, x)[0]

    def uniform(rate):                       # MACs ratio when every group loses that fraction
        keep = {g.index: torch.arange(g.size - math.floor(rate * g.size + 1e-6))
                for g in meth.groups}
        return pl.count(pl.remove_channels(model, meth.all_groups, keep), x)[0] / dense
    mid = (lo + hi) / 2
    assert uniform(mid) <= 0.6 < uniform(mid - 1 / 16)
    high, model2, _ = setup("eagleeye", tiny(), x, device, min_rate=0.7, abn_batches=1)
    with pytest.raises(ValueError, match=r"min_rate=0.7 is not allowed: min_rate must be below "
                                         r"the uniform rate"):
        high.finish(model2, Budget(macs=0.6))


# --- every method end to end ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rsnli", "pr", "scp", "gbn", "eagleeye"])
def test_pipeline_run_prunes_resnet20_to_the_macs_budget(name, device):
    data = types.SimpleNamespace(train=batches(device, n=32, size=32, bs=16),
                                 test=batches(device, n=16, size=32, bs=16, seed=1),
                                 calib=batches(device, n=16, size=32, bs=16, seed=2))
    kw = {"n_candidates": 2, "abn_batches": 1, "window": 0.02} if name == "eagleeye" else {}
    method = get(name, **kw)
    model = get_model("resnet20").to(device)
    small, res = pipeline.run(method, model, data, Budget(macs=0.5), device=device,
                              reg_epochs=0.5, ft_epochs=0.5, measure_latency=False)
    limit = 0.52 if name == "eagleeye" else 0.5
    assert res["pruned"]["macs_ratio"] <= limit
    assert res["pruned"]["params"] < res["dense"]["params"]
    assert {"dense", "regularized", "removed", "finetuned"} <= set(res["accuracy"])


@pytest.mark.parametrize("name,kw", [("rsnli", {"cost": "bogus"}), ("pr", {"valley": "x"}),
                                     ("scp", {"tau": 1.5}), ("gbn", {"p": 2.0}),
                                     ("eagleeye", {"window": 0})])
def test_bad_hyperparameters_raise(name, kw):
    with pytest.raises(ValueError):
        get(name, **kw)
