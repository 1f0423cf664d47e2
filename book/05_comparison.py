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
# # Chapter 5 — Comparing the families: all seventeen under one protocol
#
# **Objectives.** After this chapter you can
# 1. say what a comparison table must hold fixed (baseline, MACs counter, schedule, budget,
#    seed, evaluation set) and why the survey's table, copied from seventeen papers, cannot;
# 2. read a mean ± std over seeds and decide which differences the noise allows you to claim;
# 3. tell what *exact* zeros buy at removal, and what BN recalibration and fine-tuning repair;
# 4. measure how much of a MACs reduction turns into speed on a real CPU;
# 5. name the design choices (residual policy, strength, ranking, recalibration) behind each
#    row, and put the papers' own numbers next to ours without mixing them;
# 6. run a row of the comparison yourself with `prunelib sweep`, and add it to the table.
#
# **Run time** (`python book/05_comparison.py`, whole chapter): about 2 min on the idle 2-core
# CPU, almost all of it the one live row of Section 9 (quick scale). Everything else reads the
# committed results: `book/results/bench/*.json`, one file per run of the sweep
# (`book/results/bench/README.md` has the commands that made them, and what they cost).
#
# Chapters 2–4 ran each family on a 10k-image subset for 2 + 2 epochs, enough to see a
# mechanism but too noisy to rank methods. This chapter reads a larger, slower comparison made
# once on the same CPU with `prunelib sweep`: every method of chapters 2–4 plus the magnitude
# baselines, the full 50k training images and 10k test images, 3 epochs of sparse training and
# 3 of fine-tuning at lr 0.01 (the `bench` scale), from the same 91.2% ResNet-20, at 50% and 30%
# of the dense MACs kept, and three seeds for some of them.

# %%
# Setup: the only cell with settings. Exercises are graded with this cell alone (keep it cheap).
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib
if "ipykernel" not in sys.modules:        # run as a script: draw off-screen, no windows
    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", message=".*non-interactive.*")
import matplotlib.pyplot as plt
import numpy as np

import prunelib as pl
import prunelib.methods  # noqa: F401  (the registry: pl.methods.names)
from prunelib import report
from prunelib.pipeline import SCALES

# the committed sweep (the notebook runs in book/; as a script from the repository root too)
RESULTS = next(p for p in (Path("results/bench"), Path("book/results/bench")) if p.is_dir())
LIVE_SCALE = os.environ.get("PRUNELIB_SCALE", "quick")      # the scale of Section 9's live row
assert LIVE_SCALE in SCALES, f"PRUNELIB_SCALE must be one of {sorted(SCALES)}"
LIVE_METHOD = "ns"
T_START = time.time()

results = report.load_results([RESULTS])     # read as JSON and checked, nothing unpickled
rows = report.aggregate(results)             # one row per (method, budget): mean, std, n


def row(method: str, budget: str = "macs 0.5") -> dict | None:
    """The aggregated row of `method` at `budget` ('macs 0.5': 50% of dense MACs kept)."""
    return next((r for r in rows if r["method"] == method and r["budget"] == budget), None)


def show(markdown: str) -> None:
    """A markdown table: rendered in a notebook (and on the website), printed in a script."""
    if "ipykernel" in sys.modules:
        from IPython.display import Markdown, display
        display(Markdown(markdown))
    else:
        print(markdown)


print(f"{len(results)} runs in {RESULTS}, {len(rows)} (method, budget) rows; "
      f"prunelib {pl.__version__}")

# %% [markdown]
# ## 1. One protocol
#
# The survey's comparison tables (He & Xiao, Tables 2–4) copy each paper's own numbers. On
# CIFAR-10 ResNet-56 alone the baselines they start from range from 93.1% to 93.8%; FLOPs are
# counted with and without the shortcut convs, BN and the classifier; schedules run from 100 to
# 480 epochs; some rows are the best of several runs. A 0.3-point "drop" in one row and a 0.3-point
# "gain" in another can both be the difference of two baselines.
#
# A run of `prunelib sweep` fixes all of these: one baseline file, one MACs counter
# (`pl.count`: the conv and linear layers, per image), one schedule (the scale's settings,
# stored in each result), one budget rule (every method must reach the same fraction of dense
# MACs; a method that decides by its own rule is still held to it), the same 10k test images,
# and a seed per run. What it cannot fix is that each method keeps *its paper's* mechanism —
# which channels it may remove, how its strength is set, how it ranks — Section 7 lists them.

# %%
first = results[0]
print("scale     :", first["scale"], {k: first["settings"][k] for k in (
    "reg_epochs", "reg_lr", "ft_epochs", "ft_lr", "schedule", "batch_size", "weight_decay")})
base_file = (first.get("baseline") or {}).get("path", "?")
print("baseline  :", f"{first['accuracy']['dense']:.2f}% on {first['test_images']} test images,",
      Path(base_file).name, "(book/baselines)")
print("machine   :", first["device"], "| torch", first["torch"], "| threads", first.get("threads"))
commits = {(r.get("commit") or {}).get("commit", "?")[:10] for r in results}
dirty = [f"{report.row_name(r)}@{r['target']['macs']:g}" for r in results
         if (r.get("commit") or {}).get("dirty")]
print("commits   :", ", ".join(sorted(commits)), "| run from a tree with changes:",
      ", ".join(dirty) or "none", "(results/bench/README.md says what they were)" * bool(dirty))
print("commands  :", *sorted({r.get("command", "?") for r in results}), sep="\n  ")

# %% [markdown]
# Which runs are here? The comparison the book commits is every registered method plus the
# magnitude baselines (`l1`: the same fraction of every layer; `l1_global`: one global
# threshold) at 50% and 30% of dense MACs, seed 0, and seeds 1 and 2 at 50% for `l1` and two
# regularizers (NS and ResRep). The cell lists what is missing, if anything: the sweep writes
# each run as it finishes and resumes where it stopped, so a folder can be partial.

# %%
NAMES = sorted(pl.methods.names())
planned = {(m, b, 0) for m in NAMES for b in (0.5, 0.3)}
planned |= {(m, 0.5, s) for m in ("l1", "ns", "resrep") for s in (1, 2)}
have = {(report.row_name(r), r["target"]["macs"], r["seed"]) for r in results}
missing = sorted(planned - have)
print(f"{len(planned & have)} of {len(planned)} planned runs committed; "
      f"methods at 50%: {len({m for m, b, _ in have if b == 0.5})} of {len(NAMES)}")
if missing:
    print("missing:", ", ".join(f"{m}@{b:g}/seed{s}" for m, b, s in missing))

# %% [markdown]
# ## 2. The table
#
# One row per method and budget; accuracies in %, mean ± sample std where there are several
# seeds. *sparse*: the model at the end of the sparse phase, before anything is removed;
# *removed*: right after the channels are physically removed; *recal.*: after re-estimating the
# BN statistics on 100 training batches (no gradient step); *tuned*: after fine-tuning.
# *MACs*, *params*: fractions of dense; *speedup@64*: measured dense / pruned latency at batch
# 64 on this CPU (both through `pl.for_inference`), *ideal*: dense / pruned MACs.

# %%
show(report.table(rows))

# %% [markdown]
# ## 3. Accuracy against MACs kept
#
# The issue that asked for this chapter set a bar from a similar schedule measured with another
# library (Torch-Pruning): global magnitude pruning of a ResNet-20 to 50% MACs ended 0.8 points
# below its dense model; its regularized pruners 0.9–1.7 below. The cell checks our table
# against it — the best method within 0.8 points of dense, and every regularizer above the
# magnitude baseline *right after removal* — and prints what holds and what does not.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
report.plot_accuracy_vs_macs(rows, axes[0])
report.plot_removed_vs_tuned(rows, axes[1])
fig.tight_layout()
plt.show()

MAGNITUDE = {"l1", "l1_global", "tp_magnitude"}    # tp_magnitude: Torch-Pruning's, Section 7
SEARCH = {"eagleeye"}                       # no regularizer: a search over layer-wise rates
for budget in ("macs 0.5", "macs 0.3"):
    here = [r for r in rows if r["budget"] == budget and r["tuned"] is not None]
    if not here:
        continue
    best = max(here, key=lambda r: r["tuned"].mean)
    base = row("l1", budget)
    print(f"\n{budget}: best tuned {best['method']} {best['tuned'].mean:.2f}%, "
          f"{best['drop'].mean:+.2f} points from dense "
          f"({'within' if best['drop'].mean >= -0.8 else 'NOT within'} the 0.8-point bar)")
    if base is None:
        continue
    regs = [r for r in here if r["method"] not in MAGNITUDE | SEARCH]
    above = sorted(r["method"] for r in regs if r["removed"].mean > base["removed"].mean)
    below = sorted(r["method"] for r in regs if r["removed"].mean <= base["removed"].mean)
    print(f"  right after removal, l1 {base['removed'].mean:.2f}%: "
          f"{len(above)} of {len(regs)} regularizers above it ({', '.join(above) or '-'})")
    print(f"  at or below it: {', '.join(below) or '-'}")

# %% [markdown]
# Read the left panel by columns: at the same MACs, a higher point is a better method; the
# error bars (where there are seeds) are one standard deviation. The right panel puts each run's
# accuracy right after removal (x) against its accuracy after fine-tuning (y). A regularizer
# "earns its name" when its points sit far to the right: the sparse phase has already moved the
# network's function onto the channels that stay, so removal costs little. Points near the
# left edge are methods whose removal was a collapse that fine-tuning had to repair — three
# epochs of it repair a lot, which is why the vertical spread is much smaller than the
# horizontal one.
#
# **What our run shows, and why the bar is not met.** In our run neither half of the bar
# holds (the lines above). At 50% of the MACs no method comes within 0.8 points of dense (the
# first line names the best), the plain per-layer magnitude baseline ends 3.28 below (87.90%,
# three seeds); and half the regularizers do *not* beat that baseline right after removal: NS, PR,
# RSNLI, SSS, GAL, OTO, SCOP and ResRep fall to 10–15%, below `l1` (17.7%); SCP (18.7%), SSL
# (32.2%), OICSR (45.7%) and GBN (62.9%, which prunes during its phase, tick by tick) keep
# more. Four
# methods separate the channels before removal: GDP, whose gates polarize to exactly 0 or 1
# (85.4% right after removal, the same as its sparse model), BAR, whose Hard-Concrete
# masks are driven by a budget barrier (83.5%, 88.2% tuned), and DMC, whose discrete gates
# learn which channels the loss can do without (56.6%, 88.7% tuned: the best row at 50%,
# below), all three with a budget term in the loss; and GREG: 82.7% right after removal, 86.9%
# after BN recalibration, 88.5% tuned. GREG
# is the exception that explains the rule (a penalty, but only on the channels it removes);
# GDP shows that a lossless removal is not yet a good end point: it prunes the trunk (stage
# 1's 16 trunk channels down to 6), and three epochs of fine-tuning only take it to 86.4%.
# Three things separate this protocol from the one that set the bar, and the table lets us
# say which matter:
#
# * **The sparse phase is short.** 3 epochs at lr 0.01 (cosine) sum to a learning rate of 5.75;
#   the papers' schedules sum to hundreds. A penalty applied to *every* channel (NS's
#   $\lambda|\gamma|$, SSS's $\ell_1$ on block scales, ResRep's lasso at the paper's
#   $\lambda = 10^{-4}$) has to push the 60% of the internal channels the budget removes to
#   zero against the task loss, which resists; the strength rule of chapter 2 gives NS twice
#   the reach it would need unopposed, and the *sparse* column (89.6%) shows how little it bit:
#   the network still used the channels it was about to lose. GREG's penalty, by contrast, is
#   applied *only* to the channels it will remove (chosen by L1 at the start), and grows until
#   nothing can resist it: the function moves onto the kept channels during the phase (the
#   sparse column drops to 88.4% — the cost is paid before removal, not at it).
# * **The baseline is strong.** The bar was measured from a 15-epoch dense model at 88.4%;
#   ours is a 40-epoch model at 91.2%, and a pruned network recovers less of a stronger model
#   in the same epochs. Section 7 measures it: from a 15-epoch model of our own (87.8%) with
#   the bar's 5 + 5 epochs, GREG ends 1.04 points below dense (mean of three seeds), against
#   1.90 from 91.2% (seed 0; 0.91 from 87.8% for the same seed).
# * **Three epochs of fine-tuning, not five**, after a removal that for most methods drops the
#   accuracy to chance: the *recal.* column says where each method restarts from. (Section 7
#   measures five + five for `l1` and GREG: +0.7 points each, GREG then 1.9 below dense and
#   nearly lossless at removal.)
#
# **DMC, and where a gate sits.** DMC's first committed run overshot: its gates, trained with
# the weights frozen, kept closing after the FLOPs term had reached the target, and the row
# ended at 14% of the MACs and 24.6% tuned. The cause was where prunelib put the gate: folded
# into the BN, *before* the ReLU. An off channel's pre-activation is then exactly 0, the ReLU
# passes no gradient at 0, and the loss cannot tell an off gate that its channel was worth
# having: once off, a gate stayed off, and the noise that switches gates near 0 off ratcheted
# the network down (a logged rerun of the phase: the gates' MACs passed the 50% target after
# 0.6 epochs, were at about 24% after one epoch and 11% after three). A gate on the *activated*
# output, $z = g\,\mathrm{relu}(u)$, is the same network for $g \in \{0, 1\}$ but gets
# $\partial L/\partial g = \sum \partial L/\partial z\,\mathrm{relu}(u)$ when off (chapter 3,
# Section 4, checks it). The committed rows use that gate, and DMC becomes the surprise of the
# table. Its gates now settle *above* the budget (94 of 336 internal channels off, 65% of the
# MACs at the end of the phase; the paper's resource term pushes every gate with the same force
# whatever the target, so at 30% they end at about the same place: 93 off, 65%), and the
# budget's ranking by θ removes the rest: 81.3% sparse, 56.6% right after removal, 75.5%
# recalibrated and **88.7% tuned, the best row at 50%**, with EagleEye (88.6%) and GREG (88.5%)
# closer to it than
# Section 5's noise resolves. Its weights never moved during the phase: what it learned is
# *which* channels to keep — by how much the loss rises when each one is off, each priced by
# what it costs (a channel of stage 1 costs four times one of stage 3, and DMC kept 3–10 of 16
# in stage 1, 35–54 of 64 in stage 3). At 30% it ends at 85.0% (22.6% right after removal),
# level with EagleEye and 0.6 points below GREG.
#
# **At 30% of the MACs** the spread grows. GREG is again the best after fine-tuning (85.6%,
# 5.6 points below dense), then EagleEye's searched layer-wise rates (85.0%, at 30.3% of the
# MACs, a little over the target), DMC (85.0%), GDP (84.1%), OICSR and SSL (83.9%, 83.8%),
# `l1` (83.4%), GBN (83.0%) and ResRep (82.8%). The methods that decide by one
# global ranking of their scores fall much further than at 50%: NS 58.8%, PR 49.0%, SCP 67.6%,
# RSNLI 74.0%, `l1_global` 74.4%. For `l1_global` the widths say why (six convs left with 2–4
# channels, the narrowest conv of every run is in its result's `widths`); for the four BN methods
# narrowness alone does not (ResRep and OTO also left a 2-channel conv and end at 82.8% and
# 81.3%), and what the four share is a penalty on BN's γ (NS's and PR's on every BN, the trunk's
# included, as in their official code). Section 7's ablations separate the two: a floor on
# each layer's width rescues `l1_global` (83.8%) and not NS; penalizing only the prunable BNs
# lifts NS and PR by 10 and 18 points. SSS and GAL, which can only remove
# whole blocks, overshoot to 24% of the MACs and end at 55.6% and 56.5%; BAR's barrier also
# closed more than asked (25.5% of the MACs, 81.5% tuned). Right after removal, the two methods
# whose gates or masks separate the channels during the phase keep their lead (GDP 82.4%, BAR
# 63.0%); DMC's gates stopped at 65% of the MACs, so the budget's ranking by θ made most of
# the cut and it falls to 22.6%; GREG's preset set is now about 70% of the internal channels
# and three epochs did not empty it (86.9% sparse, 37.8% removed, 74.6% recalibrated); GBN,
# pruning during its phase, is at 39.2%, and the rest fall to 10–18%, near chance, as at 50%.
#
# A longer protocol would narrow these gaps; this one measures which ideas survive a short
# budget of training, which is the budget most practitioners have. The report's choices table
# (Section 7) gives the rest of the explanation.

# %% [markdown]
# ## 4. What exact zeros buy
#
# Chapters 2–4 met two kinds of sparse phases. A *proximal* or *projected* update (RSNLI's
# ISTA, SSS's APG, GAL's FISTA, OTO's HSPG) or a hard mask (ResRep's masked rows, GDP's and
# DMC's gates, BAR's Hard-Concrete masks) sets whole structures to exactly zero during training,
# so removing them does not change the function: *removed* equals *sparse*. A *subgradient*
# penalty (NS, SSL, OICSR, PR, GBN's tock) only drives them towards zero: they oscillate around
# it with an amplitude of about lr·λ, and removal cuts whatever is left. The magnitude baselines
# have no sparse phase at all. The cell measures the *removal loss*, sparse − removed accuracy,
# and what BN recalibration alone gives back.

# %%
print(f"{'method':10s} {'budget':9s} {'sparse':>7s} {'removed':>8s} {'loss':>7s} "
      f"{'recal.':>7s} {'gain':>6s} {'tuned':>7s}")
for r in sorted((r for r in rows if r["budget"] == "macs 0.5"),
                key=lambda r: r["sparse"].mean - r["removed"].mean):
    loss = r["sparse"].mean - r["removed"].mean
    gain = r["recal"].mean - r["removed"].mean
    print(f"{r['method']:10s} {r['budget']:9s} {r['sparse'].mean:7.2f} {r['removed'].mean:8.2f} "
          f"{loss:7.2f} {r['recal'].mean:7.2f} {gain:+6.2f} {r['tuned'].mean:7.2f}")

# %% [markdown]
# Exact zeros make removal free *when they form*, and in a 3-epoch phase they mostly do not
# form for as many channels as the budget removes. In our run SSS ended its phase with no
# block scale at exactly zero (`hparams['lambda_zeros']` in its result), so the budget's
# ranking removed live blocks (11.1% right after removal); OTO's half-space projection zeroes
# a group only once its norm is small, and its groups step without momentum, so the same
# per-step push reaches about a tenth as far as NS's (chapter 2's rule keeps the *push* equal,
# not the reach): its sparse model is as accurate as the dense one (91.3%) and removal cuts
# live groups (15.4%). The penalty that separates best is GREG's, which is not a proximal
# step at all but a growing L2 on a preset set: by the end it has driven that set so low that
# removing it costs 5.7 points, recalibration gives 4.2 of them back. (GDP's gates reach
# exact zeros by another route: a smoothed-L0 gate whose ε is annealed to 0.)
#
# Three more things to read here. A small removal loss is not the same as a good method: a
# method can reach exact zeros by destroying accuracy during the sparse phase itself (its
# *sparse* column is then low), or by removing fewer channels than the budget asks and letting
# the budget's ranking finish the job. Then, the recalibration gain says how much of the
# damage was only *statistics*: removing channels of a residual trunk or of a layer whose
# inputs changed leaves every BN below with running means and variances of the wider network;
# re-estimating them (no gradient) often recovers tens of points. A protocol that reports
# only removed accuracy without recalibration understates every method whose removal shifts
# the statistics; one that fine-tunes for long hides all of it. Last, fine-tuning is a great
# equalizer: several rows that collapsed to 10–35% end within about a point of `l1` after
# three epochs (OTO, SCOP, ResRep, SSL); those that do not lost structure that three epochs
# cannot rebuild — 2–4-channel bottlenecks from a global ranking (NS 74.6% over three seeds,
# PR 81.5%; SCP, 73.6%, kept 7 of 64 channels in two of the last stage's blocks), or whole
# blocks (SSS
# 70.1%, GAL 84.4%). Where *removed* equals *sparse*, removal was exact: GBN (62.9%) removes
# channels during its phase, tick by tick, and GDP's gates are exactly 0 or 1 and had closed
# on the budget (85.4%); the loss was paid during the phase, not at removal. DMC's gates are
# exactly 0 or 1 too, but had closed only down to 65% of the MACs: removing its off channels
# is free, the rest of the cut (by θ) cost 25 points, 19 of them given back by recalibration.
#
# Does the accuracy right after removal predict the accuracy after fine-tuning? Kendall's
# rank correlation τ across methods answers it (Exercise 5 writes it by hand): 1 when the two
# orders agree, −1 when one reverses the other, about 0 when they are unrelated.

# %%
for budget in ("macs 0.5", "macs 0.3"):
    here = [r for r in rows if r["budget"] == budget and r["tuned"] is not None]
    if len(here) < 3:
        continue
    rm = np.array([r["removed"].mean for r in here])
    ft = np.array([r["tuned"].mean for r in here])
    s = np.sign(rm[:, None] - rm[None, :]) * np.sign(ft[:, None] - ft[None, :])
    tau = s[np.triu_indices(len(here), 1)].mean()
    print(f"{budget}: Kendall tau(removed, tuned) over {len(here)} methods = {tau:+.2f}")

# %% [markdown]
# In our run τ is about +0.5 at both budgets: the order right after removal predicts the order
# after fine-tuning only loosely. At 50%, DMC (56.6% removed) and EagleEye (60.8%) end above GDP
# (85.4% removed) and BAR (83.5%): the widths a method chose can matter more than how gently
# it removed them (GDP cut the trunk: Section 3).

# %% [markdown]
# ## 5. Noise: what one seed allows you to say
#
# Every run is one draw: the seed changes the order of the batches and the augmentation, and a
# few epochs of training amplify such small differences. Three seeds of the same method at the
# same budget measure that spread directly. The binomial error of an accuracy on 10,000 test
# images (about 0.29 points at 91%) measures something else — how far the accuracy would move
# on another 10,000 images — and every run here is scored on the same ones. With a per-run
# standard deviation $s$, the difference of two single runs has standard deviation
# $s\sqrt 2$, so two methods whose
# single-seed accuracies differ by less than about $2\sqrt 2\,s \approx 2.8\,s$ cannot be told
# apart at 95%; with $n$ seeds each, $2\sqrt{2/n}\,s$. The cell below uses the rows with
# several seeds — `l1`, NS and ResRep at 50% — and asks, for the noise of each in turn, which
# single-seed rows at 50% are within that distance of the best.

# %%
seeded = [r for r in rows if r["n"] >= 2]
for r in seeded:
    print(f"{r['method']:8s} {r['budget']}: n={r['n']}  tuned {r['tuned'].cell()}  "
          f"removed {r['removed'].cell()}  sparse {r['sparse'].cell()}")
by_tuned = sorted((r for r in rows if r["budget"] == "macs 0.5"), key=lambda r: -r["tuned"].mean)
top = by_tuned[0]
print(f"\nbest at 50%: {top['method']} {top['tuned'].mean:.2f}")
for r in sorted(seeded, key=lambda r: r["tuned"].std):
    band = 2 * math.sqrt(2) * r["tuned"].std
    tied = [x["method"] for x in by_tuned[1:] if top["tuned"].mean - x["tuned"].mean < band]
    print(f"with {r['method']}'s noise (s = {r['tuned'].std:.2f}): single runs closer than "
          f"{band:.2f} points are not resolved; within that of the best: {len(tied)} rows"
          f"{' (' + ', '.join(tied) + ')' if len(tied) <= 6 else ''}")
assert len(seeded) >= 3

# %% [markdown]
# The noise is a property of the *method*, not only of the protocol: its standard deviation
# over three seeds differs by two orders of magnitude between the rows that have them. `l1`'s
# removal is deterministic (it ranks the baseline's filters: the same 17.68% right after
# removal for every seed), so its seed only changes the order of the fine-tuning batches, and
# its three runs end within 0.09 points of each other — closer than the binomial error, since
# all three are scored on the same 10,000 images. ResRep's masks depend on its sparse phase,
# and its tuned accuracy varies by 0.28. NS's global ranking leaves other bottlenecks for each
# seed (its narrowest conv kept 4 channels with seed 0, 2 with seeds 1 and 2), and three epochs
# repair them to very different degrees: 79.9%, 72.7% and 71.2% (a standard deviation of 4.6
# points). Seed 0's 79.9%, the number a one-seed table would have printed, was the luckiest of
# the three. (ResRep also leaves 2–3-channel convs, in stage 1 for every seed, and is not
# noisy: where the bottleneck is matters as much as how narrow it is.)
#
# So read the table in bands, not ranks, and know which noise a band assumes. With `l1`'s
# noise, the 0.8 points between the best row at 50% (DMC) and `l1` are resolved many times
# over; with ResRep's they are at the edge of the band (0.78 points, inside which EagleEye,
# GREG, OICSR and BAR all sit); with NS's, almost nothing at 50% is. A
# fine-tuned accuracy is the *least* discriminating column: fine-tuning pulls every method
# towards the same point. The accuracy right after removal is far more spread out, and
# differences there of tens of points are real — they are what the regularizers differ in.

# %% [markdown]
# ## 6. MACs are not time
#
# MACs count multiply-accumulates of convs and linear layers; a CPU also spends time on memory
# traffic, BN-free elementwise work (ReLU, the residual adds), the framework's per-op overhead,
# and kernels whose speed depends on the channel counts. The sweep measured each pruned model
# against the dense one at batch 64 through `pl.for_inference` (BN folded into the convs,
# channels_last, in-place ReLU and adds; chapter 1 shows why each matters), in the same process
# one after the other. The dashed line is the ideal: speedup = dense MACs / pruned MACs.

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
report.plot_speedup(rows, axes[0])
report.plot_wall_time(rows, axes[1])
fig.tight_layout()
plt.show()
for r in rows:
    if r["speedup64"] is None or r["ideal"] is None or r["ideal"].mean <= 1:
        continue
    share = (r["speedup64"].mean - 1) / (r["ideal"].mean - 1)
    print(f"{r['method']:10s} {r['budget']:9s} ideal {r['ideal'].mean:4.2f}x  measured "
          f"{r['speedup64'].mean:4.2f}x  -> {share:5.0%} of the MACs reduction became speed")

# %% [markdown]
# Two methods that reach the same MACs can run at different speeds, and our run shows the
# three regimes. Removing whole blocks (SSS) removes layers, and with them every per-layer
# cost — the BN-folded conv's launch, the ReLU, the add: 97% of its ideal speedup became real.
# A uniform shrink of the internal convs (`l1`, GREG, SCOP) realizes about half (50–53%): the
# trunk convs, the adds and the stem stay as they were, and they take a larger share of a
# smaller network's time. A global ranking that leaves a few layers very narrow and others
# almost whole (NS 36%, ResRep 33%, `l1_global` 42%) realizes the least: a 4-channel conv
# costs nearly as much time as a 16-channel one, so the MACs it saves are not seconds saved.
# Chapter 1 rounds widths to multiples of 8 (`Budget(multiple=8)`) for the same reason. The
# right panel is the price in training time: one bench run per method on this CPU, most of it
# the same 3 + 3 epochs; the sparse phase's own cost (a teacher for GAL and BAR, a knockoff
# batch for SCOP, EagleEye's search) shows as the difference. (Runs that shared the CPU with
# another job for a few minutes — NS, GREG, PR, RSNLI — show a few minutes more than they cost.)

# %% [markdown]
# ## 7. Which choices explain the differences
#
# A row is the result of a method *and* of the choices that came with it. The table below puts
# them next to each other: the residual policy (which channels the method may remove:
# `internal` — only the first conv of each block, the trunk kept whole; `coupled` — a trunk
# channel is removed from every block at once), how the strength was set (the library's target
# drift rule of chapter 2 at this scale, or the paper's values), the decision rule (a global
# ranking, a uniform per-layer rate, preset layer-wise ratios, exact zeros, a search), the gain
# of BN recalibration, the sparse phase's cost per epoch relative to the same run's fine-tuning
# epoch, and the share of the ideal speedup the pruned model realized.

# %%
show(report.choices_table(report.choices(results)))

# %% [markdown]
# The decision rule shows directly in *where* the channels went. Each result stores the output
# width of every layer before and after (`dense_widths`, `widths`); the map below gives the
# fraction kept of every conv at 50% of the MACs, one row per method. A uniform rate (`l1`,
# SCOP) is a flat row; a global ranking follows the scores wherever they lead, and can leave a
# layer with a handful of channels. That is harmless when the sparse phase had already moved
# the function off those channels — BAR keeps 1 channel in two blocks of stage 1 and is
# 83.5% right after removal, 88.2% tuned — and costly when it had not: NS's and PR's narrow
# layers were cut from a network that still used them, a bottleneck three epochs of
# fine-tuning do not repair.

# %%
at50 = {report.row_name(r): r for r in results if r["target"]["macs"] == 0.5 and r["seed"] == 0}
convs = [k for k in first["dense_widths"] if k != "fc"]
kept = np.array([[at50[m]["widths"].get(k, 0) / at50[m]["dense_widths"][k] for k in convs]
                 for m in sorted(at50)])                   # 0: the layer's block was removed
fig, ax = plt.subplots(figsize=(12, 0.35 * len(at50) + 1.5))
im = ax.imshow(kept, vmin=0, vmax=1, cmap="viridis", aspect="auto")
ax.set_xticks(range(len(convs)), [k.replace("layer", "L").replace(".conv", "c") for k in convs],
              rotation=90)
ax.set_yticks(range(len(at50)), sorted(at50))
fig.colorbar(im, ax=ax, label="fraction of the layer's channels kept")
ax.set_title("ResNet-20 at 50% MACs: channels kept per conv")
fig.tight_layout()
plt.show()
narrow = {m: min(at50[m]["widths"].get(k, 0) for k in convs) for m in at50}
for m in sorted(at50, key=lambda m: at50[m]["accuracy"]["finetuned"], reverse=True):
    print(f"{m:10s} tuned {at50[m]['accuracy']['finetuned']:5.2f}  narrowest conv "
          f"{narrow[m]:3d} channels  min kept fraction {kept[sorted(at50).index(m)].min():.2f}")

# %% [markdown]
# The table names the choices; an **ablation** measures one. Two more folders next to the
# sweep hold runs that change one thing and keep the rest of the protocol: `ablation/` (the
# same bench schedule, one hyperparameter set for the run — `prunelib sweep --hp key=value`,
# a row named `method+key=value`) and `schedule/` (the same methods with 5 + 5 epochs instead
# of 3 + 3, the schedule of the bar of Section 3). Each row is printed under the committed
# seed-0 row it differs from:
#
# * `penalize=prunable`: NS and PR penalize only the BNs whose channels they may remove, not
#   every BN (the trunk's too, as their official code does);
# * `min_keep=0.25`: every layer keeps at least a quarter of its channels (the default is a
#   tenth), a floor on the bottlenecks a global ranking leaves;
# * `residual=coupled`: `l1` may remove trunk channels too (jointly, from every block of a
#   stage), not only the internal ones;
# * `train_first=True`: `l1` spends the sparse phase's epochs on plain SGD (no penalty) before
#   it ranks — the regularizers' extra epochs of training, given to the magnitude baseline.

# %%
ABLATIONS = [RESULTS.parent / "ablation", RESULTS.parent / "schedule"]
ablated = report.load_results(ABLATIONS)
own = {(report.row_name(r), r["target"]["macs"]): r for r in results if r["seed"] == 0}


def label(r: dict) -> str:
    """The run's row: its variant and the settings it changed ('l1 (reg_epochs=5, ...)')."""
    return report.row_name(r) + report.settings_note(r)


print(f"{'run':34s} {'MACs':>5s} {'sparse':>7s} {'removed':>8s} {'recal.':>7s} {'tuned':>7s}"
      f" {'narrowest':>9s}")
for r in sorted(ablated, key=lambda r: (r["method"], -r["target"]["macs"], label(r))):
    base = own[(r["method"], r["target"]["macs"])]
    for x in (base, r):
        a = x["accuracy"]
        print(f"{(label(x) if x is r else x['method']):34s} {x['pruned']['macs_ratio']:5.3f} "
              f"{a['regularized']:7.2f} {a['removed']:8.2f} {a['recalibrated']:7.2f} "
              f"{a['finetuned']:7.2f} {min(x['widths'].get(k, 0) for k in convs):9d}")
    print(f"{'':34s} tuned {r['accuracy']['finetuned'] - base['accuracy']['finetuned']:+.2f}, "
          f"removed {r['accuracy']['removed'] - base['accuracy']['removed']:+.2f} points\n")
assert all(r["accuracy"]["dense"] == first["accuracy"]["dense"] for r in ablated)

# %% [markdown]
# What the ablations say (one seed each; NS's own seeds at 50% varied by 4.6 points, so a
# difference of a few points in an NS or PR row is not resolved, one of 10–18 points is):
#
# * **The width floor explains `l1_global`, not NS.** With every layer keeping a quarter of
#   its channels, `l1_global` at 30% goes from 74.4% to 83.8% tuned — level with `l1` (83.4%):
#   its collapse *was* its 2-channel convs. The same floor leaves NS where it was (58.4%
#   against 58.8%), although its narrowest conv now has 4 channels instead of 2.
# * **The trunk penalty explains much of NS and PR.** Penalizing only the BNs whose channels
#   they may remove (`penalize=prunable`) lifts NS from 58.8% to 69.4% and PR from 49.0% to
#   67.5% at 30%, with the same 2-channel bottleneck in stage 1. The official codes' L1 on
#   *every* BN also shrinks the trunk's γ, whose channels are never removed; how that hurts
#   (the trunk's scale, or the ranking it distorts) these rows do not say, only that dropping
#   it helps. Both rows stay far below `l1` (83.4%): what is
#   left is their ranking by |γ| after a phase that did not separate the channels (10–11%
#   right after removal, 16% and 14% recalibrated), which neither ablation changes.
# * **The residual policy matters little for `l1`.** With the trunk prunable too (`coupled`),
#   the uniform rate cuts every layer of a stage alike: 88.0% at 50% (0.475 of the MACs)
#   against 87.9%, and 83.1% at 30%, where the coupled widths overshoot to 0.253 of the MACs
#   (every layer halved) and run 2.37 times faster than dense against 1.85 for the internal
#   cut. At these budgets a thinner trunk costs about what thinner blocks cost; the difference
#   between methods with different policies comes from elsewhere.
# * **A regularizer's extra epochs are not its advantage.** `l1` trains 3 epochs, a
#   regularizer 6. Given the 3 more as plain SGD (`train_first=True`), `l1` ends at 88.1%
#   against 87.9% (seed 0) and falls as far at removal (15.8% against 17.7%): the epochs of
#   training are worth 0.1 points here, so what puts DMC, EagleEye and GREG above `l1` is what
#   their phases (or search) do, not their length.
# * **The schedule.** Five epochs in each phase instead of three — the bar's schedule, from
#   our stronger baseline: `l1` (only its fine-tuning is longer; the same 17.7% right after
#   removal) gains 0.7 points, to 88.6%, far more than its seed noise; GREG gains 0.75, to
#   89.3%, 1.9 below dense, the closest any run here came. And GREG's removal becomes nearly
#   lossless: 88.9% sparse, **88.0% right after removal** (82.7% with three epochs), 88.3%
#   recalibrated. Two more epochs give its growing penalty the time to empty its preset set —
#   what a regularizer is for. The bar's 0.8 points stay out of reach from a 91.2% baseline
#   at this length; the next cell starts from a 15-epoch baseline like the bar's.
#
# How to read the choices table against the accuracies (the numbers are our run's, at 50% of
# the MACs):
#
# * **Targeting.** Whether the penalty acts on the channels that will be removed or on all of
#   them is the largest single factor in this protocol. GREG (penalty only on its preset
#   removal set, growing) keeps 82.7% right after removal; NS and SSS (a penalty on every
#   channel or block, the decision taken afterwards) keep 10–11%. ResRep targets too — its
#   masks are chosen by the budget — but only the paper's small lasso
#   ($\lambda = 10^{-4}$) empties the masked rows: over 1,149 steps with the compactors'
#   momentum 0.99 it moves a row by 0.05 of its initial norm 1, so removal still cuts live rows
#   (11.0%, the mean of three seeds). A lasso strong enough to empty them in this phase acts
#   on the kept rows as well: sized by the target-drift rule ($\lambda = 0.032$ at the quick
#   scale) it took the sparse model to 50% and the tuned one to 62% (measured, quick scale, one
#   run), against 82% with the paper's value — so the library keeps the paper's $\lambda$ for
#   ResRep, and this row shows the consequence.
# * **Ranking.** `l1` against `l1_global` isolates the ranking alone: the same scores, one
#   rate per layer against one threshold for the whole network (87.9% against 86.7% tuned,
#   17.7% against 10.2% removed). A global ranking after a sparse phase that did not separate
#   the channels follows noise across layers and leaves bottlenecks (the width map above: 2–4
#   channels in some convs for `l1_global`, NS and ResRep).
# * **Strength.** A penalty sized for a 160-epoch schedule does almost nothing in 3 epochs; the
#   rule of chapter 2 sizes it so that the channels the budget removes could drift to zero by
#   the end of the phase were nothing to resist (with a margin of 2 where the loss resists).
#   Methods without a rule set their pressure from the budget itself (ResRep's masks, the gates
#   with a budget term, GREG's schedule) or have no sparse phase (EagleEye, the magnitudes).
# * **Residual policy.** `internal` methods can only remove from half the convs, so at a fixed
#   MACs budget they must cut those convs deeper (about 60% of their channels at 50% MACs);
#   `coupled` methods spread the cut over the trunk too, but every trunk channel they remove is
#   gone from every block of a stage at once.
# * **Recalibration.** The *gain* column is the part of the removal loss that was statistics:
#   for GREG it is most of it (82.7% → 86.9%), for the collapsed rows it is a fraction.
# * **Cost.** The cost column divides by an epoch of fine-tuning the *pruned* model, which is
#   cheaper when whole blocks are gone (SSS: 2.3); NS's 1.9 includes minutes when another job
#   shared the CPU; SCOP's 2.3 is real (every step also runs a batch of knockoffs).

# %% [markdown]
# **The bar's own conditions.** The bar of Section 3 was measured from a 15-epoch dense model,
# still learning, with 5 + 5 epochs. `results/bar` repeats exactly that with prunelib: a
# 15-epoch ResNet-20 trained on this CPU (committed there with its log), then `l1`, GREG (three
# seeds, and three more with its pull on the whole channel, `greg+scope=group`, read after the
# option-B cell), DMC, NS and EagleEye at 50% of the MACs with 5 + 5 epochs, the rest of the bench
# protocol unchanged, and five variants of the magnitude baseline: `l1_global`,
# `l1+residual=coupled`, `l1+train_first=True` (its 5 sparse-phase epochs spent on plain SGD)
# and two rankings read after the next cell. Next to a row, where it exists, the same method
# with the same 5 + 5 epochs from our 91.2% baseline (`results/schedule`): the two differ only
# in the dense model they start from. *drop* is tuned − dense, the bar's measure; a row of
# several seeds shows their mean and the drop's standard deviation.

# %%
barred = report.load_results([RESULTS.parent / "bar"])
scheduled = report.load_results([RESULTS.parent / "schedule"])
bar_dense = barred[0]["accuracy"]["dense"]
assert all(r["accuracy"]["dense"] == bar_dense for r in barred)     # one baseline, one folder


def bar_table(runs: list[dict], twins: list[dict], twin: str,
              twin_of: dict[str, str] | None = None) -> dict[str, dict]:
    """A markdown table of `report.aggregate(runs)`, one line per row (means over its seeds;
    drop ± their std), best mean drop first, each followed by its twin in `twins` (the row of
    the same name, or `twin_of[name]`; labelled `twin`) where there is one. Returns the rows
    by name."""
    mine = {r["method"]: r for r in report.aggregate(runs)}
    theirs = {r["method"]: r for r in report.aggregate(twins)}
    twin_of = twin_of or {}
    lines = ["| run | n | dense | MACs | sparse | removed | recal. | tuned | drop |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row_ in sorted(mine.items(), key=lambda kv: kv[1]["drop"].mean, reverse=True):
        other = twin_of.get(name, name)
        label_t = f"↳ {twin}" + (f": `{other}`" if other != name else "")
        for label, x in ((f"`{name}`", row_), (label_t, theirs.get(other))):
            if x is None:
                continue
            d = x["drop"]
            lines.append(
                f"| {label} | {x['n']} | {x['dense'].mean:.2f} | {x['macs'].mean:.3f} | "
                f"{x['sparse'].mean:.2f} | {x['removed'].mean:.2f} | {x['recal'].mean:.2f} | "
                f"{x['tuned'].mean:.2f} | {d.mean:+.2f}"
                f"{f' ± {d.std:.2f}' if d.std is not None else ''} |")
    show("\n".join(lines))
    return mine


def verdict(rows_: dict[str, dict], dense: float) -> None:
    """The bar's two tests on `rows_`: the best mean drop against 0.8 points, and which
    regularizers keep more than `l1` right after removal."""
    best = max(rows_, key=lambda k: rows_[k]["drop"].mean)
    removed = {k: r["removed"].mean for k, r in rows_.items()}
    regs = [k for k in rows_ if k.split("+")[0] not in MAGNITUDE | SEARCH]
    above = sorted(k for k in regs if removed[k] > removed["l1"])
    b = rows_[best]["drop"]
    print(f"from the {dense:.2f}% baseline: best {best} {b.mean:+.2f} points "
          f"(mean of {b.n} seed(s); {'within' if b.mean >= -0.8 else 'NOT within'} the bar's "
          f"0.8; the bar quotes Torch-Pruning's magnitude pruner at -0.8, its regularized ones "
          f"at -0.9 to -1.7)")
    print(f"right after removal, l1 {removed['l1']:.2f}%: {len(above)} of {len(regs)} "
          f"regularizers above it ({', '.join(above) or '-'})")


bar_rows = bar_table(barred, scheduled, "from the 91.2% baseline (`results/schedule`)")
verdict(bar_rows, bar_dense)

# %% [markdown]
# What the bar's conditions show (one seed each, GREG and `greg+scope=group` three; at bench
# scale the seed noise of the tuned accuracy was 0.05 points for `l1` and 0.28 for ResRep):
#
# * **The baseline explains most of the distance to dense.** From the 87.8% model GREG ends
#   1.04 ± 0.14 points below dense over three seeds (seed 0: 0.91, seeds 1 and 2: 1.18 and
#   1.03), inside the range of Torch-Pruning's regularized pruners in the bar (0.9–1.7 below),
#   not within its 0.8; with the same 5 + 5 epochs from our 91.2% model seed 0 ended 1.90
#   below. EagleEye (−1.31) and DMC (−1.75) land inside the bar's
#   regularized range too. A pruned network recovers more of a dense model that is itself
#   modest: the same epochs have less to repair.
# * **Extra epochs are not what separates the methods.** `l1` gets 5 epochs of training, a
#   regularizer 10. `l1+train_first=True` gives the magnitude baseline the same 10 (5 of plain
#   SGD in place of a sparse phase): +0.52 points, to −1.45, still behind GREG and EagleEye;
#   the plain epochs hardly moved the dense model (88.2%: its cosine schedule had already
#   annealed) and removal still falls to 11.2%. So prunelib's magnitude baseline does *not*
#   reproduce the bar's 0.8 for Torch-Pruning's global magnitude pruner, with or without them.
#   Nor do the two ways that pruner differs from `l1` which `l1` itself can run: one global
#   ranking (`l1_global`, −2.40) and trunk channels removable too (`l1+residual=coupled`,
#   −2.24). Two more rows test the ranking (`l1_global+normalize=mean` and the one named after
#   Torch-Pruning's importance, read after the next cell), and the next cell the 1×1 shortcut
#   convs of the bar's network (ours are the paper's parameter-free option A).
# * **Removal.** Right after removal, the methods that move the function before the cut keep
#   it: GREG 84.2% (mean of three seeds, 2.1 below its own sparse model), EagleEye's searched
#   rates 63.4%, DMC's learned gates 47.5%, against 12.2% for `l1`. NS falls to 11.9%, level
#   with `l1`, and ends 5.2 points below dense (the bar had measured 2.7–2.8 for it; NS's seeds
#   spread by 4.6 points at bench scale, so one run says little more than "far behind").
#
# So, against the bar on this network: under its own conditions the paper's GREG ends 1.04 ±
# 0.14 points below dense and GREG with its pull on the whole channel 0.94 ± 0.09 (three seeds
# each; the option-B cell below explains that variant), neither within 0.8, and two of the
# three regularizers measured here (GREG, DMC) beat the magnitude baseline right after removal,
# NS does not. At bench scale, from the stronger baseline, no method comes within 0.8
# (Section 3).

# %% [markdown]
# **With 1×1 shortcuts.** One difference from the bar's network stays in `results/bar`: its
# ResNet-20 had projection shortcuts (a 1×1 conv + BN where the width changes, "option B"),
# ours the paper's parameter-free option A. `results/bar_b` makes the runs again on
# `resnet20b`, prunelib's option-B ResNet-20, from a 15-epoch option-B baseline trained here with
# the same command. Two more magnitude rows test the ranking: `l1_global+normalize=mean`
# divides each group's scores by their mean before the global ranking (Torch-Pruning's default
# normalizer), and `l1_global+importance=group_l2+normalize=mean+residual=coupled` is as close
# as prunelib comes to Torch-Pruning's global magnitude pruner (every parameter slice a channel
# owns scored by its squared L2 norm, averaged, normalized per group, ranked globally, trunk
# channels included). Each option-B row is followed by the same row on option A from
# `results/bar` (where it was run).

# %%
barred_b_all = report.load_results([RESULTS.parent / "bar_b"])
bar_b_dense = barred_b_all[0]["accuracy"]["dense"]
assert all(r["accuracy"]["dense"] == bar_b_dense and r["model"] == "resnet20b"
           for r in barred_b_all)
barred_b = [r for r in barred_b_all if r["method"] != "tp_magnitude"]   # those: further below
bar_b_rows = bar_table(barred_b, barred, "option A (`results/bar`)")
verdict(bar_b_rows, bar_b_dense)

# %% [markdown]
# What the 1×1 shortcuts, the ranking and the scope of GREG's pull change (one seed each;
# GREG, `greg+scope=group` and `l1+importance=group_l2+residual=coupled` three):
#
# * **The shortcut type is worth a few tenths, not the gap.** On option B the magnitude rows
#   end closer to their dense model than on option A: `l1` −1.56 against −1.97,
#   `l1+residual=coupled` −1.93 against −2.24, `l1_global` −2.25 against −2.40, and `l1` keeps
#   more right after removal (22.5% against 12.2%). GREG moves by as much: −0.89 ± 0.17 over
#   three seeds (−1.04, −0.71, −0.91) against −1.04 ± 0.14 on option A — one seed of six
#   within the bar's 0.8, the means 0.09 and 0.24 short of it.
# * **For a global ranking, normalizing the scores is the larger lever.** Raw filter norms grow
#   with the fan-in, so `l1_global` empties stage 1 first (Section 7's widths). Dividing each
#   group's scores by their mean (`normalize=mean`) makes the global ranking compare a channel
#   with the others of its own group: +0.65 points on option A (−1.75) and +0.87 on option B
#   (−1.38, the best magnitude row of either network).
# * **Torch-Pruning's importance adds nothing on top.** The row closest to its pruner — the
#   squared L2 norm of every slice a channel owns, averaged, normalized per group, ranked
#   globally, trunk channels included — ends at −1.44 on option A and −1.67 on option B:
#   better than raw `l1_global`, not better than `normalize=mean` alone on option B. Every trunk
#   channel it removes is gone from every block of a stage, the cost the `coupled` rows showed.
# * **So the bar's 0.8 for Torch-Pruning's magnitude pruner is still not reproduced.** Every
#   difference between the two magnitude pruners that prunelib can express has now been
#   measured — shortcut type, ranking scope, normalization, importance score, trunk channels,
#   epochs — and the best combination ends 1.38 below dense, 0.58 short of it. The next cells
#   run Torch-Pruning's pruner itself through the protocol.
# * **Removal still separates the regularizer.** GREG keeps 86.2% right after removal on
#   option B (mean of three seeds; `l1`: 22.5%) and ends at the edge of the bar's regularized
#   range (0.9–1.7 below), 0.09 points short of the 0.8.
# * **Pulling the whole channel makes GREG's removal exact.** The paper's GREG pulls only the
#   filters of its pruned channels, and each filter feeds a BatchNorm that scales it back up
#   (chapter 4, Section 8): measured on this network after the 5 sparse epochs (seed 0,
#   `tools/greg_probe.py`), the pruned filters are at 0.4–1.7% of the kept ones' norm, yet
#   their BN outputs at 11–46% of the kept ones' scale, and zeroing the filters costs 5.5
#   points. `greg+scope=group` gives the same growing λ to every weight slice of those
#   channels — BN's γ and β and the next conv's input columns too, which BN does not
#   renormalize, as Torch-Pruning's growing-regularization pruner does; both ratios are then
#   0.000 and zeroing the filters costs nothing. Its removal is lossless to the digit on all
#   three seeds (86.7% before and after, against 86.9% → 86.2% for the paper's pull), and it
#   ends **−0.77 ± 0.05** below dense: the only row of either network within the bar's 0.8,
#   by 0.03 points (one seed of three, −0.83, is not). On option A the same holds: lossless
#   removal (86.2% before and after, against 86.3% → 84.2%) and −0.94 ± 0.09 against
#   −1.04 ± 0.14. Both gains, +0.12 and +0.10 points, are within GREG's seed noise (Welch's
#   t = 1.2 and 1.1 on three seeds each): what the wider pull surely buys is an exact cut, not
#   a better fine-tuned network — five epochs of fine-tuning repair most of what the paper's
#   pull leaves to the cut.

# %% [markdown]
# **Torch-Pruning's own pruner, through this protocol.** The rows above are prunelib's
# readings of Torch-Pruning's rule. `tools/torch_pruning_row.py` runs the rule itself: it
# registers Torch-Pruning 1.6's pruner as a prunelib method, `tp_magnitude`, and runs
# `prunelib sweep` with it, so its rows differ from the others in the decision rule only — the
# same baseline, data, seeds, recalibration, fine-tuning and MACs counter (Torch-Pruning's own
# count of its results agrees to 0.002). By default it is the bar's "global magnitude pruner"
# as Torch-Pruning's benchmark script runs it (`--global-pruning --speed-up 2`): the squared
# L2 score of every slice a channel owns, averaged, divided by its group's mean, ranked across
# groups, and removed in small steps, re-scoring the smaller network after each, until half the
# MACs are gone. `p=1` uses L1 norms; `global_pruning=False` is its local mode, the same
# fraction of every group at each step. Each row is followed by prunelib's row with the same
# score: `l1_global+importance=group_l2+normalize=mean+residual=coupled` ranks once where
# Torch-Pruning ranks step by step, and `l1+importance=group_l2+residual=coupled` is the local
# mode's twin (`torch_pruning_row.py scores` checks that the two libraries' scores agree, to
# 2e-7, on every channel group of this network). The chapter only reads the files: it does not
# need Torch-Pruning installed.

# %%
tp_runs = [r for r in barred_b_all if r["method"] == "tp_magnitude"]
TP_TWIN = {"tp_magnitude": "l1_global+importance=group_l2+normalize=mean+residual=coupled",
           "tp_magnitude+global_pruning=False": "l1+importance=group_l2+residual=coupled"}
tp_rows = bar_table(tp_runs, barred_b, "prunelib, same score", TP_TWIN)
TRUNKS = ("conv1", "layer2.0.conv2", "layer3.0.conv2")       # one layer of each stage's trunk
for name in [*TP_TWIN, *TP_TWIN.values(), "tp_magnitude+p=1"]:
    r = next(r for r in barred_b_all if r.get("variant", r["method"]) == name and r["seed"] == 0)
    print(f"{name:62s} trunk channels kept: "
          + ", ".join(f"{r['widths'][t]}/{r['dense_widths'][t]}" for t in TRUNKS))
raw = report.load_results([RESULTS.parent / "bar_b" / "no_restore"])[0]
as_run = next(r for r in barred_b if r.get("variant") == raw["variant"] and r["seed"] == 0)
print(f"{raw['variant']} fine-tuned without restoring the row norms (`--no-restore-norms`): "
      f"{raw['accuracy']['finetuned']:.2f}% (with them: {as_run['accuracy']['finetuned']:.2f}%)")

# %% [markdown]
# What Torch-Pruning's own pruner does under the same protocol:
#
# * **Its global mode is the worst magnitude row of either network.** With the squared L2
#   score it ends 4.38 points below dense, with L1 norms 2.91 below (seed 0). Both keep the
#   budget by emptying stage 1's trunk: 3 and 5 of 16 channels, where prunelib's one-shot
#   ranking of the same scores keeps 7 and ends 1.67 below. The steps feed on themselves: each
#   re-scoring divides a group's scores by the mean of the channels still there, so a group
#   whose mean is carried by a few strong channels finds its weaker ones below the global cut
#   again and again. Right after removal and recalibration it keeps 30.4% (one-shot: 58.1%).
# * **Its local mode is the best magnitude row here:** −1.23 ± 0.11 over three seeds (the same
#   fraction of every group: 11/16, 22/32 and 45/64 channels everywhere). prunelib's twin, the
#   same per-layer rule with the same score, ends −1.70 ± 0.15 (three seeds) with one channel
#   less in every stage-3 layer (0.475 of the MACs against 0.482) and a few other channels in
#   each group: Torch-Pruning re-scores between steps, and a channel's score includes the input
#   columns of the layers it feeds, which its neighbours' removal shortens. Both recalibrate to
#   60%; the 0.47 points appear in fine-tuning, and these runs do not tell the extra channels
#   from the different ones.
# * **Restoring the row norms is not it either:** `l1_global+normalize=mean` fine-tuned without
#   `calibrate.restore_bn_input_norms` ends at 86.98% against 86.80% with it, one seed each.
# * **So the bar's 0.8 for Torch-Pruning's magnitude pruner is not reproduced by Torch-Pruning
#   itself** under the conditions the bar states: its global pruner ends 2.9–4.4 below dense
#   and its local one 1.2 below. GREG (−0.89 ± 0.17 on option B, −1.04 ± 0.14 on option A,
#   three seeds each; with its pull on the whole channel −0.77 ± 0.05 on option B) ends ahead
#   of every Torch-Pruning magnitude row measured here. Whatever produced the 0.8 — another
#   configuration, schedule or seed — is not in the issue, and without it the magnitude half
#   of the bar cannot be checked on this machine.

# %% [markdown]
# ## 8. What the papers reported
#
# The numbers below were *not* measured by prunelib: they are each paper's (or its official
# code's, or a named third party's) own results, transcribed with their source in
# `prunelib/reported.py` (entries we could not check against a source are left out). They are
# here to show the scale the methods were designed for, not to be compared row by row with
# Section 2.

# %%
show(report.reported_table())
print("\nWhy the two tables differ:")
for why in report.REPORTED_CAVEATS:
    print(" -", why)

# %% [markdown]
# ## 9. One row, live
#
# Here is the command that made a row, run again at the quick scale (10k training images, 2 + 2
# epochs, 5,000 test images: a couple of minutes on a laptop CPU) into a temporary folder. It is
# the same pipeline as the committed rows (`pl.run`, the same protocol code), so its result file
# has the same fields; its numbers are not comparable with the bench rows because the scale
# differs — which the result itself records. Running the same command a second time does
# nothing: finished runs are skipped, so a sweep resumes after an interruption.

# %%
live = Path(tempfile.mkdtemp(prefix="prunelib-live-"))
cmd = [sys.executable, "-m", "prunelib", "sweep", "--methods", LIVE_METHOD, "--budgets", "0.5",
       "--seeds", "0", "--scale", LIVE_SCALE, "--out", str(live)]
print("$ prunelib", *cmd[3:])
for attempt in (1, 2):                                # the second run finds the file: skipped
    out = subprocess.run(cmd, capture_output=True, text=True)
    print(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:])
    assert out.returncode == 0, out.stderr[-2000:]
mine = report.load_results([live])
shutil.rmtree(live)                                   # the live row lives in memory from here
print()
show(report.table(report.aggregate(mine + [r for r in results if r["method"] == LIVE_METHOD
                                           and r["target"]["macs"] == 0.5])))

# %% [markdown]
# ## Summary
#
# * One protocol — one baseline, one MACs counter, one schedule, one budget, one test set —
#   removes most of the reasons the survey's numbers differ; what remains is each method's own
#   mechanism and the choices that come with it (Section 7).
# * The accuracy right after removal separates the methods; the accuracy after fine-tuning,
#   the number papers report, mostly does not — and its seed noise depends on the method
#   (0.05 points for `l1`, 4.6 for NS), of the same order as the differences it is asked to
#   rank (Section 5).
# * A detail of the implementation can decide a row: DMC's gate before the ReLU ratcheted the
#   network to 14% of the MACs; after it, the same method is the best row at 50% (Section 3).
# * Exact zeros make removal free; a subgradient penalty leaves a residue that removal cuts,
#   and BN recalibration repairs the part of the damage that is only statistics (Section 4).
# * Half the MACs is not half the time: measure latency (Section 6).
# * The dense model one starts from moves the "drop" as much as the method does: from a
#   15-epoch baseline with 5 + 5 epochs, GREG ends 1.04 points below dense (three seeds), from
#   our 91.2% one 1.90 below (Section 7) — a reason never to compare drops measured from
#   different baselines.
# * A global ranking needs comparable scores: dividing each layer's norms by their mean lifts
#   `l1_global` by 0.65–0.87 points. Torch-Pruning's own magnitude pruner, run through the same
#   protocol, ends 1.2 (local) to 4.4 (global) points below dense, not the 0.8 the bar quotes
#   for it; GREG, 0.89 ± 0.17 below on the same network, ends ahead of all of them
#   (Section 7).
# * A penalty on a conv row that feeds a BatchNorm meets BN's scale invariance: GREG's pruned
#   filters shrink to 1% of the kept ones' norm and BN scales them back up, so its cut still
#   costs 0.6–2.1 points. Pulling every slice of the channel (`greg+scope=group`: BN's γ and β
#   too) makes the cut exact and ends 0.77 ± 0.05 below dense on the bar's network, within the
#   bar's 0.8 — by less than the seed noise of the paper's version (Section 7).
# * `prunelib sweep` and `prunelib report` make this table; a row is one command (Section 9).

# %% [markdown]
# ## Exercises
#
# Each exercise is a code cell with a solution between `### BEGIN SOLUTION` and
# `### END SOLUTION`, followed by a check cell whose first line names the exercise and its
# points; `python tools/make_student.py` writes the student version. Exercises only rely on the
# setup cell (which loads `results`, the committed runs).
#
# **Exercise 1 — add a method's row.** From the list of result dicts `results`, compute the row
# of one method at one budget (a fraction of dense MACs kept): the number of runs `n` and the
# mean accuracy right after removal (`accuracy["removed"]`), after fine-tuning
# (`accuracy["finetuned"]`), the mean drop (fine-tuned − dense, per run) and the mean fraction
# of MACs kept (`pruned["macs_ratio"]`). Return None when there is no run. The check compares
# with `prunelib.report.aggregate` on every method and budget (so do not call `report`).

# %%
def method_row(results: list[dict], method: str, budget: float) -> dict | None:
    ### BEGIN SOLUTION
    rs = [r for r in results if r["method"] == method and r["target"]["macs"] == budget]
    if not rs:
        return None

    def mean(f):
        return sum(f(r) for r in rs) / len(rs)
    return {"n": len(rs), "removed": mean(lambda r: r["accuracy"]["removed"]),
            "tuned": mean(lambda r: r["accuracy"]["finetuned"]),
            "drop": mean(lambda r: r["accuracy"]["finetuned"] - r["accuracy"]["dense"]),
            "macs": mean(lambda r: r["pruned"]["macs_ratio"])}
    ### END SOLUTION


# %%
# check: ch5.row (3 points)
from prunelib.checks import names_used as _names  # what an answer calls  # noqa: E402

assert not _names(method_row) & {"report", "aggregate", "Stat", "table", "fmean"}, \
    "compute the row yourself: no prunelib.report"
assert method_row(results, "no-such-method", 0.5) is None
_n = 0
for _r in report.aggregate(results):
    if _r["method"] not in pl.methods.names():              # a sweep variant (ns+key=value)
        continue
    _b = float(_r["budget"].split()[1])
    _mine = method_row(results, _r["method"], _b)
    assert _mine is not None and _mine["n"] == _r["n"], (_r["method"], _b)
    for _k in ("removed", "tuned", "drop", "macs"):
        assert math.isclose(_mine[_k], _r[_k].mean, abs_tol=1e-9), (_r["method"], _b, _k)
    _n += 1
assert _n >= 1

# %% [markdown]
# **Exercise 2 — the noise of a difference.** Two methods were run with several seeds each
# (lists `a` and `b` of accuracies). Return the standard error of the difference of their
# means, $\sqrt{s_a^2/n_a + s_b^2/n_b}$ with $s^2$ the *sample* variance ($n - 1$ in the
# denominator), and whether the difference of the means exceeds twice it (`resolved`).

# %%
def difference_se(a: list[float], b: list[float]) -> tuple[float, bool]:
    ### BEGIN SOLUTION
    def var(v):
        m = sum(v) / len(v)
        return sum((x - m) ** 2 for x in v) / (len(v) - 1)
    se = math.sqrt(var(a) / len(a) + var(b) / len(b))
    return se, abs(sum(a) / len(a) - sum(b) / len(b)) > 2 * se
    ### END SOLUTION


# %%
# check: ch5.noise (2 points)
from prunelib.checks import names_used as _names  # what an answer calls  # noqa: E402

assert not _names(difference_se) & {"statistics", "stdev", "variance", "std", "var_", "ttest_ind"}
_a, _b = [88.1, 88.5, 88.3], [87.2, 87.9, 87.0, 87.5]
_se, _res = difference_se(_a, _b)
_want = math.sqrt(np.var(_a, ddof=1) / 3 + np.var(_b, ddof=1) / 4)
assert math.isclose(_se, _want, rel_tol=1e-9) and _res is True
_se2, _res2 = difference_se([88.1, 89.5, 87.0], [88.0, 87.1, 89.3])
assert math.isclose(_se2, math.sqrt(np.var([88.1, 89.5, 87.0], ddof=1) / 3
                                    + np.var([88.0, 87.1, 89.3], ddof=1) / 3)) and _res2 is False

# %% [markdown]
# **Exercise 3 — how much of the MACs reduction became speed.** For one result dict, return
# the share of the ideal batch-64 speedup the pruned model realized:
# $(\text{measured} - 1)/(\text{ideal} - 1)$, with measured = `latency["batch64"]["speedup"]`
# and ideal = dense MACs / pruned MACs (`dense["macs"]`, `pruned["macs"]`). Return None when
# the ideal is 1 (nothing removed) or the run has no latency.

# %%
def realized_share(result: dict) -> float | None:
    ### BEGIN SOLUTION
    lat = (result.get("latency") or {}).get("batch64")
    ideal = result["dense"]["macs"] / result["pruned"]["macs"]
    if not lat or ideal <= 1:
        return None
    return (lat["speedup"] - 1) / (ideal - 1)
    ### END SOLUTION


# %%
# check: ch5.realized (2 points)
_r0 = {"dense": {"macs": 40.0}, "pruned": {"macs": 20.0}, "latency": {"batch64": {"speedup": 1.5}}}
assert math.isclose(realized_share(_r0), 0.5)
assert realized_share({**_r0, "pruned": {"macs": 40.0}}) is None
assert realized_share({**_r0, "latency": None}) is None
for _r in results:
    _s = realized_share(_r)
    _l = _r["latency"]["batch64"]["speedup"]
    _i = _r["dense"]["macs"] / _r["pruned"]["macs"]
    assert _s is None or math.isclose(1 + _s * (_i - 1), _l, rel_tol=1e-9)

# %% [markdown]
# **Exercise 4 — the Pareto front.** Given points `(name, macs_kept, accuracy)`, return the
# names of those no other point dominates (another point with macs_kept ≤ and accuracy ≥, at
# least one strictly), in the order given. These are the only rows a practitioner with a MACs
# budget should ever pick.

# %%
def pareto(points: list[tuple[str, float, float]]) -> list[str]:
    ### BEGIN SOLUTION
    front = []
    for name, m, a in points:
        if not any(m2 <= m and a2 >= a and (m2 < m or a2 > a) for _, m2, a2 in points):
            front.append(name)
    return front
    ### END SOLUTION


# %%
# check: ch5.pareto (3 points)
_pts = [("a", 0.5, 88.0), ("b", 0.3, 87.0), ("c", 0.5, 87.5), ("d", 0.3, 87.0), ("e", 0.6, 88.0)]
assert pareto(_pts) == ["a", "b", "d"]                      # ties do not dominate each other
_gen = np.random.default_rng(5)
_many = [(f"p{i}", float(_gen.choice([0.3, 0.4, 0.5])), float(_gen.integers(80, 90)))
         for i in range(40)]
_front = pareto(_many)
for _n0, _m0, _a0 in _many:
    _dom = any((_m1 <= _m0 and _a1 >= _a0) and (_m1 < _m0 or _a1 > _a0)
               for _, _m1, _a1 in _many)
    assert (_n0 in _front) == (not _dom), _n0
assert [p for p in _front] == [n for n, _, _ in _many if n in _front]       # the given order

# %% [markdown]
# **Exercise 5 — Kendall's τ.** Section 4 asked whether the accuracy right after removal
# predicts the accuracy after fine-tuning. Write Kendall's rank correlation (τ-a) of two
# equal-length sequences: over all pairs $i < j$, the number of pairs ordered the same way in
# both minus the number ordered oppositely, divided by the number of pairs (a tie in either
# sequence counts as neither).

# %%
def kendall_tau(x: list[float], y: list[float]) -> float:
    ### BEGIN SOLUTION
    n, s = len(x), 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            s += (dx * dy > 0) - (dx * dy < 0)
    return s / (n * (n - 1) / 2)
    ### END SOLUTION


# %%
# check: ch5.kendall (2 points)
from prunelib.checks import names_used as _names  # what an answer calls  # noqa: E402

assert not _names(kendall_tau) & {"kendalltau", "stats", "scipy"}, "write it yourself"
assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
assert math.isclose(kendall_tau([1, 2, 3], [1, 3, 2]), 1 / 3)
assert kendall_tau([1, 1, 2], [5, 6, 7]) == 2 / 3                   # the tied pair counts 0
_gen = np.random.default_rng(7)
_x, _y = _gen.normal(size=12).tolist(), _gen.normal(size=12).tolist()
_sx, _sy = np.sign(np.subtract.outer(_x, _x)), np.sign(np.subtract.outer(_y, _y))
assert math.isclose(kendall_tau(_x, _y), (_sx * _sy)[np.triu_indices(12, 1)].mean())

# %% [markdown]
# **Going further** (no check): (a) add a row to the committed comparison: run
# `prunelib sweep --methods <name> --budgets 0.5 --seeds 0 --scale bench --out results/bench`
# from `book/` (about 8–30 min on this CPU; the folder refuses a run made with other settings)
# and rerun this chapter; (b) run GREG and EagleEye with `--seeds 1 2` and see whether their
# bands in Section 5 overlap; (c) redo Section 6 with `prunelib bench --section latency` on your
# machine, and with `Budget(multiple=8)`; (d) compare `l1` and `l1_global` at 30%: what does
# the global threshold do to the narrowest layers (`result["widths"]`)?

# %%
print(f"chapter run time: {time.time() - T_START:.0f} s (live row at scale {LIVE_SCALE})")

# %% [markdown]
# ## References
#
# * Y. He, L. Xiao, "Structured Pruning for Deep Convolutional Neural Networks: A Survey",
#   IEEE TPAMI 46(5), 2024 (arXiv:2303.00566): the methods and the comparison tables.
# * G. Fang, X. Ma, M. Song, M. B. Mi, X. Wang, "DepGraph: Towards Any Structural Pruning",
#   CVPR 2023 (Torch-Pruning; the bar of Section 3 was measured with it).
# * D. Blalock, J. J. Gonzalez Ortiz, J. Frankle, J. Guttag, "What is the State of Neural
#   Network Pruning?", MLSys 2020 (why pruning results are hard to compare).
# * M. G. Kendall, "A New Measure of Rank Correlation", Biometrika 30(1/2), 1938.
# * The method papers: the references of chapters 2–4.
