"""Probe GREG's sparse model: are its "zeroed" channels really off? (chapter 5, Section 7)

Runs GREG's sparse phase through `pipeline.run` (no fine-tuning), keeps the sparse model
(`on_sparse`), and prints per pruned layer: the pruned filters' norm over the kept ones', the
BN output scale |gamma| sqrt(var / (var + eps)) of the pruned channels over the kept ones',
and the accuracy when the pruned filter rows are zeroed. With scope='filters' (the paper's) the
BN scales shrunk filters back up, so the last number falls; with scope='group' it does not.

    python tools/greg_probe.py --baseline book/results/bar_b/resnet20b_cifar10_e15.pt \\
        --model resnet20b --reg-epochs 5 [--scope group] [--seed 0]
"""
from __future__ import annotations

import argparse
import copy

import torch

from prunelib import pipeline
from prunelib.calibrate import conv_bn_pairs
from prunelib.models import get_model
from prunelib.train import evaluate, load_checkpoint


def probe(model: torch.nn.Module, method) -> list[tuple[str, float, float]]:
    """[(layer, pruned / kept filter norm, pruned / kept BN output scale)] of `model`."""
    bn_of = dict(conv_bn_pairs(model))
    out = []
    for g in method.groups:
        mask = method.pruned[g.index]
        if not mask.any():
            continue
        name = g.sources[0]
        w = model.get_submodule(name).weight.detach().flatten(1).norm(dim=1)
        bn = model.get_submodule(bn_of[name])
        scale = bn.weight.detach().abs() * (bn.running_var / (bn.running_var + bn.eps)).sqrt()
        out.append((name, float(w[mask].mean() / w[~mask].mean()),
                    float(scale[mask].mean() / scale[~mask].mean())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="dense checkpoint (prunelib format)")
    ap.add_argument("--model", default="resnet20b")
    ap.add_argument("--scope", default="filters", choices=("filters", "group"))
    ap.add_argument("--reg-epochs", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = pipeline.load_data("bench")
    model = get_model(args.model)
    load_checkpoint(model, args.baseline)
    kept: dict = {}

    def grab(m: torch.nn.Module, method) -> None:
        kept["model"], kept["method"] = copy.deepcopy(m).eval(), method

    _, res = pipeline.run(pipeline.make_method("greg", scope=args.scope), model, data,
                          scale="bench", seed=args.seed, reg_epochs=args.reg_epochs,
                          ft_epochs=0, measure_latency=False, on_sparse=grab)
    m, method = kept["model"], kept["method"]
    print(f"greg scope={args.scope}, {args.reg_epochs:g} sparse epochs, seed {args.seed}: "
          f"accuracy {res['accuracy']}")
    print(f"{'layer':16s} {'filter norm':>12s} {'BN out scale':>13s}   (pruned / kept)")
    for name, w, s in probe(m, method):
        print(f"{name:16s} {w:12.4f} {s:13.3f}")
    with torch.no_grad():
        for g in method.groups:
            m.get_submodule(g.sources[0]).weight[method.pruned[g.index]] = 0
    print(f"pruned filter rows zeroed: {evaluate(m, data.test):.2f}% "
          f"(sparse model: {res['accuracy']['regularized']:.2f}%)")


if __name__ == "__main__":
    main()
