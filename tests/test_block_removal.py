"""Block removal (surgery.remove_branches): a residual branch whose output is exactly 0 is
removed physically; the output is unchanged, MACs drop by the branch's convs (counted by hand),
and the pruned model round-trips through save_pruned / load_pruned."""
import pytest
import torch
import torchvision
from torch import nn

import prunelib as pl
from prunelib.models import get_model
from prunelib.surgery import removed_branches

from test_surgery import randomize_bn


def silence(model: nn.Module, ends) -> None:
    """Make each branch output exactly 0: its last BN's gamma and beta set to 0."""
    with torch.no_grad():
        for e in ends:
            bn = model.get_submodule(e)
            bn.weight.zero_()
            bn.bias.zero_()


def conv_macs(conv: nn.Conv2d, hw: int) -> int:
    """MACs of one sample through `conv` with an hw x hw output (by hand)."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return conv.out_channels * conv.in_channels // conv.groups * k * hw * hw


def prepared(shortcut: str, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = get_model("resnet20", shortcut=shortcut)
    randomize_bn(model, gen)
    return model.to(device).eval(), torch.randn(2, 3, 32, 32, generator=gen).to(device)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_branches_of_cifar_resnets_are_the_residual_functions(shortcut):
    model, x = prepared(shortcut, "cpu")
    branches = pl.residual_branches(model, x)
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert [b.block for b in branches] == blocks
    assert [b.end for b in branches] == [f"{n}.bn2" for n in blocks]
    for b in branches:        # the projection shortcut (option B) is not part of the branch
        assert b.modules == tuple(f"{b.block}.{m}" for m in ("conv1", "bn1", "conv2", "bn2"))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_removing_zero_branches_leaves_the_output_unchanged_and_counts_macs(shortcut, device):
    model, x = prepared(shortcut, device)
    with torch.no_grad():
        y0 = model(x)
    ends = ["layer1.1.bn2", "layer2.0.bn2", "layer3.0.bn2", "layer3.2.bn2"]  # incl. shortcuts
    silence(model, ends)
    with torch.no_grad():
        y1 = model(x)
    assert (y0 - y1).abs().max() > 1e-3                  # the branches did contribute
    small = pl.remove_branches(model, ends).eval()
    with torch.no_grad():
        y2 = small(x)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    assert removed_branches(small) == ends
    hw = {"layer1": 32, "layer2": 16, "layer3": 8}
    gone = sum(conv_macs(model.get_submodule(e[:-4] + c), hw[e[:6]])
               for e in ends for c in (".conv1", ".conv2"))
    macs0, params0 = pl.count(model, x)
    macs1, params1 = pl.count(small, x)
    assert macs0 - macs1 == gone
    assert params0 - params1 == sum(p.numel() for e in ends
                                    for m in ("conv1", "bn1", "conv2", "bn2")
                                    for p in model.get_submodule(e[:-3] + m).parameters())
    names = {n for n, _ in small.named_modules()}
    assert "layer2.0.conv1" not in names and "layer2.0.pad" in names or shortcut == "B"
    assert ("layer2.0.downsample.0" in names) == (shortcut == "B")
    assert isinstance(model.layer2[0].conv1, nn.Conv2d)  # the original is untouched


def test_removing_a_branch_that_is_not_zero_changes_the_output():
    model, x = prepared("A", "cpu")
    with torch.no_grad():
        y = model(x)
        y2 = pl.remove_branches(model, ["layer2.1.bn2"]).eval()(x)
    assert (y - y2).abs().max() > 1e-3


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_block_and_channel_removal_round_trip_through_save_and_load(shortcut, tmp_path):
    model, x = prepared(shortcut, "cpu")
    ends = ["layer1.0.bn2", "layer2.0.bn2", "layer3.1.bn2"]
    silence(model, ends)
    small = pl.remove_branches(model, ends).eval()
    groups = pl.channel_groups(small, x)                   # channels on top of blocks
    gen = torch.Generator().manual_seed(1)
    keep = {}
    for g in groups:
        perm = torch.randperm(g.size, generator=gen)
        k = max(1, g.size // 2)
        keep[g.index] = perm[:k].sort().values
        g.zero_(perm[k:], small)
    with torch.no_grad():
        y = small(x)
    smaller = pl.remove_channels(small, groups, keep).eval()
    with torch.no_grad():
        torch.testing.assert_close(smaller(x), y, rtol=1e-4, atol=1e-4)
    pl.save_pruned(smaller, tmp_path / "p.pt", model="resnet20")
    loaded, meta = pl.load_pruned(get_model("resnet20", shortcut=shortcut), tmp_path / "p.pt")
    loaded.eval()
    assert meta == {"model": "resnet20"} and removed_branches(loaded) == ends
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), smaller(x), rtol=0, atol=0)
    assert pl.count(loaded, x) == pl.count(smaller, x)


def test_load_refuses_a_branch_the_architecture_lacks_and_leaves_it_unchanged(tmp_path):
    model, x = prepared("A", "cpu")
    small = pl.remove_branches(model, ["layer3.2.bn2"])
    pl.save_pruned(small, tmp_path / "p.pt")
    other = get_model("resnet20", shortcut="A")
    other.layer3 = other.layer3[:2]                           # no block layer3.2
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"p\.pt.*'layer3\.2\.bn2' is not the end of a "
                                         r"removable residual branch"):
        pl.load_pruned(other, tmp_path / "p.pt")
    assert other.state_dict().keys() == before.keys()
    # a wrong tensor after the cut: the cut block is put back
    bad = get_model("resnet32", shortcut="A")
    block = bad.layer3[2]
    with pytest.raises(ValueError, match="does not fit|lacks"):
        pl.load_pruned(bad, tmp_path / "p.pt")
    assert bad.layer3[2] is block and removed_branches(bad) == []


def test_a_name_that_is_not_a_branch_end_is_refused_with_the_removable_ones():
    model = get_model("resnet20")
    with pytest.raises(ValueError, match=r"'layer1\.0\.bn1' is not the end.*removable: "
                                         r"layer1\.0\.bn2"):
        pl.remove_branches(model, ["layer1.0.bn1"])
    with pytest.raises(TypeError, match="module names"):
        pl.remove_branches(model, [3])


def test_other_architectures():
    x = torch.randn(1, 3, 32, 32)
    assert pl.residual_branches(get_model("vgg16"), x) == []
    mb = get_model("mobilenetv2")                     # x + conv(x): the operand order reversed
    ends = [b.end for b in pl.residual_branches(mb, x)]
    assert len(ends) == 10 and all(e.endswith(".conv.7") for e in ends)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    found = pl.residual_branches(tv, x)
    assert [b.end for b in found] == [f"layer{s}.{b}.bn2" for s in (1, 2, 3, 4) for b in (0, 1)]
    randomize_bn(tv, torch.Generator().manual_seed(0))
    silence(tv, ["layer2.1.bn2", "layer4.0.bn2"])
    with torch.no_grad():
        torch.testing.assert_close(pl.remove_branches(tv, found[3:7:3])(x), tv(x))


class RootResidual(nn.Module):
    """A residual add in the model's own forward (the block is the root)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = x + self.branch(x)
        return self.fc(x.mean((2, 3)))


def test_a_branch_of_the_root_forward_is_removed_and_round_trips(tmp_path):
    model, x = RootResidual().eval(), torch.randn(2, 3, 8, 8)
    assert pl.residual_branches(model, x) == [pl.Branch("", "branch.1",
                                                        ("branch.0", "branch.1"))]
    silence(model, ["branch.1"])
    small = pl.remove_branches(model, ["branch.1"])
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=0)
    assert pl.count(small, x)[0] == 3 * 8 * 9 * 64 + 8 * 2
    pl.save_pruned(small, tmp_path / "r.pt")
    loaded, _ = pl.load_pruned(RootResidual(), tmp_path / "r.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
