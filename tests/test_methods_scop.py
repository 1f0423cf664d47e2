"""SCOP: the knockoff mixing against the formula by hand (forward and gradient), the first Adam
step, frozen weights and restored BN statistics, the score and the uniform rate, the fitted
generator against maximum-likelihood PPCA by an eigendecomposition, and bad input."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelib as pl
from prunelib import methods
from prunelib.methods.scop import KnockoffGenerator
from prunelib.select import Budget

from test_methods_gates import no_hooks, round_trip, tiny_resnet


class Fixed(nn.Module):
    """A 'generator' that returns the same knockoff batch whatever the noise."""
    def __init__(self, kf: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("kf", kf)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.kf[:len(z)]


def two_layer(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(-1.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net


def scop_on(model: nn.Module, x: torch.Tensor, kf: torch.Tensor | None = None, **hp):
    s = methods.get("scop", **hp)
    if kf is not None:
        s.set_generator(Fixed(kf))
    s.ctx = methods.Context(example_inputs=x[:1])
    return s, s.attach(model, pl.channel_groups(model, x[:1]))


def hand_forward(net: nn.Sequential, x, kf, lam1, lam2) -> torch.Tensor:
    """The real half's logits with conv outputs mixed lambda A + (1 - lambda) A~, BN on the
    statistics of the whole [real; knockoff] batch (train mode)."""
    def bn(m, h):
        return F.batch_norm(h, None, None, m.weight, m.bias, True, 0.0, m.eps)
    n = len(x)
    h = torch.cat([x, kf])
    for conv, norm, lam in ((net[0], net[1], lam1), (net[3], net[4], lam2)):
        a = conv(h)
        real, fake = a[:n], a[n:]
        h = F.relu(bn(norm, torch.cat([fake + lam.view(1, -1, 1, 1) * (real - fake), fake])))
    return net[8](h.mean((2, 3)))[:n]


def test_scop_mixing_forward_and_gradient_equal_the_formula_by_hand():
    net = two_layer()
    x, kf = torch.randn(6, 3, 5, 5), torch.randn(6, 3, 5, 5)
    y = torch.randint(0, 3, (6,))
    ref = copy.deepcopy(net)
    s, model = scop_on(net, x, kf)
    with torch.no_grad():
        s.lam.copy_(torch.rand(9))
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    lam1 = s.lam.detach()[:4].clone().requires_grad_()
    lam2 = s.lam.detach()[4:].clone().requires_grad_()
    want = hand_forward(ref, x, kf, lam1, lam2)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
    F.cross_entropy(want, y).backward()
    torch.testing.assert_close(s.lam.grad, torch.cat([lam1.grad, lam2.grad]),
                               rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())      # the network is frozen
    plain = two_layer()
    plain.load_state_dict(model.state_dict())
    model.eval()                                                 # eval: no knockoffs, no mix
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain.eval()(x), rtol=0, atol=0)


def test_scop_phase_takes_adam_steps_on_lambda_only_and_restores_bn_statistics():
    net = two_layer()
    x, kf = torch.randn(8, 3, 5, 5), torch.randn(8, 3, 5, 5)
    y = torch.randint(0, 3, (8,))
    ref = copy.deepcopy(net)
    s, model = scop_on(net, x, kf, lr=0.01)
    g = torch.autograd.functional.jacobian(
        lambda lam: F.cross_entropy(hand_forward(ref, x, kf, lam[:4], lam[4:]), y),
        torch.full((9,), 0.5))
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    s.regularize(model, methods.Context(x[:1], train_loader=[(x, y)], epochs=1))
    # Adam's first step from zero moments: lr * g / (|g| + eps), then the clamp to [0, 1]
    want = (0.5 - 0.01 * g / (g.abs() + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(s.lam.detach(), want, rtol=0, atol=1e-6)
    for k, v in model.state_dict().items():             # weights and BN statistics unchanged
        torch.testing.assert_close(v, stats[k], rtol=0, atol=0)
    with torch.no_grad():
        first = F.cross_entropy(hand_forward(ref, x, kf, torch.full((4,), 0.5),
                                             torch.full((5,), 0.5)), y)
    assert s.loss == pytest.approx(float(first), rel=1e-5)


def test_scop_lambda_stays_in_the_unit_interval():
    net = two_layer()
    x, kf = torch.randn(8, 3, 5, 5), torch.randn(8, 3, 5, 5)
    s, model = scop_on(net, x, kf, lr=0.4, lam_init=0.9)
    s.regularize(model, methods.Context(x[:1], train_loader=[(x, torch.zeros(8).long())] * 5,
                                        epochs=1))
    lam = s.lam.detach()
    assert lam.min() >= 0 and lam.max() <= 1 and ((lam == 0) | (lam == 1)).any()


def test_scop_score_is_abs_gamma_times_2_lambda_minus_1_and_the_rate_is_uniform(tmp_path):
    dense = tiny_resnet()
    x = torch.randn(2, 3, 8, 8)
    s, model = scop_on(copy.deepcopy(dense), x, torch.zeros(2, 3, 8, 8))
    with torch.no_grad():
        s.lam.copy_(torch.rand(s.lam.numel(), generator=torch.Generator().manual_seed(1)))
    scores = s.scores(model)
    assert scores and set(scores) == set(s.lambdas())
    for gi, sc in scores.items():
        g = s.all_groups[gi]
        (bn,) = g.bns()
        gamma = bn.tensor(model).detach()[bn.idx[:, 0]].abs()
        torch.testing.assert_close(sc, gamma * (2 * s.lambdas()[gi] - 1))
    small = s.finish(model, Budget(macs=0.6))
    assert no_hooks(small) and all(p.requires_grad for p in small.parameters())
    macs0, macs1 = pl.count(dense, x[:1])[0], pl.count(small, x[:1])[0]
    assert macs1 <= 0.6 * macs0
    for gi, sc in scores.items():                 # the same rate: floor(rate * size) removed
        g = s.all_groups[gi]
        (bn,) = g.bns()
        gone = math.floor(s.rate * g.size + 1e-9)
        dense_gamma = dense.get_submodule(bn.module).weight
        drop = bn.idx[torch.argsort(sc)[:gone], 0].tolist()           # the lowest scores
        rows = [r for r in range(dense_gamma.shape[0]) if r not in drop]
        torch.testing.assert_close(small.get_submodule(bn.module).weight, dense_gamma[rows])
    round_trip(small, tiny_resnet(), x, tmp_path / "scop.pt")


def test_ppca_generator_is_the_maximum_likelihood_fit_of_an_eigendecomposition():
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([6.0, 4.0, 2.5, 1.0] + [0.3] * 8)                # D = 12 = 3 x 2 x 2
    basis, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    x = (torch.randn(3000, 12, generator=gen, dtype=torch.float64) * scale) @ basis.T + 0.7
    batches = [(b.float().view(-1, 3, 2, 2), None) for b in x.split(500)]
    g = KnockoffGenerator.fit(batches, latent=3, images=3000)
    xs = torch.cat([b for b, _ in batches]).view(3000, 12).double()
    cov = torch.cov(xs.T)
    ev, u = torch.linalg.eigh(cov)
    ev, u = ev.flip(0), u.flip(1)
    sigma2 = float(ev[3:].mean())
    want = u[:, :3] @ torch.diag(ev[:3] - sigma2) @ u[:, :3].T + sigma2 * torch.eye(12)
    torch.testing.assert_close(g.covariance(), want, rtol=0, atol=2e-4 * float(ev[0]))
    torch.testing.assert_close(g.mean.double(), xs.mean(0), rtol=0, atol=1e-5)
    torch.manual_seed(0)
    samples = g(torch.randn(40_000, 3)).reshape(40_000, 12).double()
    assert samples.shape == (40_000, 12)
    torch.testing.assert_close(torch.cov(samples.T), want, rtol=0, atol=0.05 * float(ev[0]))


def test_ppca_generator_fits_large_inputs_at_32_pixels_and_upsamples():
    batches = [(torch.randn(16, 3, 48, 40), torch.zeros(16)) for _ in range(2)]
    g = KnockoffGenerator.fit(batches, latent=8, images=32)
    assert g.fit_shape == (3, 32, 32) and g.shape == (3, 48, 40)
    assert g(torch.randn(5, 8)).shape == (5, 3, 48, 40)


@pytest.mark.parametrize("hp", [{"lr": 0.0}, {"lr": float("nan")}, {"lam_init": 1.5},
                                {"beta1": 1.0}, {"latent": 0}, {"fit_images": 1},
                                {"lr": "0.1"}])
def test_scop_bad_hyperparameters_raise_at_construction(hp):
    with pytest.raises((TypeError, ValueError), match=next(iter(hp))):
        methods.get("scop", **hp)


def test_scop_bad_generator_and_missing_generator_say_what_to_do():
    with pytest.raises(TypeError, match="generator must be an nn.Module"):
        methods.get("scop").set_generator("gan.pt")
    net = two_layer()
    x = torch.randn(4, 3, 5, 5)
    s, model = scop_on(net, x)
    with pytest.raises(RuntimeError, match="no knockoff generator yet"):
        model.train()(x)
    s.set_generator(Fixed(torch.randn(4, 3, 6, 6)))
    with pytest.raises(ValueError, match="generator made inputs of shape"):
        model.train()(x)


def test_scop_finish_before_attach_and_without_budget():
    with pytest.raises(RuntimeError, match=r"call attach\(model, groups\) first"):
        methods.get("scop").finish(tiny_resnet(), Budget(macs=0.5))
    x = torch.randn(2, 3, 8, 8)
    s, model = scop_on(tiny_resnet(), x, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="pass a Budget"):
        s.finish(model, None)


def test_scop_attached_then_moved_mixes_as_one_attached_after_the_move():
    x, kf = torch.randn(6, 3, 5, 5), torch.randn(6, 3, 5, 5)
    y = torch.randint(0, 3, (6,))
    s, model = scop_on(two_layer(), x, kf)
    model.double()
    ref_s, ref = scop_on(two_layer().double(), x.double(), kf)
    for m, net in ((s, model), (ref_s, ref)):
        F.cross_entropy(net.train()(x.double()), y).backward()
    assert s.lam.dtype == torch.float64
    torch.testing.assert_close(s.lam.grad, ref_s.lam.grad, rtol=1e-12, atol=1e-12)
