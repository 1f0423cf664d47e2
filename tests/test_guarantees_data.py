"""What prunelib.data guarantees about bad input: every unusable CIFAR-10 file is a DataError
naming the file, the problem and a way out; the pickled batches are read without running code
from them; the npz cache is written atomically (or skipped with a warning)."""
from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from prunelib import data as D
from prunelib.data import DataError, load_cifar10


def write_npz(path: Path, n: int = 6, **override: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    arrays = {"images": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
              "labels": np.arange(n) % 10}
    arrays.update(override)
    np.savez(path, **arrays)


# -- npz files ------------------------------------------------------------------------------------

def test_valid_npz_loads_with_int64_labels(env: tuple[Path, Path]) -> None:
    root, _ = env
    write_npz(root / "cifar10_test.npz", labels=np.array([0, 9, 3, 3, 1, 2], dtype=np.uint8))
    x, y = load_cifar10(train=False)
    assert x.shape == (6, 32, 32, 3) and y.dtype == np.int64 and y.tolist() == [0, 9, 3, 3, 1, 2]


@pytest.mark.parametrize("override,problem", [
    ({"images": np.zeros((4, 32, 32, 3), np.float32)}, "expected uint8 images"),
    ({"images": np.zeros((4, 3, 32, 32), np.uint8)}, r"shape \(N, 32, 32, 3\)"),
    ({"images": np.zeros((0, 32, 32, 3), np.uint8), "labels": np.zeros(0, np.int64)},
     "holds no images"),
    ({"labels": np.arange(5)}, r"6 images but labels of shape \(5,\)"),
    ({"labels": np.array([0, 1, 2, 3, 4, 10])}, r"labels must be in \[0, 10\).* 0 to 10"),
    ({"labels": np.array([0, 1, -1, 3, 4, 5])}, r"labels must be in \[0, 10\).* -1 to 5"),
    ({"labels": np.linspace(0, 5, 6)}, "labels must be integers, got dtype float64"),
])
def test_bad_npz_content_is_an_error_naming_the_file(env: tuple[Path, Path], override: dict,
                                                      problem: str) -> None:
    root, _ = env
    path = root / "cifar10_test.npz"
    write_npz(path, **override)
    with pytest.raises(DataError, match=problem) as e:
        load_cifar10(train=False)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "delete or replace it" in msg and "PRUNELIB_DATA" in msg


def test_missing_key_names_the_key_and_what_is_there(env: tuple[Path, Path]) -> None:
    root, _ = env
    path = root / "cifar10_train.npz"
    np.savez(path, images=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"no labels array \(it holds \['images', 'y'\]\)") as e:
        load_cifar10(train=True)
    assert str(e.value).startswith(str(path))


@pytest.mark.parametrize("keep", [0, 30, 0.5, 0.9])
def test_truncated_npz_is_an_error_naming_the_file(env: tuple[Path, Path], keep: float) -> None:
    root, _ = env
    path = root / "cifar10_test.npz"
    write_npz(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:int(keep * len(raw)) if isinstance(keep, float) else keep])
    with pytest.raises(DataError) as e:
        load_cifar10(train=False)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "PRUNELIB_DATA" in msg
    assert not isinstance(e.value.__cause__, DataError)


def test_a_plain_npy_under_the_npz_name_is_refused(env: tuple[Path, Path]) -> None:
    root, _ = env
    path = root / "cifar10_test.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="not an npz archive"):
        load_cifar10(train=False)


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


# -- pickled cifar-10-batches-py ------------------------------------------------------------------

def rows_labels(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in
                                                              rng.integers(0, 10, n)]


def py2_batch(rows: np.ndarray, labels: list[int]) -> bytes:
    """{'data': rows, 'labels': labels} as Python 2's cPickle (protocol 2) wrote the official
    batches: py2 str keys and data (SHORT_BINSTRING / BINSTRING), numpy.core.multiarray."""
    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    n, d = rows.shape
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R(" + i(3) + s(b"|") + b"NNN"
             + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + i(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85"
             + s(b"b") + b"\x87R(" + i(1) + i(n) + i(d) + b"\x86" + dtype + b"\x89"
             + s(rows.tobytes()) + b"tb")
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"testing batch 1 of 1") + s(b"data") + array
            + s(b"labels") + b"](" + b"".join(i(v) for v in labels) + b"eu.")


def write_folder(root: Path, writer) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    raw = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        raw[name] = rows_labels(3 + k, seed=k)
        (folder / name).write_bytes(writer(*raw[name]))
    return raw


def expect(raw: dict, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([raw[n][0] for n in names])
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.concatenate(
        [raw[n][1] for n in names])


@pytest.mark.parametrize("writer", [
    py2_batch,
    lambda r, lab: pickle.dumps({b"batch_label": b"b", b"data": r, b"labels": lab,
                                 b"filenames": [b"a.png"] * len(lab)}, protocol=4),
    lambda r, lab: pickle.dumps({b"data": r, b"labels": lab}, protocol=5),
    lambda r, lab: pickle.dumps({"data": r, "labels": lab}, protocol=2),
], ids=["python2-official", "bytes-keys-p4", "bytes-keys-p5", "str-keys-p2"])
def test_genuine_batch_formats_load(env: tuple[Path, Path], writer) -> None:
    root, _ = env
    raw = write_folder(root, writer)
    x, y = load_cifar10(train=True)
    ex, ey = expect(raw, [f"data_batch_{i}" for i in range(1, 6)])
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
    assert x.flags.c_contiguous and y.dtype == np.int64
    xt, yt = load_cifar10(train=False)
    np.testing.assert_array_equal(xt, expect(raw, ["test_batch"])[0])
    np.testing.assert_array_equal(np.load(root / "cifar10_test.npz")["labels"], yt)


class RunsCode:
    """Unpickling an instance calls `func(*args)`: the classic pickle payload."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> list[object]:
    return [{"data": RunsCode(os.system, f"touch {marker}"), "labels": [0]},
            {b"data": np.zeros((1, 3072), np.uint8),
             b"labels": RunsCode(eval, f"open({str(marker)!r}, 'w').close() or [0]")},
            RunsCode(Path.touch, marker)]


@pytest.mark.parametrize("which,refused", [(0, r"posix\.system|nt\.system"),
                                           (1, r"builtins\.eval"), (2, r"pathlib\.Path")])
def test_crafted_batch_is_refused_without_running_it(env: tuple[Path, Path], tmp_path: Path,
                                                    which: int, refused: str) -> None:
    root, _ = env
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(payloads(live)[which]))     # the payload is real: plain pickle
    assert live.exists()                                   # runs it
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps(payloads(marker)[which]))
    with pytest.raises(DataError, match=f"refused to unpickle ({refused})") as e:
        load_cifar10(train=False)
    assert not marker.exists()
    msg = str(e.value)
    assert msg.startswith(str(folder / "test_batch")) and "not a genuine batch" in msg
    assert "--download" in msg and not (root / "cifar10_test.npz").exists()


def test_unpickler_admits_only_numpy_array_rebuilding() -> None:
    allowed = set(D._numpy_globals())
    assert {m for m, _ in allowed} == {"numpy", "numpy.core.multiarray", "numpy._core.multiarray",
                                       "numpy.core.numeric", "numpy._core.numeric", "_codecs"}
    assert {n for _, n in allowed} == {"ndarray", "dtype", "_reconstruct", "_frombuffer",
                                       "encode"}


def test_codecs_encode_is_admitted_only_for_latin1(env: tuple[Path, Path]) -> None:
    root, _ = env
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    good = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}, protocol=2)
    assert good.count(b"latin1") == 1                      # the array's bytes go through it
    (folder / "test_batch").write_bytes(good.replace(b"latin1", b"utf_16"))
    with pytest.raises(DataError, match=r"encode\(str, 'latin1'\), got encode\(str, 'utf_16'\)"):
        load_cifar10(train=False)


@pytest.mark.parametrize("content,problem", [
    (lambda: b"", "EOFError"),
    (lambda: pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]})[:-40],
     "not a readable CIFAR-10 batch"),
    (lambda: pickle.dumps([1, 2]), "expected a dict, got list"),
    (lambda: pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}), "no 'data' or 'labels'"),
    (lambda: pickle.dumps({"data": np.zeros((2, 3072), np.int16), "labels": [0, 1]}),
     r"'data' must be a uint8 array of shape \(n, 3072\), got ndarray int16"),
    (lambda: pickle.dumps({"data": [[0] * 3072], "labels": [0]}), "got list"),
    (lambda: pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}),
     r"labels must be in \[0, 10\)"),
    (lambda: pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}),
     r"2 images but labels of shape \(1,\)"),
])
def test_bad_batch_file_is_an_error_naming_it(env: tuple[Path, Path], content, problem: str
                                              ) -> None:
    root, _ = env
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(content())
    with pytest.raises(DataError, match=problem) as e:
        load_cifar10(train=False)
    msg = str(e.value)
    assert msg.startswith(str(folder / "test_batch")) and f"delete the {folder.name} folder" in msg


def test_missing_training_batch_is_named(env: tuple[Path, Path]) -> None:
    root, _ = env
    write_folder(root, lambda r, lab: pickle.dumps({"data": r, "labels": lab}))
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing.*incomplete"):
        load_cifar10(train=True)


# -- the npz cache write --------------------------------------------------------------------------

def test_interrupted_cache_write_leaves_no_file(env: tuple[Path, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = env
    write_folder(root, lambda r, lab: pickle.dumps({"data": r, "labels": lab}))

    def half_then_fail(f, **arrays) -> None:
        f.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(D.np, "savez", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        load_cifar10(train=False)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
    monkeypatch.undo()
    monkeypatch.setenv("PRUNELIB_DATA", str(root))
    x, _ = load_cifar10(train=False)                       # next run: reads and caches cleanly
    np.testing.assert_array_equal(np.load(root / "cifar10_test.npz")["images"], x)


def test_unwritable_cache_warns_and_still_returns_the_data(
        env: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = env
    raw = write_folder(root, lambda r, lab: pickle.dumps({"data": r, "labels": lab}))
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("PRUNELIB_CACHE", str(tmp_path / "a_file" / "cache"))
    real_writable = D._writable
    monkeypatch.setattr(D, "_writable", lambda p: p != root and real_writable(p))
    with pytest.warns(UserWarning, match="could not write the CIFAR-10 cache .*a_file"):
        x, y = load_cifar10(train=False)
    np.testing.assert_array_equal(x, expect(raw, ["test_batch"])[0])
    assert not (root / "cifar10_test.npz").exists()
