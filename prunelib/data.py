"""CIFAR-10 loading with an npz cache, and batched tensor-side augmentation.

Where the data comes from (`load_cifar10`):

1. ``cifar10_train.npz`` / ``cifar10_test.npz`` (uint8 ``images`` (N, 32, 32, 3) HWC RGB and
   int64 ``labels`` (N,)) in the data root, its ``cifar10/`` subfolder, or the cache dir;
2. otherwise the standard pickled ``cifar-10-batches-py`` folder (``data_batch_1..5``,
   ``test_batch``) in the data root or the cache dir, which is converted once to the npz cache;
3. otherwise, only when ``download=True``: torchvision's download utility fetches, md5-checks
   and unpacks CIFAR10's archive (into the data root if writable, else the cache dir), then 2.

Data root: argument, else ``$PRUNELIB_DATA``, else ``~/.cache/prunelib``. The data root may be
read-only; the npz cache is written there only when it is writable, else to `cache_dir()`
(``$PRUNELIB_CACHE``, else ``~/.cache/prunelib``), atomically (`prunelib.fileio`); when neither
can be written, a warning says so and the data is returned uncached.

Every split is checked when read: uint8 images (N, 32, 32, 3) with N >= 1, N integer labels in
[0, 10). A file that breaks this, or is truncated, unreadable or misses a key, raises `DataError`
naming the file, the problem and what to do. The pickled batches are read by a restricted
unpickler that admits only numpy's array rebuilding and latin1 bytes decoding (a genuine batch
holds dicts, lists, strings, integers and one uint8 array), so a crafted file cannot run code:
any other global is refused with a `DataError` naming the file.

`Batches` keeps the uint8 images as one tensor on the training device and builds every batch
with a few tensor ops (gather-based random crop with zero padding, horizontal flip,
normalization): no per-image PIL transforms and no Python loop over images.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .fileio import atomic_open

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CLASSES", "DataError", "data_root", "cache_dir",
           "load_cifar10", "Batches", "CIFAR10Data", "cifar10", "balanced_indices"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
_FOLDER = "cifar-10-batches-py"
_DEFAULT = Path("~/.cache/prunelib")


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder searched for CIFAR-10: `root`, else ``$PRUNELIB_DATA``, else the cache dir."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("PRUNELIB_DATA")
    return Path(env).expanduser() if env else _DEFAULT.expanduser()


def cache_dir() -> Path:
    """Writable folder for caches and checkpoints: ``$PRUNELIB_CACHE``, else ``~/.cache/prunelib``.

    Not created here; writers create it when they need it.
    """
    env = os.environ.get("PRUNELIB_CACHE")
    return Path(env).expanduser() if env else _DEFAULT.expanduser()


def _writable(folder: Path) -> bool:
    """True if `folder` exists (or can be created) and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


class DataError(ValueError):
    """A CIFAR-10 file exists but cannot be used: unreadable, truncated or wrong content."""


_NPZ_FIX = ("delete or replace it (a deleted cache is rebuilt from cifar-10-batches-py, or "
            "fetched with download=True / --download), or set PRUNELIB_DATA to a folder with valid "
            "cifar10_train.npz and cifar10_test.npz")


def _check_split(images: np.ndarray, labels: np.ndarray, source: Path,
                 fix: str) -> tuple[np.ndarray, np.ndarray]:
    """Raise DataError naming `source` unless images are uint8 (N >= 1, 32, 32, 3) and labels
    are N integers in [0, 10); return (images, labels as int64)."""
    problem = None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        problem = (f"expected uint8 images of shape (N, 32, 32, 3), got {images.dtype} "
                   f"{images.shape}")
    elif len(images) == 0:
        problem = "holds no images"
    elif labels.shape != (len(images),):
        problem = f"{len(images)} images but labels of shape {labels.shape}"
    elif not np.issubdtype(labels.dtype, np.integer):
        problem = f"labels must be integers, got dtype {labels.dtype}"
    elif labels.min() < 0 or labels.max() >= len(CLASSES):
        problem = (f"labels must be in [0, {len(CLASSES)}), got values from {labels.min()} to "
                   f"{labels.max()}")
    if problem is not None:
        raise DataError(f"{source}: {problem}; {fix}")
    return images, labels.astype(np.int64, copy=False)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An npz split, checked by `_check_split`; DataError naming `path` if it cannot be read."""
    try:
        d = np.load(path, allow_pickle=False)
        if not isinstance(d, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single {type(d).__name__}, not an npz archive of images "
                            f"and labels; {_NPZ_FIX}")
        with d:
            missing = {"images", "labels"} - set(d.files)
            if missing:
                raise DataError(f"{path}: no {' or '.join(sorted(missing))} array (it holds "
                                f"{sorted(d.files)}); {_NPZ_FIX}")
            images, labels = d["images"], d["labels"]
    except DataError:
        raise
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable npz file (truncated or corrupt: {e}); "
                        f"{_NPZ_FIX}") from e
    return _check_split(images, labels, path, _NPZ_FIX)


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles of bytes at protocol <= 2 call it: latin1 only."""
    if not isinstance(text, str) or encoding != "latin1":
        raise ValueError(f"_codecs.encode is admitted only as encode(str, 'latin1'), got "
                         f"encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickled CIFAR-10 batch needs: numpy's array and dtype rebuilding,
    under the module names of numpy 1.x (``numpy.core``, as in the official files) and 2.x,
    and the latin1 bytes encoding of protocol-2 pickles written by Python 3."""
    try:
        from numpy._core import multiarray, numeric         # numpy >= 2
    except ImportError:                                     # numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray,
                                           ("numpy", "dtype"): np.dtype,
                                           ("_codecs", "encode"): _latin1_encode}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer   # pickle protocol 5
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_numpy_globals` and refuses every other global."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path, self.allowed = path, _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise DataError(
            f"{self.path}: refused to unpickle {module}.{name}: a CIFAR-10 batch holds only "
            f"dicts, lists, strings, integers and numpy arrays, so this is not a genuine batch "
            f"file. Delete the {self.path.parent.name} folder and fetch CIFAR-10 again "
            f"(download=True / --download), or set PRUNELIB_DATA to a folder with the npz files")


def _read_batch_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch as (rows uint8 (n, 3072), labels int (n,)), through `_BatchUnpickler`."""
    fix = (f"delete the {path.parent.name} folder {path.parent} and fetch it again "
           f"(download=True / --download), or set PRUNELIB_DATA to a folder with the npz files")
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, path).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the {path.parent.name} folder is "
                                f"incomplete; {fix}") from None
    except DataError:
        raise
    except Exception as e:          # truncated or garbled pickles fail in many different ways
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
                        f"{fix}") from e
    if not isinstance(entry, dict):
        raise DataError(f"{path}: expected a dict, got {type(entry).__name__}; {fix}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise DataError(f"{path}: no 'data' or 'labels' entry (keys {sorted(map(str, entry))}); "
                        f"{fix}")
    rows, labels = entry["data"], np.asarray(entry["labels"])
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2 \
            or rows.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (n, 3072), got "
                        f"{type(rows).__name__} {getattr(rows, 'dtype', '')} "
                        f"{getattr(rows, 'shape', '')}; {fix}")
    images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    _check_split(images, labels, path, fix)
    return rows, labels


def _read_batches_py(folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read the pickled python-version batches (the format torchvision reads) as HWC uint8."""
    files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    parts = [_read_batch_file(folder / name) for name in files]
    rows = np.concatenate([r for r, _ in parts])
    images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.concatenate([lab for _, lab in parts]).astype(np.int64)


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write atomically (`prunelib.fileio.atomic_open`), uncompressed for fast loading."""
    with atomic_open(path, "wb") as f:
        np.savez(f, images=images, labels=labels)


def load_cifar10(root: str | os.PathLike | None = None, train: bool = True,
                 download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 split as (images uint8 (N, 32, 32, 3) HWC RGB, labels int64 (N,)).

    Search order and cache policy: see the module docstring. Raises FileNotFoundError naming
    the folders searched and the two ways out (``PRUNELIB_DATA`` or ``download=True``), and
    `DataError` for a file that is there but unusable (see the module docstring).
    """
    base = data_root(root)
    cache = cache_dir()
    fname = f"cifar10_{'train' if train else 'test'}.npz"
    for folder in (base, base / "cifar10", cache):
        if (folder / fname).is_file():
            return _read_npz(folder / fname)

    source = next((f / _FOLDER for f in (base, cache) if (f / _FOLDER / "test_batch").is_file()),
                  None)
    if source is None and download:
        target = base if _writable(base) else cache
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive
        # fetch, md5-check and unpack only: the batches are then read by our restricted reader
        download_and_extract_archive(CIFAR10.url, str(target), filename=CIFAR10.filename,
                                     md5=CIFAR10.tgz_md5)
        source = target / _FOLDER
    if source is None:
        raise FileNotFoundError(
            f"CIFAR-10 not found: no {fname} in {base}, {base / 'cifar10'} or {cache}, and no "
            f"{_FOLDER} folder in {base} or {cache}. Set PRUNELIB_DATA to a folder that holds "
            f"cifar10_train.npz and cifar10_test.npz, or pass download=True (CLI: --download) "
            f"to fetch it with torchvision.")
    images, labels = _read_batches_py(source, train)
    out = (base if _writable(base) else cache) / fname
    try:
        _write_npz(out, images, labels)
    except OSError as e:
        warnings.warn(f"could not write the CIFAR-10 cache {out} ({e}); {source} will be read "
                      f"again next time (set PRUNELIB_CACHE to a writable folder)", stacklevel=2)
    return images, labels


def balanced_indices(labels: np.ndarray, n: int, seed: int = 0,
                     exclude: np.ndarray | None = None) -> np.ndarray:
    """`n` seeded indices into `labels`, as equal per class as possible (sorted).

    Each class gets ``n // C`` images and the first ``n % C`` classes (in a seeded order) one
    more; indices in `exclude` are never chosen. Raises ValueError if a class runs short.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    allowed = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        allowed[exclude] = False
    classes = np.unique(labels)
    if n > allowed.sum():
        raise ValueError(f"asked for {n} images but only {int(allowed.sum())} are available")
    per = np.full(len(classes), n // len(classes))
    per[rng.permutation(len(classes))[: n % len(classes)]] += 1
    chosen = []
    for c, k in zip(classes, per):
        pool = np.flatnonzero((labels == c) & allowed)
        if k > len(pool):
            raise ValueError(f"class {c} has {len(pool)} images, {k} requested")
        chosen.append(rng.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


class Batches:
    """Mini-batches of a uint8 image set, normalized (and augmented) on `device` with tensor ops.

    Args:
        images: uint8 (N, 32, 32, 3) HWC array or tensor (any H = W works).
        labels: int (N,) array or tensor.
        batch_size: images per batch; the last batch is smaller unless `drop_last`.
        shuffle: a new seeded permutation each epoch (each `__iter__` call).
        augment: random crop (size H, zero padding `pad`) + random horizontal flip, per image.
        device: where the data lives and the batches are built.
        seed: seeds the permutation and augmentation stream; two objects with the same seed
            yield identical epochs.
        channels_last: yield x in channels_last memory format (else contiguous NCHW).
        mean, std: per-channel normalization on the 0..1 scale; zero padding happens in pixel
            space, before normalization (as torchvision's RandomCrop + Normalize).

    Yields (x float32 (B, 3, H, W), y int64 (B,)) on `device`.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 batch_size: int = 128, shuffle: bool = True, augment: bool = False,
                 device: str | torch.device = "cpu", seed: int = 0, channels_last: bool = True,
                 drop_last: bool = False, pad: int = 4,
                 mean: tuple[float, ...] = CIFAR10_MEAN,
                 std: tuple[float, ...] = CIFAR10_STD) -> None:
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[3] != len(mean):
            raise ValueError(f"images must be uint8 (N, H, W, {len(mean)}), "
                             f"got {x.dtype} {tuple(x.shape)}")
        y = torch.as_tensor(labels).long()
        if y.shape != (len(x),):
            raise ValueError(f"labels must have shape ({len(x)},), got {tuple(y.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = x.to(self.device)
        self.labels = y.to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.channels_last, self.drop_last, self.pad = channels_last, drop_last, pad
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        std_t = torch.tensor(std, device=self.device)
        self._scale = 1.0 / (255.0 * std_t)                         # x01 / std
        self._shift = -torch.tensor(mean, device=self.device) / std_t
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        """Images per epoch (all of them unless `drop_last` cuts the last partial batch)."""
        return len(self) * self.batch_size if self.drop_last else len(self.images)

    def _crop_flip(self, xb: torch.Tensor) -> torch.Tensor:
        """Random crop with zero padding + horizontal flip of a uint8 NHWC batch (gather)."""
        b, h, w, c = xb.shape
        p = self.pad
        padded = xb.new_zeros(b, h + 2 * p, w + 2 * p, c)
        padded[:, p:p + h, p:p + w] = xb
        dy = torch.randint(0, 2 * p + 1, (b, 1), generator=self.gen)
        dx = torch.randint(0, 2 * p + 1, (b, 1), generator=self.gen)
        flip = torch.rand(b, 1, generator=self.gen) < 0.5
        ar_h, ar_w = torch.arange(h), torch.arange(w)
        rows = dy + ar_h
        cols = dx + torch.where(flip, w - 1 - ar_w, ar_w)           # flip = reversed columns
        bi = torch.arange(b).view(b, 1, 1)
        idx = (bi.to(self.device), rows.to(self.device)[:, :, None],
               cols.to(self.device)[:, None, :])
        return padded[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        order = (torch.randperm(n, generator=self.gen) if self.shuffle else torch.arange(n))
        order = order.to(self.device)
        self.epoch += 1
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            xb = self.images[idx]
            if self.augment:
                xb = self._crop_flip(xb)
            x = xb.permute(0, 3, 1, 2)              # NHWC storage = channels_last NCHW view
            x = torch.addcmul(self._shift.view(1, -1, 1, 1), x.float(),
                              self._scale.view(1, -1, 1, 1))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            else:
                x = x.contiguous()
            yield x, self.labels[idx]


@dataclass
class CIFAR10Data:
    """Train / test / calibration batches of CIFAR-10 plus the indices that made them.

    train: augmented, shuffled `Batches` over the training subset.
    test: plain `Batches` over the test set (or its subset), in order.
    calib: plain, shuffled `Batches` over `holdout` training images not in `train`, or None.
    train_idx / calib_idx / test_idx: indices into the full splits.
    """
    train: Batches
    test: Batches
    calib: Batches | None
    train_idx: np.ndarray
    test_idx: np.ndarray
    calib_idx: np.ndarray | None
    classes: tuple[str, ...] = CLASSES


def cifar10(root: str | os.PathLike | None = None, batch_size: int = 128,
            subset: int | None = None, test_subset: int | None = None, holdout: int = 0,
            device: str | torch.device = "cpu", seed: int = 0, download: bool = False,
            channels_last: bool = True, balanced: bool = True,
            test_batch_size: int | None = None) -> CIFAR10Data:
    """CIFAR-10 as ready-to-train `Batches` (see `CIFAR10Data`).

    Args:
        root, download: passed to `load_cifar10`.
        batch_size: training batch size (test/calib use `test_batch_size`, default 2x).
        subset: number of training images (None = all not held out); seeded, class-balanced
            when `balanced`, else a seeded random draw.
        test_subset: number of test images (None = all 10,000), chosen the same way.
        holdout: number of training images set aside (class-balanced, seeded) for `.calib`;
            they are excluded from `.train`.
        device: where the uint8 data lives and batches are built.
        seed: seeds subsets, shuffling and augmentation.
        channels_last: memory format of the yielded images.
    """
    xtr, ytr = load_cifar10(root, train=True, download=download)
    xte, yte = load_cifar10(root, train=False, download=download)

    def pick(labels: np.ndarray, n: int | None, s: int,
             exclude: np.ndarray | None = None) -> np.ndarray:
        pool = np.setdiff1d(np.arange(len(labels)), exclude if exclude is not None else [])
        if n is None or n >= len(pool):
            if n is not None and n > len(pool):
                raise ValueError(f"subset of {n} requested but only {len(pool)} images remain")
            return pool
        if n < 1:
            raise ValueError(f"subset sizes must be >= 1, got {n}")
        if balanced:
            return balanced_indices(labels, n, seed=s, exclude=exclude)
        return np.sort(np.random.default_rng(s).choice(pool, size=n, replace=False))

    calib_idx = balanced_indices(ytr, holdout, seed=seed + 1) if holdout > 0 else None
    train_idx = pick(ytr, subset, seed, exclude=calib_idx)
    test_idx = pick(yte, test_subset, seed + 2)
    tbs = test_batch_size or 2 * batch_size
    train = Batches(xtr[train_idx], ytr[train_idx], batch_size, shuffle=True, augment=True,
                    device=device, seed=seed, channels_last=channels_last)
    test = Batches(xte[test_idx], yte[test_idx], tbs, shuffle=False, augment=False,
                   device=device, seed=seed, channels_last=channels_last)
    calib = None
    if calib_idx is not None:
        calib = Batches(xtr[calib_idx], ytr[calib_idx], tbs, shuffle=True, augment=False,
                        device=device, seed=seed + 3, channels_last=channels_last)
    return CIFAR10Data(train, test, calib, train_idx, test_idx, calib_idx)
