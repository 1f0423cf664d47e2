"""prunelib on timm's CNN families (random weights, eval mode, one 64x64 image).

For every architecture: channel_groups, then a random 40% of every group zeroed and removed:
the output is unchanged (allclose), the zeroing did change it (the removed channels mattered),
and MACs and parameters went down. Where an op cannot keep a zeroed channel exactly 0 in the
same place, its channels are frozen and `groups.frozen` names it; an op that cannot be traced is
refused with UnsupportedOpError naming the module. Network Slimming runs a few steps and
`finish`es on two models built of timm's BatchNormAct2d (F.batch_norm on the module's own
weight, then its activation).
"""
from __future__ import annotations

import re
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelib as pl
from prunelib import methods, pipeline
from prunelib.data import Batches
from prunelib.methods.rsnli import relu_after_bn
from prunelib.select import Budget

timm = pytest.importorskip("timm")

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

# architecture -> the structure it tests; every channel prunable except at the output
EXACT = {
    "resnet18d": "deep stem, average-pool shortcut (ResNet-D)",
    "seresnet18": "squeeze-excite gating",
    "mobilenetv3_small_050": "BatchNormAct2d, hard-swish, SE with hard-sigmoid gate",
    "tinynet_e": "EfficientNet family: inverted residuals, SiLU, SE",
    "regnety_002": "grouped convolutions + SE",
    "ese_vovnet19b_slim_dw": "one-shot aggregation concat + effective SE",
    "densenet121": "dense concatenation (BatchNormAct2d before every conv)",
    "dla46_c": "deep layer aggregation: tree roots over concats",
    "hgnetv2_b0": "HGNet aggregation concat, light convs",
    "ghostnet_050": "ghost modules: cheap features concatenated, sliced to a width",
    "ghostnetv2_100": "ghost modules + DFC attention (pooled sigmoid gate, interpolate)",
    "repvgg_a0": "re-parameterizable 3x3 + 1x1 + BN-identity branches",
    "repghostnet_050": "re-parameterizable ghost modules",
    "mobileone_s0": "re-parameterizable: parallel conv branches + scale + BN identity",
    "mobilenetv4_conv_small_035": "universal inverted bottlenecks",
    "convmixer_768_32": "attention-free patch stem, depthwise mixing + residual",
    "hrnet_w18_small": "multi-resolution branches fused by upsample + add",
    "fastvit_t8": "attention-free hybrid: RepMixer blocks, conv stem",
    "lcnet_050": "PP-LCNet: depthwise separable, hard-swish, SE",
}
# architecture -> (structure, the op that freezes some of its channels)
FROZEN = {
    "mixnet_s": ("split-transform-concat, mixed kernel sizes", "split", "MixedConv2d"),
    "skresnet18": ("selective kernel: split paths, softmax attention", "split",
                   "SelectiveKernel"),
    "res2net50_14w_8s": ("hierarchical split", "split", "Bottle2neck"),
    "cs3darknet_focus_s": ("cross-stage partial split", "split", "CrossStage3"),
    "dpn48b": ("dual path: add + concat, literal channel slices", "getitem", "DualPathBlock"),
    "rexnet_100": ("partial residual on the first channels", "getitem", "LinearBottleneck"),
    "resnetblur18": ("anti-aliased blur pool: depthwise F.conv2d with literal groups", "conv2d",
                     r"BlurPool2d\), depthwise with a literal groups"),
    "nf_resnet26": ("weight-standardized convs: nothing is prunable exactly", "conv2d",
                    r"ScaledStdConv2d\), weight computed in forward"),
}
# architecture -> (structure, what the refusal names)
REFUSED = {
    "efficientvit_b0": ("linear attention with data-dependent control flow",
                        r"module LiteMLA at 'stages\.\d+\.blocks\.\d+\.context_module\.main'"),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():                   # BN statistics far from the identity, so that a
        for m in model.modules():           # removed channel would show in the output
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model


def zero_then_remove(model: nn.Module, groups) -> nn.Module:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        y0 = model(X)
        keep = {}
        for g in groups:
            perm = torch.randperm(g.size, generator=gen)
            k = max(1, int(0.6 * g.size))
            keep[g.index] = perm[:k]
            g.zero_(perm[k:])
        y1 = model(X)
        small = pl.remove_channels(model, groups, keep).eval()
        y2 = small(X)
    scale = y1.abs().max().item()
    assert (y0 - y1).abs().max().item() > 1e-4 * scale, "zeroing changed nothing"
    assert torch.allclose(y1, y2, rtol=1e-4, atol=1e-5 * scale), (y1 - y2).abs().max()
    (m0, p0), (m1, p1) = pl.count(model, X), pl.count(small, X)
    assert m1 < m0 and p1 < p0
    return small


@pytest.mark.parametrize("name", list(EXACT) + list(FROZEN))
def test_zero_then_remove_keeps_the_output(name):
    model = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # timm's unused modules, fx notes
        groups = pl.channel_groups(model, X)
    frozen = [f.op for f in groups.frozen if f.op != "output"]
    if name in EXACT:
        assert frozen == [], frozen
    else:
        _, op, where = FROZEN[name]
        pattern = rf"\('{op}'\) in [\w.]+ \({where}"
        assert frozen and all(re.search(pattern, f) for f in frozen), frozen
        assert f"frozen by {frozen[0]}" in groups.summary()
    if name == "nf_resnet26":                          # every conv standardizes its weight
        assert len(groups) == 0
        return
    assert groups
    zero_then_remove(model, groups)


@pytest.mark.parametrize("name", list(REFUSED))
def test_untraceable_modules_are_refused_naming_the_module(name):
    with pytest.raises(pl.UnsupportedOpError, match=REFUSED[name][1] + ".*register_op"):
        pl.channel_groups(build(name), X)


def test_batchnormact_counts_as_batchnorm_for_every_lookup():
    model = build("ghostnet_050")
    groups = pl.channel_groups(model, X)
    assert "BatchNormAct2d" in {m.kind for g in groups for m in g.bns()}
    stats = {(m.param, m.role) for g in groups for m in g.members if m.kind == "BatchNormAct2d"}
    assert stats == {("weight", "affine"), ("bias", "affine"), ("running_mean", "stat"),
                     ("running_var", "stat")}
    with_relu = {n for n, m in model.named_modules()
                 if type(m).__name__ == "BatchNormAct2d" and isinstance(m.act, nn.ReLU)}
    assert with_relu and with_relu <= relu_after_bn(model)      # SCP / RSNLI: BN -> ReLU


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "regnety_002"])
def test_network_slimming_runs_and_finishes_on_batchnormact(name):
    model = build(name).train()
    ns = methods.get("ns", lam=1e-3)
    model = ns.attach(model, pl.channel_groups(model, X))
    ns.ctx = methods.Context(X)
    bnact = next(m for m in model.modules() if type(m).__name__ == "BatchNormAct2d")
    assert any(p is bnact.weight for p in ns._gammas)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    for step in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = bnact.weight.grad.clone()
        ns.after_backward(model)                       # grad(gamma) += lam * sign(gamma)
        assert torch.allclose(bnact.weight.grad - before, 1e-3 * bnact.weight.sign(),
                              atol=1e-6)
        opt.step()
    model.eval()
    small = ns.finish(model, Budget(macs=0.8))
    macs0, macs1 = pl.count(model, X)[0], pl.count(small, X)[0]
    assert macs1 <= 0.8 * macs0
    with torch.no_grad():
        assert small.eval()(X).shape == (1, 10)


@pytest.mark.parametrize("name", ["ns", "gbn", "pr", "rsnli", "scp", "eagleeye"])
def test_every_bn_method_prunes_a_model_whose_only_batchnorms_are_batchnormact(name):
    """GENet-S: all 45 BatchNorms are BatchNormAct2d (BN then ReLU in one module), so a method
    that finds no gamma there fails; the protocol runs end to end and meets the budget."""
    model = build("gernet_s")
    assert {type(m).__name__ for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)} == {"BatchNormAct2d"}
    gen = torch.Generator().manual_seed(0)

    def data(n, seed):
        imgs = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen)
        return Batches(imgs, torch.randint(0, 10, (n,), generator=gen), batch_size=16,
                       seed=seed)
    splits = types.SimpleNamespace(train=data(32, 0), test=data(16, 1), calib=data(16, 2))
    kw = {"n_candidates": 2, "abn_batches": 1, "window": 0.05} if name == "eagleeye" else {}
    small, res = pipeline.run(methods.get(name, **kw), model, splits, Budget(macs=0.6),
                              reg_epochs=0.5, ft_epochs=0.5, measure_latency=False)
    assert res["pruned"]["macs_ratio"] <= (0.65 if name == "eagleeye" else 0.6)
    assert res["pruned"]["params"] < res["dense"]["params"]
