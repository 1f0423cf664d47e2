"""tools/make_student.py: student versions of chapters and the exercise-convention checker.

Every test works on small synthetic chapter strings (pure Python, no torch), so the executing
checks start a subprocess that imports nothing heavy.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_student", ROOT / "tools" / "make_student.py")
ms = importlib.util.module_from_spec(_spec)
sys.modules["make_student"] = ms
_spec.loader.exec_module(ms)

B, E = "### BEGIN SOLUTION", "### END SOLUTION"

GOOD = f"""\
# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
# ---

# %% [markdown]
# # A tiny chapter
# Exercises use `{B}` markers.

# %%
SCALE = "quick"
import math

# %% [markdown]
# ## Exercise 1: soft-thresholding

# %%
def soft(x, t):
    {B}
    y = math.copysign(max(abs(x) - t, 0.0), x)
    return y
    {E}

# %%
assert soft(3.0, 1.0) == 2.0 and soft(-0.5, 1.0) == 0.0

# %% [markdown]
# ## Exercise 2: a top-level answer

# %%
{B}
answer = 6 * 7
{E}

# %%
assert answer == 42
"""


def write(tmp_path: Path, text: str, name: str = "01_tiny.py") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_student_replaces_each_region_by_stub_at_marker_indentation():
    out = ms.make_student(GOOD)
    assert "def soft(x, t):\n    raise NotImplementedError()\n" in out
    assert "\nraise NotImplementedError()\n" in out          # top-level region, no indent
    assert not any(ln.strip() in (B, E) for ln in out.splitlines())
    assert "copysign" not in out and "6 * 7" not in out
    compile(out, "student", "exec")


def test_student_keeps_markdown_checks_and_everything_outside_regions():
    out = ms.make_student(GOOD)
    chap = ms.parse(GOOD)
    keep = [ln for k, ln in enumerate(GOOD.splitlines(True))
            if not any(r.begin <= k <= r.end for r in chap.regions)]
    it = iter(out.splitlines(True))
    assert all(any(ln == o for o in it) for ln in keep)      # kept lines, same order
    assert out.count("raise NotImplementedError()") == 2
    assert f"# Exercises use `{B}` markers." in out              # marker text in markdown is prose
    assert "assert answer == 42" in out


def test_cells_split_by_percent_lines_with_kinds():
    cells = ms.split_cells(GOOD)
    assert [c.kind for c in cells] == ["header", "markdown", "code", "markdown", "code", "code",
                                       "markdown", "code", "code"]
    assert "".join(ln for c in cells for ln in c.lines) == GOOD


@pytest.mark.parametrize("body, message", [
    (f"# %%\n{B}\nx = 1\n", "not closed"),
    (f"# %%\nx = 1\n{E}\n", "without a matching"),
    (f"# %%\n{B}\n{B}\nx = 1\n{E}\n", "do not nest"),
    (f"# %%\ndef f():\n    {B}\n    return 1\n{E}\n", "indented differently"),
    (f"# %%\n{B}\n# only a comment\n{E}\n", "empty solution"),
    ("# %%\n## BEGIN SOLUTION\nx = 1\n### END SOLUTION\n", "malformed marker"),
    ("# %%\n### Begin Solution\nx = 1\n### END SOLUTION\n", "malformed marker"),
    (f"# %%\n{B}\nx = 1\n# %%\n{E}\n", "not closed"),
])
def test_bad_markers_raise_marker_error_naming_the_line(body, message):
    with pytest.raises(ms.MarkerError, match=message):
        ms.make_student(body)


def test_check_accepts_a_good_chapter_and_executes_both_versions(tmp_path):
    assert ms.check_chapter(write(tmp_path, GOOD)) == []


def test_check_reports_exercise_without_check_cell(tmp_path):
    text = GOOD.replace("# %%\nassert answer == 42\n", "")
    problems = ms.check_chapter(write(tmp_path, text), execute=False)
    assert any("not followed by a check" in p for p in problems)


def test_check_reports_check_cell_without_assert(tmp_path):
    text = GOOD.replace("assert answer == 42", "print(answer)")
    problems = ms.check_chapter(write(tmp_path, text), execute=False)
    assert any("no assert statement" in p for p in problems)


def test_check_reports_check_that_passes_on_the_stub(tmp_path):
    text = GOOD.replace("assert answer == 42", "answer = 42\nassert answer == 42")
    problems = ms.check_chapter(write(tmp_path, text))
    assert len(problems) == 1 and "passes on the student stub" in problems[0]


def test_check_reports_solution_that_fails_its_own_check(tmp_path):
    text = GOOD.replace("answer = 6 * 7", "answer = 6 * 8")
    problems = ms.check_chapter(write(tmp_path, text))
    assert len(problems) == 1 and "does not pass its check" in problems[0]


def test_check_runs_exercises_in_isolation_from_earlier_cells(tmp_path):
    # the exercise uses `helper`, defined in a non-setup cell: not self-contained
    text = GOOD.replace("# %% [markdown]\n# ## Exercise 2",
                        "# %%\nhelper = 7\n\n# %% [markdown]\n# ## Exercise 2")
    text = text.replace("answer = 6 * 7", "answer = 6 * helper")
    problems = ms.check_chapter(write(tmp_path, text))
    assert len(problems) == 1 and "NameError" in problems[0]


def test_check_reports_syntax_error_in_student_version(tmp_path):
    # a region that is only part of an expression leaves invalid code behind
    text = GOOD.replace("    return y\n    " + E, "    return (y\n    " + E + "\n    )")
    problems = ms.check_chapter(write(tmp_path, text), execute=False)
    assert any("student version is not valid Python" in p for p in problems)


def test_check_reports_exercise_in_setup_cell(tmp_path):
    text = GOOD.replace('SCALE = "quick"\n', f'{B}\nSCALE = "quick"\n{E}\n', 1)
    text = text.replace("# %%\ndef soft", "# %%\nassert SCALE == 'quick'\n\n# %%\ndef soft")
    problems = ms.check_chapter(write(tmp_path, text), execute=False)
    assert any("setup cell" in p for p in problems)


def test_cli_writes_student_file_and_check_exit_status(tmp_path):
    good = write(tmp_path, GOOD)
    out = tmp_path / "out"
    tool = str(ROOT / "tools" / "make_student.py")
    r = subprocess.run([sys.executable, tool, str(good), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / good.name).read_text() == ms.make_student(GOOD)
    r = subprocess.run([sys.executable, tool, "--check", "--static", str(good)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout
    bad = write(tmp_path, GOOD.replace(E, "", 1), "02_bad.py")
    r = subprocess.run([sys.executable, tool, "--check", str(good), str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "02_bad.py" in r.stderr and "not closed" in r.stderr
    r = subprocess.run([sys.executable, tool, str(bad), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and not (out / bad.name).exists()


@pytest.mark.parametrize("chapter", ms.chapters(ROOT / "book"), ids=lambda p: p.name)
def test_book_chapter_follows_the_exercise_convention(chapter):
    # (a)-(d) of tools/make_student.py on the real chapter, exercises executed in isolation
    assert ms.check_chapter(chapter) == []
