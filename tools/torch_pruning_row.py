#!/usr/bin/env python
"""Torch-Pruning's global magnitude pruner as one more row of `prunelib sweep` (issue 12's bar).

Issue 12's bar says Torch-Pruning's global magnitude pruner ends 0.8 points below dense under
the bar's schedule; prunelib's closest rule (`l1_global` with `importance='group_l2'`,
`normalize='mean'`, `residual='coupled'`) ends 1.67 below on the same model. This script tells
the two possible reasons apart: it registers a method, 'tp_magnitude', whose *decision rule* is
Torch-Pruning's and runs `prunelib sweep` with it, so everything else (baseline, data, seed, BN
recalibration, fine-tuning, MACs counter, result file) is prunelib's, as for every other row.

The rule (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023; Torch-Pruning's
`reproduce/main.py` with `--method l2 --global-pruning --speed-up 2`): DepGraph's groups (every
layer coupled to a channel, the residual trunk included), the score
`GroupMagnitudeImportance(p)`: mean over the group's slices of ||slice_k||_p^p, divided by the
group's mean score, ranked across all groups, and removed progressively: a `MetaPruner` with
`pruning_ratio=1.0`, `max_pruning_ratio=1.0` and `iterative_steps=steps` takes one step at a
time, re-scoring the smaller model, until prunelib's counter reads at most the budget's MACs.
The classifier's outputs are never pruned. Torch-Pruning's own count of the result is written
to the run's `hparams` as `torch_pruning.ops_ratio` (on resnet20b it agrees with prunelib's to
0.002).

    pip install torch-pruning                     # not a prunelib dependency
    python tools/torch_pruning_row.py sweep --methods tp_magnitude --model resnet20b \\
        --budgets 0.5 --reg-epochs 5 --ft-epochs 5 --scale bench --out book/results/bar_b

    python tools/torch_pruning_row.py scores --model resnet20b [--checkpoint FILE]

`scores` checks prunelib's `importance='group_l2'` against Torch-Pruning's
`GroupMagnitudeImportance(p=2)` (no normalizer) on every channel group of the model (random
weights unless a prunelib checkpoint is given) and exits 1 if any differs by more than 1e-5
relative (the same on resnet20b, resnet56b and vgg16; on resnet20's zero-padded shortcuts and
on mobilenetv2 the two libraries group the channels differently, and it says so). Otherwise
every argument after the script's name is `prunelib`'s command line (`prunelib --help`);
'tp_magnitude' takes `--hp steps=N`, `--hp p=1|2`, `--hp global_pruning=false` (Torch-Pruning's
local mode: every group loses the same fraction at each step) and `l1_global`'s `train_first`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # this checkout's prunelib
from prunelib import methods  # noqa: E402
from prunelib.cli import main  # noqa: E402
from prunelib.measure import count  # noqa: E402
from prunelib.methods.base import HParam  # noqa: E402
from prunelib.methods.magnitude import MagnitudeGlobal  # noqa: E402
from prunelib.select import Budget  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:          # checked before anything trains
    sys.exit("torch_pruning_row.py: error: Torch-Pruning is not installed; "
             "run `pip install torch-pruning` (it is not a prunelib dependency)")


@methods.register("tp_magnitude")
class TorchPruningMagnitude(MagnitudeGlobal):
    """Torch-Pruning's progressive global magnitude pruning as the decision rule; one-shot
    (no sparse phase) unless `train_first`. `scores` stays prunelib's reading of the same score
    (`importance='group_l2'`, `normalize='mean'`); `finish` does not use it."""
    residual = "coupled"
    HPARAMS = {"steps": HParam(int, lo=1, note="Torch-Pruning's iterative_steps"),
               "p": HParam(int, lo=1, hi=2, note="the norm of GroupMagnitudeImportance"),
               "global_pruning": HParam(bool, note="False: every group loses the same "
                                                   "fraction at each step")}

    def __init__(self, steps: int = 400, p: int = 2, global_pruning: bool = True,
                 importance: str = "group_l2", normalize: str = "mean", **kw) -> None:
        super().__init__(importance=importance, normalize=normalize, **kw)
        self.set_hparams(steps=steps, p=p, global_pruning=global_pruning)

    def finish(self, model: nn.Module, budget: Budget | None) -> nn.Module:
        """Prune `model` in place, step by step, until its MACs <= budget.macs x dense."""
        if budget is None or budget.macs is None:
            raise ValueError("tp_magnitude needs a MACs budget, e.g. Budget(macs=0.5)")
        x = self.ctx.example_inputs
        model.eval()
        macs0, _ = count(model, x)
        ops0, _ = tp.utils.count_ops_and_params(model, example_inputs=x)
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        imp = tp.importance.GroupMagnitudeImportance(p=self.p, group_reduction="mean",
                                                     normalizer="mean")
        pruner = tp.pruner.MetaPruner(model, x, importance=imp,
                                      global_pruning=self.global_pruning,
                                      pruning_ratio=1.0, max_pruning_ratio=1.0,
                                      iterative_steps=self.steps, ignored_layers=heads)
        with torch.no_grad():
            while count(model, x)[0] > budget.macs * macs0:
                if pruner.current_step == pruner.iterative_steps:
                    raise ValueError(f"tp_magnitude: {self.steps} steps did not reach "
                                     f"{budget.macs} of the MACs; raise steps")
                pruner.step()
        ops1, _ = tp.utils.count_ops_and_params(model, example_inputs=x)
        self.tp_record = {"version": tp.__version__, "steps_taken": pruner.current_step,
                          "ops_ratio": float(ops1) / float(ops0)}
        return model

    def hparams(self) -> dict:
        out = super().hparams()
        if hasattr(self, "tp_record"):
            out["torch_pruning"] = self.tp_record
        return out


def compare_scores(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """{group's first source layer: max |tp - prunelib| / max(prunelib)} over every channel group
    both libraries find, of prunelib's `group_l2` score and Torch-Pruning's
    `GroupMagnitudeImportance(p=2, group_reduction='mean', normalizer=None)`."""
    from prunelib.graph import channel_groups
    model.eval()
    groups = channel_groups(model, x)
    ours = methods.get("l1", importance="group_l2", residual="coupled")
    ours.attach(model, groups)
    mine = ours.scores(model)
    imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    names = {mod: n for n, mod in model.named_modules()}
    out = {}
    for g in dg.get_all_groups(ignored_layers=heads, root_module_types=[nn.Conv2d]):
        root = names[g[0].dep.target.module]          # the conv whose outputs are pruned
        match = [pg for pg in groups if root in pg.sources]
        if len(match) != 1:
            raise ValueError(f"no single prunelib group produced by {root}")
        theirs, s = imp(g), mine[match[0].index]
        out[match[0].sources[0]] = float((theirs - s).abs().max() / s.abs().max())
    if len(out) != len(groups):
        raise ValueError(f"Torch-Pruning found {len(out)} groups, prunelib {len(groups)}")
    return out


def _scores_command(argv: list[str]) -> int:
    import argparse

    from prunelib.models import MODELS, get_model
    from prunelib.train import load_checkpoint
    p = argparse.ArgumentParser(prog="torch_pruning_row.py scores")
    p.add_argument("--model", default="resnet20b", choices=MODELS)
    p.add_argument("--checkpoint", default=None, help="a prunelib checkpoint of that model")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = get_model(args.model)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    diffs = compare_scores(model, torch.randn(1, 3, 32, 32))
    for name, d in diffs.items():
        print(f"{name:28s} max relative difference {d:.2e}")
    worst = max(diffs.values())
    print(f"{len(diffs)} groups; worst {worst:.2e}: {'same' if worst <= 1e-5 else 'DIFFERENT'}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(_scores_command(args[1:]) if args[:1] == ["scores"] else main(args))
