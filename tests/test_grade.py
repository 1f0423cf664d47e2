"""tools/grade.py: grading a student's notebook per exercise id.

Small synthetic chapters (pure Python setup cells) released with tools/make_student.py; one test
grades two exercises of a real chapter's solution version (seconds), one locates every exercise
of every real chapter without running anything.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
_spec = importlib.util.spec_from_file_location("grade", ROOT / "tools" / "grade.py")
gr = importlib.util.module_from_spec(_spec)
sys.modules["grade"] = gr
_spec.loader.exec_module(gr)
import make_student as ms  # noqa: E402  (tools/ on the path, as grade.py has it)

B, E = "### BEGIN SOLUTION", "### END SOLUTION"
CHAPTER = f"""\
# %% [markdown]
# # A tiny chapter

# %%
import math
BASE = 10

# %%
def double(x):
    {B}
    return 2 * x
    {E}

# %%
# check: ch7.double (2 points)
assert double(BASE) == 20

# %%
def root(x):
    {B}
    return math.sqrt(x)
    {E}

# %%
# check: ch7.root (3 points)
assert root(BASE * 10) == BASE

# %% [markdown]
# The end.
"""
ANSWERS = {"ch7.double": "    return x + x\n", "ch7.root": "    return x ** 0.5\n"}


@pytest.fixture
def released(tmp_path):
    """(student notebook, answer key) of the tiny chapter, as make_student --release writes."""
    chap = tmp_path / "07_tiny.py"
    chap.write_text(CHAPTER)
    ms.release([chap], tmp_path / "out")
    return tmp_path / "out" / "student" / "07_tiny.ipynb", tmp_path / "out" / "answers"


def answer(nb_path: Path, out: Path, answers: dict[str, str], edit=None) -> Path:
    """A copy of the student notebook with the stubs of `answers` replaced by their code."""
    nb = json.loads(nb_path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for k, c in enumerate(code[1:], 1):
        ex = gr.check_id("".join(c["source"]))
        if ex in answers:
            src = "".join(code[k - 1]["source"])
            code[k - 1]["source"] = src.replace("    raise NotImplementedError()",
                                                answers[ex].rstrip("\n"))
    if edit:
        edit(nb)
    out.write_text(json.dumps(nb))
    return out


def statuses(report) -> dict[str, tuple[str, float]]:
    return {r.id: (r.status, r.earned) for r in report.exercises}


def test_answered_notebook_earns_every_point(released, tmp_path):
    nb, key = released
    rep = gr.grade(answer(nb, tmp_path / "a.ipynb", ANSWERS), key)
    assert statuses(rep) == {"ch7.double": ("passed", 2), "ch7.root": ("passed", 3)}
    assert (rep.earned, rep.possible, rep.chapter) == (5, 5, "07_tiny")


def test_student_stubs_earn_nothing_and_say_not_answered(released):
    nb, key = released
    rep = gr.grade(nb, key)
    assert statuses(rep) == {"ch7.double": ("not answered", 0), "ch7.root": ("not answered", 0)}
    assert rep.possible == 5


def test_one_broken_exercise_does_not_sink_the_other(released, tmp_path):
    nb, key = released
    broken = {"ch7.double": "    import os; os._exit(3)\n", "ch7.root": ANSWERS["ch7.root"]}
    rep = gr.grade(answer(nb, tmp_path / "a.ipynb", broken), key)
    assert statuses(rep)["ch7.root"] == ("passed", 3)
    assert statuses(rep)["ch7.double"] == ("error", 0)
    looping = {"ch7.double": "    while True: pass\n", "ch7.root": ANSWERS["ch7.root"]}
    rep = gr.grade(answer(nb, tmp_path / "b.ipynb", looping), key, timeout=3)
    assert statuses(rep) == {"ch7.double": ("timeout", 0), "ch7.root": ("passed", 3)}


def test_wrong_answer_fails_its_check_with_the_assert(released, tmp_path):
    nb, key = released
    rep = gr.grade(answer(nb, tmp_path / "a.ipynb", {**ANSWERS, "ch7.double": "    return x\n"}),
                   key)
    r = rep.exercises[0]
    assert (r.status, r.earned) == ("failed", 0) and "AssertionError" in r.detail
    assert rep.earned == 3


def test_the_key_grades_with_its_own_checks_and_setup(released, tmp_path):
    nb, key = released

    def tamper(nb_json):                   # weaken a check, break the setup cell
        code = [c for c in nb_json["cells"] if c["cell_type"] == "code"]
        code[0]["source"] = "raise RuntimeError('my setup')\n"
        code[2]["source"] = "# check: ch7.double (2 points)\nassert True\n"
    path = answer(nb, tmp_path / "a.ipynb", {"ch7.root": ANSWERS["ch7.root"]}, tamper)
    assert statuses(gr.grade(path, key)) == {"ch7.double": ("not answered", 0),
                                             "ch7.root": ("passed", 3)}
    no_key = statuses(gr.grade(path))      # the notebook's own cells: its setup fails
    assert no_key == {"ch7.double": ("error", 0), "ch7.root": ("error", 0)}


def test_bad_setup_cell_without_key_still_reports_each_exercise(released, tmp_path):
    nb, _ = released

    def bad_setup(nb_json):
        next(c for c in nb_json["cells"] if c["cell_type"] == "code")["source"] = "import nope\n"
    rep = gr.grade(answer(nb, tmp_path / "a.ipynb", ANSWERS, bad_setup))
    assert [(r.id, r.status, r.earned) for r in rep.exercises] == [
        ("ch7.double", "error", 0), ("ch7.root", "error", 0)]
    assert all("setup cell raised ModuleNotFoundError" in r.detail for r in rep.exercises)


def test_missing_check_or_exercise_cell_scores_zero(released, tmp_path):
    nb, key = released

    def drop(nb_json):                     # the check of ch7.double, the exercise of ch7.root
        code = [c for c in nb_json["cells"] if c["cell_type"] == "code"]
        nb_json["cells"] = [c for c in nb_json["cells"] if c is not code[2] and c is not code[3]]
    rep = gr.grade(answer(nb, tmp_path / "a.ipynb", ANSWERS, drop), key)
    assert [(r.status, r.earned) for r in rep.exercises] == [("missing", 0), ("missing", 0)]
    assert "no check cell" in rep.exercises[0].detail
    assert "no exercise cell" in rep.exercises[1].detail


def test_unreadable_notebook_reports_every_exercise_of_the_key(released, tmp_path):
    _, key = released
    bad = tmp_path / "07_tiny.ipynb"
    bad.write_text('{"cells": [')
    rep = gr.grade(bad, key, chapter="07_tiny")
    assert [(r.id, r.status, r.earned) for r in rep.exercises] == [
        ("ch7.double", "missing", 0), ("ch7.root", "missing", 0)]
    assert rep.possible == 5 and "cannot be read as JSON" in rep.notes[0]


def test_malformed_cell_is_skipped_and_the_rest_graded(released, tmp_path):
    nb, key = released

    def spoil(nb_json):
        nb_json["cells"].insert(0, {"cell_type": "code", "source": 42})
    rep = gr.grade(answer(nb, tmp_path / "a.ipynb", ANSWERS, spoil), key)
    assert rep.earned == 5 and rep.notes == ["cell 0 is malformed and was skipped"]


def test_without_metadata_the_check_lines_list_the_exercises(released, tmp_path):
    nb, _ = released

    def strip(nb_json):
        nb_json["metadata"].pop("prunelib")
    rep = gr.grade(answer(nb, tmp_path / "a.ipynb", ANSWERS, strip))
    assert statuses(rep) == {"ch7.double": ("passed", 2), "ch7.root": ("passed", 3)}


def test_magic_and_shell_lines_are_skipped(released, tmp_path):
    nb, key = released
    magic = {**ANSWERS, "ch7.double": "    %time 1\n    !ls\n    return 2 * x\n"}
    assert gr.grade(answer(nb, tmp_path / "a.ipynb", magic), key).earned == 5


def test_cli_prints_a_table_and_json(released, tmp_path):
    nb, key = released
    path = answer(nb, tmp_path / "a.ipynb", {"ch7.root": ANSWERS["ch7.root"]})
    tool = [sys.executable, str(ROOT / "tools" / "grade.py"), str(path), "--key", str(key)]
    r = subprocess.run(tool + ["--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["earned"], out["possible"]) == (3, 5)
    assert [(e["id"], e["earned"], e["points"]) for e in out["exercises"]] == [
        ("ch7.double", 0, 2), ("ch7.root", 3, 3)]
    r = subprocess.run(tool + ["--only", "ch7.root"], capture_output=True, text=True)
    assert r.returncode == 0 and "ch7.root" in r.stdout and "ch7.double" not in r.stdout
    assert r.stdout.splitlines()[-1].split() == ["total", "3", "/", "3"]
    r = subprocess.run(tool + ["--only", "ch7.nope"], capture_output=True, text=True)
    assert r.returncode == 0 and "no exercise with id ch7.nope" in r.stdout
    r = subprocess.run(tool[:2] + [str(tmp_path / "none.ipynb")], capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr


BOOK = [p for p in ms.chapters(ROOT / "book") if ms.static_problems(p.read_text(), str(p))[2]]


@pytest.mark.parametrize("chapter", BOOK, ids=lambda p: p.name)
def test_book_solution_notebook_locates_every_exercise(chapter, tmp_path):
    # static: the grader finds each exercise of the key before its check, as the solution
    import jupytext
    key = ms.answer_key(chapter)
    code = [c.source for c in jupytext.read(chapter).cells if c.cell_type == "code"]
    where = gr.locate(code)
    assert [e["id"] for e in key["exercises"]] == list(where)
    for e in key["exercises"]:
        i, j = where[e["id"]]
        assert i is not None and code[j] == e["check"].rstrip("\n")
        assert [ln for ln in code[i].splitlines() if ln.strip() not in (B, E)] == \
            e["solution"].rstrip("\n").splitlines()


def test_book_chapter_two_solution_version_scores_its_points(tmp_path):
    # executed, two cheap exercises of the real chapter (its setup cell imports torch)
    import jupytext
    chapter = ROOT / "book" / "02_bn_based.py"
    ms.release([chapter], tmp_path / "out")
    nb = tmp_path / "02_bn_based.ipynb"
    jupytext.write(jupytext.read(chapter), nb)
    rep = gr.grade(nb, tmp_path / "out" / "answers", only=["ch2.off-prob", "ch2.fold-1x1"])
    assert statuses(rep) == {"ch2.off-prob": ("passed", 2), "ch2.fold-1x1": ("passed", 2)}
    stub = gr.grade(tmp_path / "out" / "student" / "02_bn_based.ipynb",
                    tmp_path / "out" / "answers", only=["ch2.off-prob"])
    assert statuses(stub) == {"ch2.off-prob": ("not answered", 0)}
