"""What the chapter tests (the root conftest.py) and the site build (tools/build_site.py) share:
where the chapters are, where their executed notebooks go, how a notebook is tied to the source
it was executed from, and the kernel of the current Python environment."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
BUILD = BOOK / "_build"
EXECUTED = BUILD / "executed"


def chapters() -> list[Path]:
    """The chapter sources `book/NN_*.py`, in order."""
    return sorted(BOOK.glob("[0-9][0-9]_*.py"))


def source_hash(py: Path) -> str:
    return hashlib.sha256(Path(py).read_bytes()).hexdigest()


def executed_path(py: Path) -> Path:
    return EXECUTED / Path(py).with_suffix(".ipynb").name


def write_executed(nb, py: Path, seconds: float) -> Path:
    """Write an executed notebook, tagged with the hash of the source it ran from (atomically)."""
    import nbformat

    nb.metadata["prunelib"] = {"source_sha256": source_hash(py), "seconds": round(seconds, 1)}
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3",
                                          "language": "python"})
    nb.metadata.setdefault("language_info", {"name": "python", "pygments_lexer": "ipython3"})
    out = executed_path(py)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, out)
    return out


def remove_executed(py: Path) -> None:
    executed_path(py).unlink(missing_ok=True)


def stale(py: Path) -> str | None:
    """Why the executed notebook of chapter `py` cannot be used (None if it can)."""
    out = executed_path(py)
    if not out.exists():
        return f"{py.name} has not been executed (no {out.relative_to(ROOT)})"
    meta = json.loads(out.read_text()).get("metadata", {}).get("prunelib", {})
    if meta.get("source_sha256") != source_hash(py):
        return f"{py.name} changed since it was executed ({out.relative_to(ROOT)})"
    return None


class CurrentEnvSpecs(KernelSpecManager):
    """Every kernel name gives the IPython kernel of this Python (sys.executable), as nbval's
    --nbval-current-env did."""

    def get_kernel_spec(self, kernel_name):
        from ipykernel.kernelspec import RESOURCES, get_kernel_dict

        return self.kernel_spec_class(resource_dir=RESOURCES, **get_kernel_dict())
