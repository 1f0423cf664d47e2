"""Student versions of the book's chapters, and a checker of the exercise convention.

A chapter (jupytext py:percent, `book/NN_name.py`) marks the solution of an exercise inside a
code cell with two comment lines at the same indentation::

    def soft_threshold(x, t):
        ### BEGIN SOLUTION
        return x.sign() * (x.abs() - t).clamp_min(0)
        ### END SOLUTION

The student version replaces every region from `### BEGIN SOLUTION` to `### END SOLUTION`
(both included) by `raise NotImplementedError()` at the marker's indentation. Everything else
(markdown cells, the check cells that grade the exercise) is kept verbatim.

    python tools/make_student.py book/01_introduction.py [-o student/] [--ipynb]
    python tools/make_student.py --check [CHAPTER ...]   # default: every book/[0-9]*.py
    python tools/make_student.py --release OUT [CHAPTER ...]   # assignments + answer key

`--check` guarantees, for every chapter (exit status 1 and one line per violation otherwise):
  (a) markers are well-formed and balanced: each marker line is exactly `### BEGIN SOLUTION` or
      `### END SOLUTION` (after indentation), only in code cells, BEGIN and END alternate, a
      region opens and closes in the same cell at the same indentation and holds some code;
      near-misses such as `## BEGIN SOLUTION` or `### Begin solution` are reported too;
  (b) the chapter and its student version compile as Python;
  (c) no solution text is left: no marker survives, and no solution line that does not also
      occur outside the solution regions appears in the student version;
  (d) every exercise cell (a code cell holding a region) is followed by a check cell: the next
      code cell, with at least one `assert` statement and no region of its own. Unless
      `--static` is given, each exercise is then executed in isolation, in a subprocess with
      the chapter folder as working directory, in a fresh namespace holding only the chapter's
      first code cell (the setup cell):
        solution version:  setup + exercise cell + check cell must run without error;
        student version:   setup + stubbed exercise cell (its NotImplementedError is caught, as
                           a student who has not answered yet) + check cell must raise.
      So every check grades its own exercise: it passes on the answer and fails on the stub.
      This requires exercises to be self-contained given the setup cell (and the setup cell to
      be cheap: it runs once per exercise);
  (e) the first line of every check cell names and prices its exercise, exactly
          # check: chN.<short-id> (<P> points)
      with N the chapter's number (the file's NN_ prefix), a short id of lower-case letters and
      digits joined by '-', P > 0 (`(1 point)` is accepted too); ids are unique; a code cell
      that does not follow an exercise has no such line.

`--release OUT` writes what an instructor hands out and keeps (every chapter by default):
    OUT/student/NN_name.ipynb   the student notebooks (solutions stubbed, checks kept; the ids
                                and points in the notebook metadata under "prunelib")
    OUT/answers/answers.json    the answer key: per chapter the setup cell, and per exercise id
                                its points, solution cell and check cell (tools/grade.py --key)
    OUT/answers/NN_name.md      the same, to read
and refuses (exit status 1) when a chapter breaks (a)-(c) or (e), or a student notebook would
hold a solution line.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = "raise NotImplementedError()"
_NEAR_MISS = re.compile(r"^\s*#+\s*(BEGIN|END)[\s_]*SOLUTION\b", re.IGNORECASE)
_CELL = re.compile(r"^# %%(?=\s|$)")
CHECK_FORMAT = "# check: chN.<short-id> (<P> points)"
_CHECK = re.compile(r"# check: ch(\d+)\.([a-z0-9]+(?:-[a-z0-9]+)*) \((\d+(?:\.\d+)?) points?\)")
_CHECK_NEAR = re.compile(r"\s*#\s*check\b", re.IGNORECASE)
_ROOT = Path(__file__).resolve().parents[1]


class MarkerError(ValueError):
    """Solution markers that are unbalanced or malformed; the message names the lines."""


@dataclass
class Cell:
    """One py:percent cell: `kind` is 'header' (before the first `# %%`), 'code' or 'markdown';
    `start` is the 0-based line index of its first line (the `# %%` line itself)."""
    kind: str
    start: int
    lines: list[str]

    @property
    def source(self) -> str:
        """The cell's code without its `# %%` line."""
        body = self.lines[1:] if self.kind != "header" else self.lines
        return "".join(body)


@dataclass
class Region:
    cell: int          # index into the list of cells
    begin: int         # 0-based line index of the BEGIN marker in the chapter
    end: int           # 0-based line index of the END marker
    indent: str


@dataclass
class Chapter:
    """A parsed chapter: its lines, cells and solution regions."""
    lines: list[str]
    cells: list[Cell]
    regions: list[Region] = field(default_factory=list)

    def exercise_cells(self) -> list[int]:
        return sorted({r.cell for r in self.regions})


def split_cells(text: str) -> list[Cell]:
    """Cut a py:percent text into cells (the header before the first `# %%` is its own cell)."""
    lines = text.splitlines(keepends=True)
    cells: list[Cell] = []
    cur = Cell("header", 0, [])
    for i, line in enumerate(lines):
        if _CELL.match(line):
            if cur.lines:
                cells.append(cur)
            head = line[4:]
            kind = "markdown" if re.search(r"\[(markdown|md)\]", head) else "code"
            cur = Cell(kind, i, [line])
        else:
            cur.lines.append(line)
    if cur.lines:
        cells.append(cur)
    return cells


def parse(text: str) -> Chapter:
    """Parse a chapter and its solution regions; raise MarkerError listing every bad marker."""
    lines = text.splitlines(keepends=True)
    cells = split_cells(text)
    chap = Chapter(lines, cells)
    errors: list[str] = []
    for ci, cell in enumerate(cells):
        open_at: tuple[int, str] | None = None
        for off, line in enumerate(cell.lines):
            i = cell.start + off
            stripped = line.strip()
            indent = line[:len(line) - len(line.lstrip())]
            is_marker = stripped in (BEGIN, END)
            if not is_marker:
                if cell.kind == "code" and _NEAR_MISS.match(line):
                    errors.append(f"line {i + 1}: malformed marker {stripped!r}; write exactly "
                                  f"{BEGIN!r} or {END!r} on a line of its own")
                continue
            if cell.kind != "code":
                errors.append(f"line {i + 1}: {stripped!r} outside a code cell")
                continue
            if stripped == BEGIN:
                if open_at is not None:
                    errors.append(f"line {i + 1}: {BEGIN!r} inside the region opened at line "
                                  f"{open_at[0] + 1} (regions do not nest)")
                    continue
                open_at = (i, indent)
            else:
                if open_at is None:
                    errors.append(f"line {i + 1}: {END!r} without a matching {BEGIN!r}")
                    continue
                begin, ind = open_at
                open_at = None
                if indent != ind:
                    errors.append(f"line {i + 1}: {END!r} indented differently from the "
                                  f"{BEGIN!r} at line {begin + 1}")
                    continue
                body = "".join(lines[begin + 1:i])
                if not _has_code(body):
                    errors.append(f"lines {begin + 1}-{i + 1}: empty solution region")
                    continue
                chap.regions.append(Region(ci, begin, i, ind))
        if open_at is not None:
            errors.append(f"line {open_at[0] + 1}: {BEGIN!r} not closed by {END!r} in the "
                          f"same cell")
    if errors:
        raise MarkerError("\n".join(errors))
    return chap


def _has_code(text: str) -> bool:
    return any(ln.strip() and not ln.strip().startswith("#") for ln in text.splitlines())


def _replace(lines: list[str], regions: list[Region], lo: int = 0,
             hi: int | None = None) -> str:
    """Lines [lo, hi) with every region inside replaced by the stub."""
    hi = len(lines) if hi is None else hi
    out, i = [], lo
    for r in sorted(regions, key=lambda r: r.begin):
        if r.begin < lo or r.end >= hi:
            continue
        out.extend(lines[i:r.begin])
        out.append(f"{r.indent}{STUB}\n")
        i = r.end + 1
    out.extend(lines[i:hi])
    return "".join(out)


def make_student(text: str) -> str:
    """The student version of a chapter text (raises MarkerError on bad markers)."""
    chap = parse(text)
    return _replace(chap.lines, chap.regions)


def _cell_code(chap: Chapter, ci: int, student: bool) -> str:
    cell = chap.cells[ci]
    lo, hi = cell.start + (0 if cell.kind == "header" else 1), cell.start + len(cell.lines)
    if student:
        return _replace(chap.lines, chap.regions, lo, hi)
    return "".join(ln for k, ln in enumerate(chap.lines[lo:hi], lo)
                   if not any(k in (r.begin, r.end) for r in chap.regions))


def _has_assert(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(isinstance(n, ast.Assert) for n in ast.walk(tree))


# -- the checks --------------------------------------------------------------------------------
@dataclass
class Exercise:
    name: str             # its id and the line of the exercise cell, for messages
    solution: str         # the exercise cell with markers removed
    student: str          # the exercise cell with regions stubbed
    check: str            # the check cell
    id: str = ""          # 'chN.short-id' from the check line
    points: float = 0.0


def chapter_number(name: str) -> int | None:
    """N of a chapter file NN_name.py (None for a name without the NN_ prefix)."""
    m = re.match(r"(\d+)_", Path(name).name)
    return int(m.group(1)) if m else None


def parse_check_line(line: str, number: int | None = None) -> tuple[str, float]:
    """(id, points) of a check cell's first line; ValueError saying what is wrong."""
    line = line.rstrip("\r\n")
    m = _CHECK.fullmatch(line)
    if m is None:
        if not _CHECK_NEAR.match(line):
            raise ValueError(f"its first line is not a check line {CHECK_FORMAT!r}")
        raise ValueError(f"malformed check line {line.strip()!r}; write {CHECK_FORMAT!r}: the "
                         f"short id in lower-case letters and digits joined by '-'")
    chap, short, points = int(m.group(1)), m.group(2), float(m.group(3))
    points = int(points) if points.is_integer() else points
    if number is not None and chap != number:
        raise ValueError(f"check id 'ch{chap}.{short}' in chapter {number}: it must start with "
                         f"'ch{number}.'")
    if points <= 0:
        raise ValueError(f"check line {line.strip()!r}: the points must be positive")
    return f"ch{chap}.{short}", points


def _first_line(code: str) -> str:
    return code.split("\n", 1)[0]


def static_problems(text: str, name: str) -> tuple[list[str], Chapter | None, list[Exercise]]:
    """Checks (a)-(c) and the static part of (d); returns (problems, chapter, exercises)."""
    try:
        chap = parse(text)
    except MarkerError as e:
        return [f"{name}: {m}" for m in str(e).splitlines()], None, []
    problems: list[str] = []
    student = _replace(chap.lines, chap.regions)
    for label, src in (("chapter", text), ("student version", student)):
        try:
            compile(src, f"{name} ({label})", "exec")
        except SyntaxError as e:
            problems.append(f"{name}: the {label} is not valid Python: line {e.lineno}: {e.msg}")
    secret = secret_lines(chap)
    for k, ln in enumerate(student.splitlines(), 1):
        if ln.strip() in (BEGIN, END):
            problems.append(f"{name}: student version line {k}: a marker is left")
        elif ln.strip() in secret:
            problems.append(f"{name}: student version line {k}: solution text left: {ln.strip()!r}")
    exercises: list[Exercise] = []
    number, seen, checks = chapter_number(name), {}, set()
    code_cells = [ci for ci, c in enumerate(chap.cells) if c.kind == "code"]
    for ci in chap.exercise_cells():
        line = chap.cells[ci].start + 1
        later = [cj for cj in code_cells if cj > ci]
        if not later:
            problems.append(f"{name}: exercise cell at line {line} is not followed by a check "
                            f"cell")
            continue
        cj = later[0]
        check = _cell_code(chap, cj, student=False)
        if cj in chap.exercise_cells():
            problems.append(f"{name}: exercise cell at line {line} is followed by another "
                            f"exercise cell (line {chap.cells[cj].start + 1}), not by a check")
            continue
        if not _has_assert(check):
            problems.append(f"{name}: the check cell at line {chap.cells[cj].start + 1} (after "
                            f"the exercise at line {line}) has no assert statement")
            continue
        if code_cells and ci == code_cells[0]:
            problems.append(f"{name}: the exercise at line {line} is in the setup cell (the "
                            f"first code cell); put exercises in cells of their own")
            continue
        check_at = chap.cells[cj].start + 2
        try:
            ex_id, points = parse_check_line(_first_line(check), number)
        except ValueError as e:
            problems.append(f"{name}: the check cell at line {check_at - 1} (after the exercise "
                            f"at line {line}): {e}")
            continue
        if ex_id in seen:
            problems.append(f"{name}: line {check_at}: exercise id {ex_id!r} is used twice "
                            f"(first at line {seen[ex_id]})")
            continue
        seen[ex_id] = check_at
        checks.add(cj)
        exercises.append(Exercise(f"{ex_id} (exercise cell at line {line})",
                                  _cell_code(chap, ci, False), _cell_code(chap, ci, True), check,
                                  ex_id, points))
    for cj in code_cells:
        first = _first_line(_cell_code(chap, cj, False))
        if cj not in checks and _CHECK_NEAR.match(first) and cj not in chap.exercise_cells():
            after = [ci for ci in code_cells if ci < cj][-1:]
            if not after or after[0] not in chap.exercise_cells():
                problems.append(f"{name}: line {chap.cells[cj].start + 2}: a check line in a "
                                f"cell that does not follow an exercise cell")
    return problems, chap, exercises


_RUNNER = r"""
import json, sys, traceback
spec = json.load(open(sys.argv[1]))
def run(parts, tolerate_stub):
    ns = {"__name__": "__main__"}
    for role, label, code in parts:
        try:
            exec(compile(code, label, "exec"), ns)
        except NotImplementedError:
            if tolerate_stub and role == "exercise":
                continue
            return role, "NotImplementedError", traceback.format_exc(limit=3)
        except BaseException as e:
            return role, type(e).__name__, traceback.format_exc(limit=3)
    return None, None, None
results = []
for job in spec:
    role, kind, err = run(job["parts"], job.get("tolerate_stub", False))
    results.append({"stage": role, "kind": kind, "error": err})
    json.dump(results, open(sys.argv[2], "w"))
"""


def execute(jobs: list[dict], cwd: Path, timeout: float) -> list[dict] | str:
    """Run `jobs` in one fresh Python subprocess, each in a namespace of its own.

    A job is {"parts": [(role, label, code), ...], "tolerate_stub": bool}, executed part by
    part (role 'setup', 'exercise' or 'check'); with `tolerate_stub` a NotImplementedError of
    the exercise part is caught (a stub not answered yet) and the next part runs. Returns one
    {"stage", "kind", "error"} per job (all None when it ran through; else the role of the
    failing part, the exception's class name and its traceback), or a message when the
    subprocess itself failed or ran out of time."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps(jobs))
        env = {**os.environ, "MPLBACKEND": "Agg"}
        try:
            proc = subprocess.run([sys.executable, "-c", _RUNNER, str(spec), str(out)],
                                  cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"took more than {timeout:.0f} s"
        done = json.loads(out.read_text()) if out.exists() else []
        if proc.returncode != 0 or len(done) != len(jobs):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return f"the runner stopped (exit status {proc.returncode}): " + " | ".join(tail)
        return done


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text and text.strip() else ""


def run_exercises(setup: str, exercises: list[Exercise], name: str, cwd: Path,
                  timeout: float = 600.0) -> list[str]:
    """Execute every exercise in isolation (see the module docstring, (d)); return problems."""
    if not exercises:
        return []
    jobs = []
    for e in exercises:
        for code, stub in ((e.solution, False), (e.student, True)):
            jobs.append({"parts": [("setup", f"{name} (setup cell)", setup),
                                   ("exercise", f"{e.name} (exercise)", code),
                                   ("check", f"{e.name} (check)", e.check)],
                         "tolerate_stub": stub})
    done = execute(jobs, cwd, timeout)
    if isinstance(done, str):
        return [f"{name}: executing the exercises: {done}"]
    problems: list[str] = []
    for e, sol, stu in zip(exercises, done[::2], done[1::2]):
        if sol["error"]:
            problems.append(f"{name}: {e.name}: the solution does not pass its check "
                            f"(setup + exercise + check, in isolation): "
                            f"{_last_line(sol['error'])}")
        if not stu["error"]:
            problems.append(f"{name}: {e.name}: the check passes on the student stub; "
                            f"it does not grade the exercise")
    return problems


def check_chapter(path: Path, execute: bool = True, timeout: float = 600.0) -> list[str]:
    """Every violation of (a)-(d) in the chapter at `path`, as messages (empty list = fine)."""
    name = str(path)
    problems, chap, exercises = static_problems(path.read_text(), name)
    if chap is None or not execute or problems:
        return problems
    code = [c for c in chap.cells if c.kind == "code"]
    setup = code[0].source if code else ""
    return run_exercises(setup, exercises, name, path.resolve().parent, timeout)


def chapters(book: Path) -> list[Path]:
    """The chapters of the book: book/NN_*.py (helpers starting with '_' are not chapters)."""
    return sorted(p for p in book.glob("[0-9]*.py"))


def write_student(path: Path, outdir: Path, ipynb: bool = False) -> Path:
    """Write the student version of `path` into `outdir` (and a notebook with `ipynb`)."""
    text = path.read_text()
    problems, _, _ = static_problems(text, str(path))
    if problems:
        raise MarkerError("\n".join(problems))
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / path.name
    target.write_text(make_student(text))
    if ipynb:
        import jupytext
        jupytext.write(jupytext.read(target), target.with_suffix(".ipynb"))
    return target


def secret_lines(chap: Chapter) -> set[str]:
    """The stripped solution lines that occur nowhere outside the solution regions."""
    inside = {k for r in chap.regions for k in range(r.begin, r.end + 1)}
    outside = {ln.strip() for k, ln in enumerate(chap.lines) if k not in inside}
    return {chap.lines[k].strip() for k in inside} - outside - {"", BEGIN, END}


def leaks(text: str, chap: Chapter) -> list[str]:
    """Lines of a student file (a .py text or an .ipynb's JSON) that give a solution away: a
    marker, or a solution line that occurs nowhere outside the solution regions."""
    try:
        nb = json.loads(text)
        cells = nb["cells"] if isinstance(nb, dict) else None
    except ValueError:
        cells = None
    if isinstance(cells, list):
        text = "\n".join("".join(c.get("source", "")) for c in cells if isinstance(c, dict))
    secret = secret_lines(chap) | {BEGIN, END}
    return [ln.strip() for ln in text.splitlines() if ln.strip() in secret]


def answer_key(path: Path) -> dict:
    """Setup cell and, per exercise, id, points, solution cell and check cell of a chapter."""
    text = path.read_text()
    problems, chap, exercises = static_problems(text, str(path))
    if problems:
        raise MarkerError("\n".join(problems))
    code = [c for c in chap.cells if c.kind == "code"]
    return {"file": path.name, "setup": code[0].source if code else "",
            "exercises": [{"id": e.id, "points": e.points, "solution": e.solution,
                           "check": e.check} for e in exercises]}


def student_notebook(path: Path, key: dict):
    """The student version of chapter `path` as a notebook (nbformat), ids in its metadata."""
    import jupytext
    nb = jupytext.reads(make_student(path.read_text()), fmt="py:percent")
    nb.metadata.pop("jupytext", None)                  # a plain notebook, paired with nothing
    nb.metadata["prunelib"] = {"chapter": path.stem, "exercises": [
        {"id": e["id"], "points": e["points"]} for e in key["exercises"]]}
    return nb


def release(paths: list[Path], out: Path) -> dict:
    """Write OUT/student/*.ipynb and OUT/answers/ (see the module docstring); return the key."""
    import jupytext
    keys = {p.stem: answer_key(p) for p in paths}
    ids = [e["id"] for k in keys.values() for e in k["exercises"]]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise MarkerError(f"exercise ids used in two chapters: {', '.join(dup)}")
    (out / "student").mkdir(parents=True, exist_ok=True)
    (out / "answers").mkdir(parents=True, exist_ok=True)
    for p in paths:
        target = out / "student" / f"{p.stem}.ipynb"
        text = jupytext.writes(student_notebook(p, keys[p.stem]), fmt="ipynb")
        leaked = leaks(text, parse(p.read_text()))
        if leaked:
            raise MarkerError(f"{target}: solution text left: {leaked[0]!r}")
        target.write_text(text)
        md = [f"# Answer key: {p.name}\n"]
        for e in keys[p.stem]["exercises"]:
            pts = f"{e['points']:g} point{'s' if e['points'] != 1 else ''}"
            md.append(f"## {e['id']} ({pts})\n\n```python\n{e['solution'].strip()}\n```\n\n"
                      f"Check:\n\n```python\n{e['check'].strip()}\n```\n")
        (out / "answers" / f"{p.stem}.md").write_text("\n".join(md))
    key = {"format": "prunelib-answers/1", "chapters": keys,
           "total_points": sum(e["points"] for k in keys.values() for e in k["exercises"])}
    (out / "answers" / "answers.json").write_text(json.dumps(key, indent=1) + "\n")
    return key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapters", nargs="*", type=Path,
                    help="chapter files (default with --check: every book/[0-9]*.py)")
    ap.add_argument("-o", "--outdir", type=Path, default=Path("student"),
                    help="where student versions are written (default: student/)")
    ap.add_argument("--ipynb", action="store_true", help="also write .ipynb notebooks")
    ap.add_argument("--check", action="store_true",
                    help="verify the exercise convention (module docstring) instead of writing")
    ap.add_argument("--static", action="store_true",
                    help="with --check: skip executing the exercises")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="with --check: seconds allowed to execute one chapter's exercises")
    ap.add_argument("--release", type=Path, metavar="OUT",
                    help="write OUT/student/ (notebooks) and OUT/answers/ (the answer key)")
    args = ap.parse_args(argv)
    everything = args.check or args.release is not None
    paths = args.chapters or (chapters(_ROOT / "book") if everything else [])
    if not paths:
        ap.error("name at least one chapter (or use --check or --release)")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print("make_student: no such file: " + ", ".join(map(str, missing)), file=sys.stderr)
        return 2
    if args.check:
        problems = []
        for p in paths:
            found = check_chapter(p, execute=not args.static, timeout=args.timeout)
            problems += found
            if not found:
                n = len(parse(p.read_text()).regions)
                print(f"ok  {p} ({n} solution region{'s' if n != 1 else ''})")
        for m in problems:
            print(f"FAIL {m}", file=sys.stderr)
        return 1 if problems else 0
    if args.release is not None:
        try:
            key = release(paths, args.release)
        except MarkerError as e:
            print(f"make_student: {e}", file=sys.stderr)
            return 1
        n = sum(len(k["exercises"]) for k in key["chapters"].values())
        print(f"{len(paths)} student notebook(s) in {args.release / 'student'}; answer key "
              f"({n} exercises, {key['total_points']:g} points) in {args.release / 'answers'}")
        return 0
    try:
        for p in paths:
            print(write_student(p, args.outdir, args.ipynb))
    except MarkerError as e:
        print(f"make_student: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
