"""What the command line guarantees: every user error is one `prunelib: error: ...` line on
stderr with exit code 2 and no traceback, found before any data is loaded or training starts;
outputs are written atomically."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelib import data, pipeline
from prunelib.cli import main
from prunelib.data import Batches, CIFAR10Data
from prunelib.models import get_model
from prunelib.train import save_checkpoint


def user_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run main(argv) expecting a user error; return its message (after 'prunelib: error: ')."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("prunelib: error: ") and "Traceback" not in err
    return err.splitlines()[0][len("prunelib: error: "):]


RUN_ERRORS = [
    (["--method", "nosuch"], "--method nosuch: unknown method 'nosuch'; registered: "),
    (["--method", "ns", "--hp", "lamb=3"], "--method ns --hp lamb=3: .*lamb"),
    (["--method", "ns", "--hp", "lam=-1"], "--method ns --hp lam=-1: .*lam"),
    (["--method", "ns", "--hp", "lam"], "--hp expects KEY=VALUE, got 'lam'"),
    (["--method", "ns", "--hp", "=3"], "--hp expects KEY=VALUE, got '=3'"),
    (["--method", "ns", "--hp", "lam=nan"], "--hp lam=nan: hyperparameters must be finite"),
    (["--method", "ns", "--hp", "lam=1", "--hp", "lam=2"], "--hp lam is given twice"),
    (["--method", "ns", "--target-macs", "0"], r"budget: Budget\(macs=0.0\).* \(0, 1\]"),
    (["--method", "ns", "--target-macs", "1.5"], r"budget: Budget\(macs=1.5\)"),
    (["--method", "ns", "--percent", "1"], r"budget: Budget\(percent=1.0\).* must be in \[0, 1\)"),
    (["--method", "ns", "--threshold", "inf"], "argument --threshold: must be a finite number"),
    (["--method", "ns", "--target-macs", "nan"], "argument --target-macs: must be a finite"),
    (["--method", "ns", "--target-macs", "0.5", "--percent", "0.2"],
     "argument --percent: not allowed with argument --target-macs"),
    (["--method", "ns", "--reg-epochs", "-1"],
     "argument --reg-epochs: must be a finite number >= 0"),
    (["--method", "ns", "--ft-epochs", "nan"], "argument --ft-epochs: must be a finite number"),
    (["--method", "ns", "--seed", "-3"], "argument --seed: must be an integer >= 0, got -3"),
    (["--method", "ns", "--seed", "1.5"], "argument --seed: must be an integer >= 0, got '1.5'"),
    (["--method", "ns", "--scale", "huge"], "argument --scale: invalid choice: 'huge'"),
    (["--method", "ns", "--multiple", "0"], "argument --multiple: must be an integer >= 1"),
    (["--method", "ns", "--out", "/proc/x/y.json"], "--out '/proc/x/y.json' is not writable"),
    (["--method", "ns", "--device", "gpu7"], "--device 'gpu7' is not a device"),
    (["--method", "ns", "--data", "/no/such/folder"], "--data /no/such/folder is not a folder"),
]


@pytest.mark.parametrize("argv,message", RUN_ERRORS, ids=[" ".join(a[2:]) or a[1]
                                                          for a, _ in RUN_ERRORS])
def test_run_user_errors_are_found_before_loading_data(argv: list[str], message: str,
                                                       no_work: list[str],
                                                       capsys: pytest.CaptureFixture) -> None:
    msg = user_error(["run", *argv], capsys)
    assert re.search(message, msg), msg
    assert no_work == []


def test_run_refuses_a_directory_or_the_same_file_for_out_and_save(
        tmp_path: Path, no_work: list[str], capsys: pytest.CaptureFixture) -> None:
    assert "is a directory; give a file path" in user_error(
        ["run", "--method", "ns", "--save", str(tmp_path)], capsys)
    same = str(tmp_path / "r.json")
    assert "--out and --save are the same file" in user_error(
        ["run", "--method", "ns", "--out", same, "--save", same], capsys)
    assert no_work == [] and not (tmp_path / "r.json").exists()


def test_run_checks_the_baseline_cache_when_it_must_train_one(
        tmp_path: Path, no_work: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path / "a_file" / "cache"))
    assert not any(p.is_file() for p in pipeline.baseline_paths("resnet56"))
    msg = user_error(["run", "--method", "l1", "--model", "resnet56"], capsys)
    assert msg.startswith("the baseline cache") and "a_file" in msg and "not writable" in msg
    assert no_work == []


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "0"], "argument --epochs: must be a finite number > 0, got 0"),
    (["--epochs", "inf"], "argument --epochs: must be a finite number > 0, got inf"),
    (["--lr", "-0.1"], "argument --lr: must be a finite number > 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--momentum", "1"], r"argument --momentum: must be a number in \[0, 1\)"),
    (["--wd=-1e-4"], "argument --wd: must be a finite number >= 0"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1"),
    (["--subset", "0"], "argument --subset: must be an integer >= 1"),
    (["--eval-every", "-1"], "argument --eval-every: must be an integer >= 0"),
    (["--model", "resnet21"], "argument --model: invalid choice: 'resnet21'"),
    (["--out", "/proc/x/y.pt"], "--out '/proc/x/y.pt' is not writable"),
])
def test_train_user_errors_are_found_before_loading_data(argv: list[str], message: str,
                                                         no_work: list[str],
                                                         capsys: pytest.CaptureFixture) -> None:
    msg = user_error(["train", *argv], capsys)
    assert re.search(message, msg), msg
    assert no_work == []


def test_bench_validates_before_running(no_work: list[str], capsys: pytest.CaptureFixture
                                        ) -> None:
    assert "argument --reps: must be an integer >= 1" in user_error(["bench", "--reps", "0"],
                                                                   capsys)
    assert "--out '/proc/x/b.json' is not writable" in user_error(
        ["bench", "--out", "/proc/x/b.json"], capsys)
    assert no_work == []


def test_missing_or_corrupt_data_is_a_user_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["train", "--data", str(empty), "--out", str(tmp_path / "m.pt"), "--quiet"]
    msg = user_error(argv, capsys)
    assert msg.startswith("CIFAR-10 not found") and "PRUNELIB_DATA" in msg
    (empty / "cifar10_train.npz").write_bytes(b"PK\x03\x04 truncated")
    msg = user_error(argv, capsys)
    assert msg.startswith(f"{empty / 'cifar10_train.npz'}: not a readable npz file")
    assert not (tmp_path / "m.pt").exists()


def test_subprocess_error_has_no_traceback() -> None:
    env = {**os.environ, "PRUNELIB_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "prunelib", "run", "--method", "nosuch"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.startswith("prunelib: error: --method nosuch: unknown method 'nosuch'")
    assert "Traceback" not in p.stderr and "registered: " in p.stderr and p.stdout == ""


def tiny_data(**_) -> CIFAR10Data:
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.arange(64) % 10
    idx = np.arange(64)
    return CIFAR10Data(Batches(x, y, 32, augment=True), Batches(x, y, 64, shuffle=False),
                       Batches(x, y, 64), idx, idx, idx)


def test_divergence_is_reported_with_exit_code_1_and_keeps_old_outputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "cifar10", tiny_data)
    monkeypatch.setattr(pipeline, "load_baseline",
                        lambda name, *a, **k: (get_model(name), {"path": "x", "accuracy": 9.0}))

    def diverge(*a, **k):
        raise FloatingPointError("loss diverged at step 3 (epoch 0.10): ...; lower the lr")

    monkeypatch.setattr(pipeline, "run", diverge)
    out = tmp_path / "r.json"
    out.write_text('{"old": true}')
    with pytest.raises(SystemExit) as e:
        main(["run", "--method", "ns", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err == ("prunelib: error: loss diverged at step 3 (epoch "
                                         "0.10): ...; lower the lr\n")
    assert json.loads(out.read_text()) == {"old": True}


def test_run_end_to_end_writes_complete_json_and_model(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    save_checkpoint(get_model("resnet20"), tmp_path / "cache" / "baselines" /
                    "resnet20_cifar10.pt", accuracy=10.0)
    monkeypatch.setattr(data, "cifar10", tiny_data)
    out, save = tmp_path / "o" / "r.json", tmp_path / "o" / "p.pt"
    out.parent.mkdir()
    out.write_text("old")
    threads = torch.get_num_threads()
    try:
        assert main(["run", "--method", "l1", "--target-macs", "0.6", "--reg-epochs", "0",
                     "--ft-epochs", "0.5", "--quiet", "--device", "cpu", "--out", str(out),
                     "--save", str(save)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert res["method"] == "l1" and res["target"]["macs"] == 0.6
    assert res["pruned"]["macs"] <= 0.6 * res["dense"]["macs"]
    assert res["baseline"] == {"path": str(tmp_path / "cache" / "baselines" /
                                           "resnet20_cifar10.pt"), "accuracy": 10.0}
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.pt", "r.json"]
    import prunelib as pl
    small, meta = pl.load_pruned(get_model("resnet20"), save)
    assert pl.count(small, torch.randn(1, 3, 32, 32))[0] == res["pruned"]["macs"]
    assert meta["method"] == "l1"


def test_run_multiple_rounds_the_budget_s_kept_channels() -> None:
    import argparse
    from prunelib.cli import _budget
    from prunelib.select import Budget
    args = argparse.Namespace(target_macs=0.4, percent=None, threshold=None, multiple=8)
    assert _budget(args) == Budget(macs=0.4, multiple=8)
    assert _budget(argparse.Namespace(target_macs=None, percent=None, threshold=None,
                                      multiple=None)) == Budget(macs=0.5)
