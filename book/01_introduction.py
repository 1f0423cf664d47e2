# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 1 — Structured pruning, coupled channels and the sparsity toolbox
#
# **Objectives.** After this chapter you can
# 1. say what *structured* (channel) pruning removes and why, unlike unstructured pruning, it
#    makes a network cheaper on ordinary hardware;
# 2. read the *channel groups* of a network — the sets of tensor slices that must be removed
#    together — and explain why residual additions and the CIFAR "option-A" shortcut couple
#    channels across layers and even across stages;
# 3. tell MACs from measured latency;
# 4. derive and compare the update rules that every regularization-based method of the survey
#    is built from: subgradient, gradient of a smooth penalty, proximal (soft-thresholding),
#    group-lasso proximal and projection — and say which ones produce exact zeros;
# 5. write the training loop with the method hooks yourself, and run the protocol of this book
#    (dense → sparse phase → removal → BN recalibration → fine-tuning) on real CIFAR-10 with
#    the magnitude baseline (per-layer rate, two residual policies) and Network Slimming, with
#    the penalty's strength set by the book's target-drift rule.
#
# **Run time** (whole chapter as a script, `python book/01_introduction.py`): quick scale,
# 2-core CPU shared with two other chapter authors' jobs, torch 2.14.1: **2 min 20 s** (load
# average about 1–2 from the other jobs; an earlier run while they held the cores took
# 5 min 23 s), of which the three pipeline runs of Section 6 take about 2 min. Measured on a
# shared CPU; the CI timing may differ.
# Full scale: not measured here — it trains ResNet-20 for 160 + 160 epochs per method on 45k
# CIFAR-10 images, a job for a GPU.
#
# Every knob lives in the setup cell below. The protocol's settings (subsets, epochs, learning
# rates, target, seed, recalibration batches, strength rule) are not knobs of this chapter: they
# come from `prunelib.pipeline.SCALES[SCALE]`, the same for every chapter. `PRUNELIB_SCALE=quick`
# (default) runs in minutes on a laptop CPU: a 10k-image training subset, 5k test images and
# 2 + 2 epochs per method. `PRUNELIB_SCALE=full` uses the papers' schedule (160 + 160 epochs on
# 45k training images, all 10k test images) and wants a GPU.
#
# **Notation** (one meaning per symbol in this chapter, and in the book: `book/notation.md`). $w$:
# the parameters being optimized, $w_g$ the coefficients of group $g$ and $p_g$ their number; $W$:
# the weight tensor of one layer; $f$: the training loss; $R$: a penalty and $\lambda \ge 0$ its
# strength (a price per unit of $R$), $c_g$ the weight of group $g$ in a group penalty; $\eta$,
# $\eta_s$: the learning rate (step size), at step $s$ of $S$ — $s$ counts optimizer steps and
# nothing else; $\mu$: the SGD momentum (0.9) and nothing else; $\theta$: a threshold (of
# soft-thresholding); $\xi$: the radius of a constraint $\|w\|_1 \le \xi$; $\gamma_c, \beta_c$:
# scale and shift of BatchNorm channel $c$, $m_c, v_c$ its running mean and variance and
# $\epsilon_\text{BN}$ its small constant, $\mathrm{BN}(x)_c = \gamma_c (x_c - m_c)/\sqrt{v_c +
# \epsilon_\text{BN}} + \beta_c$; $x$: an input (an image, a feature map), $y$ its label; $j$: a
# channel (filter) index; $k$: a kernel size; $G$: the groups of a grouped convolution; $P$: the
# positions of an output map; $D$: the drift the strength rule asks for; $V$: SGD's displacement per
# unit gradient, $\nu_s$ its momentum buffer; $\mathcal{C}_\text{rm}$: the channels a budget
# removes.

# %%
# Setup: the only cell with settings. Exercises are graded with this cell alone (keep it cheap).
import copy
import math
import os
import sys
import time
import warnings

import matplotlib
if "ipykernel" not in sys.modules:        # run as a script: draw off-screen, no windows
    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", message=".*non-interactive.*")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import prunelib as pl
from prunelib.models import get_model
from prunelib.pipeline import SCALES

SCALE = os.environ.get("PRUNELIB_SCALE", "quick")
assert SCALE in SCALES, f"PRUNELIB_SCALE must be one of {', '.join(SCALES)}, got {SCALE!r}"
SC = SCALES[SCALE]          # the book's one protocol (prunelib.pipeline): not a knob of a chapter
QUICK = SCALE == "quick"
SEED = SC.seed                                  # the protocol's seed (subsets, shuffling, init)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DATA_ROOT = os.environ.get("PRUNELIB_DATA")     # None: ~/.cache/prunelib (never downloads)
torch.manual_seed(SEED)
np.random.seed(SEED)
T_START = time.time()

#                      quick     full        what
LAT_REPS = 10 if QUICK else 50              # timed passes per latency measurement (batch 1)
LAT_ROUNDS = 3                              # interleaved rounds; the best median is reported
TOY_STEPS = 400                             # iterations of the toy problem (Section 4)
LOOP_STEPS = 3                              # steps of the from-scratch loop vs fit (Sec. 6)
DRIFT_TARGETS = (0.8, 0.65, 0.5, 0.35)      # MACs targets of the strength-rule table (Sec. 6)
print(f"scale={SCALE}  device={DEVICE}  torch={torch.__version__}  prunelib={pl.__version__}")

# %% [markdown]
# ## 1. Structured versus unstructured pruning
#
# A convolution with $G$ groups and weight
# $W \in \mathbb{R}^{c_\text{out} \times (c_\text{in}/G) \times k \times k}$ that writes an
# output map of $P$ positions (height × width) costs
#
# $$\text{MACs} = P\; c_\text{out}\; \frac{c_\text{in}}{G}\; k^2$$
#
# multiply-accumulates per image. **Unstructured** pruning sets individual
# entries of $W$ to zero (a mask $M \odot W$, as in Han et al. 2015). The tensor keeps its shape,
# so a dense kernel still does every multiplication: the savings only appear with sparse kernels
# and hardware that exploit irregular zeros. **Structured** pruning removes whole *filters*
# (rows $W_{j,:,:,:}$, i.e. output channels) — and with them the matching input slice
# $W'_{:,j,:,:}$ of every layer that reads channel $j$. The result is an ordinary, smaller dense
# network: $c_\text{out}$ and the next layer's $c_\text{in}$ shrink, and so do MACs, parameters,
# memory traffic and (usually) latency, on any hardware.
#
# This book is about the *regularization-based* way of choosing which channels to remove
# (He & Xiao 2024, Section "regularization"): train with a penalty that drives some channels
# towards zero, then remove them.
#
# A first look with two layers: remove half of the output channels of `conv_a`.

# %%
conv_a, conv_b = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
x16 = torch.randn(1, 16, 32, 32)
two = nn.Sequential(conv_a, nn.ReLU(), conv_b)
keep = torch.arange(0, 32, 2)                            # keep every second filter of conv_a
small_two = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 64, 3, padding=1))
with torch.no_grad():
    small_two[0].weight.copy_(conv_a.weight[keep])
    small_two[0].bias.copy_(conv_a.bias[keep])
    small_two[2].weight.copy_(conv_b.weight[:, keep])  # the consumer loses the same inputs
    small_two[2].bias.copy_(conv_b.bias)
masked_two = copy.deepcopy(two)                          # unstructured: 50% zeros, same shapes
with torch.no_grad():
    for m in (masked_two[0], masked_two[2]):
        w = m.weight
        w.mul_((w.abs() > w.abs().flatten().median()).float())
for name, net in [("dense", two), ("structured 50% filters", small_two),
                  ("unstructured 50% zeros", masked_two)]:
    macs, params = pl.count(net, x16)
    zeros = sum(int((p == 0).sum()) for p in net.parameters())
    print(f"{name:24s} MACs {macs / 1e6:6.2f} M   params {params:6d}   exact zeros {zeros}")
assert pl.count(small_two, x16)[0] * 2 == pl.count(two, x16)[0]    # both layers halve
assert pl.count(masked_two, x16) == pl.count(two, x16)              # zeros cost the same

# %% [markdown]
# ## 2. What a channel is, and why channels are coupled
#
# Removing output channel $j$ of a convolution is only half of the job: the BatchNorm after it
# has a $\gamma_j, \beta_j$ and running statistics for channel $j$, and every layer that *reads*
# the channel has an input slice for it. A **channel group** collects all these slices; channel
# $j$ of a group is one "coupled channel", present in every member (`prunelib.channel_groups`
# finds them by tracing the model with `torch.fx`).
#
# Residual networks add tensors: in a block $x \mapsto \mathrm{relu}(F(x) + x)$ channel $j$ of
# $F$'s last BatchNorm and channel $j$ of $x$ land in the same output channel. Removing it from one
# operand only is impossible, so every layer that writes into the residual stream of a stage
# belongs to one **coupled** group. Channels that are produced and consumed inside a residual
# branch (the output of each block's first conv) form small **internal** groups.
#
# Here are the groups of ResNet-20 (He et al. 2016, CIFAR version):

# %%
ex32 = torch.randn(1, 3, 32, 32)
resnet20 = get_model("resnet20")
groups20 = pl.channel_groups(resnet20, ex32)
for g in groups20:
    print(g)

# %% [markdown]
# **Three** coupled groups, with 16, 16 and 32 channels, although the residual stream has 16,
# 32 and 64 channels in the three stages. The reason is the parameter-free **option-A
# shortcut** of the CIFAR ResNets (He et al. 2016, Sec. 4.2): when a stage doubles the width,
# the shortcut subsamples $x$ and **zero-pads** the new channels on both sides,
#
# ```python
# sc = self.pad(x[:, :, ::2, ::2])    # ChannelPad: left = right = (planes - in_planes) // 2
# ```
#
# so stage-1 channel $j$ becomes stage-2 channel $j + 8$, which becomes stage-3 channel
# $j + 8 + 16 = j + 24$: the stage-1 stream is one coupled group of 16 channels that runs
# through the whole network. The padded positions are *new channels of the wider stage*: zero
# in the shortcut, they are written by the stage's first `conv2` (and every later `conv2` of
# the stage), and they are prunable like the rest of the trunk. Stage 2's new channels
# ($0..7$ and $24..31$) continue into stage 3 at $16..23$ and $40..47$ and form the second
# group; stage 3's new channels ($0..15$ and $48..63$) are the third. Removing a padded channel
# removes it from every producer and consumer of its group *and* narrows the pad by one on its
# side (`prunelib.models.ChannelPad` keeps `left` and `right` as attributes that the surgery
# lowers; a literal `F.pad(x, (0, 0, 0, 0, 8, 8))` would pad by 8 in the pruned model too, so
# `prunelib` freezes channels padded that way). Read it off the members:

# %%
trunk, stage2, stage3 = sorted((g for g in groups20 if g.coupled), key=lambda g: g.index)
rows = {m.module: m.idx[:, 0] for m in trunk.by_role("out") if m.param == "weight"}
for name in ("conv1", "layer1.2.conv2", "layer2.0.conv2", "layer3.0.conv2", "layer3.2.conv2"):
    r = rows[name]
    print(f"{name:15s} writes trunk channels {int(r[0]):2d}..{int(r[-1]):2d} of its output")
rows2 = {m.module: m.idx[:, 0] for m in stage2.by_role("out") if m.param == "weight"}
print("stage-2 new channels in layer2.0.conv2:", rows2["layer2.0.conv2"].tolist())
print("                 and in layer3.0.conv2:", rows2["layer3.0.conv2"].tolist())
print("their pad:", stage2.by_role("pad")[0], "=", resnet20.layer2[0].pad)
assert [g.size for g in (trunk, stage2, stage3)] == [16, 16, 32]
assert torch.equal(rows["conv1"], torch.arange(16))
assert torch.equal(rows["layer2.0.conv2"], torch.arange(8, 24))      # j -> j + 8
assert torch.equal(rows["layer3.0.conv2"], torch.arange(24, 40))     # j -> j + 24
assert torch.equal(rows2["layer2.0.conv2"], torch.tensor([*range(8), *range(24, 32)]))
assert torch.equal(rows2["layer3.0.conv2"], torch.tensor([*range(16, 24), *range(40, 48)]))
assert len(trunk.sources) == 10                    # stem + the last conv of all 9 blocks
assert len(stage2.sources) == 6 and len(stage3.sources) == 3     # the conv2s of stages 2-3
_one = pl.remove_channels(resnet20, groups20, {stage2.index: torch.arange(1, 16)})
assert (_one.layer2[0].pad.left, _one.layer2[0].pad.right) == (7, 8)    # channel 0: left side


# %% [markdown]
# How much of a network can be pruned at all, and how much of it is coupled? For each model we
# count the groups, and the producer channels (conv / linear output rows) that are in an
# internal group, in a coupled group, or in none (frozen: the classifier's outputs, channels
# cut by a literal slice or padded by a literal `F.pad`, ...). With a 1x1-conv projection
# shortcut (`shortcut='B'`) each stage's stream is its own coupled group (16, 32, 64);
# torchvision's ResNet-18 has one coupled group per stage.

# %%
def group_table(model: nn.Module, example: torch.Tensor) -> dict:
    """Counts of groups and of producer channels by kind, for one model."""
    groups = pl.channel_groups(model, example)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    total = sum(m.weight.shape[0] for m in layers)
    rows_in = {"internal": 0, "coupled": 0}
    for g in groups:
        n = sum(m.idx.numel() for m in g.by_role("out") if m.param == "weight")
        rows_in["coupled" if g.coupled else "internal"] += n
    return {"groups": len(groups), "coupled": sum(g.coupled for g in groups),
            "internal": sum(not g.coupled for g in groups), "rows": total,
            "rows_internal": rows_in["internal"], "rows_coupled": rows_in["coupled"],
            "rows_frozen": total - rows_in["internal"] - rows_in["coupled"]}


import torchvision  # noqa: E402  (only needed here)

zoo = {"resnet20 (option A)": (resnet20, ex32),
       "resnet20 (option B)": (get_model("resnet20", shortcut="B"), ex32),
       "resnet56": (get_model("resnet56"), ex32),
       "vgg16": (get_model("vgg16"), ex32),
       "mobilenetv2": (get_model("mobilenetv2"), ex32),
       "torchvision resnet18": (torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))}
tables = {name: group_table(m, x) for name, (m, x) in zoo.items()}
print(f"{'model':22s} {'groups':>6s} {'coupled':>7s} {'internal':>8s} | producer rows: "
      f"{'total':>6s} {'internal':>8s} {'coupled':>7s} {'frozen':>6s}")
for name, t in tables.items():
    print(f"{name:22s} {t['groups']:6d} {t['coupled']:7d} {t['internal']:8d} | "
          f"{'':15s}{t['rows']:6d} {t['rows_internal']:8d} {t['rows_coupled']:7d} "
          f"{t['rows_frozen']:6d}")
assert tables["resnet20 (option A)"]["coupled"] == 3                  # stream 1 + new of 2, 3
assert tables["resnet20 (option A)"]["rows_frozen"] == 10             # only the classifier
assert tables["resnet20 (option B)"]["coupled"] == 3                  # one per stage
assert tables["torchvision resnet18"]["coupled"] == 4                 # one per stage
assert tables["vgg16"]["coupled"] == 0                                # no additions
assert all(t["rows_frozen"] >= 10 for t in tables.values())           # classifier outputs

# %% [markdown]
# ### From scratch: removing one internal group by hand
#
# Removing the channels of an internal group of a BasicBlock touches four tensors: the rows of
# `conv1`, the entries of `bn1` (γ, β, running mean and variance) and the input slices of
# `conv2`. Written out by hand, and compared with `prunelib.remove_channels`:

# %%
def remove_block_channels(model: nn.Module, block: str, keep: torch.Tensor) -> nn.Module:
    """A copy of `model` keeping only channels `keep` between block.conv1 and block.conv2."""
    small = copy.deepcopy(model)
    b = small.get_submodule(block)
    with torch.no_grad():
        b.conv1.weight = nn.Parameter(b.conv1.weight[keep].clone())
        b.conv1.out_channels = len(keep)
        for p in ("weight", "bias"):
            setattr(b.bn1, p, nn.Parameter(getattr(b.bn1, p)[keep].clone()))
        b.bn1.running_mean = b.bn1.running_mean[keep].clone()
        b.bn1.running_var = b.bn1.running_var[keep].clone()
        b.bn1.num_features = len(keep)
        b.conv2.weight = nn.Parameter(b.conv2.weight[:, keep].clone())
        b.conv2.in_channels = len(keep)
    return small


net = get_model("resnet20").eval()
with torch.no_grad():                             # non-trivial BN statistics
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.2, 1.0)
            m.bias.uniform_(-0.2, 0.2)
gnet = pl.channel_groups(net, ex32)
gi = next(g.index for g in gnet if g.sources == ["layer2.1.conv1"])
keep_ch = torch.randperm(gnet[gi].size)[:12].sort().values
by_hand = remove_block_channels(net, "layer2.1", keep_ch).eval()
by_lib = pl.remove_channels(net, gnet, {gi: keep_ch}).eval()
xb = torch.randn(4, 3, 32, 32)
with torch.no_grad():
    y_hand, y_lib = by_hand(xb), by_lib(xb)
print("max |by hand - prunelib| =", float((y_hand - y_lib).abs().max()))
assert all(a.shape == b.shape for a, b in zip(by_hand.state_dict().values(),
                                              by_lib.state_dict().values()))
assert torch.allclose(y_hand, y_lib, atol=1e-6)

# %% [markdown]
# ### The invariant behind every removal
#
# If the producers of a channel (its conv rows, its BN γ and β) are exactly zero, the channel
# carries exactly zero to its consumers, so removing it cannot change the output. Zero a random
# half of *every* group (the coupled trunk included), then remove those channels:

# %%
zeroed = copy.deepcopy(net)
gz = pl.channel_groups(zeroed, ex32)
halves = {g.index: torch.randperm(g.size)[: g.size // 2].sort().values for g in gz}
for g in gz:
    drop = torch.tensor(sorted(set(range(g.size)) - set(halves[g.index].tolist())))
    g.zero_(drop)
halved = pl.remove_channels(zeroed, gz, halves).eval()
with torch.no_grad():
    y_zero, y_small = zeroed.eval()(xb), halved(xb)
print("max |zeroed - removed| =", float((y_zero - y_small).abs().max()))
assert torch.allclose(y_zero, y_small, atol=1e-5)
assert halved.conv1.out_channels == 8 and halved.layer3[2].conv1.out_channels == 32

# %% [markdown]
# ## 3. MACs are not latency
#
# `pl.count` reports MACs of conv and linear layers per image and parameters; `pl.latency`
# reports the median wall time of repeated forward passes (after warm-up, synchronized on
# CUDA). Compare three versions of ResNet-20:
# * **internal halves** — a random half of every internal group removed (what methods with the
#   "trunk untouched" residual policy, such as NS, can do);
# * **all halves** — a random half of every group, the coupled trunk included;
# * **unstructured 50%** — the smaller half of every conv's weights set to zero, shapes kept.
#
# Unstructured zeros change neither the MAC count of dense kernels nor their latency. If a
# sparse kernel could skip every zero, the "effective" MACs would halve: that number is also
# shown, to make the point that it is not what a dense GPU or CPU executes.

# %%
from prunelib.measure import layer_macs  # noqa: E402

internal_only = {i: k for i, k in halves.items() if not gnet[i].coupled}
variants = {"dense": net,
            "internal halves": pl.remove_channels(net, gnet, internal_only),
            "all halves": pl.remove_channels(net, gnet, halves)}
unstructured = copy.deepcopy(net)
with torch.no_grad():
    for m in unstructured.modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            w.mul_((w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values).float())
variants["unstructured 50%"] = unstructured
xb1, xb64 = torch.randn(1, 3, 32, 32, device=DEVICE), torch.randn(64, 3, 32, 32, device=DEVICE)
lat_rows = {}
for name, m in variants.items():
    m = m.to(DEVICE).eval()
    macs, params = pl.count(m, xb1)
    dens = {n: float((mod.weight != 0).float().mean()) for n, mod in m.named_modules()
            if isinstance(mod, (nn.Conv2d, nn.Linear))}
    eff = sum(v[0] * dens[n] for n, v in layer_macs(m, xb1).items())
    lat_rows[name] = dict(macs=macs, eff=eff, params=params, ms1=math.inf, ms64=math.inf)
for _ in range(LAT_ROUNDS):              # interleave the models: a load change hits all of them
    for name, m in variants.items():
        r = lat_rows[name]
        r["ms1"] = min(r["ms1"], pl.latency(m, xb1, reps=LAT_REPS, warmup=2))
        r["ms64"] = min(r["ms64"], pl.latency(m, xb64, reps=LAT_REPS // 2, warmup=1))
d = lat_rows["dense"]
print(f"{'model':18s} {'MACs':>7s} {'nonzero MACs':>12s} {'params':>8s} "
      f"{'ms@1':>7s} {'ms@64':>7s}  speed-up@64 ({DEVICE})")
for name, r in lat_rows.items():
    print(f"{name:18s} {r['macs'] / 1e6:6.2f}M {r['eff'] / 1e6:11.2f}M {r['params']:8d} "
          f"{r['ms1']:7.2f} {r['ms64']:7.2f}  {d['ms64'] / r['ms64']:5.2f}x")
assert lat_rows["unstructured 50%"]["macs"] == d["macs"]                  # dense kernels
assert abs(lat_rows["unstructured 50%"]["eff"] / d["eff"] - 0.5) < 0.02
assert 0.45 < lat_rows["internal halves"]["macs"] / d["macs"] < 0.55     # both convs of a block
assert 0.24 < lat_rows["all halves"]["macs"] / d["macs"] < 0.28          # every width halves
assert all(r["ms1"] > 0 and r["ms64"] > 0 for r in lat_rows.values())

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
names = list(lat_rows)
ax[0].bar(names, [lat_rows[n]["macs"] / d["macs"] for n in names], color="C0", label="MACs")
ax[0].bar(names, [lat_rows[n]["eff"] / d["eff"] for n in names], color="none",
          edgecolor="k", hatch="//", label="nonzero MACs")
ax[0].set_ylabel("fraction of dense")
ax[0].legend()
ax[1].bar(names, [lat_rows[n]["ms64"] / d["ms64"] for n in names], color="C1")
ax[1].set_ylabel(f"latency at batch 64 / dense ({DEVICE.type})")
for a in ax:
    a.tick_params(axis="x", rotation=20)
fig.tight_layout()
plt.show()

# %% [markdown]
# Halving every internal group halves both convolutions of every block ($c_\text{out}$ of
# `conv1`, $c_\text{in}$ of `conv2`): about 50% of the MACs. Halving the three coupled trunk
# groups as well halves every width of the network, so nearly every convolution loses half of
# its input *and* half of its output channels: about 25% of the MACs (the stem keeps its 3
# input channels). Unstructured zeros leave the dense MAC count as it is. The measured
# speed-ups are smaller than the MAC ratios: a small network on a CPU is partly bound by memory
# traffic, per-layer overheads and the layers that do not shrink (BN, ReLU, additions are not
# in the MAC count). Latency depends on the device, the batch size and the other programs
# running on the machine — read the numbers above as an example, not as a property of the
# network (on a shared machine they can even invert). This book reports MACs (one convention
# for every method) **and** latency measured the same way for every method.
#
# ## 4. The sparsity toolbox: subgradient, proximal, group, projection
#
# Every regularization-based method solves, in one form or another,
#
# $$\min_w\; f(w) + \lambda\, R(w),$$
#
# with $f$ the training loss and $R$ a sparsity-inducing penalty on channel-level quantities
# (BN scales γ, gates, or whole filter groups). The sparsifying penalties are not
# differentiable at 0 — that is what makes them sparsify — so how the non-smooth part is handled
# matters. Two tools of convex analysis describe the updates. The **subdifferential** of $|u|$
# is $\partial|u| = \{\mathrm{sign}(u)\}$ for $u \ne 0$ and the interval $[-1, 1]$ at $u = 0$.
# The **normal cone** of a closed convex set $C$ at a point $u \in C$ is
#
# $$N_C(u) = \{v : v^\top (c - u) \le 0 \text{ for every } c \in C\},$$
#
# the directions that point out of $C$ at $u$: $\{0\}$ in the interior, e.g. $(-\infty, 0]$ at
# $u = 0$ for $C = [0, \infty)$. A convex $h$ is minimized over $C$ at $u$ exactly when
# $0 \in \partial h(u) + N_C(u)$ (with $N_C = \{0\}$ for $C$ the whole space). Four update
# rules, with step size $\eta$:
#
# **Subgradient** (NS, PR, SSL, OICSR): treat $\lambda\,\mathrm{sign}(w)$ — one element of
# $\lambda\,\partial|w|$ — as a gradient,
# $$w \leftarrow w - \eta\,\big(\nabla f(w) + \lambda\, \mathrm{sign}(w)\big).$$
# Near zero the sign flips from step to step and $w$ oscillates in a band of width
# $\sim\eta\lambda$: it gets small, but (almost surely) **never exactly zero**. Pruning then
# needs a threshold. (A *smooth* penalty such as GREG's growing $\tfrac12\lambda_j\|W_j\|^2$ per
# filter $j$ is not in this class: its gradient $\lambda_j W_j$ exists everywhere, the update
# is a plain gradient step, and the filter shrinks geometrically towards 0 without reaching it.)
#
# **Proximal / soft-thresholding** (ISTA: RSNLI; accelerated variants: SSS's APG, GAL's FISTA):
# take a gradient step on $f$ only, then solve the penalty exactly,
# $$w \leftarrow \operatorname{prox}_{\eta\lambda|\cdot|}\big(z\big),\quad z = w - \eta\nabla f(w),
# \qquad \operatorname{prox}_{\theta|\cdot|}(z) = \arg\min_u \tfrac12 (u - z)^2 + \theta|u|
# = \mathrm{sign}(z)\,\max(|z| - \theta,\, 0).$$
# (Optimality: $0 \in u - z + \theta\,\partial|u|$; for $u \ne 0$ this gives
# $u = z - \theta\,\mathrm{sign}(u)$, and $u = 0$ is optimal exactly when $|z| \le \theta$.)
# Every coordinate with $|z| \le \eta\lambda$ becomes **exactly zero** — pruning is "detect the
# zeros".
#
# **Group lasso**: $R(w) = \sum_g c_g \|w_g\|_2$ over groups $g$ (all weights of one filter,
# or one coupled channel), with group weights $c_g$. Its proximal operator shrinks whole groups,
# $$w_g \leftarrow \max\!\Big(0,\; 1 - \frac{\eta\lambda c_g}{\|z_g\|_2}\Big)\, z_g,$$
# so a group is either kept (scaled down) or **exactly zero as a whole** — a structured zero —
# and it is zero exactly when $\|z_g\|_2 \le \eta\lambda c_g$. Yuan & Lin (2006) define the
# group lasso with $c_g = \sqrt{p_g}$, $p_g$ the group's number of coefficients. prunelib's
# group methods (SSL, OICSR, OTO) use the unweighted sum, $c_g = 1$, as their papers' code does.
# With groups of unequal size this matters: a group of $p_g$ entries of similar size has a
# norm about $\sqrt{p_g}$ times that size, so with $c_g = 1$ the same threshold $\eta\lambda$
# zeroes a group of 4 coefficients when they are below about $\eta\lambda/2$ but a group of 576 only
# when they are below about $\eta\lambda/24$: per coefficient, large groups (filters of wide layers,
# $p_g = c_\text{in} k^2$) are penalized less than small ones, and the small groups go first.
# With $c_g = \sqrt{p_g}$ the threshold per coefficient is the same for every group. (In
# prunelib SSL and OICSR take *subgradient* steps on this penalty,
# $\nabla_{w_g} \mathrel{+}= \lambda w_g/\|w_g\|$, as their papers do — SSL then sets weights
# below $10^{-4}$ to exactly 0 — and OTO follows subgradient steps by a projection, below; the
# toy shows what the exact prox does.)
#
# **Projection** (constraint form): replace the penalty by a constraint $w \in C$ and project
# after each step, $w \leftarrow \Pi_C(w - \eta\nabla f(w))$, where
# $\Pi_C(z) = \arg\min_{u \in C} \tfrac12\|u - z\|^2$ is the $u \in C$ with
# $z - u \in N_C(u)$. For $C = \{\|w\|_1 \le \xi\}$ the projection is a soft-threshold whose
# level $\theta$ is chosen so that $\|w\|_1 = \xi$ (Duchi et al. 2008): again **exact zeros**,
# controlled by a radius $\xi$ instead of a price $\lambda$. For this convex problem, by
# Lagrange duality, $\xi = \|w^\star_\lambda\|_1$ gives the same solution as the penalty
# $\lambda$ (the solution is unique here). PR clamps γ to $[0, a]$ after every step, a
# projection onto a box; OTO's half-space step sets a whole group $w_g$ to zero when the trial
# point $\hat w_g$ of the step has left the half-space $\{u : \langle u, w_g\rangle \ge 0\}$
# (its default test; chapter 4) — a projection onto $\{0\}$ of the groups that fail a test, not
# onto one fixed convex set.
#
# A least-squares toy makes the difference visible: $f(w) = \frac12\|Aw - b\|^2$ with 24
# coefficients in 6 groups of 4 (equal sizes, so $c_g = 1$ and $c_g = \sqrt{p_g}$ differ only
# by a rescaling of λ), of which two groups are active.

# %%
gen = torch.Generator().manual_seed(SEED)
n_obs, n_coef, gsz = 60, 24, 4
A = torch.randn(n_obs, n_coef, generator=gen, dtype=torch.float64) / math.sqrt(n_obs)
w_true = torch.zeros(n_coef, dtype=torch.float64)
w_true[:4] = torch.tensor([1.5, -1.0, 0.8, 1.2])
w_true[12:16] = torch.tensor([-0.7, 0.9, 0.5, -1.1])
b = A @ w_true + 0.05 * torch.randn(n_obs, generator=gen, dtype=torch.float64)
eta = 1.0 / torch.linalg.matrix_norm(A, ord=2).item() ** 2        # 1 / (Lipschitz const. of f)
lam = 0.15


def grad_f(w: torch.Tensor) -> torch.Tensor:
    return A.T @ (A @ w - b)


def soft(z: torch.Tensor, theta: float) -> torch.Tensor:
    return z.sign() * (z.abs() - theta).clamp_min(0)


def group_soft(z: torch.Tensor, theta: float) -> torch.Tensor:
    zg = z.view(-1, gsz)
    norm = zg.norm(dim=1, keepdim=True)
    return (zg * (1 - theta / norm.clamp_min(1e-300)).clamp_min(0)).view(-1)


def project_l1(z: torch.Tensor, xi: float) -> torch.Tensor:
    """Euclidean projection onto {||w||_1 <= xi} (Duchi et al. 2008), O(d log d)."""
    if z.abs().sum() <= xi:
        return z
    u = z.abs().sort(descending=True).values
    css = u.cumsum(0)
    n = torch.arange(1, len(u) + 1, dtype=z.dtype)
    rho = int(torch.nonzero(u > (css - xi) / n).max())
    return soft(z, float((css[rho] - xi) / (rho + 1)))


def iterate(step, steps: int = TOY_STEPS) -> torch.Tensor:
    w, path = torch.zeros(n_coef, dtype=torch.float64), []
    for _ in range(steps):
        w = step(w)
        path.append(w)
    return torch.stack(path)                                   # (steps, n_coef)


paths = {"subgradient": iterate(lambda w: w - eta * (grad_f(w) + lam * w.sign())),
         "proximal (ISTA)": iterate(lambda w: soft(w - eta * grad_f(w), eta * lam)),
         "group lasso prox": iterate(lambda w: group_soft(w - eta * grad_f(w), eta * lam))}
xi = float(paths["proximal (ISTA)"][-1].abs().sum())
paths["projection, ||w||_1 <= xi"] = iterate(lambda w: project_l1(w - eta * grad_f(w), xi))
for name, p in paths.items():
    print(f"{name:28s} exact zeros at the end: {int((p[-1] == 0).sum()):2d} / {n_coef}   "
          f"smallest |w|: {float(p[-1].abs().min()):.1e}")

# %%
fig, axes = plt.subplots(1, 5, figsize=(17, 3.2))
for ax, (name, p) in zip(axes, paths.items()):
    for i in range(n_coef):
        ax.plot(np.arange(1, len(p) + 1), p[:, i], color=f"C{i // gsz}", lw=0.9)
    ax.set_title(name, fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("iteration")
for name, p in paths.items():
    axes[4].plot(np.arange(1, len(p) + 1), (p == 0).double().mean(1), label=name)
axes[4].set_title("fraction of exact zeros", fontsize=9)
axes[4].set_xscale("log")
axes[4].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# The colours mark the six groups. The subgradient path reaches the right neighbourhood but
# keeps chattering in a band of width about $\eta\lambda$ around zero (no exact zeros: a
# threshold above the band is needed, and coefficients smaller than the band cannot be told
# from the chatter); ISTA produces exact zeros, the group prox zeroes whole groups, and the
# projection with $\xi = \|w_\text{ISTA}\|_1$ lands on the ISTA solution.
# The asserts below check each final point against the optimality (KKT) conditions
# $0 \in \nabla f(w) + \lambda\,\partial R(w)$ of its own problem — an oracle independent of
# the iterations:
# * lasso: $\nabla_i f(w) + \lambda\,\mathrm{sign}(w_i) = 0$ where $w_i \ne 0$ and
#   $|\nabla_i f(w)| \le \lambda$ where $w_i = 0$;
# * group lasso ($c_g = 1$): $\nabla_g f(w) + \lambda\, w_g / \|w_g\| = 0$ where $w_g \ne 0$
#   and $\|\nabla_g f(w)\| \le \lambda$ where $w_g = 0$.

# %%
w_sub, w_ista, w_grp, w_prj = (p[-1] for p in paths.values())
g_ista, g_grp = grad_f(w_ista), grad_f(w_grp)
nz = w_ista != 0
assert torch.allclose(g_ista[nz] + lam * w_ista[nz].sign(), torch.zeros(1, dtype=A.dtype),
                      atol=1e-6)
assert (g_ista[~nz].abs() <= lam + 1e-6).all() and 0 < int((~nz).sum()) < n_coef
gnorm = w_grp.view(-1, gsz).norm(dim=1)
on = gnorm > 0
kkt = g_grp.view(-1, gsz)[on] + lam * w_grp.view(-1, gsz)[on] / gnorm[on, None]
assert kkt.abs().max() < 1e-6
assert (g_grp.view(-1, gsz)[~on].norm(dim=1) <= lam + 1e-6).all()
assert ((w_grp.view(-1, gsz) == 0).all(1) | (w_grp.view(-1, gsz) != 0).all(1)).all()  # groups
assert torch.allclose(w_prj, w_ista, atol=1e-5)               # duality: same solution
assert int((w_sub == 0).sum()) == 0                            # never exactly zero ...
assert (w_sub[~nz].abs() < 2 * eta * lam).all()                # ... but within ~eta*lam of it
band = 2 * eta * lam                                           # a threshold above the band
assert torch.equal(w_sub.abs() > band, w_ista.abs() > band)    # finds the same large entries

# %% [markdown]
# Which rule each method of this book uses (details in the family chapters):
#
# * **subgradient** of a non-smooth penalty (no exact zeros, a threshold decides): NS
#   ($\lambda\,\mathrm{sign}\,\gamma$), PR (the subgradient of its polarization term, then a
#   clamp), SSL and OICSR (group lasso, $\lambda w_g / \|w_g\|$; SSL then zeroes weights below
#   $10^{-4}$), ResRep (row lasso on compactors, chapter 3);
# * **gradient of a smooth penalty** (no exact zeros either): GREG (growing
#   $\tfrac12\lambda_j\|W_j\|^2$ on the filters it has chosen to remove: a plain gradient step
#   $\lambda_j W_j$, the filters shrink towards 0); SCP (a differentiable penalty in the loss,
#   the expected number of active channels, chapter 2);
# * **proximal, soft-thresholding** (exact zeros): RSNLI (ISTA on γ), SSS (APG), GAL (FISTA);
# * **projection** (exact zeros): OTO (group-lasso subgradient steps, then the half-space step
#   that sets whole groups to zero); PR's clamp of γ to $[0, a]$ is a projection too, but onto
#   a box: it creates zeros only where a step would cross 0.
#
# In `prunelib` a method acts through the hooks of `prunelib.methods.base.Method`:
# `param_groups` (its own learning rate / weight decay / momentum for some tensors),
# `loss_term` (a differentiable penalty), `after_backward` (edit gradients: the subgradient and
# smooth-penalty rules) and `after_step` (prox, clamp, projection). Section 6 writes the loop
# that calls them.
#
# ## 5. The dense baseline
#
# Every experiment starts from the same dense ResNet-20 trained on CIFAR-10
# (`book/baselines/resnet20_cifar10.pt`, trained with `prunelib train`; `load_baseline` looks
# in the cache `$PRUNELIB_CACHE` first, then in the book, and trains one if neither exists).
# `load_data(SCALE)` gives the scale's training subset, held-out calibration images and test
# subset, all seeded by the scale's seed: every chapter sees the same images.

# %%
import prunelib.methods  # noqa: E402  (the registry: pl.methods.get("ns", ...))
from prunelib import strength  # noqa: E402
from prunelib.methods import Context  # noqa: E402
from prunelib.pipeline import load_baseline, load_data, run, widths  # noqa: E402
from prunelib.results import phase_figure, standard_error, table, width_figure  # noqa: E402
from prunelib.select import Budget  # noqa: E402
from prunelib.train import evaluate, fit, lr_factor  # noqa: E402

data = load_data(SCALE, root=DATA_ROOT, device=DEVICE)
base, base_meta = load_baseline("resnet20", data, device=DEVICE, scale=SCALE)
base_acc = evaluate(base, data.test)
base_macs, base_params = pl.count(base, xb1)
n_test = data.test.num_images
print(f"baseline from {base_meta['path']}")
print(f"  trained {base_meta.get('epochs', '?')} epochs; top-1 on {n_test} test images: "
      f"{base_acc:.2f}% (standard error {standard_error(base_acc, n_test):.2f} points);  "
      f"{base_macs / 1e6:.1f} M MACs, {base_params / 1e6:.3f} M params")
print(f"  training images for the sparse phase and fine-tuning: {data.train.num_images}")
assert base_acc > 50.0                # far above chance (10%): the right weights and data
assert (base_macs, base_params) == pl.count(get_model("resnet20").to(DEVICE), xb1)
assert n_test == (SC.test_subset or 10_000)
assert data.train.num_images == (SC.subset or 50_000 - SC.holdout)

# %% [markdown]
# ## 6. The protocol, end to end: magnitude (L1) and Network Slimming
#
# The protocol of the book (`prunelib.pipeline.run`) is the same for every method, and every
# setting comes from `SCALES[SCALE]`:
# 1. **sparse phase**: train with the method's regularizer (`reg_epochs` at `reg_lr`); the
#    accuracy at its end is the *sparse* column of the tables;
# 2. **removal**: the method's decision rule picks the channels to remove under the budget
#    (here at most 50% of the dense MACs, `Budget(macs=0.5)`; every group keeps at least 10%
#    of its channels), and the surgery removes them physically: *removed*;
# 3. **BN recalibration**: the running means and variances of every BatchNorm are re-estimated
#    from `recal_batches` training batches, no gradient step: *recal.* — what stale statistics
#    cost, told apart from what the removal destroyed;
# 4. **fine-tuning** of the smaller network (`ft_epochs` at `ft_lr`): *tuned*. Before it, conv
#    rows that a strong sparse phase shrank are scaled back to the dense layer's RMS norm (the
#    same function, `calibrate.restore_bn_input_norms`, so that fine-tuning sees a sane
#    effective learning rate).

# %%
BUDGET = SC.budget()
print(f"scale {SC.name}: batch {SC.batch_size}, weight decay {SC.weight_decay}, {SC.schedule} "
      f"schedule; sparse phase {SC.reg_epochs} epochs at lr {SC.reg_lr}; fine-tuning "
      f"{SC.ft_epochs} epochs at lr {SC.ft_lr}; target {BUDGET.macs:g} of the dense MACs; BN "
      f"recalibration on {SC.recal_batches} batches; strength rule: margin "
      f"{SC.strength_margin}, quantile {SC.strength_quantile}")
assert BUDGET == Budget(macs=SC.target_macs)

# %% [markdown]
# ### The training loop behind every sparse phase
#
# `pipeline.run` is no black box: its sparse phase is `prunelib.train.fit`, plain SGD with
# Nesterov momentum $\mu = 0.9$, weight decay and a per-step learning-rate schedule, that calls
# the method's hooks at fixed points of every step. Written out from scratch (the optimizer's
# update itself is torch's SGD):

# %%
def train_with_hooks(model: nn.Module, method, batches, epochs: float, lr: float,
                     weight_decay: float, schedule: str = "cosine",
                     momentum: float = 0.9) -> nn.Module:
    """SGD (Nesterov) with a per-step lr schedule, calling the method's hooks as fit does."""
    opt = torch.optim.SGD(method.param_groups(model, lr, weight_decay), lr=lr,
                          momentum=momentum, nesterov=True, weight_decay=weight_decay)
    lr0 = [g["lr"] for g in opt.param_groups]                # each group's own base lr
    total, step = math.ceil(epochs * len(batches)), 0
    model.train()
    while step < total:
        for x, y in batches:
            if step == total:
                break
            for g, base_lr in zip(opt.param_groups, lr0):     # the schedule, step by step
                g["lr"] = base_lr * lr_factor(step, total, schedule)
            loss = nn.functional.cross_entropy(model(x), y)
            term = method.loss_term(model)                    # a differentiable penalty
            if term is not None:
                loss = loss + term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.after_backward(model)                      # edit gradients
            opt.step()
            method.after_step(model)                          # prox / clamp / projection
            step += 1
    return model


# %% [markdown]
# The check: two identical copies of the baseline, each with its own freshly attached method,
# the same batch, `LOOP_STEPS` steps (a one-batch loader run for `LOOP_STEPS` epochs: more than
# one step, so that the momentum buffer and the cosine schedule matter) — one copy trained by
# the loop above, the other by `fit`, with the scale's lr, weight decay and schedule. Three
# methods between them use every hook: NS edits gradients (`after_backward`); SCP (chapter 2)
# adds a `loss_term`; OTO (chapter 4, with `n_p=0` so that its half-space projection acts from
# the first step) has its own `param_groups` (no momentum, no weight decay on its groups) and
# an `after_step`. Every parameter must agree.

# %%
xs, ys = next(iter(data.train))
one_batch = [(xs[:32], ys[:32])]
hook_cases = {"ns": dict(lam=0.05), "scp": dict(lam=1e-2), "oto": dict(lam=1e-2, n_p=0.0)}
p0 = {k: v.detach().clone() for k, v in base.named_parameters()}
for name, hp in hook_cases.items():
    pair = []
    for _ in range(2):
        m = pl.methods.get(name, **hp)
        m.ctx = Context(xb1, train_loader=one_batch, device=DEVICE, epochs=LOOP_STEPS,
                        lr=SC.reg_lr, weight_decay=SC.weight_decay, schedule=SC.schedule)
        model = copy.deepcopy(base)
        pair.append((m.attach(model, pl.channel_groups(model, xb1)), m))
    (mine, m_mine), (lib, m_lib) = pair
    train_with_hooks(mine, m_mine, one_batch, LOOP_STEPS, SC.reg_lr, SC.weight_decay,
                     SC.schedule)
    fit(lib, one_batch, epochs=LOOP_STEPS, lr=SC.reg_lr, weight_decay=SC.weight_decay,
        schedule=SC.schedule, hooks=m_lib, device=DEVICE, quiet=True)
    pm, pf = dict(mine.named_parameters()), dict(lib.named_parameters())
    diff = max(float((pm[k] - pf[k]).detach().abs().max()) for k in pm)
    moved = max(float((pm[k].detach() - p0[k]).abs().max()) for k in pm if k in p0)
    print(f"{name:4s} {LOOP_STEPS} steps: largest weight change {moved:.2e}, largest "
          f"|loop - fit| {diff:.1e}")
    assert pm.keys() == pf.keys()
    assert all(torch.allclose(pm[k], pf[k], rtol=1e-5, atol=1e-6) for k in pm), name
    assert moved > 1e-4, name                              # the steps did change the weights
del mine, lib, pair

# %% [markdown]
# ### The two methods
#
# **Magnitude** (Li et al. 2017, registered as `'l1'`) has no sparse phase: it scores filter
# $j$ by $\|W_j\|_1$ and removes, in every prunable group, the same fraction of filters (the
# smallest), at the smallest common rate that meets the MACs budget — Li et al.'s per-layer
# rule. (A single *global* ranking of raw L1 norms across layers, `'l1_global'`, is biased by
# the fan-in; measured below.)
#
# **Network Slimming** (Liu et al. 2017, `'ns'`) trains with an L1 penalty on every BN scale,
#
# $$\min_w\; f(w) + \lambda \sum_{\gamma \in \Gamma} |\gamma|,$$
#
# with $\Gamma$ the set of all BN scales (part of the parameters $w$), implemented as in its
# official code by a subgradient edit after `backward()`:
# $\partial / \partial \gamma \mathrel{+}= \lambda\,\mathrm{sign}(\gamma)$; channels are
# ranked by $|\gamma|$ globally. Both use the residual policy `'internal'` by default: only
# internal groups are pruned and the trunk keeps its width, as in NS's official ResNet code
# (`'coupled'` also prunes the trunk; we run L1 with both). From scratch, the NS update is two
# lines; it matches `prunelib`:

# %%
def ns_subgradient_(model: nn.Module, lam: float) -> None:
    """grad(gamma) += lam * sign(gamma) for every BatchNorm scale (in place)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight.grad is not None:
            m.weight.grad.add_(lam * m.weight.detach().sign())


ns_check = pl.methods.get("ns", lam=1e-2)
m_lib = copy.deepcopy(base).eval()
ns_check.attach(m_lib, pl.channel_groups(m_lib, xb1))
xs, ys = next(iter(data.train))
nn.functional.cross_entropy(m_lib.train()(xs[:16]), ys[:16]).backward()
m_hand = copy.deepcopy(m_lib)                        # same weights, and the same gradients:
for p_hand, p_lib in zip(m_hand.parameters(), m_lib.parameters()):
    p_hand.grad = p_lib.grad.clone()
g0 = m_lib.bn1.weight.grad.clone()
ns_subgradient_(m_hand, 1e-2)
ns_check.after_backward(m_lib)
assert all(torch.allclose(a.grad, c.grad, rtol=1e-6, atol=1e-9)
           for a, c in zip(m_hand.parameters(), m_lib.parameters()))
assert torch.allclose(m_lib.bn1.weight.grad - g0, 1e-2 * m_lib.bn1.weight.detach().sign(),
                      atol=1e-6)
del m_hand, m_lib

# %% [markdown]
# ### How strong must the penalty be? The book's strength rule
#
# The official NS code uses $\lambda = 10^{-5}$ for ResNets, with 160 epochs at lr 0.1. What
# the penalty *alone* can do to one γ over the sparse phase is its **reach**: a constant
# gradient $\lambda\,\mathrm{sign}(\gamma)$ moves γ, under SGD with Nesterov momentum $\mu$ and
# learning rates $\eta_s$, by $\lambda\, V(\eta, \mu)$, where
# $V = \sum_s \eta_s (1 + \mu \nu_s)$ with $\nu_s = \mu \nu_{s-1} + 1$, $\nu_0 = 0$ (torch's
# momentum buffer for a unit gradient), is the displacement per unit gradient
# (`prunelib.strength.sgd_displacement`). Once the momentum has built up
# $V \approx \sum_s \eta_s / (1 - \mu)$; on a short cosine schedule the lr falls while the
# buffer builds, so that formula overstates $V$. Compare both scales (the full scale's
# schedule is the paper's, on the 45k training images left beside the held-out ones):

# %%
def phase_displacement(s) -> tuple[list[float], float]:
    """Learning rates of scale `s`'s sparse phase, and V: SGD's displacement per unit gradient."""
    steps_per_epoch = math.ceil((s.subset or 50_000 - s.holdout) / s.batch_size)
    ctx = Context(xb1, epochs=s.reg_epochs, lr=s.reg_lr, schedule=s.schedule)
    lrs = strength.phase_lrs(ctx, steps_per_epoch)
    return lrs, strength.sgd_displacement(lrs, ctx.momentum)


groups_base = pl.channel_groups(base, xb1)
probe = pl.methods.get("ns")                          # only to read the baseline's |γ|
probe.ctx = Context(xb1, train_loader=data.train, device=DEVICE, epochs=SC.reg_epochs,
                    lr=SC.reg_lr, weight_decay=SC.weight_decay, schedule=SC.schedule)
probe_model = probe.attach(copy.deepcopy(base), groups_base)
gamma0 = probe.scores(probe_model)                    # {group: |γ| of its channels}
gam = torch.cat(list(gamma0.values())).cpu()
disp = {name: phase_displacement(s) for name, s in SCALES.items()}
for name, (lrs, V) in disp.items():
    print(f"{name:5s}: {len(lrs):6d} steps, sum of lr {sum(lrs):8.2f}, V = {V:9.2f} "
          f"(V / sum of lr = {V / sum(lrs):.2f}; 1/(1-mu) = 10);  reach of λ=1e-5: {1e-5 * V:.2e}")
print(f"median |γ| of the prunable BNs of the baseline: {float(gam.median()):.3f}; per unit of "
      f"lr, weight decay pulls it by {SC.weight_decay * float(gam.median()):.1e}, "
      f"{SC.weight_decay * float(gam.median()) / 1e-5:.0f}x the pull of λ=1e-5")
lrs_here, V_here = disp[SCALE]
assert len(lrs_here) == math.ceil(SC.reg_epochs * len(data.train))     # the phase's own steps
assert abs(disp["full"][1] / sum(disp["full"][0]) - 10) < 0.01       # momentum at steady state
assert disp["quick"][1] < 10 * sum(disp["quick"][0])                  # short phase: less
assert 1e-5 * disp["quick"][1] < 0.01 * float(gam.median())           # the paper's λ: nothing

# %% [markdown]
# Over its own schedule, the paper's λ can move a γ by about 0.6 — more than the median |γ|
# of the baseline's prunable channels: every weak γ can be driven to zero. At the quick scale
# the same λ reaches about $10^{-4}$, invisible next to γ values of order 0.1–1 and far less
# than what weight decay does anyway: "NS" would be the magnitude-of-γ criterion applied to an
# unregularized network. So at every scale but 'full' the book derives the strength from the
# schedule **and the target** (`prunelib.strength`, the *target-drift* rule):
#
# $$\lambda\, V = \text{margin}\cdot D, \qquad
#   D = Q_{0.9}\big(\{|\gamma_c| : c \in \mathcal{C}_\text{rm}\}\big),$$
#
# where $\mathcal{C}_\text{rm}$ is the set of channels the budget would remove if the
# baseline's |γ| were ranked now (the channels the penalty must reach to meet the budget),
# $Q_{0.9}$ the 0.9-quantile (robust to a few outliers) and the margin 2 (the task gradient
# pushes back on γ; chapter 4's group norms of conv rows that feed a BN get margin 1, since
# nothing pushes back along such a row). Why the target: the more the budget removes, the
# further up the |γ| distribution the removed channels reach. A rule that ignores the target — the book's
# earlier "reach = the 10% quantile of all prunable |γ|" — is the same for a 20% and a 65%
# cut, and leaves most of the channels a 50% budget removes outside the penalty's reach.
# Computed on the baseline, with `strength.target_drift` (no training) and by hand from NS's
# own ranking (`select` with its scores):

# %%
D_old = float(torch.quantile(gam, 0.1))               # the old rule: ignores the target
drift_rows = {}
for target in DRIFT_TARGETS:
    rec = strength.target_drift(pl.methods.get("ns"), base, groups_base, Budget(macs=target),
                                probe.ctx, SC.strength_quantile, SC.strength_margin)
    keep = probe.select(probe_model, Budget(macs=target), scores=gamma0)
    gone = torch.cat([v[~torch.isin(torch.arange(len(v)), keep[i].cpu())].cpu()
                      for i, v in gamma0.items()])
    drift_rows[target] = (rec, gone)
    reach_new = float((gone <= SC.strength_margin * rec["D"]).float().mean())
    reach_old = float((gone <= D_old).float().mean())
    print(f"target {target:4.2f} of the MACs: removes {rec['removed']:3d} of {rec['prunable']} "
          f"prunable channels;  D = {rec['D']:.3f},  λ = {rec['params']['lam']:.4f};  removed "
          f"channels within reach: rule {reach_new:4.0%}, old rule (reach {D_old:.3f}) "
          f"{reach_old:4.0%}")
Ds = [drift_rows[t][0]["D"] for t in DRIFT_TARGETS]
rec50, gone50 = drift_rows.get(SC.target_macs, (None, None))
assert rec50 is not None, "DRIFT_TARGETS must contain the scale's target"
assert all(abs(float(torch.quantile(g, SC.strength_quantile)) - r["D"]) < 1e-6
           for r, g in drift_rows.values())                 # the same D, by hand
assert all(len(g) == r["removed"] for r, g in drift_rows.values())
assert all(a <= b for a, b in zip(Ds, Ds[1:]))              # D grows with what is removed
assert float((gone50 <= D_old).float().mean()) < 0.5        # old rule: most out of reach
assert abs(rec50["params"]["lam"] * rec50["unit"] - SC.strength_margin * rec50["D"]) < 1e-9
assert abs(rec50["unit"] - V_here) < 1e-9 * V_here          # unit = V of this phase
del probe_model

# %% [markdown]
# The reach the rule gives the quick scale, $2D \approx 0.65$, is close to the paper's reach
# over its full schedule (about 0.6, above): the rule does at the quick scale roughly what the
# paper's λ does at full length, for this target. `run` applies it at every scale but 'full'
# to a method whose strength parameters are still the constructor defaults (the papers'
# values), and writes what it did into `result["strength"]`; a method built with an explicit
# λ keeps it. At the full scale the paper's $10^{-5}$ is used.
#
# ### The runs
#
# L1 twice (residual policy `'internal'`, the default, and `'coupled'`), and NS with its
# defaults, so that the strength rule sizes λ. `on_sparse` keeps a copy of NS's model at the
# end of its sparse phase, for the γ histogram below.

# %%
l1 = pl.methods.get("l1")
l1_coupled = pl.methods.get("l1", residual="coupled")     # also prunes the residual trunk
ns = pl.methods.get("ns")                                 # defaults: λ from the strength rule
assert l1_coupled.residual == "coupled" and l1.residual == "internal"
sparse = {}


def keep_sparse(model: nn.Module, method) -> None:
    """on_sparse callback: keep the model as it is at the end of the sparse phase."""
    sparse["model"] = copy.deepcopy(model)


common = dict(scale=SCALE, device=DEVICE, dense_accuracy=base_acc)
t0 = time.time()
_, res_l1 = run(l1, base, data, **common)
_, res_l1c = run(l1_coupled, base, data, **common)
_, res_ns = run(ns, base, data, on_sparse=keep_sparse, **common)
print(f"three runs: {time.time() - t0:.0f} s")
results = {"L1 (internal)": res_l1, "L1 (coupled)": res_l1c, "NS": res_ns}
print(table(results))
print(f"latency: median ms of the pruned model on {DEVICE}, this machine, now; dense: "
      f"{res_l1['latency']['batch1']['dense_ms']:.2f} ms@1, "
      f"{res_l1['latency']['batch64']['dense_ms']:.2f} ms@64")
print("NS strength:", {k: (round(v, 5) if isinstance(v, float) else v)
                       for k, v in res_ns["strength"].items()})
for r in results.values():
    assert r["pruned"]["macs_ratio"] <= SC.target_macs + 1e-9         # the budget is met
    assert r["pruned"]["macs_ratio"] > SC.target_macs - 0.05          # ... and not overshot
    assert r["pruned"]["params"] < r["dense"]["params"]
    assert r["accuracy"]["dense"] == base_acc and r["test_images"] == n_test
    assert r["accuracy"]["finetuned"] > 20.0                          # training worked at all
    assert r["settings"]["reg_epochs"] == SC.reg_epochs               # the scale's protocol
for r in (res_l1, res_l1c):
    assert r["accuracy"]["regularized"] == r["accuracy"]["dense"]     # l1: no sparse phase
    assert r["strength"]["rule"] == "method"                          # l1 has no strength
if SCALE != "full":
    assert res_ns["strength"]["rule"] == "target drift"
    assert abs(res_ns["strength"]["params"]["lam"] - rec50["params"]["lam"]) < 1e-9
    assert ns.lam == res_ns["strength"]["params"]["lam"]
else:
    assert ns.lam == 1e-5                                             # the paper's value

# %%
fig, ax = plt.subplots(2, 1, figsize=(10, 7.5))
phase_figure(results, ax=ax[0])
width_figure(results, ax=ax[1], title="output channels of every layer after removal")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Reading the table.** *sparse* is the accuracy at the end of the sparse phase (for L1 it is
# the dense model), *removed* right after the channels are physically removed, *recal.* after
# the BN statistics of the removed model are re-estimated (no weight changes), *tuned* after
# fine-tuning. A regularizer earns its name when *removed* stays close to *sparse*: the
# channels it removed were already nearly silent. The table's last line gives the binomial
# standard error of one accuracy (differences between runs on the same images are less noisy
# than that, but seed-to-seed differences of training are not in it at all).
#
# **Why does accuracy collapse right after removal, and what does recalibration tell?** A
# removed channel takes away what it sent to the next layer. If that was a constant — a
# channel with $\gamma_c \approx 0$ outputs $\mathrm{relu}(\beta_c)$ whatever the input — the
# next conv loses a constant input, the mean its BatchNorm sees shifts, and the stored
# statistics $m_c, v_c$ are stale: every later layer is misnormalized, although nothing the
# network computes was lost. Re-estimating $m_c, v_c$ repairs exactly that. If the removed
# channels carried signal, no statistics can bring it back: the function itself is damaged,
# and only training repairs it. So the gap *recal. − removed* measures the stale statistics,
# and *sparse − recal.* what the removal destroyed:

# %%
for label, r in (("L1 (internal)", res_l1), ("NS", res_ns)):
    a = r["accuracy"]
    se = standard_error(a["regularized"], n_test)
    stale, destroyed = a["recalibrated"] - a["removed"], a["regularized"] - a["recalibrated"]
    print(f"{label:13s}: sparse {a['regularized']:5.1f} -> removed {a['removed']:5.1f} -> recal. "
          f"{a['recalibrated']:5.1f};  stale statistics (recal. - removed) {stale:+5.1f}, "
          f"destroyed (sparse - recal.) {destroyed:+5.1f}"
          + ("  (recal. above sparse: nothing destroyed)" if destroyed < 0 else
             "  (within one standard error: nothing destroyed)" if destroyed < se else ""))
print(f"one standard error at these accuracies: {standard_error(50.0, n_test):.2f} points at "
      f"50%, {standard_error(90.0, n_test):.2f} at 90%")
assert all(0 <= r["accuracy"][p] <= 100 for r in results.values() for p in r["accuracy"])

# %% [markdown]
# For **L1** the collapse is large and recalibration gives back only part of it: the
# smallest-norm filters of a trained network are small, not silent, so much of what they
# computed is gone, and fine-tuning has to rebuild it. For **NS** the penalty has pushed the
# removed channels' γ towards zero, so what they still sent is close to the constant
# $\mathrm{relu}(\beta_c)$: removal destroys little, and whatever it costs is stale
# statistics. Recalibration can even lift the removed model above *sparse*: the running
# statistics that BatchNorm averaged during a strong sparse phase lag behind weights that kept
# changing under them, so the sparse model's own statistics were stale too. How much removal
# costs depends on how close to zero the removed γ came, and on their β (a channel with
# $\gamma_c \approx 0$ and $\beta_c \le 0$ sends exactly nothing through its ReLU) — both read
# off the model at the end of the sparse phase (kept by `on_sparse`). The γ of the prunable
# BatchNorms (the first BN of every block) before and after NS's sparse phase; the dashed line
# marks the largest |γ| that the budget removed (the lowest |γ| network-wide, but
# always 10% of every group kept):

# %%
sparse_model = sparse["model"]
keep_ns = ns.select(sparse_model, BUDGET)
s_after = {i: v.cpu() for i, v in ns.scores(sparse_model).items()}
removed = {i: ~torch.isin(torch.arange(len(s_after[i])), k.cpu()) for i, k in keep_ns.items()}
cut = max(float(s_after[i][r].max()) for i, r in removed.items() if r.any())
after = torch.cat(list(s_after.values()))
const = []                                  # relu(β) of the removed channels: what they sent
for i, r in removed.items():
    bn = ns.all_groups[i].bns()[0]
    beta = sparse_model.get_submodule(bn.module).bias.detach().cpu()[bn.idx[:, 0]]
    const.append(beta[r].clamp_min(0))
const = torch.cat(const)
gone_gamma = torch.cat([s_after[i][r] for i, r in removed.items()])
fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
bins = np.linspace(0, float(max(gam.max(), after.max())), 50)
ax[0].hist(gam.numpy(), bins=bins, alpha=0.6, label="baseline")
ax[0].hist(after.numpy(), bins=bins, alpha=0.6, label=f"after NS sparse phase (λ={ns.lam:.3g})")
ax[0].axvline(cut, color="k", ls="--", lw=1, label="largest removed |γ|")
ax[0].set_xlabel("|γ| of prunable channels")
ax[0].legend(fontsize=8)
ax[1].scatter(gone_gamma.numpy(), const.numpy(), s=6)
ax[1].set_xlabel("|γ| of a removed channel (end of sparse phase)")
ax[1].set_ylabel("relu(β): its constant output at γ = 0")
fig.tight_layout()
plt.show()
print(f"median |γ|: baseline {float(gam.median()):.3f}, after sparse phase "
      f"{float(after.median()):.3f};  removed by NS: {int(sum(r.sum() for r in removed.values()))} "
      f"of {len(after)} channels, largest removed |γ| {cut:.2e}, median "
      f"{float(gone_gamma.median()):.2e}")
print(f"removed channels with relu(β) > 0.01: {int((const > 0.01).sum())}; largest relu(β) "
      f"{float(const.max()):.3f}")
assert len(after) == len(gam) == sum(g.size for g in groups20 if not g.coupled)
assert float(after.median()) < float(gam.median())              # the penalty shrank γ
assert set(keep_ns) == set(s_after)                              # only internal groups
assert sum(int(r.sum()) for r in removed.values()) == sum(
    res_ns["dense_widths"][n] - res_ns["widths"][n] for n in res_ns["widths"])  # same removal

# %% [markdown]
# ### Magnitude per layer, or one global ranking?
#
# Li et al. prune every layer by the same fraction; the natural-looking alternative, one
# global ranking of the filter norms $\|W_j\|_1$ across layers (`'l1_global'`), is biased by
# the fan-in: a filter has $c_\text{in} k^2$ weights, so its L1 norm grows with the width of
# the layer it reads (at He initialization about as $\sqrt{c_\text{in} k^2}$). The global
# ranking then removes the narrow early layers first. No training is needed to see it: attach
# `'l1_global'` to the baseline and `finish` it with the same budget, and compare with the
# widths the `'l1'` run kept (`res["widths"]`):

# %%
l1g = pl.methods.get("l1_global")
l1g.ctx = Context(xb1)
g_model = copy.deepcopy(base)
g_model = l1g.attach(g_model, pl.channel_groups(g_model, xb1))     # attach first, then finish
g_pruned = l1g.finish(g_model, BUDGET)
w_global = widths(g_pruned)
w_l1, w_dense = res_l1["widths"], res_l1["dense_widths"]
print(f"{'block conv1':15s} {'fan-in':>6s} {'mean ||W_j||_1':>14s} {'dense':>5s} "
      f"{'l1':>4s} {'l1_global':>9s}")
block_convs = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
for n in block_convs:
    w = base.get_submodule(n).weight.detach()
    print(f"{n:15s} {w[0].numel():6d} {float(w.abs().sum((1, 2, 3)).mean()):14.2f} "
          f"{w_dense[n]:5d} {w_l1[n]:4d} {w_global[n]:9d}")
print(f"l1: one rate {l1.rate:.3f} in every internal group")
kept = {s: (sum(w_l1[n] for n in block_convs if n.startswith(f"layer{s}")),
            sum(w_global[n] for n in block_convs if n.startswith(f"layer{s}")),
            sum(w_dense[n] for n in block_convs if n.startswith(f"layer{s}"))) for s in (1, 3)}
print("kept fraction of stage 1 / stage 3 block channels: l1 "
      f"{kept[1][0] / kept[1][2]:.2f} / {kept[3][0] / kept[3][2]:.2f}, l1_global "
      f"{kept[1][1] / kept[1][2]:.2f} / {kept[3][1] / kept[3][2]:.2f}")
for s in (1, 2, 3):
    assert len({w_l1[n] for n in block_convs if n.startswith(f"layer{s}")}) == 1  # one rate
assert kept[1][1] / kept[1][2] < kept[3][1] / kept[3][2]      # global: stage 1 loses most
assert pl.count(g_pruned, xb1)[0] <= SC.target_macs * base_macs * (1 + 1e-9)   # budget met
del g_model, g_pruned

# %% [markdown]
# ### The residual policy decides how deep a budget cuts
#
# With `'internal'` the trunk keeps all its channels, so the 50% MACs budget must come from
# the block-internal channels alone: about half of every one of them goes. With `'coupled'`
# the three trunk groups can be pruned too; since a trunk channel appears in every block of
# its stages, removing it saves MACs in many layers at once, and a much smaller common rate
# meets the same budget — the cut is spread over the whole network (the lower panel of the
# figure above):

# %%
trunk_convs = ["conv1", "layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"]
for label, r, m in (("internal", res_l1, l1), ("coupled", res_l1c, l1_coupled)):
    print(f"L1 {label:8s}: rate {m.rate:.3f};  trunk widths "
          + ", ".join(f"{n} {r['widths'][n]}/{r['dense_widths'][n]}" for n in trunk_convs)
          + ";  block conv1s " + " ".join(str(r["widths"][n]) for n in block_convs))
assert all(res_l1["widths"][n] == res_l1["dense_widths"][n] for n in trunk_convs)
assert res_l1c["widths"]["conv1"] < res_l1c["dense_widths"]["conv1"]    # the trunk narrowed
assert l1_coupled.rate < l1.rate                                         # a smaller rate
assert res_l1c["hparams"]["residual"] == "coupled"

# %% [markdown]
# Cutting the trunk costs more at removal (every block writes into it, so a removed trunk
# channel is missing from many layers at once): *removed* and *recal.* are lower for
# `'coupled'` than for `'internal'` at the same MACs. After fine-tuning the two policies were
# within about a point of each other at the time of writing (quick scale, seed 0).
#
# **What NS pays for its cheap removal.** The removal is cheap because the sparse phase has
# already paid: with the reach the rule gives and NS's official `penalize='all'` (every BN's
# γ is penalized, the trunk's too, although only the internal channels can be removed) the
# network loses many points *before* anything is removed, and two epochs of fine-tuning do not
# win them back — at the time of writing NS ended several points below L1 in the *tuned*
# column. The papers' 160 epochs let the network adapt while its γ shrink; at the quick scale
# the comparison says what a regularizer achieves in two epochs, not which method is better.
# Chapter 2 varies what NS penalizes (`penalize='prunable'`) and compares the BN-based family
# under this protocol.
#
# At the quick scale, two epochs on 10k images are far from the papers' 160 + 160 epochs on
# 45–50k, so the fine-tuned accuracies sit well below a fully trained run; compare methods with
# each other at the same scale, not with the papers' numbers.
#
# ## Summary
#
# * Structured pruning removes channels — conv rows, BN entries and the consumers' input
#   slices — and yields a smaller dense network; unstructured zeros leave dense MACs and latency
#   unchanged.
# * Residual additions couple channels into groups; the option-A shortcut of CIFAR ResNets
#   chains the three stages' streams: its zero-padded channels are new, prunable trunk channels,
#   and pruning them narrows the pad (three coupled groups of 16, 16 and 32 in ResNet-20).
# * MACs count work; latency must be measured, and it improves less than MACs on small models.
# * Subgradient updates never reach exactly zero (a threshold is needed), and neither do
#   gradient steps on a smooth penalty (GREG); proximal and projection updates produce exact
#   zeros, and group versions produce structured zeros. The group lasso of prunelib's methods
#   is the unweighted $\sum_g \|w_g\|$, which penalizes large groups less per coefficient than
#   Yuan & Lin's $\sum_g \sqrt{p_g}\|w_g\|$.
# * The protocol is one loop (`fit`, written out above) with the method's hooks, then removal,
#   BN recalibration and fine-tuning; every setting comes from `SCALES[SCALE]`.
# * A paper's λ is tuned for its schedule: at the quick scale NS's $10^{-5}$ would move γ by
#   about $10^{-4}$. The book's strength rule sets the reach $\lambda V$ to twice the
#   0.9-quantile of the magnitudes the *budget* removes; a rule that ignores the target leaves
#   most removed channels out of reach. `result["strength"]` records what was used.
# * *recal.* versus *removed* tells stale BN statistics (repaired without training) from a
#   destroyed function (only training repairs it): L1's collapse is mostly the latter.
# * The magnitude baseline is Li et al.'s per-layer rate; a global ranking of filter norms is
#   biased by the fan-in and empties the early layers. The residual policy decides how deep a
#   budget cuts: 'internal' halves the blocks, 'coupled' spreads the cut over the trunk.
#
# ## Exercises
#
# Each exercise is a code cell with a solution between `### BEGIN SOLUTION` and
# `### END SOLUTION` markers, followed by a check cell whose first line names the exercise and
# its points. `python tools/make_student.py` writes a student version with the solutions
# replaced by `raise NotImplementedError()`, and `tools/grade.py` grades it (see the preface).
# Exercises only rely on the setup cell at the top of the chapter.
#
# **Exercise 1 — derivation: nonnegative soft-thresholding.** SSS and GAL keep their channel scales
# nonnegative: their proximal step solves $\;\arg\min_{u \ge 0}\; \tfrac12 (u - z)^2 + \theta\,u$.
# Derive the closed form (write the optimality condition $0 \in u - z + \theta + N_{[0,\infty)}(u)$
# with the normal cone of Section 4) and implement it elementwise for a tensor `z` and a threshold
# `theta >= 0`. The check uses the optimality conditions, not a reference implementation.

# %%
def nonneg_soft_threshold(z: torch.Tensor, theta: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    return (z - theta).clamp_min(0)
    ### END SOLUTION


# %%
# check: ch1.nonneg-prox (3 points)
from prunelib.checks import names_used as _names  # what an answer calls  # noqa: E402

assert not _names(nonneg_soft_threshold) & {"soft_threshold", "methods"}, \
    "derive it: no prunelib thresholding function"
_z = torch.linspace(-3, 3, 61, dtype=torch.float64)
_u = nonneg_soft_threshold(_z, 0.7)
assert _u.shape == _z.shape and _u.dtype == _z.dtype and (_u >= 0).all()
_pos = _u > 0
assert torch.allclose(_u[_pos], _z[_pos] - 0.7)              # u > 0: u - z + theta = 0
assert (_z[~_pos] <= 0.7 + 1e-12).all()                      # u = 0: z - theta in N(0) = (-inf, 0]
assert int((~_pos).sum()) == int((_z <= 0.7).sum())          # exact zeros, all of them
assert torch.equal(nonneg_soft_threshold(_z, 0.0), _z.clamp_min(0))

# %% [markdown]
# **Exercise 2 — implementation: MACs of a convolution by hand.** Return the multiply-accumulates
# per image of `conv` (an `nn.Conv2d` with integer `padding`) on an `h x w` input; mind stride,
# dilation and groups. The check compares with `pl.count` (so your answer may not call it).

# %%
def conv_macs(conv: nn.Conv2d, h: int, w: int) -> int:
    ### BEGIN SOLUTION
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    (ph, pw), (dh, dw) = conv.padding, conv.dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return ho * wo * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    ### END SOLUTION


# %%
# check: ch1.conv-macs (2 points)
from prunelib.checks import names_used as _names  # what an answer calls  # noqa: E402

assert not _names(conv_macs) & {"count", "layer_macs", "flop_counter", "measure"}, \
    "count the MACs by hand, not with prunelib or torch's counter"
for _cfg in [dict(in_channels=16, out_channels=32, kernel_size=3, padding=1),
             dict(in_channels=32, out_channels=32, kernel_size=3, stride=2, padding=1, groups=32),
             dict(in_channels=12, out_channels=18, kernel_size=5, stride=2, padding=2, groups=3),
             dict(in_channels=8, out_channels=24, kernel_size=(1, 3), dilation=2, padding=0)]:
    _c = nn.Conv2d(**_cfg)
    assert conv_macs(_c, 31, 32) == pl.count(_c, torch.zeros(1, _c.in_channels, 31, 32))[0], _cfg

# %% [markdown]
# **Exercise 3 — implementation: which group owns a layer's output channels?** Given the groups of a
# model and the name of a conv or linear layer, return the index of the first group (lowest index)
# that holds some of its output channels (a `conv2` of stage 3 writes channels of all three trunk
# groups), or `None` if they are in no group (frozen). The check removes one channel of the group
# you return and verifies that the layer's output shrinks.

# %%
def group_of(groups: list, layer: str) -> int | None:
    ### BEGIN SOLUTION
    for g in groups:
        if any(m.module == layer and m.param == "weight" for m in g.by_role("out")):
            return g.index
    return None
    ### END SOLUTION


# %%
# check: ch1.group-of (2 points)
_m = get_model("resnet20")
_gs = pl.channel_groups(_m, torch.randn(1, 3, 32, 32))
for _name in ["conv1", "layer1.0.conv1", "layer2.1.conv2", "layer3.2.conv1"]:
    _i = group_of(_gs, _name)
    assert _i is not None, _name
    _small = pl.remove_channels(_m, _gs, {_i: torch.arange(1, _gs[_i].size)})
    _before = _m.get_submodule(_name).out_channels
    assert _small.get_submodule(_name).out_channels == _before - 1, _name
assert group_of(_gs, "fc") is None                                       # classifier: frozen
assert group_of(_gs, "layer1.0.conv2") == group_of(_gs, "layer3.0.conv2")  # option A couples
assert group_of(_gs, "layer1.0.conv1") != group_of(_gs, "layer1.1.conv1")

# %% [markdown]
# **Exercise 4 — derivation: what momentum makes of a constant push.** Section 6 measured the
# reach of a penalty with $V = \sum_s \eta_s (1 + \mu\nu_s)$, $\nu_s = \mu\nu_{s-1} + 1$,
# $\nu_0 = 0$, over the steps $s = 1, \dots, S$ of a phase. For a constant learning rate
# $\eta$, solve the recursion for $\nu_s$, sum the two geometric series, and implement
# $V(\eta, \mu, S)$ in closed form (no loop over the steps, no `prunelib.strength`). Then read
# your formula: as $S \to \infty$, $V$ stays a constant below $\eta S / (1 - \mu)$. How many
# steps at the steady-state push $\eta / (1 - \mu)$ does the build-up of the momentum cost at
# $\mu = 0.9$, and does that matter for a sparse phase of a few hundred steps? The check runs
# torch's SGD (Nesterov, as `fit`) on one parameter with a constant unit gradient.

# %%
def constant_lr_reach(eta: float, mu: float, steps: int) -> float:
    """V = sum over s = 1..S of eta * (1 + mu * nu_s), in closed form (S = steps)."""
    ### BEGIN SOLUTION
    return eta * (steps / (1 - mu) - mu ** 2 * (1 - mu ** steps) / (1 - mu) ** 2)
    ### END SOLUTION


# %%
# check: ch1.momentum-reach (3 points)
from prunelib.checks import names_used as _names  # what an answer calls  # noqa: E402

assert not _names(constant_lr_reach) & {"range", "arange", "cumsum", "strength",
                                        "sgd_displacement", "optim", "SGD"}, \
    "a closed form: no loop over the steps, no optimizer, no prunelib.strength"
for _eta, _mu in ((0.05, 0.9), (0.3, 0.5), (0.1, 0.0)):
    _p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    _opt = torch.optim.SGD([_p], lr=_eta, momentum=_mu, nesterov=_mu > 0)
    for _s in range(1, 201):
        _p.grad = torch.ones_like(_p)                     # a constant unit gradient
        _opt.step()
        if _s in (1, 2, 5, 50, 200):                      # the parameter moved by -V
            _v = constant_lr_reach(_eta, _mu, _s)
            assert abs(_v + float(_p)) <= 1e-9 * (1 + abs(_v)), (_eta, _mu, _s)

# %% [markdown]
# **Exercise 5 — experiment: what is one channel worth?** For every group of ResNet-20 (option
# A), remove one channel with `pl.remove_channels` and measure with `pl.count` how many MACs
# per image that saves; return `{group index: MACs saved}`. Then read the numbers: how many
# internal channels of stage 1 is one channel of the stage-1 trunk group worth, and why (in how
# many layers does it appear)? What does that say about the rates of L1 'internal' and
# 'coupled' in Section 6? The check recomputes every saving from the MACs formula of Section 1,
# layer by layer.

# %%
def macs_per_channel(model: nn.Module, example: torch.Tensor) -> dict[int, int]:
    """{group index: MACs per image saved by removing one channel of that group}."""
    ### BEGIN SOLUTION
    groups = pl.channel_groups(model, example)
    dense = pl.count(model, example)[0]
    saved = {}
    for g in groups:
        small = pl.remove_channels(model, groups, {g.index: torch.arange(1, g.size)})
        saved[g.index] = dense - pl.count(small, example)[0]
    return saved
    ### END SOLUTION


# %%
# check: ch1.channel-worth (3 points)
_m, _x = get_model("resnet20"), torch.randn(1, 3, 32, 32)
_pos = {}                                  # output positions P of every conv and linear layer
for _n, _mod in _m.named_modules():
    if isinstance(_mod, (nn.Conv2d, nn.Linear)):
        _mod.register_forward_hook(lambda mod, i, o, n=_n: _pos.update({n: o[0, 0].numel()}))
with torch.no_grad():
    _m(_x)
_gs = pl.channel_groups(_m, _x)
_want = {}
for _g in _gs:                             # P (c_in / G) k^2 per output row, P c_out k^2 per input
    _want[_g.index] = sum(
        _pos[_b.module] * (_b.tensor(_m)[0] if _b.role == "out" else _b.tensor(_m)[:, 0]).numel()
        for _b in _g.members if _b.param == "weight" and _b.role in ("out", "in"))
_got = macs_per_channel(get_model("resnet20"), torch.randn(1, 3, 32, 32))
assert _got == _want, {i: (_got.get(i), v) for i, v in _want.items()}
_trunk = next(g.index for g in _gs if "conv1" in g.sources)           # the stage-1 stream
assert _got[_trunk] > 5 * max(v for i, v in _got.items()
                             if not _gs[i].coupled)   # worth more than 5 internal channels

# %% [markdown]
# **Going further** (no check): (a) rerun NS with the paper's λ at the quick scale,
# `run(pl.methods.get("ns"), ..., strength={"lam": 1e-5})`, and compare the γ histograms and
# the *removed* column; then try `strength={"lam": 0.9 * ns.lam}` and watch how sensitive the
# removal is to how close the removed γ get to zero (and what recalibration gives back);
# (b) let NS also prune the coupled trunk (`pl.methods.get("ns", residual="coupled")`) and
# compare MACs, latency and accuracy with L1 (coupled); (c) rerun the L1 runs with
# `restore_norms=False` (a scale override of `run`) and compare the *tuned* column; (d) in
# Section 4, replace the constant step of the subgradient method by $\eta_s = \eta/\sqrt{s}$
# and watch the band around zero shrink — still without exact zeros.
# %%
print(f"chapter run time: {time.time() - T_START:.0f} s at scale {SCALE} on {DEVICE}")

# %% [markdown]
# ## References
#
# * Y. He, L. Xiao, "Structured Pruning for Deep Convolutional Neural Networks: A Survey",
#   IEEE TPAMI 46(5), 2024 (arXiv:2303.00566).
# * K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
#   (CIFAR ResNets and the option-A shortcut, Sec. 4.2).
# * S. Han, J. Pool, J. Tran, W. Dally, "Learning both Weights and Connections for Efficient
#   Neural Networks", NeurIPS 2015 (unstructured magnitude pruning).
# * H. Li, A. Kadav, I. Durdanovic, H. Samet, H. P. Graf, "Pruning Filters for Efficient
#   ConvNets", ICLR 2017 (L1 filter magnitude).
# * Z. Liu, J. Li, Z. Shen, G. Huang, S. Yan, C. Zhang, "Learning Efficient Convolutional
#   Networks through Network Slimming", ICCV 2017; code: github.com/Eric-mingjie/network-slimming.
# * N. Parikh, S. Boyd, "Proximal Algorithms", Foundations and Trends in Optimization 1(3), 2014.
# * A. Beck, M. Teboulle, "A Fast Iterative Shrinkage-Thresholding Algorithm for Linear Inverse
#   Problems", SIAM J. Imaging Sciences 2(1), 2009 (ISTA / FISTA).
# * M. Yuan, Y. Lin, "Model Selection and Estimation in Regression with Grouped Variables",
#   J. Royal Statistical Society B 68(1), 2006 (group lasso).
# * J. Duchi, S. Shalev-Shwartz, Y. Singer, T. Chandra, "Efficient Projections onto the
#   l1-Ball for Learning in High Dimensions", ICML 2008.
# * W. Wen, C. Wu, Y. Wang, Y. Chen, H. Li, "Learning Structured Sparsity in Deep Neural
#   Networks", NeurIPS 2016 (SSL).
# * J. Ye, X. Lu, Z. Lin, J. Z. Wang, "Rethinking the Smaller-Norm-Less-Informative Assumption
#   in Channel Pruning of Convolution Layers", ICLR 2018 (RSNLI, ISTA on γ).
# * T. Chen et al., "Only Train Once: A One-Shot Neural Network Training and Pruning
#   Framework", NeurIPS 2021 (OTO, half-space projection).
