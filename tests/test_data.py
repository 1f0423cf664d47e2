"""Tests for prunelib.data: data-root policy, the pickled-batches -> npz path, the error,
batched augmentation (against a per-image reference) and seeded subsets."""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from prunelib import data as D
from prunelib.data import Batches, balanced_indices, cifar10, load_cifar10

REAL = Path(os.environ.get("PRUNELIB_DATA", "/work/shared/data/cifar10"))
if not (REAL / "cifar10_train.npz").is_file():
    REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def write_batches_py(root: Path, per_batch: int = 4, n_test: int = 3, seed: int = 0) -> dict:
    """Tiny CIFAR-10 in the standard pickled python format; returns the raw CHW rows."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    raw: dict[str, tuple[np.ndarray, list[int]]] = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        raw[name] = (rows, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": rows, "labels": labels,
                         "filenames": [f"{name}_{i}.png" for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(D.CLASSES), "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f)
    return raw


def test_root_and_cache_policy(env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = env
    assert D.data_root() == root and D.data_root("/x/y") == Path("/x/y")
    assert D.cache_dir() == cache
    monkeypatch.delenv("PRUNELIB_DATA")
    monkeypatch.delenv("PRUNELIB_CACHE")
    assert D.data_root() == D.cache_dir() == Path("~/.cache/prunelib").expanduser()


def test_pickled_batches_to_npz_roundtrip(env: tuple[Path, Path]) -> None:
    root, cache = env
    raw = write_batches_py(root)
    x, y = load_cifar10(train=True)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    rows = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)])
    np.testing.assert_array_equal(x, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(y, sum((raw[f"data_batch_{i}"][1] for i in range(1, 6)), []))
    xt, yt = load_cifar10(train=False)
    np.testing.assert_array_equal(xt[1, 2, 3], raw["test_batch"][0][1].reshape(3, 32, 32)[:, 2, 3])
    assert (root / "cifar10_train.npz").is_file() and (root / "cifar10_test.npz").is_file()
    assert not cache.exists()
    # the npz alone is enough now, and reads back identically
    for f in (root / "cifar-10-batches-py").iterdir():
        f.unlink()
    x2, y2 = load_cifar10(train=True)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def test_read_only_root_writes_cache(env: tuple[Path, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = env
    write_batches_py(root)
    real_writable = D._writable
    monkeypatch.setattr(D, "_writable", lambda p: p != root and real_writable(p))
    x, _ = load_cifar10(train=False)
    assert not (root / "cifar10_test.npz").exists()
    assert (cache / "cifar10_test.npz").is_file()
    np.testing.assert_array_equal(np.load(cache / "cifar10_test.npz")["images"], x)


def test_missing_data_error_names_both_options(env: tuple[Path, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="PRUNELIB_DATA") as e:
        load_cifar10(train=True, download=False)
    assert "download=True" in str(e.value) and "--download" in str(e.value)


def reference_batch(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray,
                    pad: int = 4) -> torch.Tensor:
    """Per-image reference: zero-pad, crop at (dy, dx), flip, scale, normalize (NCHW)."""
    out = []
    h, w = images.shape[1:3]
    for img, a, b, f in zip(images, dy, dx, flip):
        p = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))[a:a + h, b:b + w]
        p = p[:, ::-1] if f else p
        out.append((p / 255.0 - np.array(D.CIFAR10_MEAN)) / np.array(D.CIFAR10_STD))
    return torch.tensor(np.stack(out), dtype=torch.float32).permute(0, 3, 1, 2)


def test_augmentation_matches_per_image_reference() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    b = Batches(images, np.arange(16), batch_size=16, shuffle=False, augment=True, seed=3)
    x, y = next(iter(b))
    assert x.shape == (16, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    # recover each image's crop offset and flip by search, then compare to the reference
    params = []
    for i in range(16):
        match = [(a, c, f) for f in (False, True) for a in range(9) for c in range(9)
                 if torch.allclose(x[i], reference_batch(images[i:i + 1], [a], [c], [f])[0],
                                   atol=1e-5)]
        assert match, f"image {i} is not a padded crop (+ flip) of its source"
        params.append(match[0])
    assert len(set(params)) > 4 and {f for _, _, f in params} == {False, True}
    x2, _ = next(iter(b))                                 # next epoch: new random crops
    assert not torch.equal(x, x2)


def test_plain_batches_normalize_exactly_and_cover_epoch() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    b = Batches(images, np.arange(10), batch_size=4, shuffle=True, augment=False,
                channels_last=False, seed=0)
    assert len(b) == 3
    xs, ys = zip(*b)
    assert [len(y) for y in ys] == [4, 4, 2] and xs[0].is_contiguous()
    order = torch.cat(ys)
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    ref = reference_batch(images[order.numpy()], np.full(10, 4), np.full(10, 4), np.zeros(10))
    torch.testing.assert_close(torch.cat(xs), ref, atol=1e-5, rtol=0)
    assert len(Batches(images, np.arange(10), 4, drop_last=True)) == 2


def test_batches_seeded_determinism_and_errors() -> None:
    images = np.random.default_rng(2).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    lab = np.arange(12)

    def epochs(seed: int) -> list[torch.Tensor]:
        b = Batches(images, lab, 5, shuffle=True, augment=True, seed=seed)
        return [torch.cat([x.flatten() for x, _ in b]) for _ in range(2)]

    e1, e2, e3 = epochs(0), epochs(0), epochs(1)
    assert all(torch.equal(a, c) for a, c in zip(e1, e2))
    assert not torch.equal(e1[0], e3[0]) and not torch.equal(e1[0], e1[1])
    with pytest.raises(ValueError, match="uint8"):
        Batches(images.astype(np.float32), lab, 4)
    with pytest.raises(ValueError, match="labels"):
        Batches(images, lab[:5], 4)


def test_balanced_indices() -> None:
    labels = np.repeat(np.arange(10), 20)
    idx = balanced_indices(labels, 53, seed=0)
    counts = np.bincount(labels[idx], minlength=10)
    assert len(np.unique(idx)) == 53 and counts.max() - counts.min() <= 1
    ex = balanced_indices(labels, 30, seed=1)
    assert not set(balanced_indices(labels, 100, seed=0, exclude=ex)) & set(ex)
    np.testing.assert_array_equal(idx, balanced_indices(labels, 53, seed=0))
    with pytest.raises(ValueError):
        balanced_indices(labels, 201)


@pytest.mark.skipif(not (REAL / "cifar10_train.npz").is_file(), reason="real CIFAR-10 absent")
def test_real_cifar10(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRUNELIB_DATA", str(REAL))
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path))
    xt, yt = load_cifar10(train=False)
    assert xt.shape == (10000, 32, 32, 3) and np.bincount(yt).tolist() == [1000] * 10
    assert hashlib.sha256(yt.tobytes()).hexdigest().startswith("cbb7365de8ed11f0")
    assert yt[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    d = cifar10(subset=200, test_subset=100, holdout=50, batch_size=64, seed=0)
    assert d.train.num_images == 200 and d.test.num_images == 100 and d.calib.num_images == 50
    assert not set(d.train_idx) & set(d.calib_idx)
    assert np.bincount(d.train.labels.numpy(), minlength=10).tolist() == [20] * 10
    x, y = next(iter(d.train))
    assert x.shape == (64, 3, 32, 32) and y.dtype == torch.int64
    assert list(tmp_path.iterdir()) == []                 # nothing written anywhere


def test_batches_on_device_match_cpu(device: torch.device) -> None:
    images = np.random.default_rng(3).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    ref = list(Batches(images, np.arange(20), 8, shuffle=True, augment=True, seed=5))
    got = list(Batches(images, np.arange(20), 8, shuffle=True, augment=True, seed=5,
                       device=device))
    for (x, y), (xd, yd) in zip(ref, got):
        assert xd.device.type == device.type and yd.device.type == device.type
        assert torch.equal(yd.cpu(), y)
        torch.testing.assert_close(xd.cpu(), x)
