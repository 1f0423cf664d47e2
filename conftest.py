"""The book's chapters as tests, each executed once per run.

Before collection, each chapter `book/NN_*.py` (jupytext py:percent) is written as a notebook next
to it (git-ignored). Each notebook is then collected here: one test per code cell, run in order
in one Jupyter kernel of the current environment (cwd `book/`). A cell that raises fails its test
with the cell's source and traceback; the cells after it are skipped. When every code cell of a
chapter has run and passed, the executed notebook (outputs, figures) is written to
`book/_build/executed/` with the chapter's source hash, and `tools/build_site.py` renders the
website from those files without executing anything again.
"""
import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("book_exec", Path(__file__).parent / "tools"
                                               / "book_exec.py")
book_exec = sys.modules["book_exec"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(book_exec)  # tools/book_exec.py: what the chapters and the site share

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def pytest_addoption(parser):
    parser.addoption("--cell-timeout", type=float, default=3600.0,
                     help="seconds one chapter cell may run (default 3600)")


def pytest_sessionstart(session):
    import jupytext

    for py in book_exec.chapters():
        nb = py.with_suffix(".ipynb")
        if not nb.exists() or nb.stat().st_mtime < py.stat().st_mtime:
            jupytext.write(jupytext.read(py), nb)


def pytest_collect_file(file_path, parent):
    if file_path.parent == book_exec.BOOK and re.fullmatch(r"\d\d_.+\.ipynb", file_path.name):
        if file_path.with_suffix(".py").exists():
            return Chapter.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(items):
    """The site tests run last: they need the chapters this run executes."""
    items.sort(key=lambda item: item.get_closest_marker("site") is not None)


def pytest_configure(config):
    config.addinivalue_line("markers", "site: needs the built website (runs after the chapters)")


class Chapter(pytest.File):
    """A chapter notebook: its code cells, run in order in one kernel."""

    def collect(self):
        import nbformat

        self.nb = nbformat.read(self.path, as_version=4)
        self.client, self.failed, self.passed, self.t0 = None, False, set(), None
        code = [i for i, c in enumerate(self.nb.cells) if c.cell_type == "code"]
        for n, i in enumerate(code):
            yield Cell.from_parent(self, name=f"Cell {n}", index=i)
        self.n_code = len(code)

    def start(self):
        """Start a kernel of this Python (like nbval's --nbval-current-env), cwd book/, with the
        inline matplotlib backend so figures become outputs even if MPLBACKEND is set."""
        from jupyter_client.manager import AsyncKernelManager
        from nbclient import NotebookClient

        env = dict(os.environ, MPLBACKEND="module://matplotlib_inline.backend_inline")
        km = AsyncKernelManager(kernel_spec_manager=book_exec.CurrentEnvSpecs())
        self.client = NotebookClient(self.nb, km=km, timeout=self.config.option.cell_timeout,
                                     resources={"metadata": {"path": str(self.path.parent)}})
        self.client.start_new_kernel(env=env)
        self.client.start_new_kernel_client()
        self.t0 = time.time()

    def teardown(self):
        if self.client is None:
            return
        self.client._cleanup_kernel()
        self.client = None
        if not self.failed and len(self.passed) == self.n_code:
            book_exec.write_executed(self.nb, self.path.with_suffix(".py"),
                                      time.time() - self.t0)


class CellFailed(Exception):
    pass


class Cell(pytest.Item):
    """One code cell of a chapter; fails with the cell's source and traceback."""

    def __init__(self, *, index, **kw):
        super().__init__(**kw)
        self.index = index

    def runtest(self):
        from nbclient.exceptions import CellExecutionError

        chapter = self.parent
        if chapter.failed:
            pytest.skip("an earlier cell of this chapter failed")
        if chapter.client is None:
            book_exec.remove_executed(chapter.path.with_suffix(".py"))
            chapter.start()
        cell = chapter.nb.cells[self.index]
        try:
            chapter.client.execute_cell(cell, self.index)
        except CellExecutionError as e:
            chapter.failed = True
            raise CellFailed(ANSI.sub("", str(e))) from None
        except BaseException:
            chapter.failed = True
            raise
        chapter.passed.add(self.index)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CellFailed):
            return f"{self.path.name}, {self.name}: {excinfo.value.args[0]}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::{self.name}"
