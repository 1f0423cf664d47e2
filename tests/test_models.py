"""Tests for prunelib.models: sizes against the papers and the docstring table, fx tracing,
the option-A shortcut, and errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from prunelib import models
from prunelib.models import MODELS, BasicBlock, get_model


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def n_macs(m: nn.Module, size: int = 32) -> int:
    """Multiply-accumulates of conv and linear layers for one image (independent oracle)."""
    total = 0

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += out[0].numel() * k
        else:
            total += mod.in_features * mod.out_features

    hs = [x.register_forward_hook(hook) for x in m.modules()
          if isinstance(x, (nn.Conv2d, nn.Linear))]
    m.eval()
    dev = next(m.parameters()).device
    with torch.no_grad():
        m(torch.zeros(1, 3, size, size, device=dev))
    for h in hs:
        h.remove()
    return total


def meta_model(name: str, **kw) -> nn.Module:
    """Model on the meta device: shapes only, so counting needs no arithmetic."""
    with torch.device("meta"):
        return get_model(name, **kw)


def test_resnet56_matches_paper() -> None:
    m = meta_model("resnet56")
    assert abs(n_params(m) / 0.85e6 - 1) < 0.03
    assert abs(n_macs(m) / 125e6 - 1) < 0.03


def test_docstring_table_matches_models() -> None:
    rows = re.findall(r"^\| (\w+)\s*\| ([\d.]+) M\s*\|\s*([\d.]+) M", models.__doc__, re.M)
    assert sorted(r[0] for r in rows) == sorted(MODELS)
    for name, params, macs in rows:
        m = meta_model(name)
        assert f"{n_params(m) / 1e6:.3f}" == params, name
        assert f"{n_macs(m) / 1e6:.1f}" == macs, name


def test_resnet_depths_and_block_counts() -> None:
    for depth in (20, 32, 44, 56, 110):
        m = meta_model(f"resnet{depth}")
        convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
        assert len(convs) + 1 == depth          # option A: no shortcut convs; + fc
        assert sum(isinstance(x, BasicBlock) for x in m.modules()) == (depth - 2) // 2


@pytest.mark.parametrize("name", MODELS)
def test_fx_traceable(name: str) -> None:
    gm = torch.fx.symbolic_trace(meta_model(name))
    assert any(n.op == "call_module" for n in gm.graph.nodes)


@pytest.mark.parametrize("name,kw", [("resnet20", {}), ("resnet20", {"shortcut": "B"}),
                                     ("vgg16", {}), ("mobilenetv2", {})])
def test_forward_shape_and_traced_equivalence(name: str, kw: dict) -> None:
    torch.manual_seed(0)
    m = get_model(name, num_classes=7, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = torch.fx.symbolic_trace(m)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (2, 7)
        torch.testing.assert_close(gm(x), y)


@pytest.mark.parametrize("depth", [20, 56])
def test_b_names_build_the_option_b_resnet_of_that_depth(depth: int) -> None:
    b, ref = meta_model(f"resnet{depth}b"), meta_model(f"resnet{depth}", shortcut="B")
    assert all(blk.shortcut_type == "B" for blk in b.modules() if isinstance(blk, BasicBlock))
    assert {k: v.shape for k, v in b.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}
    assert any(k.endswith("downsample.0.weight") for k in b.state_dict())
    assert not any("downsample" in k for k in meta_model(f"resnet{depth}").state_dict())


def test_option_a_shortcut_is_subsample_and_zero_pad() -> None:
    torch.manual_seed(0)
    blk = BasicBlock(16, 32, stride=2).eval()
    nn.init.zeros_(blk.bn2.weight)                   # residual branch outputs exactly 0
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        y = blk(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.all(y[:, :8] == 0) and torch.all(y[:, 24:] == 0)
    torch.testing.assert_close(y[:, 8:24], F.relu(x[:, :, ::2, ::2]))
    assert sum(p.numel() for n, p in blk.named_parameters() if "downsample" in n) == 0


def test_option_a_pad_is_a_parameter_free_module_and_checkpoints_still_load() -> None:
    m = get_model("resnet20")
    assert isinstance(m.layer2[0].pad, models.ChannelPad) and m.layer2[1].pad is None
    assert (m.layer3[0].pad.left, m.layer3[0].pad.right) == (16, 16)
    assert not any("pad" in k for k in m.state_dict())
    baseline = Path(models.__file__).resolve().parents[1] / "book" / "baselines"
    if (baseline / "resnet20_cifar10.pt").exists():          # the committed dense baseline
        ckpt = torch.load(baseline / "resnet20_cifar10.pt", weights_only=True)
        m.load_state_dict(ckpt["state_dict"])                # strict: same keys and shapes


def test_option_b_shortcut_has_projection() -> None:
    a, b = meta_model("resnet20"), meta_model("resnet20", shortcut="B")
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)          # two 1x1 convs + BN affine
    assert n_params(b) - n_params(a) == extra
    assert get_model("resnet20", shortcut="B").layer2[0].downsample is not None
    torch.fx.symbolic_trace(b)


def test_kaiming_init_and_bn_defaults() -> None:
    torch.manual_seed(0)
    m = get_model("resnet56")
    w = m.layer3[0].conv2.weight                     # fan_out = 64 * 9
    assert abs(w.std().item() / (2 / (64 * 9)) ** 0.5 - 1) < 0.05
    assert torch.all(m.bn1.weight == 1) and torch.all(m.bn1.bias == 0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="resnet56.*vgg16"):
        get_model("resnet57")
    with pytest.raises(ValueError, match="6n\\+2"):
        models.CifarResNet(21)
    with pytest.raises(ValueError, match="shortcut"):
        get_model("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="cfg"):
        models.VGG([64, "X"])
    assert isinstance(get_model("ResNet-20"), models.CifarResNet)
