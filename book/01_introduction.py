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
# 4. derive and compare the four update rules that every regularization-based method of the
#    survey is built from: subgradient, proximal (soft-thresholding), group-lasso proximal and
#    projection — and say which ones produce exact zeros;
# 5. run the protocol of this book (dense baseline → sparse phase → removal → fine-tuning) on
#    real CIFAR-10 with the magnitude baseline and Network Slimming.
#
# **Run time** (whole chapter, `jupytext --to ipynb` + `pytest --nbval-lax --nbval-current-env`):
# quick scale, 2-core CPU shared with other jobs (load ≈ 5), torch 2.14.1: **1 min 40 s**, of
# which about 90 s are the two pipeline runs of Section 6. (While a training job held both
# cores the same run took 13.7 min.) Full scale: not measured here — it trains ResNet-20 for
# 2 × (160 + 160) epochs on all of CIFAR-10, a job for a GPU.
#
# Every knob lives in the setup cell below. `PRUNELIB_SCALE=quick` (default) runs in minutes on a
# laptop CPU: a 10k-image training subset and 2 + 2 epochs per method. `PRUNELIB_SCALE=full` uses
# the papers' schedules (160 + 160 epochs on all of CIFAR-10) and wants a GPU.

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

SCALE = os.environ.get("PRUNELIB_SCALE", "quick")
assert SCALE in ("quick", "full"), f"PRUNELIB_SCALE must be 'quick' or 'full', got {SCALE!r}"
QUICK = SCALE == "quick"
SEED = 0
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DATA_ROOT = os.environ.get("PRUNELIB_DATA")     # None: ~/.cache/prunelib (download allowed)
torch.manual_seed(SEED)
np.random.seed(SEED)
T_START = time.time()

#                      quick     full        what
TEST_SUBSET = 5_000 if QUICK else None      # test images for accuracies (None: all 10,000)
TARGET_MACS = 0.5                           # keep <= 50% of the dense MACs (both scales)
NS_LAM = 4e-2 if QUICK else 1e-5           # NS sparsity strength (Section 6 explains quick)
LAT_REPS = 10 if QUICK else 50              # timed passes per latency measurement (batch 1)
LAT_ROUNDS = 3                              # interleaved rounds; the best median is reported
TOY_STEPS = 400                             # iterations of the toy problem (Section 4)
print(f"scale={SCALE}  device={DEVICE}  torch={torch.__version__}  prunelib={pl.__version__}")

# %% [markdown]
# ## 1. Structured versus unstructured pruning
#
# A convolution with weight $W \in \mathbb{R}^{c_\text{out} \times c_\text{in} \times k \times k}$
# applied to an $h_\text{out} \times w_\text{out}$ output map costs
#
# $$\text{MACs} = h_\text{out}\, w_\text{out}\; c_\text{out}\; \frac{c_\text{in}}{g}\; k^2$$
#
# multiply-accumulates per image ($g$ = groups). **Unstructured** pruning sets individual
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
# $k$ of a group is one "coupled channel", present in every member (`prunelib.channel_groups`
# finds them by tracing the model with `torch.fx`).
#
# Residual networks add tensors: in $y = \mathrm{relu}(F(x) + x)$ channel $j$ of $F$'s last
# BatchNorm and channel $j$ of $x$ land in the same channel of $y$. Removing it from one
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
# so stage-1 channel $k$ becomes stage-2 channel $k + 8$, which becomes stage-3 channel
# $k + 8 + 16 = k + 24$: the stage-1 stream is one coupled group of 16 channels that runs
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
assert torch.equal(rows["layer2.0.conv2"], torch.arange(8, 24))      # k -> k + 8
assert torch.equal(rows["layer3.0.conv2"], torch.arange(24, 40))     # k -> k + 24
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
# $$\min_x\; f(x) + \lambda\, R(x),$$
#
# with $f$ the training loss and $R$ a sparsity-inducing penalty on channel-level quantities
# (BN scales γ, gates, or whole filter groups). $R$ is not differentiable at 0 — that is what
# makes it sparsify — so how the non-smooth part is handled matters. Four update rules, with
# step size $\eta$ and gradient $\nabla f(x)$:
#
# **Subgradient** (NS, SSL, PR, GREG): treat $\lambda\,\mathrm{sign}(x)$ as a gradient,
# $$x \leftarrow x - \eta\,\big(\nabla f(x) + \lambda\, \mathrm{sign}(x)\big).$$
# Near zero the sign flips from step to step and $x$ oscillates in a band of width
# $\sim\eta\lambda$: it gets small, but (almost surely) **never exactly zero**. Pruning then
# needs a threshold.
#
# **Proximal / soft-thresholding** (ISTA: RSNLI; accelerated variants: SSS's APG, GAL's FISTA):
# take a gradient step on $f$ only, then solve the penalty exactly,
# $$x \leftarrow \operatorname{prox}_{\eta\lambda|\cdot|}\big(z\big),\quad z = x - \eta\nabla f(x),
# \qquad \operatorname{prox}_{t|\cdot|}(z) = \arg\min_u \tfrac12 (u - z)^2 + t|u|
# = \mathrm{sign}(z)\,\max(|z| - t,\, 0).$$
# (Optimality: $0 \in u - z + t\,\partial|u|$; for $u \ne 0$ this gives
# $u = z - t\,\mathrm{sign}(u)$, and $u = 0$ is optimal exactly when $|z| \le t$.) Every
# coordinate with $|z| \le \eta\lambda$ becomes **exactly zero** — pruning is "detect the
# zeros".
#
# **Group lasso** (SSL, OICSR, OTO): $R(x) = \sum_g \|x_g\|_2$ over groups $g$ (e.g. all weights
# of one filter, or one coupled channel); its proximal operator shrinks whole groups,
# $$x_g \leftarrow \max\!\Big(0,\; 1 - \frac{\eta\lambda}{\|z_g\|_2}\Big)\, z_g,$$
# so a group is either kept (scaled down) or **exactly zero as a whole** — a structured zero.
#
# **Projection** (constraint form; PR clamps γ to $[0, a]$, OTO's half-space step projects a
# group to zero): replace the penalty by a constraint $x \in C$ and project after each step,
# $x \leftarrow \Pi_C(x - \eta\nabla f(x))$. For $C = \{\|x\|_1 \le \tau\}$ the projection is a
# soft-threshold whose level $\theta$ is chosen so that $\|x\|_1 = \tau$ (Duchi et al. 2008):
# again **exact zeros**, controlled by a budget $\tau$ instead of a price $\lambda$. By Lagrange
# duality, $\tau = \|x^\star_\lambda\|_1$ gives the same solution as the penalty $\lambda$.
#
# A least-squares toy makes the difference visible: $f(x) = \frac12\|Ax - b\|^2$ with 24
# coefficients in 6 groups of 4, of which two groups are active.

# %%
gen = torch.Generator().manual_seed(SEED)
n_obs, n_coef, gsz = 60, 24, 4
A = torch.randn(n_obs, n_coef, generator=gen, dtype=torch.float64) / math.sqrt(n_obs)
x_true = torch.zeros(n_coef, dtype=torch.float64)
x_true[:4] = torch.tensor([1.5, -1.0, 0.8, 1.2])
x_true[12:16] = torch.tensor([-0.7, 0.9, 0.5, -1.1])
b = A @ x_true + 0.05 * torch.randn(n_obs, generator=gen, dtype=torch.float64)
eta = 1.0 / torch.linalg.matrix_norm(A, ord=2).item() ** 2           # 1 / L
lam = 0.15


def grad_f(x: torch.Tensor) -> torch.Tensor:
    return A.T @ (A @ x - b)


def soft(z: torch.Tensor, t: float) -> torch.Tensor:
    return z.sign() * (z.abs() - t).clamp_min(0)


def group_soft(z: torch.Tensor, t: float) -> torch.Tensor:
    zg = z.view(-1, gsz)
    norm = zg.norm(dim=1, keepdim=True)
    return (zg * (1 - t / norm.clamp_min(1e-300)).clamp_min(0)).view(-1)


def project_l1(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Euclidean projection onto {||x||_1 <= tau} (Duchi et al. 2008), O(d log d)."""
    if z.abs().sum() <= tau:
        return z
    u = z.abs().sort(descending=True).values
    css = u.cumsum(0)
    k = torch.arange(1, len(u) + 1, dtype=z.dtype)
    rho = int(torch.nonzero(u > (css - tau) / k).max())
    return soft(z, float((css[rho] - tau) / (rho + 1)))


def iterate(step, steps: int = TOY_STEPS) -> torch.Tensor:
    x, path = torch.zeros(n_coef, dtype=torch.float64), []
    for _ in range(steps):
        x = step(x)
        path.append(x)
    return torch.stack(path)                                   # (steps, n_coef)


paths = {"subgradient": iterate(lambda x: x - eta * (grad_f(x) + lam * x.sign())),
         "proximal (ISTA)": iterate(lambda x: soft(x - eta * grad_f(x), eta * lam)),
         "group lasso prox": iterate(lambda x: group_soft(x - eta * grad_f(x), eta * lam))}
tau = float(paths["proximal (ISTA)"][-1].abs().sum())
paths["projection, ||x||_1 <= tau"] = iterate(lambda x: project_l1(x - eta * grad_f(x), tau))
for name, p in paths.items():
    print(f"{name:28s} exact zeros at the end: {int((p[-1] == 0).sum()):2d} / {n_coef}   "
          f"smallest |x|: {float(p[-1].abs().min()):.1e}")

# %%
fig, axes = plt.subplots(1, 5, figsize=(17, 3.2))
for ax, (name, p) in zip(axes, paths.items()):
    for j in range(n_coef):
        ax.plot(np.arange(1, len(p) + 1), p[:, j], color=f"C{j // gsz}", lw=0.9)
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
# projection with $\tau = \|x_\text{ISTA}\|_1$ lands on the ISTA solution.
# The asserts below check each final point against the optimality (KKT) conditions
# of its own problem — an oracle independent of the iterations:
# * lasso: $\nabla_i f(x) + \lambda\,\mathrm{sign}(x_i) = 0$ where $x_i \ne 0$ and
#   $|\nabla_i f(x)| \le \lambda$ where $x_i = 0$;
# * group lasso: $\nabla_g f(x) + \lambda\, x_g / \|x_g\| = 0$ where $x_g \ne 0$ and
#   $\|\nabla_g f(x)\| \le \lambda$ where $x_g = 0$.

# %%
x_sub, x_ista, x_grp, x_prj = (p[-1] for p in paths.values())
g_ista, g_grp = grad_f(x_ista), grad_f(x_grp)
nz = x_ista != 0
assert torch.allclose(g_ista[nz] + lam * x_ista[nz].sign(), torch.zeros(1, dtype=A.dtype),
                      atol=1e-6)
assert (g_ista[~nz].abs() <= lam + 1e-6).all() and 0 < int((~nz).sum()) < n_coef
gnorm = x_grp.view(-1, gsz).norm(dim=1)
on = gnorm > 0
kkt = g_grp.view(-1, gsz)[on] + lam * x_grp.view(-1, gsz)[on] / gnorm[on, None]
assert kkt.abs().max() < 1e-6
assert (g_grp.view(-1, gsz)[~on].norm(dim=1) <= lam + 1e-6).all()
assert ((x_grp.view(-1, gsz) == 0).all(1) | (x_grp.view(-1, gsz) != 0).all(1)).all()  # groups
assert torch.allclose(x_prj, x_ista, atol=1e-5)               # duality: same solution
assert int((x_sub == 0).sum()) == 0                            # never exactly zero ...
assert (x_sub[~nz].abs() < 2 * eta * lam).all()                # ... but within ~eta*lam of it
band = 2 * eta * lam                                           # a threshold above the band
assert torch.equal(x_sub.abs() > band, x_ista.abs() > band)    # finds the same large entries

# %% [markdown]
# Which rule each method of this book uses (details in the family chapters):
#
# * **subgradient / gradient edit** (no exact zeros, a threshold decides): NS
#   ($\lambda\,\mathrm{sign}\,\gamma$), SSL (group lasso), PR (autograd, then a clamp),
#   GREG (growing L2), ResRep (row lasso on compactors);
# * **proximal, soft-thresholding** (exact zeros): RSNLI (ISTA on γ), SSS (APG), GAL (FISTA);
# * **projection** (exact zeros): OTO (half-space projection of whole groups); PR's clamp of γ
#   to $[0, a]$ is a projection too, but onto a box that does not create zeros by itself.
#
# In `prunelib` the three places where a method can act are the hooks of
# `prunelib.methods.base.Method`: `loss_term` (a differentiable penalty), `after_backward`
# (edit gradients: the subgradient rules) and `after_step` (prox, clamp, projection).
#
# ## 5. The dense baseline
#
# Every experiment starts from the same dense ResNet-20 trained on CIFAR-10
# (`book/baselines/resnet20_cifar10.pt`, trained with `prunelib train`; `load_baseline` looks
# in the cache `$PRUNELIB_CACHE` first, then in the book, and trains one if neither exists).

# %%
import prunelib.methods  # noqa: E402  (the registry: pl.methods.get("ns", ...))
from prunelib.data import cifar10  # noqa: E402
from prunelib.pipeline import SCALES, load_baseline, run  # noqa: E402
from prunelib.select import Budget  # noqa: E402
from prunelib.train import evaluate, lr_factor  # noqa: E402

sc = SCALES[SCALE]
data = cifar10(root=DATA_ROOT, batch_size=sc.batch_size, subset=sc.subset, holdout=sc.holdout,
               test_subset=TEST_SUBSET, device=DEVICE, seed=SEED)
base, base_meta = load_baseline("resnet20", data, device=DEVICE, scale=SCALE)
base_acc = evaluate(base, data.test)
base_macs, base_params = pl.count(base, xb1)
print(f"baseline from {base_meta['path']}")
print(f"  trained {base_meta.get('epochs', '?')} epochs; top-1 on {data.test.num_images} test "
      f"images: {base_acc:.2f}%;  {base_macs / 1e6:.1f} M MACs, {base_params / 1e6:.3f} M params")
print(f"  training images for the sparse phase and fine-tuning: {data.train.num_images}")
assert base_acc > 50.0                # far above chance (10%): the right weights and data
assert (base_macs, base_params) == pl.count(get_model("resnet20").to(DEVICE), xb1)

# %% [markdown]
# ## 6. Two baselines end to end: magnitude (L1) and Network Slimming
#
# The protocol of the book (`prunelib.pipeline.run`), the same for every method:
# 1. **sparse phase**: train with the method's regularizer (`reg_epochs`);
# 2. **removal**: rank channels by the method's score and remove the lowest, globally, until
#    the MACs are at most `TARGET_MACS` of the dense model (`Budget(macs=0.5)`; every layer keeps
#    at least 10% of its channels);
# 3. **fine-tuning** of the smaller network (`ft_epochs`).
#
# **Magnitude** (Li et al. 2017, registered as `'l1'`) has no sparse phase: it scores filter $j$
# by $\|W_j\|_1$ and removes the smallest. **Network Slimming** (Liu et al. 2017, `'ns'`)
# trains with $\lambda \sum |\gamma|$ on every BN scale,
#
# $$L = \sum_{(x, y)} \ell(f(x; W), y) + \lambda \sum_{\gamma \in \Gamma} |\gamma|,$$
#
# implemented as in its official code by a subgradient edit after `backward()`:
# $\partial L / \partial \gamma \mathrel{+}= \lambda\,\mathrm{sign}(\gamma)$; channels are
# ranked by $|\gamma|$. Both use the residual policy `'internal'` here: only internal groups
# are pruned and the trunk keeps its width, as in NS's official ResNet code.
# From scratch, the NS update is two lines; it matches `prunelib`:

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
# ### Why λ must change at the quick scale
#
# The official NS code uses $\lambda = 10^{-5}$ for ResNets, with 160 epochs at lr 0.1. The
# penalty's direct effect on one γ is bounded by $\lambda \sum_t \eta_t / (1 - \mu)$ (every
# step moves γ by at most $\eta_t \lambda$, amplified at most $1/(1-\mu)$ by momentum $\mu$).
# Compare this budget at both scales, and with the shrinkage that weight decay already applies
# to γ ($\eta\, w_d\, |\gamma|$ per step):

# %%
def lr_sum(s) -> float:
    n_train = s.subset or 50_000 - s.holdout
    steps = math.ceil(s.reg_epochs * math.ceil(n_train / s.batch_size))
    return sum(s.reg_lr * lr_factor(t, steps, s.schedule) for t in range(steps))


gam = torch.cat([g.detach().abs().flatten() for n, g in base.named_parameters()
                 if n.endswith("bn1.weight") and "layer" in n])
for s in (SCALES["quick"], SCALES["full"]):
    drift = 1e-5 * lr_sum(s) / (1 - 0.9)
    print(f"{s.name:5s}: sum of lr = {lr_sum(s):8.2f};  max |Δγ| from λ=1e-5: {drift:.1e};  "
          f"median |γ| of the prunable BNs: {float(gam.median()):.2f}")
wd_ratio = sc.weight_decay * float(gam.median()) / 1e-5
print(f"per step, weight decay shrinks a median γ {wd_ratio:.0f}x more than λ=1e-5 does")
print(f"the full schedule sums {lr_sum(SCALES['full']) / lr_sum(SCALES['quick']):.0f}x more "
      f"learning rate than the quick one")
budget_paper = 1e-5 * lr_sum(SCALES["full"]) / (1 - 0.9)
budget_here = NS_LAM * lr_sum(sc) / (1 - 0.9)
print(f"this chapter uses λ = {NS_LAM:g} at the {SCALE} scale: max |Δγ| = {budget_here:.2f} "
      f"(the paper's λ and schedule: {budget_paper:.2f})")
assert 1e-5 * lr_sum(SCALES["quick"]) / (1 - 0.9) < 0.01 * float(gam.median())
assert budget_paper > 0.1 and 0.5 < budget_here / budget_paper < 2

# %% [markdown]
# At the quick scale the paper's λ could move a γ by at most about $2\cdot10^{-4}$ — invisible
# next to γ values of order 0.1–1, and a fraction of what weight decay does anyway; the "NS"
# run would be the magnitude-of-γ criterion applied to an unregularized network. The quick
# scale therefore uses a larger λ (setup cell), chosen so that the penalty has the same
# *budget* $\lambda \sum_t \eta_t / (1-\mu)$ as the paper's $10^{-5}$ over the paper's
# schedule (printed above): enough to push the weak γ all the way to zero within the 2-epoch
# sparse phase. This is a deviation from the paper, forced by a schedule thousands of times
# shorter in summed learning rate; the full scale uses $10^{-5}$. The price shows in the table
# below: squeezed into 2 epochs, the penalty also costs accuracy at the end of the sparse phase
# (a smaller λ costs less there but leaves γ nearly where it was, so removal then hurts as
# much as for the magnitude baseline; a much larger one leaves too little to fine-tune). Now run
# both methods:

# %%
BUDGET = Budget(macs=TARGET_MACS)
t0 = time.time()
_, res_l1 = run("l1", base, data, BUDGET, scale=SCALE, device=DEVICE, seed=SEED)
ns = pl.methods.get("ns", lam=NS_LAM)
_, res_ns = run(ns, base, data, BUDGET, scale=SCALE, device=DEVICE, seed=SEED)
sparse_model = ns.groups[0].model                 # the model at the end of NS's sparse phase
print(f"both runs: {time.time() - t0:.0f} s")

# %%
results = {"magnitude (l1)": res_l1, f"NS (λ={NS_LAM:g})": res_ns}
print(f"{'method':16s} {'dense':>6s} {'sparse':>6s} {'removed':>7s} {'tuned':>6s} | "
      f"{'MACs':>7s} {'params':>7s} | {'ms@1':>5s} {'ms@64':>6s} {'x@64':>5s}")
for name, r in results.items():
    a, p, lt = r["accuracy"], r["pruned"], r["latency"]
    print(f"{name:16s} {a['dense']:6.2f} {a['regularized']:6.2f} {a['removed']:7.2f} "
          f"{a['finetuned']:6.2f} | {p['macs'] / 1e6:6.2f}M {p['params'] / 1e3:6.1f}k | "
          f"{lt['batch1']['pruned_ms']:5.2f} {lt['batch64']['pruned_ms']:6.2f} "
          f"{lt['batch64']['speedup']:5.2f}")
d0 = res_l1["dense"]
print(f"{'dense':16s} {'':29s}| {d0['macs'] / 1e6:6.2f}M {d0['params'] / 1e3:6.1f}k | "
      f"{res_l1['latency']['batch1']['dense_ms']:5.2f} "
      f"{res_l1['latency']['batch64']['dense_ms']:6.2f}")
print(f"accuracies: top-1 % on {data.test.num_images} test images; latency: median ms on "
      f"{DEVICE}, this machine, now")
for r in results.values():
    assert r["pruned"]["macs_ratio"] <= TARGET_MACS + 1e-9            # the budget is met
    assert r["pruned"]["macs_ratio"] > TARGET_MACS - 0.05             # ... and not overshot
    assert r["pruned"]["params"] < r["dense"]["params"]
    assert abs(r["accuracy"]["dense"] - base_acc) < 0.1               # same baseline
    assert r["accuracy"]["finetuned"] > 20.0                          # training worked at all
assert abs(res_l1["accuracy"]["regularized"] - base_acc) < 0.1    # l1: no sparse phase

# %% [markdown]
# The γ of the prunable BatchNorms (the first BN of every block) before and after NS's sparse
# phase; the dashed line marks the largest |γ| that the 50%-MACs budget removed (the budget
# removes the lowest |γ| network-wide, but always keeps 10% of every layer):

# %%
keep_ns = ns.select(sparse_model, BUDGET)
s_before = ns.scores(base)
s_after = {i: v.cpu() for i, v in ns.scores(sparse_model).items()}
removed = {i: torch.ones(len(s_after[i]), dtype=torch.bool).index_fill_(0, k.cpu(), False)
           for i, k in keep_ns.items()}
cut = max(float(s_after[i][r].max()) for i, r in removed.items() if r.any())
before = torch.cat(list(s_before.values())).cpu()
after = torch.cat(list(s_after.values())).cpu()
fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
bins = np.linspace(0, float(max(before.max(), after.max())), 50)
ax[0].hist(before.numpy(), bins=bins, alpha=0.6, label="baseline")
ax[0].hist(after.numpy(), bins=bins, alpha=0.6, label=f"after NS sparse phase (λ={NS_LAM:g})")
ax[0].axvline(cut, color="k", ls="--", lw=1, label="largest removed |γ|")
ax[0].set_xlabel("|γ| of prunable channels")
ax[0].legend(fontsize=8)
phases = {"dense": "dense", "sparse": "regularized", "removed": "removed", "tuned": "finetuned"}
for name, r in results.items():
    ax[1].plot(list(phases), [r["accuracy"][k] for k in phases.values()], "o-", label=name)
ax[1].set_ylabel("top-1 %")
ax[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
print(f"median |γ|: baseline {float(before.median()):.3f}, after sparse phase "
      f"{float(after.median()):.3f};  channels removed by NS: "
      f"{sum(len(s_after[i]) - len(k) for i, k in keep_ns.items())} of {len(after)}")
assert len(after) == len(before) == sum(g.size for g in groups20 if not g.coupled)
assert float(after.median()) < float(before.median())          # the penalty shrank γ
assert set(keep_ns) == set(s_after)                             # only internal groups

# %% [markdown]
# **Reading the table.** *sparse* is the accuracy at the end of the sparse phase (for L1 it is
# the dense model), *removed* right after the channels are physically removed, *tuned* after
# fine-tuning. A regularizer earns its name when *removed* stays close to *sparse*: the
# channels it removes were already nearly silent. Removing half of the MACs of a network as
# small as ResNet-20 in one shot is brutal for the magnitude criterion: it removes channels
# that still carry signal, and every removed channel also takes away its constant output
# ReLU(β), which shifts the statistics the next BatchNorm was trained for (chapter 2 shows two
# cures: RSNLI folds that constant into the next layer, EagleEye re-estimates the BN
# statistics). NS pays during the sparse phase instead, to make the removal cheaper; compare
# the gap between *sparse* and *removed* of the two rows, and where fine-tuning ends.
#
# At the quick scale, two epochs on 10k images are far from the papers' 160 + 160 epochs on
# 50k, so the fine-tuned accuracies sit well below a fully trained run; compare methods with
# each other at the same scale, not with the papers' numbers. Seed-to-seed noise on small CIFAR
# networks is a few tenths of a per cent even at full scale, more at the quick scale, and the
# test subset adds about ±0.4% (one standard deviation at 5,000 images).
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
# * Subgradient updates never reach exactly zero (a threshold is needed); proximal and
#   projection updates produce exact zeros, and group versions produce structured zeros.
# * At the quick scale, λ must be rescaled for a regularizer to act at all — each chapter says
#   where it deviates from the paper and why.
#
# ## Exercises
#
# Each exercise is a code cell with a solution between `### BEGIN SOLUTION` and
# `### END SOLUTION` markers, followed by a check cell. `python tools/make_student.py` writes a
# student version with the solutions replaced by `raise NotImplementedError()`. Exercises only
# rely on the setup cell at the top of the chapter.
#
# **Exercise 1 — nonnegative soft-thresholding.** SSS and GAL keep their channel scales
# $m \ge 0$: their proximal step solves
# $\;\arg\min_{u \ge 0}\; \tfrac12 (u - z)^2 + t\,u$. Derive the closed form (write the
# optimality condition with the normal cone of $u \ge 0$) and implement it elementwise for a
# tensor `z` and a threshold `t >= 0`. The check uses the optimality conditions, not a
# reference implementation.

# %%
def nonneg_soft_threshold(z: torch.Tensor, t: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    return (z - t).clamp_min(0)
    ### END SOLUTION


# %%
_z = torch.linspace(-3, 3, 61, dtype=torch.float64)
_u = nonneg_soft_threshold(_z, 0.7)
assert _u.shape == _z.shape and _u.dtype == _z.dtype and (_u >= 0).all()
_pos = _u > 0
assert torch.allclose(_u[_pos], _z[_pos] - 0.7)              # u > 0: u - z + t = 0
assert (_z[~_pos] <= 0.7 + 1e-12).all()                      # u = 0: z - t in the normal cone
assert int((~_pos).sum()) == int((_z <= 0.7).sum())          # exact zeros, all of them
assert torch.equal(nonneg_soft_threshold(_z, 0.0), _z.clamp_min(0))

# %% [markdown]
# **Exercise 2 — MACs of a convolution by hand.** Return the multiply-accumulates per image of
# `conv` (an `nn.Conv2d` with integer `padding`) on an `h x w` input; mind stride, dilation and
# groups. The check compares with `pl.count`.

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
for _cfg in [dict(in_channels=16, out_channels=32, kernel_size=3, padding=1),
             dict(in_channels=32, out_channels=32, kernel_size=3, stride=2, padding=1, groups=32),
             dict(in_channels=12, out_channels=18, kernel_size=5, stride=2, padding=2, groups=3),
             dict(in_channels=8, out_channels=24, kernel_size=(1, 3), dilation=2, padding=0)]:
    _c = nn.Conv2d(**_cfg)
    assert conv_macs(_c, 31, 32) == pl.count(_c, torch.zeros(1, _c.in_channels, 31, 32))[0], _cfg

# %% [markdown]
# **Exercise 3 — which group owns a layer's output channels?** Given the groups of a model and
# the name of a conv or linear layer, return the index of the first group (lowest index) that
# holds some of its output channels (a `conv2` of stage 3 writes channels of all three trunk
# groups), or `None` if they are in no group (frozen). The check removes one channel of the
# group you return and verifies that the layer's output shrinks.

# %%
def group_of(groups: list, layer: str) -> int | None:
    ### BEGIN SOLUTION
    for g in groups:
        if any(m.module == layer and m.param == "weight" for m in g.by_role("out")):
            return g.index
    return None
    ### END SOLUTION


# %%
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
# **Going further** (no check): (a) rerun Section 6 with `NS_LAM = 1e-5` at the quick scale and
# compare the γ histograms; (b) let NS also prune the coupled trunk
# (`pl.methods.get("ns", lam=NS_LAM, residual="coupled")`) and compare MACs, latency and accuracy;
# (c) in Section 4, replace the constant step of the subgradient method by $\eta_t = \eta/\sqrt t$
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
