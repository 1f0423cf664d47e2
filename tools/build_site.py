"""Build the book's static website from the chapters' executed notebooks.

    python tools/build_site.py             # -> book/_build/html/index.html
    python tools/build_site.py --execute   # first run the chapters that are missing or stale

The chapters are executed once, by `pytest` (the root conftest.py writes each passing chapter's
executed notebook to book/_build/executed/, tagged with the hash of its source). This script only
renders them (Sphinx + myst-nb, execution off) with the README's introduction as the landing page
and book/00_preface.md, book/notation.md when they exist. A chapter that was not executed, or
changed since, stops the build with the command that executes it (or use --execute).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import book_exec  # noqa: E402

ROOT, BOOK, BUILD = book_exec.ROOT, book_exec.BOOK, book_exec.BUILD
SRC, HTML = BUILD / "site_src", BUILD / "html"
EXTRA_PAGES = ["00_preface.md", "notation.md"]  # written by others; used when present
LANDING_SECTIONS = ("Quick start", "The book")  # README sections after the introduction


def landing_page(readme: str, chapters: list[Path]) -> str:
    """The README's introduction (its text before the first `## `) and LANDING_SECTIONS, with
    `book/NN_*.py` turned into links to the chapter pages, then the table of contents."""
    parts = re.split(r"(?m)^(?=## )", readme)
    keep = [parts[0]] + [p for p in parts[1:] if p[3:].startswith(LANDING_SECTIONS)]
    text = "".join(keep)
    names = {py.stem for py in chapters}
    text = re.sub(r"`book/(\d\d_\w+)\.py`",
                  lambda m: f"[`{m[1]}`]({m[1]}.ipynb)" if m[1] in names else m[0], text)
    pages = [Path(p).stem for p in EXTRA_PAGES if (BOOK / p).exists()]
    pages += [py.stem for py in chapters]
    toc = "\n".join(["```{toctree}", ":maxdepth: 2", ":caption: The book", "", *pages, "```"])
    return f"{text.rstrip()}\n\n## Contents\n\n{toc}\n"


MATH = re.compile(r"\$\$.+?\$\$|\$[^$]+?\$", re.S)
CODE = re.compile(r"(```.*?```|`[^`]*`)", re.S)


def one_line_math(md: str) -> str:
    """Each maths span of a Markdown text on one line. Jupyter takes maths out before it parses
    Markdown; MyST does not, so a line inside `$...$` that starts with `- ` or `+ ` would become a
    list item there. Code is left alone, and so is a span across a blank line (not maths)."""
    def join(m):
        return m[0] if re.search(r"\n\s*\n", m[0]) else m[0].replace("\n", " ")

    parts = CODE.split(md)
    return "".join(p if i % 2 else MATH.sub(join, p) for i, p in enumerate(parts))


def check_executed(execute: bool) -> list[Path]:
    """The chapters, all executed from their current source; runs pytest on the others when
    `execute`, else exits with what to run."""
    chapters = book_exec.chapters()
    stale = [py for py in chapters if book_exec.stale(py)]
    if stale and execute:
        nbs = [str(py.with_suffix(".ipynb").relative_to(ROOT)) for py in stale]
        print("executing:", " ".join(nbs), flush=True)
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nbs],
                       cwd=ROOT, check=False)
        stale = [py for py in chapters if book_exec.stale(py)]
    if stale:
        why = "\n".join(f"  - {book_exec.stale(py)}" for py in stale)
        nbs = " ".join(str(py.with_suffix(".ipynb").relative_to(ROOT)) for py in stale)
        sys.exit(f"build_site: the site renders executed chapters, and {len(stale)} cannot be "
                 f"used:\n{why}\nExecute them with the chapter tests (`pytest {nbs}`, or plain "
                 f"`pytest`), or run `python tools/build_site.py --execute`.")
    return chapters


def stage(chapters: list[Path]) -> None:
    """Lay out the site's sources: landing page, extra pages, executed notebooks (maths on one
    line)."""
    shutil.rmtree(SRC, ignore_errors=True)
    SRC.mkdir(parents=True)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (SRC / "index.md").write_text(landing_page(readme, chapters), encoding="utf-8")
    for name in EXTRA_PAGES:
        if (BOOK / name).exists():
            shutil.copy2(BOOK / name, SRC / name)
    for py in chapters:
        nb = json.loads(book_exec.executed_path(py).read_text(encoding="utf-8"))
        for cell in nb["cells"]:
            if cell["cell_type"] == "markdown":
                cell["source"] = one_line_math("".join(cell["source"]))
        (SRC / f"{py.stem}.ipynb").write_text(json.dumps(nb), encoding="utf-8")


def build(execute: bool = False) -> Path:
    """Build the site; returns its index.html."""
    t0 = time.time()
    chapters = check_executed(execute)
    stage(chapters)
    shutil.rmtree(HTML, ignore_errors=True)
    warnings = BUILD / "site_warnings.txt"
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-c", str(BOOK / "site"),
           "-w", str(warnings), str(SRC), str(HTML)]
    if subprocess.run(cmd, cwd=ROOT).returncode:
        sys.exit(f"build_site: sphinx failed (warnings and errors: {warnings})")
    index = HTML / "index.html"
    print(f"site: {index} ({len(chapters)} chapters, {time.time() - t0:.0f} s)")
    return index


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--execute", action="store_true",
                    help="run the chapters that have no up-to-date executed notebook first")
    build(ap.parse_args().execute)
