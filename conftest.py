"""Before collection, write each chapter `book/NN_*.py` (jupytext py:percent) as a notebook
next to it (git-ignored), so that `pytest` runs the chapters under nbval with the tests."""
from pathlib import Path


def pytest_sessionstart(session):
    import jupytext

    for py in sorted(Path(__file__).parent.glob("book/[0-9][0-9]_*.py")):
        nb = py.with_suffix(".ipynb")
        if not nb.exists() or nb.stat().st_mtime < py.stat().st_mtime:
            jupytext.write(jupytext.read(py), nb)
