"""Sizes read along channel dims: a size that flows into the shape of another tensor freezes the
channels it was read from, unless the use is exact (it keeps following the pruned width).

Each `SILENT` pattern reads the channel count of `w = b(x)` and shapes `y = a(x)` with it, in a
way whose output keeps its shape when `b` shrinks: without the freeze, pruning `b` changes the
output silently (the check below shows it on the model itself). `b`'s channels also reach the
head through a plain path, so only the size read can keep them out of every group.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import prunelib as pl
from test_guarantees_graph import check_zero_then_remove

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
SHUFFLENET_X05 = (21, 1928)          # (groups, channels) of shufflenet_v2_x0_5 before the change


def _unpacked(y, w):
    n, c, h, ww = w.shape                          # a torch.Size unpacked (fx: getitem nodes)
    return y[:, :c].sum(1)


SILENT = {                                         # f(y, w) -> a shape that does not follow w
    "slice": lambda y, w: y[:, :w.shape[1]].sum(1),
    "narrow": lambda y, w: y.narrow(1, 0, w.size(1)).sum(1),
    "split_sizes": lambda y, w: torch.split(y, [w.shape[1], y.shape[1] - w.shape[1]], 1)[0]
    .sum(1),
    "size_then_indexed": lambda y, w: y[:, :w.size()[1]].sum(1),
    "shape_unpacked": _unpacked,
    "view": lambda y, w: y.view(y.size(0), w.size(1), -1).amax(2).sum(1, keepdim=True),
    "reshape_numel": lambda y, w: y.reshape(y.size(0), w.numel() // 16, -1).amax(2)
    .sum(1, keepdim=True),
    "expand": lambda y, w: y.sum(1, keepdim=True).expand(-1, w.size(1), -1, -1).sum(1),
    "repeat": lambda y, w: y.repeat(1, w.size(1) // 2, 1, 1).sum(1),
    "zeros_size": lambda y, w: (y.sum(1, keepdim=True) + torch.zeros(2, w.size(1), 1, 1)).sum(1),
    "spatial_slice": lambda y, w: y[:, :, :w.shape[1]].sum(2),
    "scalar": lambda y, w: y * (w.shape[1] // 2),
    "pad_width": lambda y, w: F.pad(y, (0, w.size(1))).mean(3),
}
# exact uses: the size keeps following the dim it shapes, nothing more is frozen
EXACT = {
    "full_slice_of_itself": lambda y, w: y[:, :y.shape[1]],
    "view_channels_of_a_coupled_tensor": lambda y, w: (y + w).view(y.size(0), w.size(1), -1),
    "channel_shuffle_by_sizes": lambda y, w: _shuffle(y + w),
    "reshape_numel": lambda y, w: y.reshape(y.size(0), y.numel() // y.size(0)),
    "expand_to_own_width": lambda y, w: (y + w)[:, :, :1].expand(-1, y.size(1), -1, -1),
    "view_to_a_whole_torch_size": lambda y, w: y.flatten(2).view((y + w).shape),
}


def _shuffle(x):                                   # torchvision's ShuffleNetV2 channel_shuffle
    n, c, h, w = x.size()
    x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class SizeNet(nn.Module):
    """a, b: convs; f(a(x), b(x)); the head sees f's output and, separately, b's channels."""

    def __init__(self, f, wide_b: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.f = f
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8 if wide_b else 4, 1)
        with torch.no_grad():
            n = torch.flatten(f(self.a(X), self.b(X)), 1).shape[1]
        self.head = nn.Linear(n + self.b.out_channels, 3)
        self.eval()

    def forward(self, x):
        w = self.b(x)
        return self.head(torch.cat([torch.flatten(self.f(self.a(x), w), 1), w.mean((2, 3))], 1))


def _outs(groups):
    return {m.module for g in groups for m in g.by_role("out")}


def _hand_pruned_b_changes_the_output(net: SizeNet) -> bool:
    """Zero b's channels 1 and 3, then remove them by hand (b's rows, the head's columns): does
    the output change while keeping its shape (f's output does not follow b's width)?"""
    net, small, keep = copy.deepcopy(net), copy.deepcopy(net), torch.tensor([0, 2])
    with torch.no_grad():
        net.b.weight[[1, 3]] = 0
        net.b.bias[[1, 3]] = 0
        small.b = nn.Conv2d(3, 2, 1)
        small.b.weight.copy_(net.b.weight[keep])
        small.b.bias.copy_(net.b.bias[keep])
        n = net.head.in_features - 4
        cols = torch.cat([torch.arange(n), n + keep])
        small.head = nn.Linear(len(cols), 3)
        small.head.weight.copy_(net.head.weight[:, cols])
        small.head.bias.copy_(net.head.bias)
        y1, y2 = net(X), small(X)
    return y1.shape == y2.shape and not torch.allclose(y1, y2, atol=1e-5)


@pytest.mark.parametrize("name", list(SILENT))
def test_a_size_of_another_tensor_shaping_a_tensor_freezes_its_channels(name):
    net = SizeNet(SILENT[name])
    assert _hand_pruned_b_changes_the_output(net)          # what a group with b would do
    groups = pl.channel_groups(net, X)
    assert "b" not in _outs(groups)
    ops = [f for f in groups.frozen if f.op.endswith("a size read from channels")]
    assert ops and ops[0].layers == ["b"] and ops[0].channels == 4, groups.frozen
    check_zero_then_remove(net, must_remove=bool(groups))


def test_sizes_that_follow_the_dim_they_shape_are_exact():
    """Each EXACT pattern: a and b stay prunable, nothing but the output is frozen, and zeroing
    then removing keeps the output. On torchvision's ShuffleNetV2, whose channel_shuffle views
    by the sizes it reads (x.size()), every group stays (the counts before size tracking)."""
    for name, f in EXACT.items():
        net = SizeNet(f, wide_b=True)
        groups = pl.channel_groups(net, X)
        assert {"a", "b"} <= _outs(groups), name
        assert not [f for f in groups.frozen if f.op != "output"], (name, groups.frozen)
        check_zero_then_remove(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = pl.channel_groups(torchvision.models.shufflenet_v2_x0_5().eval(),
                                   torch.randn(1, 3, 64, 64))
    assert [f.op for f in groups.frozen] == ["output"]
    assert (len(groups), sum(g.size for g in groups)) == SHUFFLENET_X05


def test_a_size_returned_by_the_model_freezes_its_channels():
    class Returns(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y), y.size(1)

    groups = pl.channel_groups(Returns(), X)
    assert groups == []
    assert [(f.op, f.layers) for f in groups.frozen] == [
        ("output", ["b"]), ("output, a size read from channels", ["a"])]

