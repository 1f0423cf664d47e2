"""Network Slimming, the L1 baseline, the pipeline and the command line, end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prunelib as pl
from prunelib import methods
from prunelib.cli import main
from prunelib.data import Batches
from prunelib.models import get_model
from prunelib.pipeline import run
from prunelib.select import Budget


class Tiny:
    def __init__(self, device="cpu", n=128):
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n)
        self.train = Batches(x, y, 32, augment=True, device=device)
        self.test = Batches(x, y, 64, shuffle=False, device=device)
        self.calib = Batches(x, y, 64, shuffle=True, device=device)


def test_registry_has_ns_and_l1_and_refuses_unknown_names():
    assert {"ns", "l1"} <= set(methods.names())
    with pytest.raises(KeyError, match="registered"):
        methods.get("nope")


def test_ns_adds_lam_sign_gamma_to_the_bn_gradients(device):
    model = get_model("resnet20").to(device)
    x = torch.randn(4, 3, 32, 32, device=device)
    m = methods.get("ns", lam=1e-3)
    model = m.attach(model, pl.channel_groups(model, x))
    F.cross_entropy(model(x), torch.arange(4, device=device)).backward()
    bn = model.layer2[1].bn1
    before = bn.weight.grad.clone()
    m.after_backward(model)
    assert torch.allclose(bn.weight.grad - before, 1e-3 * bn.weight.sign())
    assert torch.allclose(model.layer2[1].conv1.weight.grad,
                          model.layer2[1].conv1.weight.grad)   # untouched (same tensor)


def test_ns_scores_are_abs_gamma_and_gamma_init():
    model = get_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    m = methods.get("ns", gamma_init=0.5)
    model = m.attach(model, pl.channel_groups(model, x))
    assert all(torch.all(bn.weight == 0.5) for bn in [model.bn1, model.layer3[2].bn2])
    with torch.no_grad():
        model.layer1[0].bn1.weight[3] = -0.1
    s = m.scores(model)
    assert set(s) == {g.index for g in m.groups} and len(s) == 9     # internal groups only
    g = next(g for g in m.groups if g.bns()[0].module == "layer1.0.bn1")
    assert s[g.index][3] == pytest.approx(0.1)


def test_l1_scores_are_filter_norms():
    model = get_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    m = methods.get("l1")
    m.attach(model, pl.channel_groups(model, x))
    g = m.groups[0]
    w = model.get_submodule(g.sources[0]).weight
    assert torch.allclose(m.scores(model)[g.index], w.abs().sum((1, 2, 3)))


@pytest.mark.parametrize("name", ["ns", "l1"])
def test_pipeline_meets_the_macs_target_and_reports_every_phase(name, device):
    model = get_model("resnet20").to(device)
    pruned, res = run(name, model, Tiny(device), Budget(macs=0.5), reg_epochs=0.25,
                      ft_epochs=0.25, device=device, measure_latency=False)
    assert res["pruned"]["macs"] <= 0.5 * res["dense"]["macs"]
    assert set(res["accuracy"]) == {"dense", "regularized", "removed", "recalibrated", "finetuned"}
    assert pl.count(pruned, torch.randn(1, 3, 32, 32, device=device))[0] == res["pruned"]["macs"]
    assert next(model.parameters()).shape == (16, 3, 3, 3)          # the input is untouched
    assert res["dense_widths"]["layer1.0.conv1"] == 16 and res["widths"]["fc"] == 10
    assert sum(res["widths"].values()) < sum(res["dense_widths"].values())
    assert res["widths"]["layer3.0.conv1"] == pruned.layer3[0].conv1.out_channels


def test_pipeline_takes_a_known_dense_accuracy():
    _, res = run("l1", get_model("resnet20"), Tiny(), Budget(macs=0.7), reg_epochs=0,
                 ft_epochs=0, measure_latency=False, dense_accuracy=91.5)
    assert res["accuracy"]["dense"] == 91.5 == res["dense"]["accuracy"]


def test_cli_run_writes_json(tmp_path, monkeypatch, data_root):
    from prunelib.train import save_checkpoint
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path))
    save_checkpoint(get_model("resnet20"), tmp_path / "baselines" / "resnet20_cifar10.pt",
                    accuracy=10.0)
    from prunelib import pipeline
    monkeypatch.setitem(pipeline.SCALES, "quick", pipeline.Scale(
        **{**pipeline.SCALES["quick"].__dict__, "subset": 500, "holdout": 100, "test_subset": 500}))
    out = tmp_path / "r.json"
    assert main(["run", "--method", "ns", "--model", "resnet20", "--target-macs", "0.5",
                 "--reg-epochs", "0.2", "--ft-epochs", "0.2", "--quiet", "--seed", "0",
                 "--out", str(out), "--save", str(tmp_path / "p.pt")]) == 0
    res = json.loads(out.read_text())
    assert res["method"] == "ns" and res["model"] == "resnet20" and res["scale"] == "quick"
    assert res["pruned"]["macs"] <= 0.5 * res["dense"]["macs"]
    assert {"batch1", "batch64", "device"} <= set(res["latency"])
    assert set(res["seconds"]) >= {"regularize", "remove", "finetune"}
    small, meta = pl.load_pruned(get_model("resnet20"), tmp_path / "p.pt")
    assert pl.count(small, torch.randn(1, 3, 32, 32))[0] == res["pruned"]["macs"]


def test_finish_without_budget_is_refused_for_a_ranking_method():
    model = get_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    ns = methods.get("ns")
    ns.ctx = methods.base.Context(example_inputs=x)
    ns.attach(model, pl.channel_groups(model, x))
    with pytest.raises(ValueError, match="pass a Budget"):
        ns.finish(model, None)
