"""tools/make_student.py: student versions of chapters and the exercise-convention checker.

Every test works on small synthetic chapter strings (pure Python, no torch), so the executing
checks start a subprocess that imports nothing heavy.
"""
from __future__ import annotations

import importlib.util
import json
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
# check: ch1.soft (2 points)
assert soft(3.0, 1.0) == 2.0 and soft(-0.5, 1.0) == 0.0

# %% [markdown]
# ## Exercise 2: a top-level answer

# %%
{B}
answer = 6 * 7
{E}

# %%
# check: ch1.top-level (1 point)
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
    text = GOOD.replace("# %%\n# check: ch1.top-level (1 point)\nassert answer == 42\n", "")
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
    text = text.replace("# %%\ndef soft", "# %%\n# check: ch1.setup (1 point)\n"
                        "assert SCALE == 'quick'\n\n# %%\ndef soft")
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


def test_check_line_gives_id_and_points():
    assert ms.parse_check_line("# check: ch2.scp-grads (2 points)", 2) == ("ch2.scp-grads", 2)
    assert ms.parse_check_line("# check: ch12.a1-b (1 point)\n") == ("ch12.a1-b", 1)
    assert ms.parse_check_line("# check: ch3.x (1.5 points)", 3) == ("ch3.x", 1.5)
    _, _, exercises = ms.static_problems(GOOD, "01_tiny.py")
    assert [(e.id, e.points) for e in exercises] == [("ch1.soft", 2), ("ch1.top-level", 1)]


@pytest.mark.parametrize("line, message", [
    ("assert soft(3.0, 1.0) == 2.0", "first line is not a check line"),
    ("# check: ch1.Soft (2 points)", "malformed check line"),
    ("# check: ch1.soft_x (2 points)", "malformed check line"),
    ("# check: ch1.soft (2 pts)", "malformed check line"),
    ("# check: ch1.soft", "malformed check line"),
    ("#check: ch1.soft (2 points)", "malformed check line"),
    ("# check: ch1.soft (0 points)", "points must be positive"),
    ("# check: ch2.soft (2 points)", "must start with 'ch1.'"),
    ("# check: ch1.top-level (1 point)", "used twice"),
])
def test_check_reports_bad_or_duplicate_check_lines(tmp_path, line, message):
    text = GOOD.replace("# check: ch1.soft (2 points)", line)
    if not line.startswith("# check"):
        text = text.replace(line + "\n", line + "\n", 1)
    problems = ms.check_chapter(write(tmp_path, text), execute=False)
    assert len(problems) == 1 and message in problems[0], problems


def test_check_reports_check_line_in_a_cell_that_follows_no_exercise(tmp_path):
    text = GOOD.replace("# %% [markdown]\n# ## Exercise 1",
                        "# %%\n# check: ch1.stray (1 point)\nx = 1\n\n# %% [markdown]\n"
                        "# ## Exercise 1")
    problems = ms.check_chapter(write(tmp_path, text), execute=False)
    assert len(problems) == 1 and "does not follow an exercise" in problems[0]


def test_release_writes_student_notebooks_and_an_answer_key(tmp_path):
    chap = write(tmp_path, GOOD)
    key = ms.release([chap], tmp_path / "out")
    nb = json.loads((tmp_path / "out" / "student" / "01_tiny.ipynb").read_text())
    src = ["".join(c["source"]) for c in nb["cells"]]
    assert sum("raise NotImplementedError()" in c for c in src) == 2
    assert any(c.startswith("# check: ch1.soft (2 points)") for c in src)      # checks kept
    assert nb["metadata"]["prunelib"] == {"chapter": "01_tiny", "exercises": [
        {"id": "ch1.soft", "points": 2}, {"id": "ch1.top-level", "points": 1}]}
    saved = json.loads((tmp_path / "out" / "answers" / "answers.json").read_text())
    assert saved == key and key["total_points"] == 3
    ex = {e["id"]: e for e in key["chapters"]["01_tiny"]["exercises"]}
    assert "answer = 6 * 7" in ex["ch1.top-level"]["solution"] and B not in str(key)
    assert ex["ch1.soft"]["check"].startswith("# check: ch1.soft (2 points)\n")
    assert key["chapters"]["01_tiny"]["setup"].startswith('SCALE = "quick"')
    assert "copysign" in (tmp_path / "out" / "answers" / "01_tiny.md").read_text()
    assert not list((tmp_path / "out" / "student").glob("*.md"))              # key kept apart


def test_release_refuses_a_chapter_that_breaks_the_convention(tmp_path):
    bad = write(tmp_path, GOOD.replace("# check: ch1.soft (2 points)\n", ""))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_student.py"), str(bad),
                        "--release", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1 and "not a check line" in r.stderr
    assert not (tmp_path / "out" / "student" / "01_tiny.ipynb").exists()


def test_leak_check_finds_a_solution_line_in_a_notebook(tmp_path):
    chap = ms.parse(GOOD)
    nb = {"cells": [{"cell_type": "code", "source": ["def soft(x, t):\n",
                                                     "    return y\n"]}]}
    assert ms.leaks(json.dumps(nb), chap) == ["return y"]
    assert ms.leaks(ms.make_student(GOOD), chap) == []


def test_released_book_notebooks_hold_no_solution_line(tmp_path):
    # every chapter of the book, released (static: nothing is executed)
    paths = ms.chapters(ROOT / "book")
    key = ms.release(paths, tmp_path)
    for p in paths:
        text = (tmp_path / "student" / f"{p.stem}.ipynb").read_text()
        chap = ms.parse(p.read_text())
        assert ms.leaks(text, chap) == []
        secret = ms.secret_lines(chap)
        cells = json.loads(text)["cells"]
        src = ["".join(c["source"]) for c in cells]
        assert not [ln for c in src for ln in c.splitlines() if ln.strip() in secret]
        assert sum("".join(c["source"]).count("raise NotImplementedError()") for c in cells
                   if c["cell_type"] == "code") == len(chap.regions)
        n = ms.chapter_number(p.name)
        assert all(e["id"].startswith(f"ch{n}.") for e in key["chapters"][p.stem]["exercises"])


@pytest.mark.parametrize("chapter", [p for p in ms.chapters(ROOT / "book")
                                     if p.name[:2] in ("01", "02", "04")], ids=lambda p: p.name)
def test_book_chapter_has_five_priced_exercises(chapter):
    _, _, exercises = ms.static_problems(chapter.read_text(), str(chapter))
    assert len(exercises) >= 5 and all(e.points > 0 for e in exercises)


@pytest.mark.parametrize("chapter", ms.chapters(ROOT / "book"), ids=lambda p: p.name)
def test_book_chapter_follows_the_exercise_convention(chapter):
    # (a)-(d) of tools/make_student.py on the real chapter, exercises executed in isolation
    assert ms.check_chapter(chapter) == []
