"""Grade a student's notebook of a chapter: points per exercise id, and a total.

    python tools/grade.py STUDENT.ipynb [--key OUT/answers/answers.json] [--json]
                          [--only ID ...] [--timeout SECONDS] [--chapter NN_name]

The notebook is one that `python tools/make_student.py --release OUT` wrote into OUT/student/
(or the chapter itself, as a notebook). Every exercise is graded on its own, as
`make_student.py --check` runs it: in a fresh Python subprocess, the setup cell (the first code
cell), then the student's exercise cell (the code cell before the check cell), then the check
cell. The exercise earns its points when all three run without an error; otherwise 0, with the
reason: the exercise not answered (its stub raised NotImplementedError), the exercise cell or
the setup cell failed, the check failed (an assert) or errored, a cell is missing, or the run
took longer than --timeout. One broken exercise cannot sink another, and a notebook that cannot
be read still gets a report for every exercise the answer key lists.

With `--key` (recommended) the answer key decides what is graded and how: its list of
exercises and points, its setup cell and its check cells (a student who edits a check or the
setup changes nothing), and the cell before a check counts as the exercise only if it defines
the functions the key's exercise cell defines. Without it, the exercises and points come
from the notebook's metadata (written by the release) or, failing that, from its check lines,
and the notebook's own setup and check cells are run. Lines starting with `%` or `!`
(IPython magics, shell commands) are skipped. The report is a table, or JSON with `--json`;
the exit status is 0 when a report was written, 2 when the arguments are wrong (no such file,
an unreadable key, an unknown chapter).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_student import execute, parse_check_line  # noqa: E402


@dataclass
class Result:
    """The grade of one exercise."""
    id: str
    points: float
    earned: float = 0
    status: str = "not run"      # passed | not answered | failed | error | missing | timeout
    detail: str = ""


@dataclass
class Report:
    notebook: str
    chapter: str | None
    key: str | None
    exercises: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def earned(self) -> float:
        return sum(r.earned for r in self.exercises)

    @property
    def possible(self) -> float:
        return sum(r.points for r in self.exercises)

    def as_dict(self) -> dict:
        return {**asdict(self), "earned": self.earned, "possible": self.possible}

    def text(self) -> str:
        width = max([len(r.id) for r in self.exercises] + [8])
        lines = [f"{self.notebook}  (chapter {self.chapter or '?'}; "
                 f"{'answer key ' + self.key if self.key else 'no answer key'})"]
        lines += [f"  note: {n}" for n in self.notes]
        for r in self.exercises:
            lines.append(f"  {r.id:{width}s}  {_num(r.earned):>4s} / {_num(r.points):<4s} "
                         f"{r.status}{': ' + r.detail if r.detail else ''}")
        lines.append(f"  {'total':{width}s}  {_num(self.earned):>4s} / {_num(self.possible)}")
        return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:g}"


# -- reading the notebook ----------------------------------------------------------------------
def read_notebook(path: Path) -> tuple[list[str], dict, list[str]]:
    """(sources of its code cells, its metadata, notes on what could not be read)."""
    try:
        nb = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return [], {}, [f"the notebook cannot be read as JSON ({type(e).__name__}: {e})"]
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        return [], {}, ["the notebook has no list of cells"]
    code, notes = [], []
    for k, cell in enumerate(nb["cells"]):
        src = cell.get("source") if isinstance(cell, dict) else None
        if isinstance(src, list) and all(isinstance(s, str) for s in src):
            src = "".join(src)
        if not isinstance(src, str):
            notes.append(f"cell {k} is malformed and was skipped")
            continue
        if cell.get("cell_type") == "code":
            code.append(src)
    meta = nb.get("metadata")
    return code, meta if isinstance(meta, dict) else {}, notes


def check_id(source: str) -> str | None:
    """The exercise id of a check cell's first line (None if it is not a valid check line)."""
    try:
        return parse_check_line(source.split("\n", 1)[0])[0]
    except ValueError:
        return None


def locate(code: list[str]) -> dict[str, tuple[int | None, int]]:
    """{id: (index of its exercise cell or None, index of its check cell)} in `code`; the
    exercise cell is the code cell before the check, never the setup cell nor another check."""
    found: dict[str, tuple[int | None, int]] = {}
    for j, src in enumerate(code):
        ex_id = check_id(src)
        if ex_id is None or ex_id in found:
            continue
        i = j - 1
        ok = i >= 1 and check_id(code[i]) is None
        found[ex_id] = (i if ok else None, j)
    return found


def defined(source: str) -> set[str] | None:
    """Names of the functions and classes a cell defines at top level (None: not Python)."""
    try:
        tree = ast.parse(without_magics(source))
    except SyntaxError:
        return None
    return {n.name for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def without_magics(source: str) -> str:
    """`source` with IPython magic and shell lines (`%...`, `!...`) replaced by `pass`."""
    return re.sub(r"(?m)^([ \t]*)[%!].*$", r"\1pass  # skipped by the grader", source)


# -- grading -----------------------------------------------------------------------------------
def load_key(path: Path) -> dict:
    """The answer key written by `make_student.py --release` (answers.json, or its folder)."""
    path = path / "answers.json" if path.is_dir() else path
    key = json.loads(path.read_text())
    if not isinstance(key, dict) or not isinstance(key.get("chapters"), dict):
        raise ValueError(f"{path}: not an answer key (no 'chapters')")
    return key


def pick_chapter(key: dict, meta: dict, code: list[str], name: str | None) -> str | None:
    """The key's chapter this notebook answers: --chapter, the notebook's metadata, else the
    chapter number of its check ids, else the only chapter of the key."""
    chapters = key["chapters"]
    if name:
        return name if name in chapters else None
    meta_chapter = (meta.get("prunelib") or {}).get("chapter") if isinstance(
        meta.get("prunelib"), dict) else None
    if meta_chapter in chapters:
        return meta_chapter
    ids = {i for i in map(check_id, code) if i}
    for stem, chap in chapters.items():
        if ids & {e["id"] for e in chap["exercises"]}:
            return stem
    return next(iter(chapters)) if len(chapters) == 1 else None


def expected_from_notebook(meta: dict, code: list[str]) -> list[dict]:
    """Exercises and points from the release's metadata, else from the check lines."""
    listed = (meta.get("prunelib") or {}).get("exercises") if isinstance(
        meta.get("prunelib"), dict) else None
    if isinstance(listed, list) and all(isinstance(e, dict) and "id" in e for e in listed):
        return [{"id": str(e["id"]), "points": float(e.get("points", 0))} for e in listed]
    out = []
    for src in code:
        try:
            ex_id, points = parse_check_line(src.split("\n", 1)[0])
        except ValueError:
            continue
        out.append({"id": ex_id, "points": points})
    return out


def _outcome(done: dict | str) -> tuple[str, str]:
    if isinstance(done, str):
        return ("timeout" if done.startswith("took more") else "error"), done
    if done["stage"] is None:
        return "passed", ""
    last = (done["error"] or "").strip().splitlines()[-1:] or [done["kind"]]
    stage, kind = done["stage"], done["kind"]
    if kind == "NotImplementedError" and stage in ("exercise", "check"):
        return "not answered", "the exercise still raises NotImplementedError"
    if stage == "check" and kind == "AssertionError":
        return "failed", f"the check failed: {last[0]}"
    return "error", f"the {stage} cell raised {last[0]}"


def grade(notebook: Path, key_path: Path | None = None, only: list[str] | None = None,
          timeout: float = 300.0, chapter: str | None = None) -> Report:
    """Grade `notebook` (see the module docstring); raises ValueError on an unusable key."""
    code, meta, notes = read_notebook(notebook)
    key = load_key(key_path) if key_path else None
    report = Report(str(notebook), None, str(key_path) if key_path else None, notes=notes)
    if key is not None:
        report.chapter = pick_chapter(key, meta, code, chapter)
        if report.chapter is None:
            raise ValueError(f"{notebook}: which chapter of the key it answers is unknown; "
                             f"name it with --chapter (one of {', '.join(key['chapters'])})")
        kc = key["chapters"][report.chapter]
        expected, setup = kc["exercises"], kc["setup"]
    else:
        expected = expected_from_notebook(meta, code)
        setup = code[0] if code else None
        report.chapter = (meta.get("prunelib") or {}).get("chapter") if isinstance(
            meta.get("prunelib"), dict) else None
    where = locate(code)
    unknown = sorted(set(only or []) - {e["id"] for e in expected})
    if unknown:
        report.notes.append(f"no exercise with id {', '.join(unknown)} in this chapter")
    for e in expected:
        if only and e["id"] not in only:
            continue
        r = Result(e["id"], e["points"])
        report.exercises.append(r)
        if not code:
            r.status, r.detail = "missing", "the notebook could not be read"
            continue
        if e["id"] not in where:
            r.status, r.detail = "missing", "no check cell with this id"
            continue
        i, j = where[e["id"]]
        need = defined(e.get("solution", "")) or set()     # the key's def lines, if any
        have = defined(code[i]) if i is not None else set()
        if i is None or (have is not None and not need <= have):
            r.status, r.detail = "missing", "no exercise cell before its check cell" + (
                f" (one that defines {', '.join(sorted(need))})" if need else "")
            continue
        check = e.get("check") or code[j]
        job = {"parts": [("setup", "setup cell", without_magics(setup or "")),
                         ("exercise", f"{r.id} (exercise)", without_magics(code[i])),
                         ("check", f"{r.id} (check)", check)]}
        done = execute([job], notebook.resolve().parent, timeout)
        r.status, r.detail = _outcome(done if isinstance(done, str) else done[0])
        r.earned = r.points if r.status == "passed" else 0
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", type=Path, help="the student's .ipynb")
    ap.add_argument("--key", type=Path, help="answers.json from make_student.py --release "
                                             "(or its folder)")
    ap.add_argument("--chapter", help="the key's chapter (NN_name) the notebook answers")
    ap.add_argument("--only", nargs="+", metavar="ID", help="grade only these exercise ids")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds allowed to one exercise (setup + exercise + check)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if not args.notebook.is_file():
        print(f"grade: no such file: {args.notebook}", file=sys.stderr)
        return 2
    try:
        report = grade(args.notebook, args.key, args.only, args.timeout, args.chapter)
    except (OSError, ValueError) as e:
        print(f"grade: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
