"""Channel groups: structure on known models, couplings, frozen channels, clear refusals."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import prunelib as pl
from prunelib.models import get_model

X32 = torch.randn(2, 3, 32, 32)


def names(g, role):
    return {m.module for m in g.by_role(role)}


def test_resnet20_option_a_trunk_is_three_coupled_groups_and_nine_internal():
    groups = pl.channel_groups(get_model("resnet20").eval(), X32)
    coupled = [g for g in groups if g.coupled]
    assert len(groups) == 12 and sorted(g.size for g in coupled) == [16, 16, 32]
    assert sorted(g.size for g in groups if not g.coupled) == [16] * 3 + [32] * 3 + [64] * 3
    # option A zero-pads the stage-1 trunk into the middle of stages 2 and 3: those 16 channels
    # span all stages. The padded positions are channels of their own (a ChannelPad is a leaf),
    # written by the stage's first conv2 and prunable: 16 new in stage 2, 32 new in stage 3.
    s1, s2, s3 = sorted(coupled, key=lambda g: g.index)
    assert s1.size == 16 and not s1.by_role("pad")
    assert {"conv1", "layer1.0.conv2", "layer2.0.conv2", "layer3.2.conv2"} <= names(s1, "out")
    pos = {m.module: m.idx[:, 0] for m in s1.by_role("out")}
    assert torch.equal(pos["layer2.0.conv2"], torch.arange(8, 24))
    assert torch.equal(pos["layer3.0.conv2"], torch.arange(24, 40))
    fc = next(m for m in s1.by_role("in") if m.kind == "Linear")
    assert torch.equal(fc.idx[:, 0], torch.arange(24, 40))     # the classifier reads them too
    assert len(s1.sources) == 10                               # stem + every block's conv2
    pos2 = {m.module: m.idx[:, 0] for m in s2.by_role("out")}
    assert torch.equal(pos2["layer2.0.conv2"], torch.cat([torch.arange(8), torch.arange(24, 32)]))
    assert torch.equal(pos2["layer3.0.conv2"], torch.cat([torch.arange(16, 24),
                                                          torch.arange(40, 48)]))
    assert len(s2.sources) == 6 and len(s3.sources) == 3
    (p2,), (p3,) = s2.by_role("pad"), s3.by_role("pad")
    assert (p2.module, p2.kind, p3.module) == ("layer2.0.pad", "ChannelPad", "layer3.0.pad")
    assert torch.equal(p2.idx[:, 0], torch.arange(16))         # slot: 8 left, then 8 right
    pos3 = {m.module: m.idx[:, 0] for m in s3.by_role("out")}
    assert torch.equal(pos3["layer3.0.conv2"], torch.cat([torch.arange(16), torch.arange(48, 64)]))


def test_literal_channel_pad_freezes_the_padded_positions():
    class Pad(nn.Module):                # a literal F.pad: the pruned model pads by the same
        def __init__(self):              # amount, so what is added to the padding must stay
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(F.pad(self.a(x), (0, 0, 0, 0, 2, 2)) + self.b(x))

    (g,) = [g for g in pl.channel_groups(Pad(), X32) if g.coupled]
    assert g.size == 4 and not g.by_role("pad")
    assert torch.equal(next(m for m in g.by_role("out") if m.module == "b").idx[:, 0],
                       torch.arange(2, 6))


def test_channel_pad_member_has_no_tensor():
    model = get_model("resnet20")
    pad = next(m for g in pl.channel_groups(model, X32) for m in g.by_role("pad"))
    with pytest.raises(TypeError, match="no tensor"):
        pad.tensor(model)


def test_option_b_shortcut_gives_one_coupled_group_per_stage():
    groups = pl.channel_groups(get_model("resnet20", shortcut="B").eval(), X32)
    assert sorted(g.size for g in groups if g.coupled) == [16, 32, 64]


def test_vgg_flatten_maps_each_channel_to_its_features():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 2 * 2, 5)

        def forward(self, x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 2), 1))

    (g,) = pl.channel_groups(Tiny(), X32)
    fc = next(m for m in g.by_role("in") if m.module == "fc")
    assert fc.idx.shape == (4, 4) and torch.equal(fc.idx[1], torch.arange(4, 8))


def test_depthwise_conv_follows_its_input_channels():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                      nn.Conv2d(8, 2, 1))
    (g,) = pl.channel_groups(m, X32)
    assert g.size == 8 and names(g, "out") == {"0", "2"} and g.sources == ["0"]


def test_grouped_conv_couples_positions_across_groups():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1))
    groups = pl.channel_groups(m, X32)
    first = next(g for g in groups if "0" in g.sources)
    assert first.size == 4 and first.by_role("out")[0].idx.shape == (4, 2)


def test_channel_shuffle_couples_the_shuffled_pairs():
    groups = pl.channel_groups(torchvision.models.shufflenet_v2_x0_5().eval(),
                               torch.randn(1, 3, 64, 64))
    for g in groups:                          # every group stays even-sized through a shuffle
        for m in g.by_role("out"):
            assert m.idx.numel() == g.size * m.idx.shape[1]


def test_layernorm_over_channels_freezes_them():
    groups = pl.channel_groups(torchvision.models.convnext_tiny().eval(),
                               torch.randn(1, 3, 64, 64))
    assert groups and all(not g.coupled for g in groups)
    assert all(m.module.endswith("block.3") for g in groups for m in g.by_role("out"))


def test_literal_channel_slice_freezes_the_sliced_channels():
    class Slice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(self.a(x)[:, :4])

    assert pl.channel_groups(Slice(), X32) == []


def test_sigmoid_before_a_consumer_freezes_but_gating_multiply_does_not():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.g, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y * torch.sigmoid(self.g(y)))      # SE-style gate: still exact

    (g,) = [g for g in pl.channel_groups(Gate(), X32) if g.coupled]
    assert names(g, "out") == {"a", "g"}

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)))          # sigmoid(0) = 0.5 reaches b

    assert pl.channel_groups(Bad(), X32) == []


def test_unknown_op_is_refused_with_the_node_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return torch.cummax(self.a(x), 1).values

    with pytest.raises(pl.UnsupportedOpError, match="cummax"):
        pl.channel_groups(Odd(), X32)


def test_zero_sets_producers_only(device):
    model = get_model("resnet20").to(device).eval()
    g = pl.channel_groups(model, X32.to(device))[1]
    g.zero_([0, 3])
    assert model.layer1[0].conv1.weight[[0, 3]].abs().sum() == 0
    assert model.layer1[0].bn1.weight[[0, 3]].abs().sum() == 0
    assert model.layer1[0].bn1.weight[1] != 0
    assert model.layer1[0].conv2.weight[:, [0, 3]].abs().sum() > 0       # consumers kept


def test_tracing_in_train_mode_leaves_bn_statistics_and_rng_untouched():
    model = get_model("resnet20").train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    x = torch.randn(4, 3, 32, 32) * 5 + 3          # statistics far from the model's
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    pl.channel_groups(model, x)
    assert torch.equal(torch.rand(3), expected)    # the global random state is not consumed
    assert model.training
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_a_registered_module_is_traced_as_a_leaf():
    class Doubler(nn.Module):                # data-dependent Python: fx cannot trace inside it
        def forward(self, x):
            return 2 * x if bool(x.abs().sum() >= 0) else x

    pl.register_op(Doubler, "zero")
    (g,) = pl.channel_groups(nn.Sequential(nn.Conv2d(3, 4, 1), Doubler(), nn.Conv2d(4, 2, 1)),
                             X32)
    assert g.size == 4 and names(g, "in") == {"2"}


class BNAct(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward (like timm's BatchNormAct2d): F.batch_norm on
    its own weight, bias and statistics, then an activation."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class Ghostly(nn.Module):
    """Conv -> BNAct, cheap depthwise features concatenated and sliced back to `width`."""

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.a, self.bn = nn.Conv2d(3, 4, 1, bias=False), BNAct(4)
        self.cheap, self.head = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(width, 2, 1)

    def forward(self, x):
        y = self.bn(self.a(x))
        return self.head(torch.cat([y, self.cheap(y)], 1)[:, :self.width])


def test_a_batchnorm_subclass_calling_f_batch_norm_is_sliced_like_batchnorm():
    from prunelib.methods.rsnli import relu_after_bn
    model = Ghostly(8).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    (g,) = pl.channel_groups(model, X32)
    assert g.size == 4 and names(g, "out") == {"a", "cheap"}
    roles = {(m.param, m.role) for m in g.members if m.module == "bn"}
    assert roles == {("weight", "affine"), ("bias", "affine"), ("running_mean", "stat"),
                     ("running_var", "stat")}
    assert [(m.module, m.kind) for m in g.bns()] == [("bn", "BNAct")]
    assert relu_after_bn(model) == {"bn"}                 # SCP / RSNLI find it too
    y0 = model(X32)
    g.zero_([1, 2])
    with torch.no_grad():
        y1 = model(X32)
        small = pl.remove_channels(model, [g], {0: [0, 3]})
        y2 = small(X32)
    assert not torch.allclose(y0, y1) and torch.allclose(y1, y2, atol=1e-6)
    assert small.bn.num_features == 2 and small.bn.running_var.shape == (2,)


def test_a_slice_that_cuts_channels_is_frozen_and_listed():
    groups = pl.channel_groups(Ghostly(6).eval(), X32)     # [:, :6] of 8 channels
    assert groups == [] and isinstance(groups, pl.GroupList)  # the public types
    assert all(isinstance(f, pl.FrozenOp) for f in groups.frozen)
    ops = [f.op for f in groups.frozen]
    assert ops[0] == "getitem ('getitem')" and groups.frozen[0].layers == ["a"]
    assert groups.frozen[0].channels == 4 and ops[-1] == "output"
    assert "frozen by getitem ('getitem'): 4 channels of a" in groups.summary()


def test_a_module_fx_cannot_trace_is_refused_naming_it():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x               # data-dependent control flow

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Branchy(), nn.Conv2d(4, 2, 1))
    with pytest.raises(pl.UnsupportedOpError, match=r"module Branchy at '1'.*register_op"):
        pl.channel_groups(model, X32)
    pl.register_op(Branchy, "mix")                        # declared: a leaf, channels frozen
    assert pl.channel_groups(model, X32) == []
