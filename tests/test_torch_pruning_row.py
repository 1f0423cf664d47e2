"""tools/torch_pruning_row.py: prunelib's group_l2 score against Torch-Pruning's (an independent
implementation), and 'tp_magnitude' pruning a network to its MACs budget.

The script registers 'tp_magnitude' when imported; the fixture imports it for one test at a time
and takes the name out of the registry afterwards, so no other test sees an eighteenth method.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from prunelib.graph import channel_groups
from prunelib.measure import count
from prunelib.methods import base
from prunelib.methods.base import Context
from prunelib.models import get_model
from prunelib.select import Budget

pytest.importorskip("torch_pruning")
SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "torch_pruning_row.py"


@pytest.fixture
def row(monkeypatch: pytest.MonkeyPatch):
    """The script as a module, with 'tp_magnitude' registered only for the test."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    spec = importlib.util.spec_from_file_location("torch_pruning_row", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("torch_pruning_row", None)


@pytest.mark.parametrize("name", ["resnet20b", "vgg16"])
def test_group_l2_equals_torch_pruning_group_magnitude_on_every_group(row, name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name)
    with torch.no_grad():                      # BN gammas not all 1: they count in the score
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)
    diffs = row.compare_scores(model, torch.randn(1, 3, 32, 32))
    assert len(diffs) == len(channel_groups(model, torch.randn(1, 3, 32, 32)))
    assert max(diffs.values()) < 1e-5


@pytest.mark.parametrize("hp", [{}, {"global_pruning": False}])
def test_tp_magnitude_prunes_to_the_macs_budget_and_records_torch_pruning(row, hp) -> None:
    torch.manual_seed(0)
    model, x = get_model("resnet20b").eval(), torch.randn(1, 3, 32, 32)
    macs0 = count(model, x)[0]
    m = row.methods.get("tp_magnitude", **hp)
    m.ctx = Context(example_inputs=x, train_loader=None, device="cpu", epochs=0, lr=0.01)
    m.attach(model, channel_groups(model, x))
    pruned = m.finish(model, Budget(macs=0.5))
    ratio = count(pruned, x)[0] / macs0
    assert 0.45 < ratio <= 0.5
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    rec = m.hparams()["torch_pruning"]
    assert rec["steps_taken"] >= 1 and abs(rec["ops_ratio"] - ratio) < 0.01
    assert "tp_magnitude" in row.methods.names()


def test_tp_magnitude_needs_a_macs_budget(row) -> None:
    x = torch.randn(1, 3, 32, 32)
    model = get_model("resnet20b").eval()
    m = row.methods.get("tp_magnitude")
    m.ctx = Context(example_inputs=x, train_loader=None, device="cpu", epochs=0, lr=0.01)
    m.attach(model, channel_groups(model, x))
    with pytest.raises(ValueError, match="needs a MACs budget"):
        m.finish(model, Budget(percent=0.5))
