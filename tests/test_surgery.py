"""Surgery: the zero-then-remove invariant on every supported model, shapes, save/load."""
import pytest
import torch
import torchvision
from torch import nn

import prunelib as pl
from prunelib.models import get_model

TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn",
               "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121",
               "regnet_x_400mf", "mnasnet1_0", "squeezenet1_1", "googlenet", "convnext_tiny",
               "shufflenet_v2_x1_0"]
CIFAR = ["resnet20", "resnet56", "vgg16", "vgg19", "mobilenetv2"]


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give BN layers non-trivial statistics so removed channels would show in the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):                 # ConvNeXt starts them at 1e-6
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))


def check_invariant(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    randomize_bn(model, gen)
    model.eval()
    with torch.no_grad():
        y0 = model(x)
    groups = pl.channel_groups(model, x)
    assert groups, "no prunable group found"
    keep = {}
    for g in groups:                                      # a random subset of every group
        perm = torch.randperm(g.size, generator=gen)
        k = max(1, int(g.size * 0.6))
        keep[g.index] = perm[:k].sort().values
        g.zero_(perm[k:])
    with torch.no_grad():
        y1 = model(x)
    small = pl.remove_channels(model, groups, keep).eval()
    with torch.no_grad():
        y2 = small(x)
    scale = y1.abs().max().item()
    assert (y0 - y1).abs().max().item() > 1e-6 * scale    # zeroing really changed the model
    assert (y1 - y2).abs().max().item() <= 1e-4 * scale
    macs0, params0 = pl.count(model, x)
    macs1, params1 = pl.count(small, x)
    assert macs1 < macs0 and params1 < params0
    return small


@pytest.mark.parametrize("name", CIFAR)
def test_invariant_cifar_models(name, device):
    check_invariant(get_model(name).to(device), torch.randn(2, 3, 32, 32, device=device))


@pytest.mark.parametrize("name", TORCHVISION)
def test_invariant_torchvision_models(name):
    model = getattr(torchvision.models, name)(num_classes=10)
    with pytest.warns() if name == "googlenet" else _nothing():   # unused aux heads
        check_invariant(model, torch.randn(1, 3, 32, 32))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_removed_model_has_smaller_tensors_and_original_is_untouched():
    model = get_model("resnet20").eval()
    groups = pl.channel_groups(model, torch.randn(1, 3, 32, 32))
    g = groups[1]                                          # layer1.0.conv1 -> bn1 -> conv2
    small = pl.remove_channels(model, groups, {g.index: torch.arange(10)})
    assert small.layer1[0].conv1.weight.shape == (10, 16, 3, 3)
    assert small.layer1[0].bn1.running_mean.shape == (10,)
    assert small.layer1[0].conv2.weight.shape == (16, 10, 3, 3)
    assert small.layer1[0].conv1.out_channels == 10 and small.layer1[0].bn1.num_features == 10
    assert model.layer1[0].conv1.weight.shape == (16, 16, 3, 3)


@pytest.mark.parametrize("keep, err", [({1: []}, "lose all"), ({1: [0, 0]}, "distinct"),
                                       ({1: [99]}, "out of range"), ({99: [0]}, "group index")])
def test_bad_keep_is_refused(keep, err):
    model = get_model("resnet20")
    groups = pl.channel_groups(model, torch.randn(1, 3, 32, 32))
    with pytest.raises((ValueError, IndexError), match=err):
        pl.remove_channels(model, groups, keep)


def test_save_and_load_pruned_model_without_code(tmp_path):
    model = get_model("mobilenetv2").eval()
    x = torch.randn(1, 3, 32, 32)
    groups = pl.channel_groups(model, x)
    keep = {g.index: torch.arange(0, g.size, 2) for g in groups}
    small = pl.remove_channels(model, groups, keep).eval()
    pl.save_pruned(small, tmp_path / "p.pt", model="mobilenetv2")
    loaded, meta = pl.load_pruned(get_model("mobilenetv2"), tmp_path / "p.pt")
    assert meta == {"model": "mobilenetv2"}
    with torch.no_grad():
        assert torch.allclose(small(x), loaded.eval()(x), atol=1e-6)
    assert pl.count(loaded, x) == pl.count(small, x)


def test_load_pruned_recreates_a_bias_added_after_construction(tmp_path):
    model = get_model("resnet20").eval()                  # convs have bias=None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():                                 # what RSNLI's folding can do
        model.layer1[0].conv2.bias = torch.nn.Parameter(torch.randn(16))
    pl.save_pruned(model, tmp_path / "b.pt")
    loaded, _ = pl.load_pruned(get_model("resnet20"), tmp_path / "b.pt")
    assert loaded.layer1[0].conv2.bias is not None
    with torch.no_grad():
        assert torch.allclose(model(x), loaded.eval()(x), atol=1e-6)


def test_load_pruned_refuses_a_tensor_the_architecture_lacks(tmp_path):
    model = get_model("resnet20")
    model.fc.register_buffer("extra", torch.zeros(3))
    pl.save_pruned(model, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="does not define"):
        pl.load_pruned(get_model("resnet20"), tmp_path / "e.pt")


def test_removing_option_a_padded_channels_narrows_the_pad(tmp_path):
    model = get_model("resnet20")
    randomize_bn(model, torch.Generator().manual_seed(0))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    groups = pl.channel_groups(model, x)
    pad_group = {m.module: g for g in groups for m in g.by_role("pad")}
    assert set(pad_group) == {"layer2.0.pad", "layer3.0.pad"}
    gone = {"layer2.0.pad": [0, 2, 5, 12],                 # 3 of 8 left, 1 of 8 right
            "layer3.0.pad": list(range(16))}               # every left one, no right one
    keep = {}
    for name, slots in gone.items():
        g = pad_group[name]
        (p,) = g.by_role("pad")
        drop = torch.isin(p.idx[:, 0], torch.tensor(slots))
        g.zero_(torch.nonzero(drop).flatten())
        keep[g.index] = torch.nonzero(~drop).flatten()
    small = pl.remove_channels(model, groups, keep).eval()
    assert (small.layer2[0].pad.left, small.layer2[0].pad.right) == (5, 7)
    assert (small.layer3[0].pad.left, small.layer3[0].pad.right) == (0, 16)
    assert small.layer2[2].conv2.out_channels == 28 and small.fc.in_features == 44
    assert (model.layer2[0].pad.left, model.layer3[0].pad.right) == (8, 16)   # original kept
    with torch.no_grad():
        y, y_small = model(x), small(x)
    assert torch.allclose(y, y_small, atol=1e-5)
    pl.save_pruned(small, tmp_path / "a.pt")
    loaded, _ = pl.load_pruned(get_model("resnet20"), tmp_path / "a.pt")
    assert (loaded.layer2[0].pad.left, loaded.layer2[0].pad.right) == (5, 7)
    with torch.no_grad():
        assert torch.allclose(small(x), loaded.eval()(x), atol=1e-6)
