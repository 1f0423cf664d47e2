"""`prunelib sweep` and `prunelib report` on a tiny grid: one complete JSON per run, resume,
atomic writes, aggregation against a hand computation, figures, and input errors."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prunelib import data, fileio, pipeline, report
from prunelib.cli import main
from prunelib.data import Batches, CIFAR10Data
from prunelib.pipeline import SCALES
from prunelib.sweep import Grid, SweepError, git_commit, plan, run_name, sweep

FAST = {"reg_epochs": 0.5, "ft_epochs": 0.5, "recal_batches": 1}


class TinyNet(nn.Module):
    """conv-bn-relu x 2, pool, linear: every method under test prunes it in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                      nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def tiny_data(seed: int = 0, **_) -> CIFAR10Data:
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 10
    idx = np.arange(64)
    return CIFAR10Data(Batches(x, y, 32, augment=True, seed=seed),
                       Batches(x, y, 64, shuffle=False), Batches(x, y, 64), idx, idx, idx)


def tiny_model(_data=None) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    return TinyNet(), {"path": "tiny.pt", "accuracy": 10.0}


def grid(**kw) -> Grid:
    return Grid(**{"methods": ("l1", "ns"), "budgets": (0.6,), "seeds": (0, 1),
                   "model": "tiny", "scale": "quick", "overrides": FAST, **kw})


def run_sweep(g: Grid, folder: Path, log: list[str] | None = None, **kw):
    return sweep(g, folder, tiny_data, tiny_model, device="cpu", measure_latency=False,
                 log=(log.append if log is not None else lambda s: None), **kw)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The methods `pipeline.run` is called with, in order."""
    calls: list[str] = []
    real = pipeline.run

    def run(method, *a, **k):
        calls.append(method)
        return real(method, *a, **k)

    monkeypatch.setattr(pipeline, "run", run)
    return calls


# -- sweep: files, resume, atomicity ------------------------------------------------------------
def test_sweep_writes_one_complete_result_per_run_with_its_spec_and_provenance(
        tmp_path: Path) -> None:
    log: list[str] = []
    done = run_sweep(grid(), tmp_path, log, command="prunelib sweep ...")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(run_name(s) for s in grid().specs()) == [
        "tiny-quick-l1-macs0.6-seed0.json", "tiny-quick-l1-macs0.6-seed1.json",
        "tiny-quick-ns-macs0.6-seed0.json", "tiny-quick-ns-macs0.6-seed1.json"]
    assert len(done.written) == 4 and not done.skipped and not done.failed
    for spec in grid().specs():
        res = report.read_result(tmp_path / run_name(spec))
        assert res["run"] == spec and res["method"] == spec["method"]
        assert res["seed"] == spec["seed"] and res["target"]["macs"] == 0.6
        assert res["pruned"]["macs_ratio"] <= 0.6 and res["settings"]["ft_epochs"] == 0.5
        assert set(res["seconds"]) >= {"regularize", "finetune", "total"}
        assert res["command"] == "prunelib sweep ..." and res["grid"]["seeds"] == [0, 1]
        assert "commit" in res and res["baseline"] == {"path": "tiny.pt", "accuracy": 10.0}
    assert re.search(r"\[4/4\] .*done 4, skipped 0, failed 0, left 0, ETA 0 s", log[-2])


def test_rerun_skips_finished_runs_without_loading_anything(tmp_path: Path,
                                                            counted: list[str]) -> None:
    run_sweep(grid(), tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    counted.clear()

    def refuse(*a):
        raise AssertionError("nothing to run: no data or model should be loaded")

    done = sweep(grid(), tmp_path, refuse, refuse, log=lambda s: None)
    assert counted == [] and len(done.skipped) == 4 and done.written == []
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_rerun_runs_again_a_missing_a_half_written_and_a_foreign_file(tmp_path: Path,
                                                                      counted: list[str]
                                                                      ) -> None:
    run_sweep(grid(), tmp_path)
    specs = grid().specs()
    (tmp_path / run_name(specs[0])).unlink()                             # l1 seed 0: missing
    half = tmp_path / run_name(specs[1])                                 # ns seed 0: truncated
    half.write_text(half.read_text()[:500])
    (tmp_path / run_name(specs[2])).write_text('{"not": "a result"}')   # l1 seed 1: foreign
    kept = (tmp_path / run_name(specs[3])).read_text()
    counted.clear()
    done = run_sweep(grid(), tmp_path)
    assert counted == ["l1", "ns", "l1"] and len(done.skipped) == 1
    for spec in specs:
        assert report.read_result(tmp_path / run_name(spec))["run"] == spec
    assert (tmp_path / run_name(specs[3])).read_text() == kept


def test_a_crash_between_write_and_rename_leaves_no_file_under_the_run_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: list[str]) -> None:
    real, renames = os.replace, []

    def crash_on_second(src, dst):
        renames.append(dst)
        if len(renames) == 2:                       # the process dies before the rename
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(grid(), tmp_path)
    monkeypatch.setattr(fileio.os, "replace", real)
    specs = grid().specs()
    assert [p.name for p in tmp_path.iterdir()] == [run_name(specs[0])]   # no half, no tmp
    (tmp_path / f".{run_name(specs[1])}.x1y2.tmp").write_text('{"method": "ns", ')  # kill -9
    assert [p.finished for p in plan(grid(), tmp_path)] == [True, False, False, False]
    counted.clear()
    run_sweep(grid(), tmp_path)
    assert counted == ["ns", "l1", "ns"]
    assert len(report.load_results([tmp_path])) == 4          # the stray .tmp is not read


def test_a_result_made_with_other_settings_is_an_error_and_is_kept(tmp_path: Path) -> None:
    run_sweep(grid(seeds=(0,), methods=("l1",)), tmp_path)
    path = tmp_path / "tiny-quick-l1-macs0.6-seed0.json"
    text = path.read_text()
    other = grid(seeds=(0,), methods=("l1",), overrides={**FAST, "ft_epochs": 1.0})
    with pytest.raises(SweepError, match=r"other settings \(settings.ft_epochs: 0.5 -> 1.0\)"):
        run_sweep(other, tmp_path)
    assert path.read_text() == text


def test_a_folder_made_from_another_baseline_is_an_error_before_the_next_run_trains(
        tmp_path: Path, counted: list[str]) -> None:
    run_sweep(grid(methods=("l1",)), tmp_path)
    counted.clear()

    def other_baseline(_data=None) -> tuple[nn.Module, dict]:
        return tiny_model()[0], {"path": "other.pt", "accuracy": 12.5}
    with pytest.raises(SweepError, match=r"baseline at 10.0%.*other.pt\) is at 12.5%"):
        sweep(grid(), tmp_path, tiny_data, other_baseline, device="cpu",
              measure_latency=False, log=lambda s: None)
    assert counted == [] and len(list(tmp_path.iterdir())) == 2       # nothing ran or written
    assert len(run_sweep(grid(), tmp_path).written) == 2              # the same baseline: resumes


def test_another_grids_runs_from_another_baseline_also_refuse_the_folder(
        tmp_path: Path, counted: list[str]) -> None:
    run_sweep(grid(methods=("l1",), seeds=(0,)), tmp_path)          # a finished l1 run
    counted.clear()

    def other_baseline(_data=None) -> tuple[nn.Module, dict]:
        return tiny_model()[0], {"path": "other.pt", "accuracy": 12.5}
    with pytest.raises(SweepError, match=r"tiny-quick-l1-macs0.6-seed0.json was made from"):
        sweep(grid(methods=("ns",), seeds=(0,)), tmp_path, tiny_data, other_baseline,
              device="cpu", measure_latency=False, log=lambda s: None)
    assert counted == []
    for f in list(tmp_path.iterdir()):                               # another model's files
        other = tmp_path / f.name.replace("tiny-", "other-")
        other.write_text(f.read_text().replace('"model": "tiny"', '"model": "other"'))
        f.unlink()
    done = sweep(grid(methods=("ns",), seeds=(0,)), tmp_path, tiny_data, other_baseline,
                 device="cpu", measure_latency=False, log=lambda s: None)
    assert [p.name for p in done.written] == ["tiny-quick-ns-macs0.6-seed0.json"]


def test_a_failing_run_is_reported_writes_nothing_and_the_others_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pipeline.run

    def run(method, *a, **k):
        if method == "ns":
            raise FloatingPointError("loss diverged at step 3")
        return real(method, *a, **k)

    monkeypatch.setattr(pipeline, "run", run)
    log: list[str] = []
    done = run_sweep(grid(), tmp_path, log)
    assert [p.name for p in done.written] == ["tiny-quick-l1-macs0.6-seed0.json",
                                              "tiny-quick-l1-macs0.6-seed1.json"]
    assert done.failed == [("ns macs 0.6 seed 0", "FloatingPointError: loss diverged at step 3"),
                           ("ns macs 0.6 seed 1", "FloatingPointError: loss diverged at step 3")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in done.written)
    assert any("FAILED: FloatingPointError" in line for line in log)


def test_git_commit_is_none_outside_a_checkout(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None
    here = git_commit()
    assert here is None or (re.fullmatch("[0-9a-f]{40}", here["commit"])
                            and isinstance(here["dirty"], bool))


def test_bench_scale_is_the_full_data_from_the_baseline_and_quick_is_unchanged() -> None:
    b = SCALES["bench"]
    assert b.subset is None and b.test_subset is None and b.target_macs == 0.5
    assert 0 < b.reg_epochs == b.ft_epochs <= 5 and b.holdout > 0
    q = SCALES["quick"]
    assert (q.subset, q.test_subset, q.reg_epochs, q.ft_epochs) == (10_000, 5_000, 2, 2)


# -- report: aggregation, table, figures -------------------------------------------------------
def fake(method: str, macs: float, seed: int, tuned: float, removed: float, ratio: float,
         speedup: float, seconds: float) -> dict:
    return {"model": "resnet20", "scale": "bench", "method": method, "seed": seed,
            "test_images": 10_000, "target": {"macs": macs, "own_rule": False},
            "accuracy": {"dense": 92.0, "regularized": 80.0, "removed": removed,
                         "recalibrated": removed + 5, "finetuned": tuned},
            "dense": {"accuracy": 92.0, "macs": 1000, "params": 100},
            "pruned": {"accuracy": tuned, "macs": int(1000 * ratio), "params": 50,
                       "macs_ratio": ratio, "params_ratio": 0.5},
            "latency": {"batch64": {"dense_ms": 10.0, "pruned_ms": 10 / speedup,
                                    "speedup": speedup}},
            "seconds": {"regularize": seconds / 2, "finetune": seconds / 4, "total": seconds}}


HAND = [fake("ns", 0.5, 0, 90.0, 10.0, 0.5, 1.2, 100.0),
        fake("ns", 0.5, 1, 91.0, 20.0, 0.48, 1.4, 200.0),
        fake("ns", 0.5, 2, 93.0, 60.0, 0.52, 1.6, 300.0),
        fake("l1", 0.5, 0, 89.0, 30.0, 0.5, 1.5, 60.0),
        fake("ns", 0.3, 0, 85.0, 5.0, 0.3, 2.0, 120.0)]


def test_aggregate_gives_mean_sample_std_and_n_per_method_and_budget() -> None:
    rows = report.aggregate(HAND)
    assert [(r["method"], r["budget"], r["n"]) for r in rows] == [    # most MACs kept first
        ("l1", "macs 0.5", 1), ("ns", "macs 0.5", 3), ("ns", "macs 0.3", 1)]
    ns = rows[1]
    assert ns["seeds"] == [0, 1, 2]
    mean = (90 + 91 + 93) / 3
    assert ns["tuned"].mean == pytest.approx(mean) and ns["tuned"].n == 3
    assert ns["tuned"].std == pytest.approx(math.sqrt(((90 - mean) ** 2 + (91 - mean) ** 2
                                                       + (93 - mean) ** 2) / 2))
    assert ns["removed"].mean == 30 and ns["removed"].std == pytest.approx(math.sqrt(700))
    assert ns["drop"].mean == pytest.approx(mean - 92)
    assert ns["macs"].mean == pytest.approx(0.5) and ns["macs"].std == pytest.approx(0.02)
    assert ns["speedup64"].mean == pytest.approx(1.4) and ns["speedup64"].std == pytest.approx(0.2)
    assert ns["ideal"].mean == pytest.approx((1000 / 500 + 1000 / 480 + 1000 / 520) / 3)
    assert ns["seconds"].mean == 200 and ns["seconds"].std == pytest.approx(100)
    assert rows[0]["tuned"] == report.Stat(89.0, None, 1)


def test_table_shows_mean_std_and_n_in_markdown_and_text() -> None:
    md = report.table(report.aggregate(HAND))
    line = next(x for x in md.splitlines() if x.startswith("| ns | macs 0.5 |"))
    assert "| 3 |" in line and "| 91.33 ± 1.53 |" in line and "| 30.00 ± 26.46 |" in line
    assert "| 3.3 ± 1.7 |" in line                          # minutes
    assert "| l1 | macs 0.5 | 1 | 92.00 |" in md and "| 89.00 |" in md   # no ± for n = 1
    assert "binomial standard error of about 0.27 points" in md
    text = report.table(report.aggregate(HAND), fmt="text")
    assert "|" not in text.splitlines()[0] and "91.33 ± 1.53" in text


def test_seconds_fall_back_to_the_sum_of_the_phases_without_a_total() -> None:
    r = fake("ns", 0.5, 0, 90.0, 10.0, 0.5, 1.2, 100.0)
    del r["seconds"]["total"], r["latency"]
    row = report.aggregate([r])[0]
    assert row["seconds"].mean == 75 and row["speedup64"] is None


def write_hand(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(HAND):
        (folder / f"r{i}.json").write_text(json.dumps(r))


def test_report_command_writes_the_table_and_four_figures(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    write_hand(tmp_path / "res")
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "res"), "--out", str(out)]) == 0
    assert "| ns | macs 0.5 | 3 |" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.md", *report.FIGURES])
    for name in report.FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "res" / "r0.json"), "--format", "text"]) == 0


def test_report_reads_a_sweeps_folder(tmp_path: Path) -> None:
    run_sweep(grid(seeds=(0, 1), methods=("l1",)), tmp_path / "res")
    rows = report.aggregate(report.load_results([tmp_path / "res"]))
    assert [(r["method"], r["n"], r["seeds"]) for r in rows] == [("l1", 2, [0, 1])]
    assert len(report.write_figures(rows, tmp_path / "figs")) == 4


# -- input errors --------------------------------------------------------------------------------
def user_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("prunelib: error: ") and "Traceback" not in err
    return err.splitlines()[0][len("prunelib: error: "):]


def test_report_refuses_what_is_not_a_result_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    import pickle
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    (tmp_path / "p.json").write_bytes(pickle.dumps({"method": "ns"}))
    (tmp_path / "t.json").write_text('{"method": "ns", ')
    (tmp_path / "l.json").write_text("[1, 2]")
    r = fake("ns", 0.5, 0, 90.0, 10.0, 0.5, 1.2, 100.0)
    del r["accuracy"]["recalibrated"]
    (tmp_path / "m.json").write_text(json.dumps(r))
    (tmp_path / "empty").mkdir()
    cases = {"p.json": "not JSON (binary, not UTF-8 text)", "t.json": "not JSON (Expecting",
             "l.json": "not a prunelib result (a JSON list, not an object)",
             "m.json": "not a prunelib result (missing or not a number: accuracy.recalibrated)",
             "empty": "no *.json result files in this folder",
             "nosuch": "no such file or folder"}
    for name, message in cases.items():
        msg = user_error(["report", str(tmp_path / name)], capsys)
        assert msg.startswith(f"{tmp_path / name}: {message}"), msg


SWEEP_ERRORS = [
    (["--methods", "ns", "nosuch"], "--methods nosuch: unknown method 'nosuch'; registered: "),
    (["--methods", "ns", "ns"], "--methods ns is given twice"),
    (["--methods", "ns", "--budgets", "0"], r"argument --budgets: must be a fraction in \(0, 1\]"),
    (["--methods", "ns", "--budgets", "1.5"], "argument --budgets: must be a fraction"),
    (["--methods", "ns", "--budgets", "nan"], "argument --budgets: must be a fraction"),
    (["--methods", "ns", "--budgets", "0.5", "0.5"], "--budgets 0.5 is given twice"),
    (["--methods", "ns", "--seeds", "-1"], "argument --seeds: must be an integer >= 0, got -1"),
    (["--methods", "ns", "--seeds", "0", "0"], "--seeds 0 is given twice"),
    (["--methods", "ns", "--scale", "huge"], "argument --scale: invalid choice: 'huge'"),
    (["--methods", "ns", "--model", "resnet21"], "argument --model: invalid choice"),
    (["--methods", "ns", "--ft-epochs", "-1"], "argument --ft-epochs: must be a finite number"),
    (["--methods", "ns", "--device", "gpu7"], "--device 'gpu7' is not a device"),
    (["--methods", "ns", "--data", "/no/such"], "--data /no/such is not a folder"),
    (["--methods", "ns", "--hp", "lamb=1"], "--methods ns --hp lamb=1: .*lamb"),
    (["--methods", "ns", "l1", "--hp", "lam=0.01"], "--methods l1 --hp lam=0.01: .*lam"),
    (["--methods", "ns", "--hp", "lam"], "--hp expects KEY=VALUE, got 'lam'"),
    (["--methods", "ns", "--hp", "lam=inf"], "--hp lam=inf: hyperparameters must be finite"),
]


@pytest.mark.parametrize("argv,message", SWEEP_ERRORS,
                         ids=[" ".join(a[1:]) for a, _ in SWEEP_ERRORS])
def test_sweep_user_errors_are_found_before_loading_data(argv: list[str], message: str,
                                                         tmp_path: Path, no_work: list[str],
                                                         capsys: pytest.CaptureFixture) -> None:
    msg = user_error(["sweep", *argv, "--out", str(tmp_path / "res")], capsys)
    assert re.search(message, msg), msg
    assert no_work == []


def test_sweep_refuses_an_unusable_folder_or_one_with_other_settings(
        tmp_path: Path, no_work: list[str], capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "f").write_text("")
    assert "--out '" + str(tmp_path / "f") + "' is a file; give a folder" == user_error(
        ["sweep", "--methods", "l1", "--out", str(tmp_path / "f")], capsys)
    assert "is not writable" in user_error(["sweep", "--methods", "l1", "--out", "/proc/x/r"],
                                           capsys)
    res = tmp_path / "res"
    res.mkdir()
    r = fake("l1", 0.5, 0, 90.0, 10.0, 0.5, 1.2, 100.0)
    r["run"] = {"model": "resnet20", "scale": "quick", "method": "l1", "budget": 0.5, "seed": 0,
                "settings": {}}
    (res / "resnet20-bench-l1-macs0.5-seed0.json").write_text(json.dumps(r))
    msg = user_error(["sweep", "--methods", "l1", "--out", str(res)], capsys)
    assert "holds a run with other settings (scale: 'quick' -> 'bench'" in msg
    assert no_work == []


def test_sweep_command_runs_the_grid_and_resumes(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(data, "cifar10", tiny_data)
    monkeypatch.setattr(pipeline, "load_baseline", lambda name, *a, **k: tiny_model())
    argv = ["sweep", "--methods", "l1", "--budgets", "0.6", "--seeds", "0", "--scale", "quick",
            "--reg-epochs", "0", "--ft-epochs", "0.5", "--out", str(tmp_path), "--quiet",
            "--device", "cpu"]
    assert main(argv) == 0
    res = report.read_result(tmp_path / "resnet20-quick-l1-macs0.6-seed0.json")
    assert res["command"] == "prunelib " + " ".join(argv)
    assert set(res["latency"]) >= {"batch1", "batch64"} and res["settings"]["reg_epochs"] == 0
    capsys.readouterr()
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("a finished run reran"))
    assert main(argv) == 0
    assert "1 finished, 0 to run" in capsys.readouterr().out
    assert main([*argv, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("finished  resnet20-quick-l1-macs0.6-seed0.json")
    monkeypatch.setattr(pipeline, "load_baseline",             # another baseline: refused
                        lambda name, *a, **k: (tiny_model()[0], {"path": "b.pt", "accuracy": 9}))
    msg = user_error([*argv[:6], "0", "1", *argv[7:]], capsys)
    assert "made from a dense baseline at 10.0%, the baseline loaded now (b.pt) is at 9%" in msg


def test_sweep_command_interrupted_keeps_finished_runs_and_says_how_to_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(data, "cifar10", tiny_data)
    monkeypatch.setattr(pipeline, "load_baseline", lambda name, *a, **k: tiny_model())
    real = pipeline.run

    def run(method, *a, **k):
        if method == "ns":
            raise KeyboardInterrupt
        return real(method, *a, **k)

    monkeypatch.setattr(pipeline, "run", run)
    argv = ["sweep", "--methods", "l1", "ns", "--budgets", "0.6", "--scale", "quick",
            "--reg-epochs", "0", "--ft-epochs", "0.5", "--out", str(tmp_path), "--quiet",
            "--device", "cpu"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("prunelib: interrupted;") and "Rerun the same command" in err
    assert "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["resnet20-quick-l1-macs0.6-seed0.json"]


def test_no_restore_norms_skips_the_rescaling_and_is_a_protocol_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from prunelib import calibrate
    monkeypatch.setattr(data, "cifar10", tiny_data)
    monkeypatch.setattr(pipeline, "load_baseline", lambda name, *a, **k: tiny_model())
    calls: list[int] = []
    real = calibrate.restore_bn_input_norms
    monkeypatch.setattr(calibrate, "restore_bn_input_norms",
                        lambda *a: calls.append(1) or real(*a))
    argv = ["sweep", "--methods", "l1", "--budgets", "0.6", "--scale", "quick",
            "--reg-epochs", "0", "--ft-epochs", "0.5", "--out", str(tmp_path / "raw"),
            "--quiet", "--device", "cpu"]
    assert main([*argv, "--no-restore-norms"]) == 0
    res = report.read_result(tmp_path / "raw" / "resnet20-quick-l1-macs0.6-seed0.json")
    assert calls == [] and res["rescaled_rows"] == 0
    assert res["settings"]["restore_norms"] is False
    msg = user_error(argv, capsys)          # the same folder without the flag: refused
    assert "holds a run with other settings (settings.restore_norms: False -> True" in msg
    argv[argv.index("--out") + 1] = str(tmp_path / "restored")
    assert main(argv) == 0 and calls == [1]


# -- variants: the same methods with hyperparameters set by the sweep (ablation rows) -----------
def test_a_variant_grid_names_its_runs_and_keeps_the_plain_specs_unchanged() -> None:
    plain, var = grid(), grid(hparams={"residual": "coupled"})
    assert all("hparams" not in s for s in plain.specs())       # old result files still match
    assert [run_name(s) for s in var.specs()][:2] == [
        "tiny-quick-l1+residual=coupled-macs0.6-seed0.json",
        "tiny-quick-ns+residual=coupled-macs0.6-seed0.json"]
    assert all(s["hparams"] == {"residual": "coupled"} for s in var.specs())


def test_a_variant_runs_with_its_hyperparameters_and_is_a_row_of_its_own(
        tmp_path: Path, counted: list) -> None:
    g = grid(methods=("ns",), seeds=(0,), hparams={"lam": 0.002})
    run_sweep(grid(methods=("ns",), seeds=(0,)), tmp_path)
    run_sweep(g, tmp_path)
    assert counted[0] == "ns" and counted[1].name == "ns" and counted[1].lam == 0.002
    res = report.read_result(tmp_path / "tiny-quick-ns+lam=0.002-macs0.6-seed0.json")
    assert res["variant"] == "ns+lam=0.002" and res["hparams"]["lam"] == 0.002
    assert res["strength"]["rule"] == "method"                # set by the caller: no rule
    rows = report.aggregate(report.load_results([tmp_path]))
    assert [r["method"] for r in rows] == ["ns", "ns+lam=0.002"]
    ch = report.choices(report.load_results([tmp_path]))
    assert [r["method"] for r in ch] == ["ns", "ns+lam=0.002"]
    assert ch[1]["decision"] == ch[0]["decision"] == report.DECISIONS["ns"]
