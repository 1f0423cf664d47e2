import os
from pathlib import Path

import pytest
import torch

from prunelib import data, pipeline

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def data_root():
    root = Path(os.environ.get("PRUNELIB_DATA", SHARED_DATA))
    if not (root / "cifar10_test.npz").exists():
        pytest.skip("real CIFAR-10 npz not found (set PRUNELIB_DATA)")
    return root


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An empty data root and cache folder, set as $PRUNELIB_DATA / $PRUNELIB_CACHE."""
    root, cache = tmp_path / "root", tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("PRUNELIB_DATA", str(root))
    monkeypatch.setenv("PRUNELIB_CACHE", str(cache))
    return root, cache


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Record (and refuse) any data loading, baseline loading, pruning run or benchmark."""
    calls: list[str] = []

    def refuse(name: str):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} was called before validation finished")
        return f

    monkeypatch.setattr(data, "cifar10", refuse("cifar10"))
    monkeypatch.setattr(pipeline, "load_baseline", refuse("load_baseline"))
    monkeypatch.setattr(pipeline, "run", refuse("run"))
    monkeypatch.setattr("prunelib.bench.run_bench", refuse("run_bench"))
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path / "cache"))
    return calls
