"""tools/greg_probe.py: the pruned / kept ratios it prints, on a model whose pruned channels
are set by hand (filter rows shrunk, BN gamma left or zeroed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from prunelib.graph import channel_groups
from prunelib.methods.base import Context
from prunelib.methods.greg import GReg
from prunelib.models import get_model

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "greg_probe.py"


def load_probe():
    spec = importlib.util.spec_from_file_location("greg_probe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.probe


@pytest.mark.parametrize("gamma_off", [False, True])
def test_probe_reports_shrunk_filters_and_what_their_bn_still_outputs(gamma_off: bool) -> None:
    torch.manual_seed(0)
    model, x = get_model("resnet20").eval(), torch.randn(1, 3, 32, 32)
    greg = GReg(macs=0.5)
    greg.ctx = Context(example_inputs=x)
    greg.attach(model, channel_groups(model, x))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.running_var.fill_(1.0)
        for g in greg.groups:
            mask = greg.pruned[g.index]
            conv = model.get_submodule(g.sources[0])
            conv.weight.fill_(1.0)
            conv.weight[mask] = 0.01                       # pruned rows: 1% of the kept norm
            bn = model.get_submodule(g.sources[0].replace("conv", "bn"))
            if gamma_off:
                bn.weight[mask] = 0.0
    rows = load_probe()(model, greg)
    assert len(rows) == sum(bool(m.any()) for m in greg.pruned.values()) > 0
    for _, w_ratio, scale_ratio in rows:
        assert w_ratio == pytest.approx(0.01)
        # gamma 1, var 1 >> eps: BN outputs the pruned channels at full scale; gamma 0: none
        assert scale_ratio == pytest.approx(0.0 if gamma_off else 1.0)
