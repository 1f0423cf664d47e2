"""`prunelib.report`'s choices table (residual policy, strength, decision rule, recalibration
gain, sparse-phase cost, realized speedup), the papers' reported results (`prunelib.reported`)
and `prunelib report`'s new tables, on hand-made result dicts. Aggregation, the main table,
the figures and the refusal of bad input are tested in test_sweep.py."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from prunelib import methods, report
from prunelib.cli import main
from prunelib.reported import REPORTED, VERIFIED_TAGS


def result(method: str = "ns", seed: int = 0, macs: float = 0.5, *, removed: float = 20.0,
           recal: float = 50.0, reg_s: float = 60.0, ft_s: float = 30.0,
           reg_epochs: float = 3.0, ft_epochs: float = 3.0, pruned_macs: int = 500,
           speedup: float | None = 1.5, hparams: dict | None = None,
           strength: dict | None = None, own_rule: bool = False) -> dict[str, Any]:
    """A result dict with the fields `pipeline.run` writes (dense MACs 1000)."""
    r: dict[str, Any] = {
        "model": "resnet20", "scale": "bench", "method": method, "seed": seed,
        "test_images": 10_000,
        "target": {"macs": macs, "percent": None, "threshold": None, "own_rule": own_rule},
        "settings": {"reg_epochs": reg_epochs, "ft_epochs": ft_epochs},
        "accuracy": {"dense": 91.0, "regularized": 80.0, "removed": removed,
                     "recalibrated": recal, "finetuned": 88.0},
        "dense": {"accuracy": 91.0, "macs": 1000, "params": 100},
        "pruned": {"accuracy": 88.0, "macs": pruned_macs, "params": 50,
                   "macs_ratio": pruned_macs / 1000, "params_ratio": 0.5},
        "seconds": {"evaluate": 1.0, "regularize": reg_s, "remove": 0.1, "recalibrate": 2.0,
                    "finetune": ft_s, "total": reg_s + ft_s + 3.1},
        "hparams": {"min_keep": 0.1, "min_channels": 1} if hparams is None else hparams,
        "strength": (strength if strength is not None else
                     {"rule": "target drift", "params": {"lam": 2.5}}),
    }
    if speedup is not None:
        r["latency"] = {"batch64": {"dense_ms": 10.0, "pruned_ms": 10.0 / speedup,
                                    "speedup": speedup}}
    return r


def row_of(rows: list[dict], method: str, budget: str = "macs 0.5") -> dict:
    return next(r for r in rows if r["method"] == method and r["budget"] == budget)


# -- the new columns -----------------------------------------------------------------------------
def test_sparse_cost_is_seconds_per_epoch_of_the_sparse_phase_over_fine_tuning() -> None:
    assert report.sparse_cost(result(reg_s=60.0, ft_s=30.0)) == pytest.approx(2.0)
    assert report.sparse_cost(result(reg_s=10.0, reg_epochs=1.0, ft_s=30.0, ft_epochs=3.0)) \
        == pytest.approx(1.0)
    assert report.sparse_cost(result(reg_epochs=0.0)) is None
    assert report.sparse_cost(result("l1", reg_s=2e-5)) is None      # no sparse phase
    trained = result("l1", reg_s=60.0, hparams={"train_first": True})  # a plain-SGD phase
    assert report.sparse_cost(trained) == pytest.approx(2.0)
    assert report.sparse_cost(result("eagleeye")) is None
    rows = report.choices([result(reg_s=60.0), result(seed=1, reg_s=90.0)])
    cost = rows[0]["sparse_cost"]
    assert (cost.mean, cost.n) == (pytest.approx(2.5), 2)
    assert cost.std == pytest.approx(math.sqrt(0.5))


def test_recal_gain_and_realized_share_per_run_then_averaged() -> None:
    rs = [result(removed=20.0, recal=50.0, speedup=1.5),           # ideal 2: share 0.5
          result(seed=1, removed=30.0, recal=31.0, speedup=1.25)]  # share 0.25
    row = report.choices(rs)[0]
    assert row["recal_gain"].mean == pytest.approx(15.5) and row["recal_gain"].n == 2
    assert row["realized"].mean == pytest.approx(0.375)
    assert report.realized_share(result(pruned_macs=250, speedup=2.5)) == pytest.approx(0.5)
    assert report.realized_share(result(speedup=None)) is None       # no latency measured
    assert report.realized_share(result(pruned_macs=1000)) is None   # nothing removed


def test_residual_comes_from_the_hparams_else_from_the_method_class() -> None:
    rows = report.choices([result("ns"), result("gbn"),
                           result("ssl", hparams={"residual": "coupled"}),
                           result("oto", hparams={"residual": "internal"}),
                           result("oto", seed=1)])
    assert row_of(rows, "ns")["residual"] == "internal"
    assert row_of(rows, "gbn")["residual"] == type(methods.get("gbn")).residual == "coupled"
    assert row_of(rows, "ssl")["residual"] == "coupled"
    assert row_of(rows, "oto")["residual"] == "coupled / internal"   # the runs disagree


def test_strength_names_the_rule_and_its_values_or_the_papers() -> None:
    rows = report.choices([
        result("ns", strength={"rule": "target drift", "params": {"lam": 2.4771}}),
        result("ns", seed=1, strength={"rule": "target drift", "params": {"lam": 3.0}}),
        result("pr", strength={"rule": "target drift", "params": {"lam": 1e-3, "t": 1.4}}),
        result("l1", strength={"rule": "method", "why": "no rule: the method plans its own "
                                                        "phase"}),
        result("dmc", strength={"rule": "method", "why": "no rule: the method plans its own "
                                                         "phase"}),
        result("ssl", strength={"rule": "method", "why": "the paper's values (full scale)"}),
        result("sss", strength={"rule": "given", "params": {"gamma": 0.05}})])
    assert row_of(rows, "ns")["strength"] == "target drift: lam=2.48-3"
    assert row_of(rows, "pr")["strength"] == "target drift: lam=0.001, t=1.4"
    assert row_of(rows, "l1")["strength"] == "- (no penalty)"
    assert row_of(rows, "dmc")["strength"] == "paper's values (no rule)"
    assert row_of(rows, "ssl")["strength"] == "paper's values"
    assert row_of(rows, "sss")["strength"] == "given: gamma=0.05"


def test_every_registered_method_has_a_decision_phrase() -> None:
    assert set(report.DECISIONS) == set(methods.names())
    assert all(isinstance(v, str) and 0 < len(v) <= 80 for v in report.DECISIONS.values())
    assert set(report.OWN_DECISIONS) <= set(methods.names())
    assert report.NO_SPARSE_PHASE <= set(methods.names())
    rows = report.choices([result("scop"), result("rsnli", own_rule=True)])
    assert row_of(rows, "scop")["decision"] == report.DECISIONS["scop"]
    assert row_of(rows, "rsnli", "own")["decision"] == report.OWN_DECISIONS["rsnli"]


class _NoBatches:
    def __iter__(self) -> Any:
        raise AssertionError("the sparse phase read a batch")

    def __len__(self) -> int:
        return 10


@pytest.mark.parametrize("name", sorted(report.NO_SPARSE_PHASE))
def test_methods_said_to_have_no_sparse_phase_train_nothing(name: str) -> None:
    m, model = methods.get(name), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = methods.Context(example_inputs=torch.zeros(1, 3, 8, 8), train_loader=_NoBatches(),
                          epochs=3.0)
    assert type(m).regularize(m, model, ctx) is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_choices_table_shows_the_columns_in_markdown_and_text() -> None:
    rows = report.choices([result("ns"), result("ns", seed=1, recal=40.0, reg_s=90.0),
                           result("l1", strength={"rule": "method", "why": "no rule"},
                                  reg_s=2e-5), result("ns", macs=0.3, pruned_macs=300)])
    assert [(r["method"], r["budget"], r["n"]) for r in rows] == [
        ("l1", "macs 0.5", 1), ("ns", "macs 0.5", 2), ("ns", "macs 0.3", 1)]
    md = report.choices_table(rows)
    line = next(x for x in md.splitlines() if x.startswith("| ns | macs 0.5 |"))
    assert line == ("| ns | macs 0.5 | 2 | internal | target drift: lam=2.5 | global ranking "
                    "of \\|gamma\\| | 25.00 ± 7.07 | 2.50 ± 0.71 | 0.50 ± 0.00 |")
    assert "| l1 | macs 0.5 | 1 | internal | - (no penalty) |" in md
    assert next(x for x in md.splitlines() if x.startswith("| l1 ")).endswith(
        "| 30.00 | - | 0.50 |")
    assert "realized speedup share: (measured batch-64 speedup - 1) / (ideal - 1)" in md
    text = report.choices_table(rows, fmt="text")
    assert "|" not in text.splitlines()[0] and "global ranking of |gamma|" in text
    with pytest.raises(ValueError, match="fmt must be"):
        report.choices_table(rows, fmt="html")


# -- the papers' reported results ----------------------------------------------------------------
def test_reported_entries_are_verified_finite_fractions() -> None:
    assert REPORTED and REPORTED[0].model == "ResNet-56" and REPORTED[0].dataset == "CIFAR-10"
    for e in REPORTED:
        tag = e.source.strip("[]").split(":")[0].strip()
        assert e.source.startswith("[") and e.source.endswith("]"), e
        assert "mem" not in e.source and tag in VERIFIED_TAGS, e
        assert e.method in methods.names(), e
        assert e.dataset in ("CIFAR-10", "ImageNet"), e
        assert math.isfinite(e.pruned) and 0 < e.pruned < 100, e
        assert e.baseline is None or (math.isfinite(e.baseline) and 0 < e.baseline < 100), e
        assert 0 < e.flops_reduction < 1, e
        assert e.params_reduction is None or 0 < e.params_reduction < 1, e
    assert len(set(REPORTED)) == len(REPORTED)


def test_reported_table_says_it_is_not_measured_here_and_filters_methods() -> None:
    md = report.reported_table()
    head = md.splitlines()[0]
    assert "NOT measured by prunelib" in head and "baselines" in head
    assert "| pr | ResNet-56 | CIFAR-10 | 93.80 | 93.83 | +0.03 | 47.0% | - | [paper] |" in md
    assert not any(c in md for c in report.REPORTED_CAVEATS)
    assert all(c in report.reported_table(caveats=True) for c in report.REPORTED_CAVEATS)
    only = report.reported_table("text", methods=["resrep"])
    rows = [x for x in only.splitlines() if x.startswith(("resrep ", "ns ", "pr "))]
    assert rows and all(x.startswith("resrep ") for x in rows) and "|" not in only
    assert "no verified reported result" in report.reported_table(methods=["l1"])
    assert len(report.REPORTED_CAVEATS) >= 5
    with pytest.raises(ValueError, match="fmt must be"):
        report.reported_table("latex")


# -- prunelib report ------------------------------------------------------------------------------
def test_report_command_writes_the_choices_and_with_reported_the_papers_tables(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    res = tmp_path / "res"
    res.mkdir()
    for i, r in enumerate([result("ns"), result("ns", seed=1), result("l1")]):
        (res / f"r{i}.json").write_text(json.dumps(r))
    out = tmp_path / "rep"
    assert main(["report", str(res), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert md.index("| tuned |") < md.index("| residual | strength | decision |")
    assert "NOT measured by prunelib" not in md
    assert "| residual | strength | decision |" in capsys.readouterr().out
    assert main(["report", str(res), "--out", str(out), "--reported", "--format", "text"]) == 0
    txt = (out / "report.txt").read_text()
    assert "residual  strength" in txt and "NOT measured by prunelib" in txt
    reported = txt[txt.index("NOT measured by prunelib"):]
    assert "ResNet-56" in reported and "\nresrep " not in reported     # only ns and l1
    assert report.REPORTED_CAVEATS[0] in reported


def test_runs_made_with_other_settings_are_rows_of_their_own_not_extra_seeds() -> None:
    rs = [result("l1"), result("l1", seed=1), result("l1", ft_epochs=5.0, reg_epochs=5.0)]
    rows = report.aggregate(rs)
    assert [(r["method"], r["n"]) for r in rows] == [
        ("l1", 2), ("l1 (reg_epochs=5, ft_epochs=5)", 1)]
    assert [r["method"] for r in report.choices(rs)] == ["l1", "l1 (reg_epochs=5, ft_epochs=5)"]
    assert report.settings_note(result("l1")) == ""                   # the scale's own
    assert [r["n"] for r in report.aggregate(rs[2:])] == [1]          # alone: one plain row
    assert report.aggregate(rs[2:])[0]["method"] == "l1"
    odd = [{**r, "scale": "mine"} for r in rs]                        # no defaults known
    assert [r["method"] for r in report.aggregate(odd)] == ["l1 (settings 0)",
                                                            "l1 (settings 1)"]


def test_runs_from_another_dense_baseline_are_rows_of_their_own_not_extra_seeds() -> None:
    other = result("l1", seed=1)
    other["dense"] = {**other["dense"], "accuracy": 88.2}
    rows = report.aggregate([result("l1"), other, result("l1", seed=2)])
    assert [(r["method"], r["n"]) for r in rows] == [("l1 (dense 88.20%)", 1),
                                                     ("l1 (dense 91.00%)", 2)]
    both = {**other, "settings": {"reg_epochs": 5.0, "ft_epochs": 5.0}}
    rows = report.aggregate([result("l1"), both])
    assert sorted(r["method"] for r in rows) == [
        "l1 (dense 91.00%)", "l1 (reg_epochs=5, ft_epochs=5; dense 88.20%)"]


def test_magnitude_rows_name_their_score_and_torch_pruning_rows_are_described() -> None:
    no_rule = {"rule": "method", "why": "no rule: the method plans its own phase"}
    rows = report.choices([
        result("l1", hparams={}, strength=no_rule, reg_s=1e-5),
        result("l1_global", hparams={"importance": "group_l2", "normalize": "mean"},
               strength=no_rule, reg_s=1e-5),
        result("tp_magnitude", hparams={"p": 2, "global_pruning": False, "steps": 400},
               strength=no_rule, reg_s=1e-5)])
    assert row_of(rows, "l1")["decision"] == report.DECISIONS["l1"]       # defaults: same text
    assert row_of(rows, "l1_global")["decision"] == "global ranking of group L2 / group mean"
    tp = row_of(rows, "tp_magnitude")
    assert tp["decision"] == ("Torch-Pruning: uniform per-group rate of group L2 / group mean, "
                              "400 re-scored steps")
    assert tp["residual"] == "coupled"                      # not registered here: EXTERNAL
    assert tp["strength"] == "- (no penalty)" and tp["sparse_cost"] is None
    assert "tp_magnitude" not in methods.names()
