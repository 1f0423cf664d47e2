"""Atomic file writes: every file prunelib writes goes through here.

A writer writes to a temporary file in the destination's folder, flushes it to disk and renames
it over the destination (`os.replace`, atomic on POSIX and Windows). An interrupted write leaves
the old file (or none) and at most a stray `.<name>.<random>.tmp`, never a half-written file
under the real name.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = ["atomic_open", "atomic_write_text", "atomic_torch_save", "check_writable"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to `path` for writing; on success rename it to `path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike,
                      save: Callable[[Any, IO[bytes]], None] | None = None) -> None:
    """`torch.save(obj, path)` atomically (or `save(obj, file)` when given)."""
    import torch
    with atomic_open(path, "wb") as f:
        (save or torch.save)(obj, f)


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Raise ValueError naming `what` unless a file can be created at `path` (checked by creating
    and removing a temporary file in its folder, creating missing folders)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} is not writable ({e.strerror or e}); choose "
                         "another path") from None
    return path
