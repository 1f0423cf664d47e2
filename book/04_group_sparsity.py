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
# # Chapter 4 — Filter group sparsity: SSL, OICSR, OTO and GREG
#
# **Objectives.** After this chapter you can
# 1. derive the group lasso from the L1 norm, say why it produces *structured* zeros, and what
#    the (un)weighted sum does to groups of unequal size;
# 2. explain why a group must follow the channel coupling — per-layer filter and channel groups
#    (SSL), out-in-channel groups that span every consumer (OICSR), zero-invariant groups that
#    span every producer (OTO) — and which of them make removal *exact*;
# 3. contrast the subgradient step (SSL, OICSR) with the half-space projection of OTO's HSPG
#    (a half-space test, drawn in 2-D), and state when that step decreases the objective;
# 4. state the argument behind growing regularization (GREG), a smooth L2 penalty, and see its
#    magnitude separation;
# 5. explain what BatchNorm's scale invariance does to every penalty on a conv row;
# 6. check a from-scratch version of each update against `prunelib`, and run all four plus the
#    magnitude baseline on real CIFAR-10 ResNet-20 under the book's one protocol.
#
# **Run time** (`python book/04_group_sparsity.py`, whole chapter, quick scale):
# **7 min 36 s** on the idle 2-core CPU (default threads; 453 s by the chapter's own clock);
# 13 min 54 s of CPU time in one thread (`PRUNELIB_THREADS=1`). The "in our run" numbers in
# the prose are from that idle run; the thread count alone moves single rows by several points
# (one seed, short chaotic phases), so read orders and gaps, not decimals.
#
# The protocol is the book's one protocol, read from `prunelib.pipeline.SCALES` in the setup
# cell: at `PRUNELIB_SCALE=quick` (default) every method gets 2 epochs of sparse training and
# 2 of fine-tuning on a 10k-image training subset, accuracies are measured on 5,000 test
# images, and every method must keep at most 50% of the dense MACs. The strengths are set by
# the library's one rule (`prunelib.strength`, Section 7). `PRUNELIB_SCALE=full` uses the
# papers' schedules and strengths and wants a GPU.

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
import torch.nn.functional as F
from torch import nn

import prunelib as pl
import prunelib.methods  # noqa: F401  (the registry: pl.methods.get)
from prunelib.models import get_model
from prunelib.pipeline import SCALES

SCALE = os.environ.get("PRUNELIB_SCALE", "quick")
assert SCALE in SCALES, f"PRUNELIB_SCALE must be one of {sorted(SCALES)}, got {SCALE!r}"
SC = SCALES[SCALE]                              # the protocol: subsets, epochs, lr, target, seed
QUICK = SCALE == "quick"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DATA_ROOT = os.environ.get("PRUNELIB_DATA")     # None: ~/.cache/prunelib (never downloads)
torch.manual_seed(SC.seed)
np.random.seed(SC.seed)
T_START = time.time()

SNAP_EVERY = 10          # steps between recorded per-channel scores (histograms, Section 8)
PROBE_EPOCHS = 0.5       # fine-tuning probe with / without restored row norms (Section 8)
print(f"scale={SCALE}  device={DEVICE}  torch={torch.__version__}  prunelib={pl.__version__}")
print(f"protocol: {SC.reg_epochs:g} + {SC.ft_epochs:g} epochs, {SC.subset} training images, "
      f"{SC.test_subset or 10_000} test images, target {SC.target_macs:.0%} MACs, "
      f"seed {SC.seed}")

# %% [markdown]
# **Notation** (one meaning per symbol in this chapter, and in the book: `book/notation.md`)
#
# * $w_g$, $x_g$, $p_g$: the weights of group $g$ (SSL, OICSR: $w_g$; OTO's zero-invariant
#   groups: $x_g$) and their number;
# * $f$, $\psi$: the training loss; OTO's objective $\psi = f + \lambda\sum_g\|x_g\|_2$;
# * $\lambda$: a penalty's strength ($\lambda_f, \lambda_c$: SSL's filter and channel
#   strengths; $\lambda_j$: GREG's strength of filter $j$);
# * $\eta$, $\eta_s$: the learning rate (step size), at optimizer step $s$; $s$: the step;
# * $\theta$: a threshold (of a proximal step, $\theta = \eta\lambda$); $c_g$: the weight of
#   group $g$ in a group penalty ($c_g = 1$: unweighted; Yuan & Lin: $c_g = \sqrt{p_g}$);
# * $\alpha > 0$: a factor a conv row is scaled by;
# * $\mu$: the optimizer's momentum (0.9; 0 on OTO's groups);
# * $\epsilon$: HSPG's half-space parameter, $0 \le \epsilon < 1$;
# * $\delta$, $K_u$, $\tau$: GREG's growth of $\lambda_j$ per update, iterations between
#   updates, ceiling of $\lambda_j$;
# * $L$: a Lipschitz constant of $\nabla f$ ($f$ is $L$-smooth);
# * $m_k$, $v_k$, $\gamma_k$, $\beta_k$, $\epsilon_\text{BN}$: BatchNorm of channel $k$ —
#   running mean and variance, scale, shift, and BN's small constant;
# * $D$: the strength rule's target drift (Section 7).
#
# ## 1. From the L1 norm to the group lasso
#
# The L1 penalty $\lambda\|w\|_1 = \lambda\sum_i |w_i|$ makes *individual* weights exactly zero
# (chapter 1, Section 4): its proximal operator, soft-thresholding, sets every coordinate with
# $|z_i| \le \eta\lambda$ to zero. Applied to conv weights this gives *unstructured* zeros, which
# a dense kernel still multiplies. To remove a filter we need *all* of its weights to be zero at
# the same time.
#
# **The group lasso** applies the L1 norm to the vector of *group norms*: partition the weights
# into groups $g_1, g_2, \dots$, $w = (w_{g_1}, w_{g_2}, \dots)$, and penalize
#
# $$R(w) = \sum_g \|w_g\|_2 = \big\|\,(\|w_{g_1}\|_2, \|w_{g_2}\|_2, \dots)\,\big\|_1 .$$
#
# Inside a group the Euclidean norm is round (it has no preference for any coordinate), across
# groups the L1 norm is pointed (it prefers whole groups at zero). With groups of size one it
# *is* the L1 norm. Its subdifferential is
#
# $$\partial \|w_g\|_2 = \begin{cases} w_g / \|w_g\|_2 & w_g \ne 0 \\
#   \{u : \|u\|_2 \le 1\} & w_g = 0 \end{cases}$$
#
# — a unit vector pointing at the group, of length 1 whatever the group's size. The proximal
# operator of $\eta\lambda\|\cdot\|_2$ is the *block* soft-threshold
#
# $$\operatorname{prox}_{\eta\lambda\|\cdot\|_2}(z_g)
#   = \max\!\Big(0,\; 1 - \frac{\eta\lambda}{\|z_g\|_2}\Big)\, z_g ,$$
#
# which sets the whole group to zero when $\|z_g\| \le \eta\lambda$ and otherwise shrinks it
# without changing its direction. (Compare the L2 penalty $\frac\lambda2\|w\|_2^2$: it is
# smooth, its gradient $\lambda w$ vanishes near zero, so it shrinks but never zeroes — GREG,
# Section 5, uses it anyway, with a growing λ.)
#
# **Weighted or not.** Yuan & Lin's group lasso (2006) weights each group by the square root of
# its size, $\sum_g \sqrt{p_g}\,\|w_g\|_2$. The three group-lasso methods of this chapter, as
# their code does, use the **unweighted** sum above: SSL (Caffe's `GroupLassoRegularize`), OTO
# (`hspg.py`) and OICSR (the paper's formula; no public code, so not verified). With unequal
# groups this matters. Every group is pulled towards zero by a step of norm λ whatever its
# size, so per weight a group of $p_g$ weights gets about $\lambda/\sqrt{p_g}$; a group's norm
# grows like $\sqrt{p_g}$ for weights of similar size. So large groups (the filters of a layer
# with many inputs, a channel with many consumers) are pulled less per weight and reach zero
# later than small ones, and a *global* ranking of raw group norms across layers prefers to
# remove the small groups. With $\sqrt{p_g}$ weights the pull per weight would be the same for
# every group. The group sizes of ResNet-20 differ by up to a factor 8 (below).
#
# ## 2. Which weights form a group: follow the coupling
#
# A group is useful only if zeroing it lets us *remove* something. For structured pruning the
# removable unit is a coupled channel (chapter 1): the producer rows, the BN entries and the
# input slices of every consumer. The four methods cut this unit differently:
#
# | method | one group for channel $k$ | regularizer | zero group ⇒ |
# |---|---|---|---|
# | SSL (Wen+ 2016) | each layer's filter row $W^l_{k,:}$; separately, each consumer's input slice $W^{l+1}_{:,k}$ | $\lambda_f\sum\|W^l_{k,:}\| + \lambda_c\sum\|W^{l+1}_{:,k}\|$ (unweighted) | channel removable (with fine-tuning) |
# | OICSR (Li+ 2019) | producer rows **and** every consumer's input slice, jointly | $\lambda\sum_k \sqrt{\|W^l_{k,:}\|^2 + \|W^{l+1}_{:,k}\|^2}$ (unweighted) | both halves shrink together |
# | OTO (Chen+ 2021) | every producer parameter: rows, biases, BN $\gamma_k, \beta_k$ (a zero-invariant group) | $\lambda\sum_k \|x_k\|_2$ (unweighted) | output of channel $k$ is exactly 0: removal is exact |
# | GREG (Wang+ 2021) | the filter row $W_j$ | $\frac{\lambda_j}{2} \|W_j\|^2$, $\lambda_j$ growing (smooth, not a group lasso) | small filter, removed by magnitude |
#
# In `prunelib` a `ChannelGroup` holds exactly these slices with their roles: `'out'` (producer
# rows and biases), `'affine'` (BN γ, β), `'in'` (consumer input slices). SSL takes `'out'` and
# `'in'` weights as separate groups, OICSR takes `'out'` + `'in'` as one group, OTO takes
# `'out'` + `'affine'`. Here are the slices of one internal group of ResNet-20 (the channels
# between the two convs of block `layer2.1`), and the sizes $p_g$ of every method's groups:

# %%
ex1 = torch.randn(1, 3, 32, 32)
r20 = get_model("resnet20")
g20 = pl.channel_groups(r20, ex1)
blk = next(g for g in g20 if g.sources == ["layer2.1.conv1"])
for m in blk.members:
    print(f"  {m.role:6s} {m.module:18s} {m.param:12s} dim {m.dim}  "
          f"{m.tensor(r20)[0].numel() if m.dim == 0 else m.tensor(r20)[:, 0].numel():4d} "
          f"elements per channel")
ROLES = {"SSL filter": ("out",), "SSL channel": ("in",), "OICSR": ("out", "in"),
         "OTO": ("out", "affine")}
per_channel = {name: sum(r.shape[1] for r in blk.rows(r20, roles=roles))
               for name, roles in ROLES.items()}
print(per_channel)
assert per_channel["SSL filter"] == 32 * 9 and per_channel["SSL channel"] == 32 * 9
assert per_channel["OICSR"] == 2 * 32 * 9 and per_channel["OTO"] == 32 * 9 + 2

sizes = {}                                   # p_g of every group each method regularizes
for name, roles in ROLES.items():
    gs = g20 if name == "OTO" else [g for g in g20 if not g.coupled]   # OTO: trunk too
    sizes[name] = sorted({sum(r.shape[1] for r in g.rows(r20, roles=roles)) for g in gs})
    print(f"  {name:12s} p_g in {sizes[name]}: per-weight pull differs up to "
          f"sqrt({max(sizes[name])}/{min(sizes[name])}) = "
          f"{math.sqrt(max(sizes[name]) / min(sizes[name])):.1f}x")
assert sizes["SSL filter"] == [16 * 9, 32 * 9, 64 * 9]      # fan-in 16, 32, 64 (3x3 kernels)

# %% [markdown]
# Why OTO insists on the BN parameters: a filter row at zero makes the conv output of channel
# $k$ zero, but BatchNorm then outputs
# $\gamma_k \cdot (0 - m_k)/\sqrt{v_k + \epsilon_\text{BN}} + \beta_k$ — in training mode (batch
# mean 0) exactly $\beta_k$, a constant map that the next layer still reads. Removing the channel
# then changes the network. With $\gamma_k = \beta_k = 0$ as well, the output is exactly zero in
# both modes and removal changes nothing:

# %%
net = get_model("resnet20").eval()
with torch.no_grad():                                      # non-trivial BN parameters
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.3, 1.0)
            m.bias.uniform_(-0.3, 0.3)
gnet = pl.channel_groups(net, ex1)
gb = next(g for g in gnet if g.sources == ["layer2.1.conv1"])
drop = torch.arange(0, gb.size, 2)                          # every second channel
keep = {gb.index: torch.arange(1, gb.size, 2)}
xb = torch.randn(8, 3, 32, 32)
diffs = {}
for kind in ("filter rows only (SSL, GREG)", "zero-invariant group (OTO)"):
    z = copy.deepcopy(net)
    g = pl.channel_groups(z, ex1)[gb.index]
    if kind.startswith("filter"):
        with torch.no_grad():
            z.layer2[1].conv1.weight[drop] = 0.0
    else:
        g.zero_(drop)                                       # conv rows, biases, gamma, beta
    small = pl.remove_channels(z, pl.channel_groups(z, ex1), keep).eval()
    with torch.no_grad():
        diffs[kind] = float((z(xb) - small(xb)).abs().max())
    print(f"{kind:30s} max |zeroed - removed| = {diffs[kind]:.2e}")
assert diffs["filter rows only (SSL, GREG)"] > 1e-3          # beta still talks
assert diffs["zero-invariant group (OTO)"] < 1e-5             # exact removal

# %% [markdown]
# ## 3. The subgradient step: SSL and OICSR
#
# SSL and OICSR add the group-lasso subgradient to the gradient after `backward()` — exactly
# what the SSL Caffe solver does in `GroupLassoRegularize` — and then take an ordinary SGD step
# (momentum μ, weight decay):
#
# $$\nabla_{w_g} \;\mathrel{+}=\; \lambda\, \frac{w_g}{\|w_g\|_2} \quad (0 \text{ if } w_g = 0).$$
#
# Like the subgradient step of chapter 1 this never lands exactly on zero; SSL's code sets every
# weight with $|w| < 10^{-4}$ to zero after each step (its README, "stabilizing sparsity"), so
# groups that have collapsed become exactly zero. SSL removes a channel whose filter group *or*
# channel group is zero; OICSR ranks the out-in-channels by their **energy**
# $E_k = \|W^l_{k,:}\|^2 + \|W^{l+1}_{:,k}\|^2$ (statistics of two consecutive layers) and
# removes the lowest ones greedily across all layers. `prunelib`'s `Budget(macs=r)` *is* such a
# global greedy removal: one channel at a time, lowest score first, until the MACs fit.
#
# From scratch, OICSR's subgradient for one internal group of a BasicBlock (conv1's rows and
# conv2's input slices), against `prunelib`:

# %%
def out_in_lasso_grad(conv_out: nn.Conv2d, conv_in: nn.Conv2d, lam: float):
    """Gradient of lam * sum_k sqrt(||W_out[k]||^2 + ||W_in[:, k]||^2); 0 for zero groups."""
    a = conv_out.weight.detach().flatten(1)                       # (c, rest): rows k
    b = conv_in.weight.detach().transpose(0, 1).flatten(1)        # (c, rest'): slices k
    norm = torch.sqrt(a.pow(2).sum(1) + b.pow(2).sum(1))
    scale = torch.where(norm > 0, lam / norm.clamp_min(1e-30), torch.zeros_like(norm))
    ga = (a * scale[:, None]).view_as(conv_out.weight)
    wb = conv_in.weight
    gb_ = (b * scale[:, None]).view(wb.shape[1], wb.shape[0], *wb.shape[2:]).transpose(0, 1)
    return ga, gb_


lam_check = 0.01
m_lib = copy.deepcopy(net)
oicsr_check = pl.methods.get("oicsr", lam=lam_check)
oicsr_check.attach(m_lib, pl.channel_groups(m_lib, ex1))
for p in m_lib.parameters():
    p.grad = torch.zeros_like(p)
oicsr_check.after_backward(m_lib)
ga, gb_ = out_in_lasso_grad(net.layer2[1].conv1, net.layer2[1].conv2, lam_check)
assert torch.allclose(m_lib.layer2[1].conv1.weight.grad, ga, atol=1e-7)
assert torch.allclose(m_lib.layer2[1].conv2.weight.grad, gb_, atol=1e-7)
assert m_lib.conv1.weight.grad.abs().sum() == 0           # stem: trunk group, not regularized
print("OICSR subgradient from scratch == prunelib for block layer2.1 "
      f"({ga.shape[0]} out-in groups of {ga[0].numel() + gb_[:, 0].numel()} weights each)")

# %% [markdown]
# ## 4. The half-space projection: OTO's HSPG
#
# The subgradient step never produces zeros; the proximal step (block soft-threshold) does, but
# only for groups with $\|z_g\| \le \eta\lambda$ — with the small λ that keeps accuracy, very
# few. OTO's **Half-Space Projected Gradient** (HSPG) zeroes groups by a different test. On
# $\psi(x) = f(x) + \lambda\sum_g\|x_g\|$, the first fraction $n_p$ of the phase are plain
# subgradient steps; after that each step is
#
# 1. a trial point $\hat x = x - \eta\,\big(\nabla f(x) + \lambda\, x_g/\|x_g\|\big)$, group by
#    group (groups that are already zero are not moved);
# 2. for every non-zero group, if the trial point lies in the open half-space
#    $\{z : \langle z, x_g\rangle < \epsilon\,\|x_g\|^2\}$, **project the group to zero**;
#    otherwise keep $\hat x_g$;
# 3. zero groups stay zero.
#
# The test is a **half-space test**, not a test of crossing the origin. Its boundary is the
# hyperplane orthogonal to $x_g$ through $\epsilon x_g$; the group is projected when the step
# shrank the component of $x_g$ along itself below $\epsilon$ times its length
# ($\epsilon = 0$: when the step turned the group by more than 90°). A trial point can be far
# from 0 — as long as $x_g$, say — and still be projected, and a group can shrink a lot and
# survive as long as it keeps its direction. In 2-D (a group of two parameters; ε = 0.3):

# %%
EPS_2D = 0.3
x_2d = torch.tensor([2.0, 1.0])                              # the group x_g
trial = {"inside": torch.tensor([-0.4, 1.9]),                # two trial points x^_g
         "outside": torch.tensor([1.4, -0.9])}
# prunelib's own test on a net whose zero-invariant groups are 2-D: the (weight, bias) of each
# unit of a Linear(1, 2). Both units start at x_g; the gradient is set so that the step lands
# exactly on the trial point (lam = 0: the step is the loss gradient; OTO's groups have no
# momentum and no weight decay).
toy = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
hs = pl.methods.get("oto", lam=0.0, eps=EPS_2D, n_p=0.0)
hs.attach(toy, pl.channel_groups(toy, torch.zeros(1, 1)))
lr_2d = 0.5
opt_2d = torch.optim.SGD(hs.param_groups(toy, lr_2d, 0.0), lr=lr_2d)
x_hat = torch.stack(list(trial.values()))                    # (2 units, 2)
with torch.no_grad():
    toy[0].weight[:, 0], toy[0].bias[:] = x_2d[0], x_2d[1]
    for p in toy.parameters():
        p.grad = torch.zeros_like(p)
    toy[0].weight.grad[:, 0] = (x_2d[0] - x_hat[:, 0]) / lr_2d
    toy[0].bias.grad[:] = (x_2d[1] - x_hat[:, 1]) / lr_2d
hs.after_backward(toy)
opt_2d.step()
hs.after_step(toy)
after_2d = torch.stack([toy[0].weight[:, 0], toy[0].bias], 1).detach()

fig, ax = plt.subplots(figsize=(4.8, 4.4))
lim, u, c = 2.6, x_2d.numpy(), EPS_2D * float(x_2d @ x_2d)
zz = np.linspace(-lim, lim, 2)
ax.fill_between(zz, (c - u[0] * zz) / u[1], -3 * lim, color="tab:red", alpha=0.12,
                label=r"$\langle z, x_g\rangle < \epsilon\|x_g\|^2$: projected to 0")
ax.plot(zz, (c - u[0] * zz) / u[1], "r-", lw=1,
        label=r"$\{z : \langle z, x_g\rangle = \epsilon\|x_g\|^2\}$")
ax.annotate("", xy=u, xytext=(0, 0), arrowprops=dict(arrowstyle="->", lw=2))
ax.text(u[0] + 0.08, u[1] + 0.08, r"$x_g$")
ax.plot(*(EPS_2D * u), "k.", ms=6)
ax.text(EPS_2D * u[0] + 0.05, EPS_2D * u[1] - 0.25, r"$\epsilon x_g$")
for k, (name, h) in enumerate(trial.items()):
    h, a = h.numpy(), after_2d[k].numpy()
    ax.annotate("", xy=h, xytext=u, arrowprops=dict(arrowstyle="->", ls="--", color="tab:blue"))
    ax.plot(*h, "o", color="tab:blue")
    ax.text(h[0] + 0.1, h[1] - 0.05, rf"$\hat x_g$ ({name})", fontsize=8)
    if not np.allclose(a, h):
        ax.annotate("", xy=a, xytext=h, arrowprops=dict(arrowstyle="->", color="tab:green"))
ax.plot(0, 0, "s", color="tab:green", label="after the projection")
ax.set_xlim(-lim, lim)
ax.set_ylim(-lim, lim)
ax.set_aspect("equal")
ax.axhline(0, c="0.85", lw=0.5)
ax.axvline(0, c="0.85", lw=0.5)
ax.legend(fontsize=7, loc="lower left")
ax.set_title("HSPG: the half-space test (ε = 0.3)", fontsize=9)
fig.tight_layout()
plt.show()
for k, (name, h) in enumerate(trial.items()):
    in_half_space = float(h @ x_2d) < EPS_2D * float(x_2d @ x_2d)   # the test, by hand
    print(f"{name:8s} x^_g = {h.tolist()}  <x^_g, x_g> = {float(h @ x_2d):.2f} vs "
          f"eps ||x_g||^2 = {EPS_2D * float(x_2d @ x_2d):.2f}  ->  {after_2d[k].tolist()}")
    assert in_half_space == (name == "inside")
    assert torch.equal(after_2d[k], torch.zeros(2) if in_half_space else h)   # prunelib agrees
assert trial["inside"].norm() > 0.8 * x_2d.norm()            # projected, yet far from 0

# %% [markdown]
# **When does the step decrease ψ?** Only under step-size conditions. The OTO / HSPG analysis
# assumes $f$ $L$-smooth, $\epsilon \in [0, 1)$ and a step size bounded in terms of
# $(1-\epsilon)/L$; for mini-batch gradients the guarantee holds in expectation, with further
# conditions on the step size and the batch size. The exact constants are those of the paper's
# theorem (Chen et al. 2021) — *not verified here* (`reference/methods.md` does not quote
# them). The projection part is a one-line check. A group that is projected (the others held)
# has $\langle \hat x_g, x_g\rangle < \epsilon\|x_g\|^2$ with
# $\hat x_g = x_g - \eta\,\nabla_g\psi$, i.e. $\eta\,\langle\nabla_g\psi, x_g\rangle >
# (1-\epsilon)\|x_g\|^2$. Setting it to 0 removes $\lambda\|x_g\|$ from the penalty and, by
# $L$-smoothness, changes $f$ by at most $-\langle\nabla_g f, x_g\rangle + \frac L2\|x_g\|^2$;
# since $\langle \lambda x_g/\|x_g\|, x_g\rangle = \lambda\|x_g\|$, ψ changes by at most
#
# $$-\langle\nabla_g\psi, x_g\rangle + \frac L2\|x_g\|^2
#   \;<\; -\Big(\frac{1-\epsilon}{\eta} - \frac L2\Big)\|x_g\|^2 ,$$
#
# a decrease when $\eta < 2(1-\epsilon)/L$ (exact gradient). `prunelib` enforces none of this:
# the step size is the protocol's learning rate.
#
# In `prunelib` the trial point is the optimizer's own step: `after_backward` adds the
# subgradient (and zeroes the gradient of zero groups), `optimizer.step()` computes $\hat x$ *on
# the same tensors*, and `after_step` projects. The zero-invariant groups get their own
# optimizer group with weight decay 0 and momentum $\mu = 0$ (the official configs), and zero
# groups are re-zeroed after every step, so neither momentum nor weight decay can revive them.
#
# From scratch, one HSPG step on a group matrix (rows = groups), against OTO on the internal
# group of `layer2.1` (conv1 rows + bn1 γ, β):

# %%
def hspg_step(x: torch.Tensor, grad_f: torch.Tensor, lr: float, lam: float,
              eps: float) -> torch.Tensor:
    """One half-space step on a (groups, d) matrix x with loss gradient grad_f."""
    norm = x.norm(dim=1)
    sub = torch.where(norm[:, None] > 0, x / norm.clamp_min(1e-30)[:, None],
                      torch.zeros_like(x))
    hat = x - lr * (grad_f + lam * sub)                            # trial point
    out = (hat * x).sum(1) < eps * norm ** 2                       # in the half-space
    return torch.where((out | (norm == 0))[:, None], torch.zeros_like(hat), hat)


def zig_matrix(model: nn.Module, grads: bool = False) -> torch.Tensor:
    """(channels, 3*3*c_in + 2) rows: layer2.1.conv1 filter, bn1 gamma, bn1 beta."""
    conv, bn = model.layer2[1].conv1, model.layer2[1].bn1
    t = (lambda p: p.grad) if grads else (lambda p: p.detach())
    return torch.cat([t(conv.weight).flatten(1), t(bn.weight)[:, None], t(bn.bias)[:, None]], 1)


m_oto = copy.deepcopy(net).train()
oto_check = pl.methods.get("oto", lam=0.05, eps=0.2, n_p=0.0)
g_oto = pl.channel_groups(m_oto, ex1)
oto_check.attach(m_oto, g_oto)
with torch.no_grad():                                      # a few weak channels to project
    for k in range(4):
        for t in (m_oto.layer2[1].conv1.weight[k], m_oto.layer2[1].bn1.weight[k:k + 1],
                  m_oto.layer2[1].bn1.bias[k:k + 1]):
            t.mul_(0.01)
opt = torch.optim.SGD(oto_check.param_groups(m_oto, 0.5, 5e-4), lr=0.5, momentum=0.9)
F.cross_entropy(m_oto(xb), torch.arange(8) % 10).backward()
x_before, gf = zig_matrix(m_oto).clone(), zig_matrix(m_oto, grads=True).clone()
oto_check.after_backward(m_oto)
opt.step()
oto_check.after_step(m_oto)
x_hand = hspg_step(x_before, gf, 0.5, 0.05, 0.2)
assert torch.allclose(zig_matrix(m_oto), x_hand, atol=1e-6)
n_proj = int((x_hand.abs().sum(1) == 0).sum())
print(f"HSPG from scratch == prunelib; {n_proj} of {len(x_hand)} groups projected to zero")
assert n_proj >= 4

# %% [markdown]
# ## 5. Growing regularization: GREG
#
# GREG does not use a sparsity-inducing norm at all. It adds a per-filter L2 term
# $\frac{\lambda_j}{2}\|W_j\|^2$ through the gradient, $\nabla_{W_j} \mathrel{+}= \lambda_j W_j$
# (official `_apply_reg`, not part of the loss), and lets $\lambda_j$ **grow**: every $K_u$
# iterations $\lambda_j \mathrel{+}= \delta$, up to a ceiling $\tau$ (official $\delta = 10^{-4}$,
# $K_u = 10$, $\tau = 1$). The term is smooth — its gradient $\lambda_j W_j$ exists everywhere,
# also at 0 — so GREG's update is a plain **gradient** step, not a subgradient method: a
# penalized filter shrinks geometrically towards 0 without reaching it, and the removal goes by
# magnitude. Two arguments:
#
# * **Slow growth lets the rest of the network take over.** GReg-1 fixes the pruned filters up
#   front (smallest L1 norm, layer-wise ratios — the same choice as the magnitude baseline
#   `l1`) and grows $\lambda_j$ only on them. A sudden removal is a large perturbation; a
#   penalty that grows over thousands of iterations pushes the pruned filters towards zero
#   while SGD keeps adapting the kept ones — by the time they are removed, the network should
#   no longer use them.
# * **A growing L2 penalty reads the curvature.** Near a minimum $w_0$ with Hessian $H$,
#   $f(w) \approx f(w_0) + \frac12 (w - w_0)^\top H (w - w_0)$, and the minimizer of
#   $f + \frac\lambda2\|w\|^2$ is $w^\star = (H + \lambda I)^{-1} H w_0$: along an eigenvector
#   with curvature $h$ the weight shrinks by the factor $h / (h + \lambda)$. As λ grows,
#   directions with *small* curvature (where the loss does not care) collapse first. GReg-2
#   grows λ uniformly on all filters, waits until magnitudes separate, and only then picks the
#   pruned filters by magnitude: magnitude after uniform growth is an implicit curvature score.

# %%
lams_grid = np.logspace(-3, 1, 200)
curv = [0.01, 0.1, 1.0, 10.0]
fig, ax = plt.subplots(figsize=(5.5, 3))
for h in curv:
    ax.plot(lams_grid, h / (h + lams_grid), label=f"curvature h = {h:g}")
ax.set_xscale("log")
ax.set_xlabel("λ")
ax.set_ylabel("kept fraction h / (h + λ)")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
shrink = np.array([[h / (h + lam) for h in curv] for lam in (0.05, 0.5)])
assert (np.diff(shrink, axis=1) > 0).all()           # flatter directions shrink more
assert shrink[1, 0] < 0.1 < 0.9 < shrink[1, 3]       # ... until they separate


# %% [markdown]
# From scratch, the GReg-1 schedule: the pruned set is the ratio $r$ of each layer's filters
# with the smallest mean $|w|$ (at most all but one); $\lambda_j$ of a pruned filter after the
# update at step $s$ is $\delta \cdot \min(\lfloor s / K_u \rfloor + 1,\ n_\tau)$, where
# $n_\tau$ is the first count with $n_\tau\delta > \tau$; kept filters stay at 0. Against
# `prunelib`:

# %%
def greg1_lambda(s: int, delta: float, tau: float, k_u: int) -> float:
    """lambda of a pruned filter after the update at step s (updates at 0, K_u, ...)."""
    n_tau = math.floor(tau / delta) + 1                       # first count above tau
    return delta * min(s // k_u + 1, n_tau)


m_greg = copy.deepcopy(net)
greg_check = pl.methods.get("greg", pr=0.5, delta=0.03, tau=0.1, k_u=4,
                            mag_ratio_limit=math.inf)
greg_check.attach(m_greg, pl.channel_groups(m_greg, ex1))
gi = next(g.index for g in greg_check.groups if g.sources == ["layer2.1.conv1"])
w_abs = m_greg.layer2[1].conv1.weight.detach().abs().mean((1, 2, 3))
want = torch.zeros(len(w_abs), dtype=torch.bool)
want[torch.argsort(w_abs)[:math.ceil(0.5 * len(w_abs))]] = True
assert torch.equal(greg_check.pruned[gi].cpu(), want)
for s in range(20):
    for p in m_greg.parameters():
        p.grad = torch.zeros_like(p)
    greg_check.after_backward(m_greg)
    lam_s = greg_check.lam[gi]
    assert torch.allclose(lam_s[want], torch.full((int(want.sum()),),
                                                  greg1_lambda(s, 0.03, 0.1, 4)))
    assert (lam_s[~want] == 0).all()
    w = m_greg.layer2[1].conv1.weight
    assert torch.allclose(w.grad, lam_s.view(-1, 1, 1, 1) * w.detach())   # grad += lam_j W_j
    greg_check.after_step(m_greg)
print("GReg-1 schedule from scratch == prunelib; final lambda of pruned filters:",
      float(greg_check.lam[gi].max()))

# %% [markdown]
# ## 6. BatchNorm's scale invariance: what a penalty on a conv row can and cannot do
#
# In ResNet-20 every conv feeds a BatchNorm. BN normalizes each channel by its own statistics,
# so multiplying a conv row $w_k$ (the filter of channel $k$) by any $\alpha > 0$ leaves the
# output unchanged: $f(\alpha w_k) = f(w_k)$. Two consequences, both visible in the experiments
# below:
#
# * **The loss does not resist a radial push.** Differentiating $f(\alpha w_k)$ at $\alpha = 1$:
#   $\langle \nabla_{w_k} f, w_k\rangle = 0$. A penalty that pulls the *whole row* towards 0
#   (SSL's filter groups, GREG's $\lambda_j W_j$, the row part of OICSR's and OTO's groups)
#   meets no opposing task gradient along the row: the row shrinks by the penalty's whole
#   reach, whether the channel matters or not — and BN rescales it back, so a shrunk filter
#   still carries its full signal (GREG, Section 8). Only what BN does not renormalize — the
#   consumers' input slices (SSL's channel groups, OICSR's `'in'` half), or BN's own γ, β
#   (OTO's zero-invariant groups) — switches a channel off.
# * **A shrunk row trains with a hotter learning rate.** The gradient scales as
#   $\nabla f(\alpha w) = \nabla f(w)/\alpha$, so one SGD step changes the row's *direction* by
#   $\eta/\alpha^2$ times as much as at scale 1: the effective learning rate is
#   $\propto 1/\|w_k\|^2$. A row shrunk 50-fold is trained as if with a 2,500-fold learning
#   rate. This is why the protocol calls `calibrate.restore_bn_input_norms` before
#   fine-tuning: it scales such rows back to the dense layer's RMS norm (and BN's running
#   statistics with them: the same function, a sane effective learning rate).
#
# The first consequence, measured on the randomly initialized network of Section 2 in training
# mode: the gradient of a row that feeds a BN is orthogonal to the row; the input slices of the
# consumer (not followed by a per-slice BN) have no such property.

# %%
m_inv = copy.deepcopy(net).train()
F.cross_entropy(m_inv(torch.randn(16, 3, 32, 32)), torch.arange(16) % 10).backward()


def abs_cos(w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """|cos(grad, w)| of every slice of `w` along `dim` (rows: dim 0, input slices: dim 1)."""
    gr, v = w.grad.movedim(dim, 0).flatten(1), w.detach().movedim(dim, 0).flatten(1)
    return ((gr * v).sum(1) / (gr.norm(dim=1) * v.norm(dim=1))).abs()


cos_rows = abs_cos(m_inv.layer2[1].conv1.weight)              # feed bn1: scale invariant
cos_slices = abs_cos(m_inv.layer2[1].conv2.weight, dim=1)     # input slices of conv2
print(f"|cos(grad, w)|: conv1 rows (-> BN) max {float(cos_rows.max()):.1e}; conv2 input slices "
      f"median {float(cos_slices.median()):.1e}")
assert float(cos_rows.max()) < 1e-4                            # <grad f, w_k> = 0
assert float(cos_slices.median()) > 1e-3                       # ... not for the slices

# %% [markdown]
# ## 7. All four on CIFAR-10 ResNet-20, under the book's protocol
#
# The protocol of the book (`prunelib.pipeline.run`, one call per method): sparse phase with the
# method's regularizer → removal down to the scale's target (`SC.budget()`, 50% of the dense
# MACs: a global ranking by each method's own score, every group keeps at least 10% of its
# channels) → BN statistics recalibrated on 20 training batches (no gradient step) → the
# shrunk conv rows restored to the dense RMS norm (Section 6) → fine-tuning of the smaller
# network. Defaults and sources are in each class's docstring:
#
# * **SSL** (`'ssl'`): filter + channel groups, $\lambda_f = \lambda_c$; ResNet rule (only the
#   convs between shortcut endpoints); score $\min(\|\text{filter}\|, \|\text{channel}\|)$;
#   its own rule `finish(model)` removes channels whose filter or channel group is exactly 0.
# * **OICSR** (`'oicsr'`): joint out-in groups, score = group energy.
# * **OTO** (`'oto'`): zero-invariant groups, HSPG with $n_p$ = the first 25% of the phase,
#   $\epsilon = 0$, $\mu = 0$ on the groups; it may also prune the coupled trunk (its official
#   ResNet groups join each stage's trunk producers); score = group norm; its own rule removes
#   exactly the zero groups.
# * **GREG** (`'greg'`, GReg-1): a uniform layer-wise ratio chosen up front so that the pruned
#   set meets the MACs target; score = mean $|w|$ of the filter.
# * **magnitude** (`'l1'`, Li et al.): no sparse phase; in every internal group the same
#   fraction of filters with the smallest $\|W_k\|_1$, the smallest common rate that meets the
#   target (chapter 1).
#
# ### The strength: one rule for every method
#
# The papers tune their strengths for hundreds of epochs; at the quick scale the sparse phase
# is 158 steps. Every method is constructed with its defaults (the papers' values where known),
# and the library's **target-drift rule** (`prunelib.strength`, applied by `run`) sets the strength:
# rank the channels by the method's magnitude at the start, take the channels the budget would
# remove, $D$ = the 0.9-quantile of their magnitudes, and choose λ so that a constant push of
# λ per unit learning rate, *carried by the training optimizer's momentum* μ = 0.9, moves a
# parameter by D over the phase: $\lambda \cdot V(\eta, \mu) = D$ with
# $V \approx \sum_s\eta_s/(1-\mu)$ (`sgd_displacement` computes it exactly). Every method then
# gets the **same per-step push** $\lambda\eta_s$ for the same $D$.
#
# **Why D and not 2D, as for the BN-based methods.** Chapter 2's rules move γ, and the task
# gradient resists that push, so they ask for a reach of margin × D = 2D. The group norms here
# are mostly conv rows that feed a BN, and along such a row the loss is scale-invariant
# (Section 6: $\langle\nabla f, w_k\rangle = 0$): nothing resists the push, so a reach of D
# already carries the budget's channels to 0, and 2D would carry the *kept* rows there too.
# `prunelib.strength` marks these rules `resisted=False` (their record says `margin` 1);
# Section 8 runs SSL once more at 2D to show what the margin would do. GREG's rule is of its own
# kind: $\delta = \tau K_u / (\text{steps}/2)$, so that $\lambda_j$ reaches $\tau$ at half of the
# phase (the rest is GREG's stabilization); `l1` has no strength.
#
# **Why OTO's groups get a shorter reach.** OTO's zero-invariant groups take their steps
# without momentum ($\mu = 0$, as in the official configs). The same per-step push then adds up
# to only $\lambda\sum_s\eta_s \approx (1-\mu)\cdot D = 0.1D$ over the phase, a tenth of the
# others' reach. Giving OTO the same *reach* instead would make its per-step push ten times
# stronger relative to the task gradient than every other method's (momentum multiplies the
# task gradient and the penalty alike for the others, and neither for OTO's groups); the
# library measured the result on this network: the sparse phase then ends at 17% accuracy
# (docstring of `prunelib.strength`). One push, shorter reach: at this scale OTO's penalty
# shrinks its groups a little and empties none (Section 8 measures it).
#
# A small wrapper records each method's per-channel scores every `SNAP_EVERY` steps (for the
# histograms below); it changes nothing else. It subclasses the method's class without a new
# constructor, so `prunelib.strength.uses_defaults` still sees the constructor defaults and the
# rule still applies (checked below: `res["strength"]["rule"]`).

# %%
from prunelib.calibrate import conv_bn_pairs, recalibrate_bn, restore_bn_input_norms  # noqa: E402
from prunelib.pipeline import load_baseline, load_data, run  # noqa: E402
from prunelib.results import phase_figure, standard_error, table, width_figure  # noqa: E402
from prunelib.strength import uses_defaults  # noqa: E402
from prunelib.train import evaluate, fit  # noqa: E402

data = load_data(SCALE, root=DATA_ROOT, device=DEVICE)          # the scale's subsets and seed
base, base_meta = load_baseline("resnet20", data, device=DEVICE, scale=SCALE)
base_acc = evaluate(base, data.test)
N_TEST = data.test.num_images
xb1 = torch.randn(1, 3, 32, 32, device=DEVICE)
print(f"baseline {base_meta['path']}: {base_acc:.2f}% on {N_TEST} test images "
      f"(standard error {standard_error(base_acc, N_TEST):.2f} points)")
assert base_acc > 50.0
assert N_TEST == (SC.test_subset or 10_000)


def recorded(name: str):
    """Method `name`, default-constructed, that also keeps (step, all per-channel scores) every
    SNAP_EVERY steps in `.snaps`."""
    cls = type(pl.methods.get(name))

    class Recorded(cls):
        def attach(self, model, groups):
            model = super().attach(model, groups)
            self.snaps, self.snap_step = [(0, self.all_scores(model))], 0
            return model

        def after_step(self, model):
            super().after_step(model)
            self.snap_step += 1
            if self.snap_step % SNAP_EVERY == 0:
                self.snaps.append((self.snap_step, self.all_scores(model)))

        def all_scores(self, model):
            return torch.cat([v.detach().float().cpu() for v in self.scores(model).values()])

    Recorded.__name__ = Recorded.__qualname__ = cls.__name__
    return Recorded()


sparse: dict[str, dict] = {}         # what `on_sparse` keeps at the end of each sparse phase


def keep_sparse(label: str):
    """on_sparse callback: keep a copy of the sparse model and what Section 8 needs from it."""
    def on_sparse(model: nn.Module, method) -> None:
        rec = sparse[label] = {"model": copy.deepcopy(model).eval()}
        if method.name in ("oto", "ssl"):              # the protocol's removed model (Sec. 8)
            rec["removed"] = method.finish(model, SC.budget())
        if method.name == "oto":
            rec["own"] = method.finish(model, None).eval()    # its own rule: the zero groups
            rec["scores"] = {i: s.detach().cpu() for i, s in method.scores(model).items()}
        if method.name == "greg":
            rec["keep"] = method.select(model, SC.budget())   # what the common budget keeps
            rec["pruned"] = {i: m.cpu() for i, m in method.pruned.items()}
    return on_sparse


methods = {"l1": pl.methods.get("l1"), "SSL": recorded("ssl"), "OICSR": recorded("oicsr"),
           "OTO": recorded("oto"), "GREG": recorded("greg")}
assert all(uses_defaults(m) for k, m in methods.items() if k != "l1")   # the rule will apply
results = {}
for label, meth in methods.items():
    t0 = time.time()
    _, results[label] = run(meth, base, data, scale=SCALE, device=DEVICE,
                            dense_accuracy=base_acc, on_sparse=keep_sparse(label))
    print(f"{label:6s} {time.time() - t0:4.0f} s  " + "  ".join(
        f"{k} {v:5.2f}" for k, v in results[label]["accuracy"].items()), flush=True)
# SSL once more at a reach of 2D: the margin the BN-based rules use (Section 8 reads it)
ssl_2d = {k: 2 * v for k, v in results["SSL"]["strength"]["params"].items()}
t0 = time.time()
_, results["SSL 2D"] = run(recorded("ssl"), base, data, scale=SCALE, device=DEVICE,
                           dense_accuracy=base_acc, strength=ssl_2d,
                           on_sparse=keep_sparse("SSL 2D"))
print(f"SSL 2D {time.time() - t0:4.0f} s  " + "  ".join(
    f"{k} {v:5.2f}" for k, v in results["SSL 2D"]["accuracy"].items()), flush=True)

# %% [markdown]
# The strength each run used, as `run` recorded it, and the reach it gives (for OTO, without
# momentum: $\lambda\sum_s\eta_s$; "SSL 2D" was given twice SSL's values by hand):

# %%
for label, r in results.items():
    s = r["strength"]
    line = f"{label:6s} rule: {s['rule']:12s}"
    if s["rule"] == "target drift":
        lam = next(iter(s["params"].values()))
        reach = lam * (s["sum_lr"] if label == "OTO" else s["unit"])
        line += (f" {', '.join(f'{k} = {v:.3g}' for k, v in s['params'].items())};  D = "
                 f"{s['D']:.3f} ({s['removed']} of {s['prunable']} channels removed), "
                 f"reach = {reach:.3f} = {reach / s['D']:.2f} D")
    elif s["rule"] == "schedule":
        line += (f" delta = {s['params']['delta']:.3g}: lambda_j reaches tau after "
                 f"{math.ceil(methods[label].tau / s['params']['delta'])} updates "
                 f"(every {methods[label].k_u} of {s['steps']} steps)")
    elif s["rule"] == "given":
        line += " " + ", ".join(f"{k} = {v:.3g}" for k, v in s["params"].items())
    else:
        line += f" {s.get('why', '')}"
    print(line)
if QUICK:
    assert all(results[k]["strength"]["rule"] == "target drift" for k in ("SSL", "OICSR", "OTO"))
    assert results["GREG"]["strength"]["rule"] == "schedule"
    s_oto = results["OTO"]["strength"]
    push = {k: next(iter(results[k]["strength"]["params"].values())) / results[k]["strength"]["D"]
            for k in ("SSL", "OICSR", "OTO")}
    assert max(push.values()) / min(push.values()) < 1 + 1e-9    # one push per unit D
    reach_oto = s_oto["params"]["lam"] * s_oto["sum_lr"]          # no momentum on OTO's groups
    assert reach_oto < 0.5 * s_oto["D"]                           # < half the others' reach
    assert all(results[k]["strength"]["margin"] == 1.0 for k in ("SSL", "OICSR", "OTO"))

# %% [markdown]
# ### The results table
#
# Accuracy at every phase of the protocol (*sparse*: end of the sparse phase; *removed*: right
# after physical removal; *recal.*: after BN recalibration, no gradient step; *tuned*: after
# fine-tuning), MACs and parameters kept, latency of the pruned model (median ms on this
# machine, now), and the strength:

# %%
print(table(results))
phase_figure(results, title="ResNet-20, 50% MACs: accuracy at every phase")
plt.show()
width_figure(results)
plt.show()
for r in results.values():
    assert r["pruned"]["macs_ratio"] <= SC.target_macs + 1e-9         # the budget is met
    assert r["pruned"]["macs_ratio"] > SC.target_macs - 0.05          # ... and not overshot
    assert r["pruned"]["params"] < r["dense"]["params"]
    assert r["accuracy"]["dense"] == base_acc                         # same baseline
    assert r["test_images"] == N_TEST
    assert r["accuracy"]["finetuned"] > 20.0                          # training worked at all
assert results["l1"]["accuracy"]["regularized"] == base_acc           # l1: no sparse phase

# %% [markdown]
# ## 8. Reading the results: what each regularizer did, and why
#
# ### Right after removal: GREG against the group lasso, and each against `l1`
#
# The gap between *sparse* and *removed* is what a regularizer is for; `l1` (no sparse phase)
# shows what removal costs without one. GReg-1 penalizes **exactly** the channels it will
# remove, with a growing strength; the group-lasso methods push every group by the same λ and
# let the ranking decide afterwards. Against the magnitude baseline after fine-tuning, with the
# standard error of a difference of two accuracies on the same number of test images:

# %%
a_l1 = results["l1"]["accuracy"]
for label, r in results.items():
    a = r["accuracy"]
    se_diff = math.hypot(standard_error(a["finetuned"], N_TEST),
                         standard_error(a_l1["finetuned"], N_TEST))
    print(f"{label:6s} sparse {a['regularized']:5.1f} -> removed {a['removed']:5.1f} "
          f"({a['removed'] - a['regularized']:+5.1f}) -> recal. {a['recalibrated']:5.1f} -> "
          f"tuned {a['finetuned']:5.1f}" + ("" if label == "l1" else
          f";  tuned - l1's: {a['finetuned'] - a_l1['finetuned']:+5.1f} (+-{se_diff:.1f})"))

# %% [markdown]
# ### SSL and OICSR: removal is cheap, the sparse phase is not
#
# Histograms of each method's per-channel score (SSL: the smaller of the filter and channel
# group norms; OICSR: the out-in energy, shown as its square root; OTO: the norm of the
# zero-invariant group) at the start, the middle and the end of the sparse phase:

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.2))
for ax, name in zip(axes, ["SSL", "OICSR", "OTO"]):
    snaps = methods[name].snaps
    picks = [snaps[0], snaps[len(snaps) // 2], snaps[-1]]
    vals = [(t, s.sqrt() if name == "OICSR" else s) for t, s in picks]
    hi = float(max(v.max() for _, v in vals))
    for t, v in vals:
        ax.hist(v.numpy(), bins=np.linspace(0, hi, 40), alpha=0.5, label=f"step {t}")
    ax.set_title(f"{name}: {int((vals[-1][1] == 0).sum())} groups exactly 0 at the end")
    ax.set_xlabel("group norm")
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
for name in ("SSL", "OICSR", "OTO"):
    first, last = methods[name].snaps[0][1], methods[name].snaps[-1][1]
    if name == "OICSR":                                          # energy -> norm
        first, last = first.sqrt(), last.sqrt()
    print(f"{name:6s} median group norm {float(first.median()):.3f} -> "
          f"{float(last.median()):.3f};  exactly zero at the end: {int((last == 0).sum())} "
          f"of {len(last)}")
    assert float(last.median()) < float(first.median())           # the penalty shrank groups


# %% [markdown]
# Every group shrinks, not only those the budget will remove: the penalty pushes *all* groups
# towards zero, and for the conv rows nothing resists it (Section 6:
# $\langle\nabla f, w_k\rangle = 0$ for a row that feeds a BN). How far the rows that feed a BN
# went, relative to the dense layer's RMS row norm, and the effective learning rate that gives
# them ($\propto 1/\|w_k\|^2$), at the rule's reach D and, for SSL, at 2D:

# %%
def row_norm_ratio(model: nn.Module, reference: nn.Module) -> torch.Tensor:
    """||w_k|| / (RMS row norm of the reference layer) for every conv row that feeds a BN."""
    ref = dict(reference.named_modules())
    out = []
    for conv_name, _ in conv_bn_pairs(model):
        w, w0 = model.get_submodule(conv_name).weight.detach(), ref[conv_name].weight.detach()
        rms = float(w0.pow(2).sum() / w0.shape[0]) ** 0.5
        out.append(w.flatten(1).norm(dim=1).cpu() / rms)
    return torch.cat(out)


row_ratio = {k: float(row_norm_ratio(v["model"], base).median()) for k, v in sparse.items()}
for k, v in row_ratio.items():
    print(f"{k:6s} median row norm / dense RMS at the end of the sparse phase: {v:.3f}  "
          f"(effective lr x{1 / v ** 2:,.1f});  sparse accuracy "
          f"{results[k]['accuracy']['regularized']:.1f}")
assert abs(row_ratio["l1"] - float(row_norm_ratio(base, base).median())) < 1e-6   # no phase
assert row_ratio["SSL 2D"] < row_ratio["SSL"]                   # twice the push: emptier rows
acc_ssl = {k: results[k]["accuracy"] for k in ("SSL", "SSL 2D")}
assert acc_ssl["SSL 2D"]["regularized"] < acc_ssl["SSL"]["regularized"]   # ... and less left

# %% [markdown]
# **SSL at 2D against SSL at D** is the reason for the rule's `resisted=False`. At 2D (the
# margin the BN-based rules use) removal costs almost nothing — their groups include what BN
# does not renormalize, the consumers' input slices, so the channels the ranking removes were
# already switched off, and SSL's zero-out makes many groups exactly zero — but the rows that
# feed a BN collapse to 1–2% of their dense norm and train for the rest of the phase with an
# effective learning rate thousands of times the nominal one: the sparse phase itself destroys
# most of the accuracy, and two epochs of fine-tuning do not bring it back (in our run: rows at
# 1.9% of the dense norm, sparse 42.9%, removed 42.9%, tuned 56.4%, against `l1`'s 84.8%). At
# D the rows keep about a sixth of their norm and the sparse phase keeps most of the accuracy
# (83.2%; OICSR 80.1%), and both end within 3 points of `l1` after fine-tuning, but removal
# is no longer nearly free (−43 and −33 points; recalibration gives back about two thirds and
# three quarters of it): the push that leaves the kept rows alive leaves the removed ones alive too
# (compare the *removed* and *recal.* columns). At this scale
# the group lasso on BN-fed rows trades one for the other; neither reach gives both. (The
# papers' λ over hundreds of epochs lets the rows settle where the growth that the gradient
# noise gives a scale-invariant row balances the push; Going further (a), (e).)
#
# ### GREG: the penalized filters shrink, BN scales them back
#
# GREG's magnitude separation: the mean $|w|$ of the pruned and of the kept filters (relative
# to their values at the start), recorded at every λ update, with $\lambda_j$ of the pruned
# filters (Section 5's `greg1_lambda` at the rule's δ):

# %%
greg = methods["GREG"]
steps_g = [s for s, _ in greg.log]
rel = {"pruned": [], "kept": []}
for _, mags in greg.log:
    for key in rel:
        vals = [mags[i][greg.pruned[i] if key == "pruned" else ~greg.pruned[i]].mean()
                for i in mags if greg.pruned[i].any()]
        rel[key].append(float(torch.stack(vals).mean()))
rel = {k: np.array(v) / v[0] for k, v in rel.items()}
lam_path = [greg1_lambda(s, greg.delta, greg.tau, greg.k_u) for s in steps_g]
fig, ax = plt.subplots(figsize=(6, 3))
for key, v in rel.items():
    ax.plot(steps_g, v, "o-", ms=3, label=f"{key} filters")
ax.set_yscale("log")
ax.set_xlabel("iteration")
ax.set_ylabel("mean |w| / initial")
ax2 = ax.twinx()
ax2.plot(steps_g, lam_path, "k:", lw=1)
ax2.set_ylabel("λ_j of pruned filters (dotted)")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
print(f"GREG: pruned filters at {rel['pruned'][-1]:.3f}x, kept at {rel['kept'][-1]:.3f}x "
      "their initial mean |w|")
assert rel["pruned"][-1] < 0.5 * rel["kept"][-1]          # the magnitudes separated

# %% [markdown]
# The common budget ranks GREG's filters by magnitude across layers; the preset pruned filters
# are the smallest, so it removes only preset ones (it meets the target before it has removed
# all of them). And yet removal costs GREG the most of the four: the shrunk filters feed a BN,
# which divides by their (shrunk) running standard deviation, so the channel's BN output — what
# the next layer reads — is nearly as large as that of a kept channel. Measured on a test batch
# of the sparse model, per layer:

# %%
gm, g_rec = sparse["GREG"]["model"], sparse["GREG"]
groups_g = pl.channel_groups(gm, xb1)
bn_of = dict(conv_bn_pairs(gm))
n_left = 0
for i, mask in g_rec["pruned"].items():
    kept_budget = set(g_rec["keep"][i].tolist()) if i in g_rec["keep"] else set(range(len(mask)))
    kept_preset = set(torch.nonzero(~mask).flatten().tolist())
    assert kept_preset <= kept_budget               # the budget removed preset filters only
    n_left += len(kept_budget - kept_preset)
print(f"the common budget removed only preset filters; {n_left} of "
      f"{sum(int(m.sum()) for m in g_rec['pruned'].values())} preset filters were not needed")
acts = {}
hooks = [gm.get_submodule(bn_of[groups_g[i].sources[0]]).register_forward_hook(
    lambda mod, inp, out, i=i: acts.__setitem__(i, out.detach().pow(2).mean((0, 2, 3))
                                                .sqrt().cpu()))
    for i in g_rec["pruned"]]
x_test = next(iter(data.test))[0]
with torch.no_grad():
    gm(x_test)
for h in hooks:
    h.remove()
w_ratio, a_ratio = [], []
for i, mask in g_rec["pruned"].items():
    w = gm.get_submodule(groups_g[i].sources[0]).weight.detach().flatten(1).norm(dim=1).cpu()
    w_ratio.append(float(w[mask].mean() / w[~mask].mean()))
    a_ratio.append(float(acts[i][mask].mean() / acts[i][~mask].mean()))
    print(f"  {groups_g[i].sources[0]:15s} pruned / kept: filter norm {w_ratio[-1]:.3f}, "
          f"BN output RMS {a_ratio[-1]:.2f}")
if QUICK:
    assert np.median(w_ratio) < 0.2 < 0.3 < np.median(a_ratio)   # shrunk, yet still talking

# %% [markdown]
# So GREG's removal is a real perturbation at this scale (in our run 85.5% → 64.3%, −21
# points, against −43 and −33 for SSL and OICSR at D and −76 for OTO): the
# penalty shrank exactly the right filters, to about 5% of the kept ones, but the BN that
# follows them undid most of it, and the channels still carried 60–80% of a kept channel's
# signal when they were cut. What the growing penalty bought is visible against `l1`, which
# removes nearly the same filters — the same per-layer magnitude choice, Section 5 — without any
# preparation: GREG's *removed* and *recal.* columns (64.3, 77.5) are far above `l1`'s (18.0,
# 48.8), and after fine-tuning it is slightly ahead (in our run +1.2 ± 0.7 points; it also
# trained two epochs more). Among the four, GREG's sparse phase kept the network most intact
# *and* prepared the removal best; the group-lasso methods prepared it less at the rule's
# reach (SSL, OICSR), only at the cost of the network at twice the reach (SSL 2D), or not at
# all (OTO, below). The papers hold
# $\lambda_j = \tau$ for thousands of iterations, until the filters fall below BN's small
# constant and the channel's output is $\beta_k$ alone.
#
# ### OTO: exact under its own rule, but nothing to remove at this reach
#
# OTO's own decision rule removes exactly the zero groups (`run(..., budget="own")` would use
# it; here `finish(model)` on the sparse model, kept by `on_sparse`). Removing them must not
# change the output, whatever their number:

# %%
oto, s_o = methods["OTO"], sparse["OTO"]
own = s_o["own"]
n_zero = sum(int((s == 0).sum()) for s in s_o["scores"].values())
n_groups = sum(int(s.numel()) for s in s_o["scores"].values())
acc_own = evaluate(own, data.test)
with torch.no_grad():
    y_sparse, y_own = s_o["model"](x_test), own(x_test)
own_macs = pl.count(own, xb1)[0] / results["OTO"]["dense"]["macs"]
print(f"OTO: {n_zero} of {n_groups} zero-invariant groups exactly zero; own rule keeps "
      f"{100 * own_macs:.1f}% of the MACs; accuracy {results['OTO']['accuracy']['regularized']:.2f}"
      f" -> {acc_own:.2f}, max |output change| = {float((y_sparse - y_own).abs().max()):.1e}")
channels = lambda model: sum(g.size for g in pl.channel_groups(model, xb1))   # noqa: E731
assert channels(own) == channels(s_o["model"]) - n_zero        # exactly the zero groups went
assert abs(acc_own - results["OTO"]["accuracy"]["regularized"]) < 0.2   # exact removal
assert torch.allclose(y_sparse, y_own, atol=1e-4 * float(y_sparse.abs().max()))
assert (n_zero == 0) == (own_macs == 1.0)
hist = oto.sparsity_history()
assert all(f == 0 for s, f in hist if s <= math.ceil(oto.n_p * oto.total_steps))   # no zeros
assert (np.diff([f for _, f in hist]) >= 0).all()                 # ... and none revived

# %% [markdown]
# Why (almost) no group reached zero: with $\epsilon = 0$ the half-space test projects a group
# only when one step turns it by more than 90°, i.e. when a single step is longer than the
# group's own component along itself — after the whole phase has brought it close to 0. The
# penalty's total reach without momentum is $\lambda\sum_s\eta_s$; compared with the group
# norms at the start:

# %%
s_oto = results["OTO"]["strength"]
reach_oto = s_oto["params"]["lam"] * s_oto["sum_lr"] if "sum_lr" in s_oto else float("nan")
norms0 = oto.snaps[0][1]
print(f"OTO reach {reach_oto:.3f}; group norms at the start: min {float(norms0.min()):.3f}, "
      f"median {float(norms0.median()):.3f}; groups within reach: "
      f"{int((norms0 <= reach_oto).sum())} of {len(norms0)}")

# %% [markdown]
# So under the common budget OTO's removal is a one-shot ranking of barely changed group norms
# — a magnitude rule like `l1`'s, but global across layers, with unweighted groups of unequal
# size (Section 1) — and it loses to `l1` (in our run 81.1% against 84.8% after fine-tuning,
# 31.6% against 48.8% after recalibration). How much of that is the allocation across layers?
# Remove the same number of channels per layer as `l1` did, chosen by OTO's own scores on its
# sparse model (the same MACs exactly), and recalibrate BN:

# %%
l1_widths = results["l1"]["widths"]
g_o = pl.channel_groups(s_o["model"], xb1)
keep_pl = {g.index: torch.argsort(s_o["scores"][g.index], descending=True)
           [:l1_widths[g.sources[0]]].sort().values for g in g_o if not g.coupled}
oto_pl = pl.remove_channels(s_o["model"], g_o, keep_pl)
assert pl.count(oto_pl, xb1)[0] == results["l1"]["pruned"]["macs"]    # l1's widths exactly
acc_pl_rm = evaluate(oto_pl, data.test)
recalibrate_bn(oto_pl, data.train, SC.recal_batches)
acc_pl_cal = evaluate(oto_pl, data.test)
a_o = results["OTO"]["accuracy"]
print(f"OTO scores, global ranking (protocol): removed {a_o['removed']:.1f}, recal. "
      f"{a_o['recalibrated']:.1f}\nOTO scores, l1's per-layer counts:       removed "
      f"{acc_pl_rm:.1f}, recal. {acc_pl_cal:.1f}\nl1 (dense L1 norms, per layer):          "
      f"removed {a_l1['removed']:.1f}, recal. {a_l1['recalibrated']:.1f}   "
      f"(standard error about {standard_error(a_l1['recalibrated'], N_TEST):.1f})")

# %% [markdown]
# ### Restoring the row norms before fine-tuning: before / after
#
# The protocol scales the rows that feed a BN back to the dense RMS norm before fine-tuning
# (`calibrate.restore_bn_input_norms`; the function is unchanged, Section 6). What it changes:
# two copies of the protocol's removed and recalibrated model, one restored and one as is,
# fine-tuned on the very same batches (`PROBE_EPOCHS` of an epoch, the protocol's lr and
# schedule), for OTO and for SSL at 2D:

# %%
probe = [b for _, b in zip(range(math.ceil(PROBE_EPOCHS * len(data.train))), data.train)]
probe_acc = {}
for label in ("OTO", "SSL 2D"):
    rem = sparse[label]["removed"]
    recalibrate_bn(rem, data.train, SC.recal_batches)
    restored, as_is = copy.deepcopy(rem), copy.deepcopy(rem)
    n_rows = sum(restore_bn_input_norms(restored, base).values())
    with torch.no_grad():
        y_r, y_a = restored.eval()(x_test), as_is.eval()(x_test)
    assert torch.allclose(y_r, y_a, atol=1e-4 * float(y_a.abs().max()))   # same function
    for key, mdl in (("restored", restored), ("as is", as_is)):
        torch.manual_seed(SC.seed)
        fit(mdl, probe, epochs=1, lr=SC.ft_lr, weight_decay=SC.weight_decay,
            schedule=SC.schedule, device=DEVICE, quiet=True)
        probe_acc[label, key] = evaluate(mdl, data.test)
    print(f"{label:4s} median row norm / dense RMS {float(row_norm_ratio(rem, base).median()):.3f}"
          f" ({n_rows} rows rescaled); after {len(probe)} fine-tuning steps: restored "
          f"{probe_acc[label, 'restored']:.1f}, as is {probe_acc[label, 'as is']:.1f}  "
          f"(+-{standard_error(probe_acc[label, 'as is'], N_TEST):.1f} each)")

# %% [markdown]
# In our run the per-layer choice recovers OTO's recalibrated accuracy to `l1`'s level (48.1%
# against 31.6% with the global ranking, `l1` 48.8%): OTO's scores are no worse than `l1`'s,
# but the global ranking of unweighted group norms cuts some layers to a few channels (the width
# figure: 3 of 16 in `layer1.1`, 10 of 64 in `layer3.0`) and leaves others almost whole.
#
# The size of the restore effect follows the row norms. Rows shrunk by a factor $\alpha$ are
# fine-tuned with an effective learning rate $1/\alpha^2$ times the nominal one (BN's scale
# invariance, Section 6). Where the sparse phase collapsed the rows (SSL at 2D, 2% of the dense
# norm), the unrestored copy is fine-tuned at a learning rate thousands of times too hot and
# recovers far less in the same steps (in our run 28.6% against 52.7% restored); where the rows
# barely moved (OTO, 79%), restoring them changes nothing measurable (71.9% against 71.9%).
#
# SSL's shape and depth groups (`lam_shape`, `lam_depth`) are available but not used here:
# kernel positions cannot be removed by channel surgery (`prunelib` keeps them as frozen zeros),
# and a whole residual branch can only be shrunk to its minimum width.
#
# ## Summary
#
# * The group lasso is the L1 norm of group norms: a round norm inside a group, a pointed one
#   across groups, so whole groups reach zero. Its subgradient has unit length per group. SSL,
#   OICSR and OTO use the unweighted sum (not Yuan & Lin's $\sqrt{p_g}$ weights), so large
#   groups are pulled less per weight than small ones.
# * A group must match what can be removed: SSL regularizes each layer's filter and channel
#   slices separately, OICSR joins a channel's producer rows with every consumer's input slice,
#   OTO's zero-invariant groups hold every producer parameter (BN γ and β included) so that a
#   zero group contributes exactly nothing and removal is exact (checked: < 0.2 points, and
#   the very same outputs).
# * Subgradient steps (SSL, OICSR) shrink but chatter; SSL's zero-out threshold or a ranking
#   finishes the job. HSPG projects a group to zero when its trial point falls in the
#   half-space $\langle z, x_g\rangle < \epsilon\|x_g\|^2$ — a half-space test, not a crossing
#   of the origin — and zero groups stay zero; the step decreases ψ only under step-size
#   conditions.
# * GREG grows a smooth L2 penalty slowly (a gradient method) on exactly the filters it will
#   remove; a uniformly growing penalty shrinks low-curvature directions first.
# * BatchNorm's scale invariance decides much of what happens at this scale: the loss does not
#   resist a push along a conv row that feeds a BN, a shrunk row is renormalized by the BN (so
#   GREG's shrunk filters still talk) and trains with an effective lr $\propto 1/\|w\|^2$ (so
#   the protocol restores row norms before fine-tuning). So the strength rule gives the group
#   norms a reach of D, not 2D: at 2D SSL empties every row and loses its sparse phase; at D it
#   keeps its accuracy but removal is no longer free. OTO's momentum-free groups barely move (and
#   its global ranking of unweighted norms allocates the removal badly), and GREG, which targets
#   the channels it removes, ends slightly ahead of the magnitude baseline.
#
# ## Exercises
#
# Each exercise is a code cell with a solution between `### BEGIN SOLUTION` and
# `### END SOLUTION`, followed by a check cell whose first line names the exercise and its
# points; `python tools/make_student.py` writes the student version. Exercises only rely on the
# setup cell.
#
# **Exercise 1 — implementation: SSL's filter-group subgradient.** For a conv weight `w` of shape
# (out, in, kh, kw), return $\lambda\, W_j / \|W_j\|$ for every filter $j$ (0 for a zero
# filter). The check compares with autograd of $\lambda\sum_j\|W_j\|$ (so your answer may not
# use autograd).
# %%
def filter_lasso_grad(w: torch.Tensor, lam: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    norm = w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))
    return torch.where(norm > 0, lam * w / norm.clamp_min(1e-30), torch.zeros_like(w))
    ### END SOLUTION


# %%
# check: ch4.filter-grad (2 points)
from prunelib.checks import names_used as _names  # what an answer calls  # noqa: E402

assert not _names(filter_lasso_grad) & {
    "grad", "backward", "autograd", "func", "jacrev", "jacfwd", "vjp", "methods"}, \
    "write the subgradient yourself: no autograd"
_w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
_w[2] = 0.0
_g = filter_lasso_grad(_w, 0.3)
_wr = _w.clone().requires_grad_(True)
_nz = torch.tensor([n for n in range(6) if n != 2])
(0.3 * _wr[_nz].flatten(1).norm(dim=1).sum()).backward()
assert _g.shape == _w.shape
assert torch.allclose(_g, _wr.grad)                         # autograd (zero row excluded)
assert (_g[2] == 0).all()                                   # a zero group gets no push
assert torch.allclose(_g.flatten(1).norm(dim=1)[_nz], torch.full((5,), 0.3,
                                                                dtype=torch.float64))

# %% [markdown]
# **Exercise 2 — implementation: the half-space projection.** Given the current groups `x` and the
# trial point `x_hat` (both (groups, d)), return the projected trial point: groups with $\langle
# \hat x_g, x_g\rangle < \epsilon\|x_g\|^2$ and groups that are zero in `x` become 0, the others
# keep $\hat x_g$. The check is written from the definition.

# %%
def half_space_project(x: torch.Tensor, x_hat: torch.Tensor, eps: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    sq = x.pow(2).sum(1)
    kill = ((x_hat * x).sum(1) < eps * sq) | (sq == 0)
    return torch.where(kill[:, None], torch.zeros_like(x_hat), x_hat)
    ### END SOLUTION


# %%
# check: ch4.half-space (2 points)
_gen = torch.Generator().manual_seed(3)
_x = torch.randn(50, 7, generator=_gen, dtype=torch.float64)
_x[:5] = 0.0
_xh = _x + 2.0 * torch.randn(50, 7, generator=_gen, dtype=torch.float64)
_n_proj = {}
for _eps in (0.0, 0.5):
    _p = half_space_project(_x, _xh, _eps)
    assert _p.shape == _x.shape
    for _i in range(50):
        _dot, _sq = float(_xh[_i] @ _x[_i]), float(_x[_i] @ _x[_i])
        if _sq == 0 or _dot < _eps * _sq:
            assert (_p[_i] == 0).all(), (_i, _eps)          # projected or already zero
        else:
            assert torch.equal(_p[_i], _xh[_i]), (_i, _eps)  # untouched
    _n_proj[_eps] = int((_p.abs().sum(1) == 0).sum()) - 5
assert 0 < _n_proj[0.0] < _n_proj[0.5] < 45                  # real projections, more with eps

# %% [markdown]
# **Exercise 3 — implementation: a zero-invariant group by hand.** In the conv → BN → ReLU → conv
# network below, zero *everything that produces* channel `k` (the exercise: which tensors are
# they?). The check verifies that channel `k` then carries exactly zero for any input, in training
# and in evaluation mode, and that removing it with `prunelib` leaves the output unchanged.

# %%
def zero_zig_(seq: nn.Sequential, k: int) -> None:
    """Zero the zero-invariant group of channel k of seq[0] (conv with bias) -> seq[1] (BN)."""
    ### BEGIN SOLUTION
    with torch.no_grad():
        seq[0].weight[k] = 0.0
        seq[0].bias[k] = 0.0
        seq[1].weight[k] = 0.0
        seq[1].bias[k] = 0.0
    ### END SOLUTION


# %%
# check: ch4.zero-group (2 points)
from prunelib.checks import names_used as _names  # what an answer calls  # noqa: E402

assert not _names(zero_zig_) & {"zero_", "channel_groups", "members", "rows"}, \
    "name the tensors yourself: no prunelib group"
torch.manual_seed(1)
_seq = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                     nn.Conv2d(6, 4, 3, padding=1))
with torch.no_grad():
    _seq[1].weight.uniform_(0.5, 1.5)
    _seq[1].bias.uniform_(0.1, 0.5)                         # beta > 0: a live constant
    _seq[1].running_mean.uniform_(-1, 1)
    _seq[1].running_var.uniform_(0.5, 2)
zero_zig_(_seq, 2)
_xin = torch.randn(5, 3, 8, 8)
for _mode in (True, False):
    _seq.train(_mode)
    with torch.no_grad():
        assert (_seq[:3](_xin)[:, 2] == 0).all(), f"train={_mode}"
_seq.eval()
_gs = pl.channel_groups(_seq, _xin)
_small = pl.remove_channels(_seq, _gs, {0: torch.tensor([0, 1, 3, 4, 5])}).eval()
with torch.no_grad():
    assert torch.allclose(_small(_xin), _seq(_xin), atol=1e-6)
assert _small[0].out_channels == 5

# %% [markdown]
# **Exercise 4 — derivation: the proximal operator of the weighted group lasso.** Derive
# $\operatorname{prox}_{\theta c_g\|\cdot\|_2}(z_g) = \arg\min_u \tfrac12\|u - z_g\|_2^2 +
# \theta c_g\|u\|_2$ from the optimality condition $0 \in u - z_g + \theta c_g\,\partial\|u\|_2$
# with the subdifferential of Section 1: for $u \ne 0$, show that $u$ is a positive multiple of
# $z_g$ and find the multiple; then find when $u = 0$ is optimal. Implement it for the rows of a
# (groups, d) matrix `z`, a threshold $\theta = \eta\lambda \ge 0$ and per-group weights `c`
# ($c_g = 1$: the methods of this chapter; $c_g = \sqrt{p_g}$: Yuan & Lin). Then say, from your
# formula, below which size per weight a group of $p_g$ weights of similar size is zeroed, with
# and without the $\sqrt{p_g}$ weights. The check uses the optimality conditions, not a
# reference implementation.

# %%
def weighted_block_prox(z: torch.Tensor, theta: float, c: torch.Tensor) -> torch.Tensor:
    """Row g of the result: argmin_u 0.5 ||u - z_g||^2 + theta * c_g * ||u||_2."""
    ### BEGIN SOLUTION
    norm = z.norm(dim=1, keepdim=True)
    return (1 - theta * c[:, None] / norm.clamp_min(1e-300)).clamp_min(0) * z
    ### END SOLUTION


# %%
# check: ch4.block-prox (3 points)
_gen = torch.Generator().manual_seed(4)
_z = torch.randn(60, 5, generator=_gen, dtype=torch.float64) * torch.logspace(
    -1, 0.5, 60, dtype=torch.float64)[:, None]                  # group norms over a wide range
_z[7] = 0.0
for _theta, _c in ((0.4, torch.ones(60, dtype=torch.float64)),
                   (0.25, torch.rand(60, generator=_gen, dtype=torch.float64) * 3)):
    _u = weighted_block_prox(_z, _theta, _c)
    assert _u.shape == _z.shape and _u.dtype == _z.dtype
    _nu = _u.norm(dim=1)
    _on = _nu > 0
    _kkt = _u[_on] - _z[_on] + (_theta * _c[_on] / _nu[_on])[:, None] * _u[_on]
    assert _kkt.abs().max() < 1e-10                             # u != 0: the gradient is 0
    assert bool((_z[~_on].norm(dim=1) <= _theta * _c[~_on] + 1e-12).all())   # u = 0: 0 in it
    assert 5 < int((~_on).sum()) < 55                            # some groups zeroed, not all
    assert bool(((_u == 0).all(1) | (_u != 0).all(1)).all())     # whole groups

# %% [markdown]
# **Exercise 5 — experiment: how much hotter does a shrunk row train?** Section 6 claims that a
# conv row that feeds a BatchNorm, scaled by $\alpha > 0$, turns $1/\alpha^2$ times as far in
# one SGD step. Measure it: `turn_angle(model, x, y, k, alpha, lr)` takes a model whose
# `model[0]` is a conv without bias followed by a BatchNorm (training mode), scales row `k` of
# the conv by `alpha` *in a copy* of the model, takes one plain SGD step of size `lr` (no
# momentum, no weight decay) on the cross-entropy of `(x, y)`, and returns the angle in radians
# between row `k` before and after the step. The check measures a few values of $\alpha$ and
# compares the ratios with the law; then ask yourself what a row shrunk 50-fold by a sparse
# phase needs before fine-tuning.

# %%
def turn_angle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, alpha: float,
               lr: float) -> float:
    """Angle (radians) by which one SGD step turns row k of model[0], scaled by alpha."""
    ### BEGIN SOLUTION
    m = copy.deepcopy(model).train()
    w = m[0].weight
    with torch.no_grad():
        w[k] *= alpha
    before = w[k].detach().clone()
    F.cross_entropy(m(x), y).backward()
    after = before - lr * w.grad[k]
    cos = (before * after).sum() / (before.norm() * after.norm())
    return float(torch.arccos(cos.clamp(-1.0, 1.0)))
    ### END SOLUTION


# %%
# check: ch4.hot-rows (3 points)
torch.manual_seed(5)
_net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, eps=1e-12),
                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double()
_xin, _yin = torch.randn(16, 3, 8, 8, dtype=torch.float64), torch.arange(16) % 4
_w0 = _net[0].weight.detach().clone()
_ang = {_a: turn_angle(_net, _xin, _yin, 3, _a, 1e-3) for _a in (1.0, 0.1, 0.02)}
assert torch.equal(_net[0].weight, _w0) and _net[0].weight.grad is None   # the model untouched
assert 0 < _ang[1.0] < 1e-3
for _a in (0.1, 0.02):                     # tan of the turn grows exactly as 1 / alpha^2
    assert abs(math.tan(_ang[_a]) / math.tan(_ang[1.0]) * _a ** 2 - 1) < 1e-4, (_a, _ang)

# %% [markdown]
# **Going further** (no check): (a) rerun Section 7 with the papers' strengths: pass them
# explicitly, e.g. `pl.methods.get("ssl", lam_filter=3e-3, lam_channel=3e-3)`,
# `pl.methods.get("oto", lam=1e-3)` (`run` then records "set by the caller"), and compare the
# histograms and the row norms; (b) run GReg-2 (`pl.methods.get("greg", variant="greg2")`)
# and compare the filters it picks with GReg-1's L1 picks (it warns when the phase is too short
# for its pick); (c) give OTO `eps=0.5` and a longer phase (`reg_epochs=...` as a keyword of
# `run`) and watch `sparsity_history()`; (d) let OICSR prune the trunk (`residual="coupled"`);
# (e) give OICSR twice the rule's λ (`run(..., strength={"lam": 2 * lam})`, as "SSL 2D" above)
# and compare its sparse-phase accuracy and row norms with its run at D; (f) run OTO with
# `restore_norms=False` for the full
# fine-tuning and compare with the probe of Section 8; (g) give GREG's pull to every slice of
# its pruned channels — BN's γ and β and the consumers' input columns too, which BN does not
# renormalize (`pl.methods.get("greg", scope="group")`, as Torch-Pruning's growing-regularization
# pruner does) — and compare the BN output RMS of Section 8 and the accuracy right after
# removal with the paper's filters-only pull (chapter 5, Section 7 measures both at 5 + 5
# epochs).

# %%
print(f"chapter run time: {time.time() - T_START:.0f} s at scale {SCALE} on {DEVICE}")

# %% [markdown]
# ## References
#
# * Y. He, L. Xiao, "Structured Pruning for Deep Convolutional Neural Networks: A Survey",
#   IEEE TPAMI 46(5), 2024 (arXiv:2303.00566).
# * M. Yuan, Y. Lin, "Model Selection and Estimation in Regression with Grouped Variables",
#   J. Royal Statistical Society B 68(1), 2006 (group lasso).
# * W. Wen, C. Wu, Y. Wang, Y. Chen, H. Li, "Learning Structured Sparsity in Deep Neural
#   Networks", NeurIPS 2016 (SSL); code: github.com/wenwei202/caffe (branch scnn).
# * J. Li, Q. Qi, J. Wang, C. Ge, Y. Li, Z. Yue, H. Sun, "OICSR: Out-In-Channel Sparsity
#   Regularization for Compact Deep Neural Networks", CVPR 2019 (no public code).
# * T. Chen, B. Ji, T. Ding, B. Fang, G. Wang, Z. Zhu, L. Liang, Y. Shi, S. Yi, X. Tu, "Only
#   Train Once: A One-Shot Neural Network Training and Pruning Framework", NeurIPS 2021 (OTO,
#   HSPG); code: github.com/tianyic/only_train_once (v1: optimizer/hspg.py).
# * H. Wang, C. Qin, Y. Zhang, Y. Fu, "Neural Pruning via Growing Regularization", ICLR 2021
#   (GREG); code: github.com/MingSun-Tse/Regularization-Pruning.
# * H. Li, A. Kadav, I. Durdanovic, H. Samet, H. P. Graf, "Pruning Filters for Efficient
#   ConvNets", ICLR 2017 (L1 filter magnitude).
