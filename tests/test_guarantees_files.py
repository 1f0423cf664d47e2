"""What prunelib guarantees about the files it writes and reads back: an interrupted write never
leaves a half-written file under the real name (nor a stray temporary file), and an unusable
cached baseline is reported and skipped, never trusted and never fatal when another exists."""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelib import pipeline
from prunelib.data import Batches
from prunelib.fileio import atomic_open, atomic_torch_save, atomic_write_text
from prunelib.models import get_model
from prunelib.train import load_checkpoint, save_checkpoint


class Interrupted(Exception):
    pass


def half_then_raise(obj: object, f) -> None:
    """A writer that gets some bytes out and then fails, like a full disk or a Ctrl-C."""
    f.write(b"\x80\x02half of a file")
    f.flush()
    raise Interrupted("stopped midway")


@pytest.mark.parametrize("existed", [False, True])
def test_interrupted_write_leaves_old_content_or_nothing(tmp_path: Path, existed: bool) -> None:
    dest = tmp_path / "out" / "model.pt"
    if existed:
        atomic_torch_save({"v": torch.arange(3)}, dest)
    before = dest.read_bytes() if existed else None
    with pytest.raises(Interrupted):
        atomic_torch_save({"v": torch.arange(5)}, dest, save=half_then_raise)
    assert (dest.read_bytes() if dest.exists() else None) == before
    assert os.listdir(dest.parent) == (["model.pt"] if existed else [])
    if existed:
        assert torch.equal(torch.load(dest, weights_only=True)["v"], torch.arange(3))


def test_keyboard_interrupt_inside_atomic_open_leaves_no_file(tmp_path: Path) -> None:
    dest = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(dest, "w") as f:
            f.write('{"half": ')
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_failure_at_fsync_keeps_the_old_text(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "r.json"
    atomic_write_text(dest, '{"old": 1}')

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(dest, '{"new": 2, "long": "' + "x" * 10_000 + '"}')
    monkeypatch.undo()
    assert dest.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ["r.json"]


def test_a_completed_write_replaces_the_file_whole(tmp_path: Path) -> None:
    dest = tmp_path / "r.json"
    atomic_write_text(dest, "old")
    atomic_write_text(dest, "é new")
    assert dest.read_text(encoding="utf-8") == "é new" and os.listdir(tmp_path) == ["r.json"]


# -- cached baselines -----------------------------------------------------------------------------

class Tiny:
    def __init__(self, n: int = 64) -> None:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10
        self.train = Batches(x, y, 32, augment=True)
        self.test = Batches(x, y, 64, shuffle=False)


def quick_scale() -> pipeline.Scale:
    return dataclasses.replace(pipeline.get_scale("quick"), baseline_epochs=1)


def truncated_baseline(path: Path) -> bytes:
    torch.manual_seed(0)
    save_checkpoint(get_model("resnet20"), path, accuracy=1.0)
    raw = path.read_bytes()[:5000]
    path.write_bytes(raw)
    return raw


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path))
    return tmp_path / "baselines"


def test_truncated_cached_baseline_is_skipped_for_the_committed_one(cache: Path) -> None:
    cached, committed = pipeline.baseline_paths("resnet20")
    assert cached.parent == cache and committed.is_file()
    truncated_baseline(cached)
    with pytest.warns(UserWarning) as rec:
        model, info = pipeline.load_baseline("resnet20", train_if_missing=False)
    msg = " ".join(str(w.message) for w in rec)
    assert str(cached) in msg and str(committed) in msg and "not a readable checkpoint" in msg
    assert info["path"] == str(committed)
    ref = get_model("resnet20")
    assert load_checkpoint(ref, committed)["accuracy"] == info["accuracy"]
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_cached_baseline_of_another_architecture_is_skipped(cache: Path) -> None:
    cached, committed = pipeline.baseline_paths("resnet20")
    save_checkpoint(get_model("resnet32"), cached, accuracy=50.0)
    with pytest.warns(UserWarning, match="does not match the CifarResNet it is loaded into") as rec:
        _, info = pipeline.load_baseline("resnet20", train_if_missing=False)
    msg = str(rec[0].message)
    assert str(committed) in msg and info["path"] == str(committed) and len(msg) < 800


def test_shortcut_b_model_has_baselines_of_its_own_never_the_option_a_one(cache: Path) -> None:
    cached, committed = pipeline.baseline_paths("resnet20b")
    assert cached.name == committed.name == "resnet20b_cifar10.pt" and not committed.exists()
    with pytest.raises(FileNotFoundError, match="prunelib train --model resnet20b"):
        pipeline.load_baseline("resnet20b", train_if_missing=False)
    save_checkpoint(get_model("resnet20", shortcut="B"), cached, accuracy=42.0)
    model, info = pipeline.load_baseline("resnet20b", train_if_missing=False)
    assert info["accuracy"] == 42.0 and model.layer2[0].downsample is not None


def test_good_cached_baseline_is_used_without_a_warning(cache: Path) -> None:
    cached, _ = pipeline.baseline_paths("resnet20")
    save_checkpoint(get_model("resnet20"), cached, accuracy=42.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = pipeline.load_baseline("resnet20", train_if_missing=False)
    assert info["path"] == str(cached) and info["accuracy"] == 42.0


def test_unusable_only_baseline_is_named_when_training_is_off(cache: Path) -> None:
    cached, committed = pipeline.baseline_paths("resnet56")
    assert not committed.exists()
    truncated_baseline(cached)
    with pytest.raises(FileNotFoundError, match="no usable baseline for resnet56") as e:
        pipeline.load_baseline("resnet56", train_if_missing=False)
    assert f"{cached}: not a readable checkpoint" in str(e.value)


def test_unusable_only_baseline_is_retrained_and_replaced(cache: Path) -> None:
    cached, _ = pipeline.baseline_paths("resnet56")
    truncated_baseline(cached)
    with pytest.warns(UserWarning, match=f"{cached}: not a readable.*Training a new one, saved "
                                         f"to {cached}"):
        model, info = pipeline.load_baseline("resnet56", Tiny(), scale=quick_scale())
    assert info["path"] == str(cached) and info["epochs"] == 1 and os.listdir(cache) == [
        cached.name]
    fresh = get_model("resnet56")
    assert load_checkpoint(fresh, cached)["accuracy"] == info["accuracy"]
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_interrupted_save_of_a_trained_baseline_leaves_the_old_file(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached, _ = pipeline.baseline_paths("resnet56")
    old = truncated_baseline(cached)
    monkeypatch.setattr(torch, "save", half_then_raise)
    with pytest.warns(UserWarning, match="Training a new one"), pytest.raises(Interrupted):
        pipeline.load_baseline("resnet56", Tiny(), scale=quick_scale())
    assert cached.read_bytes() == old and os.listdir(cache) == [cached.name]
