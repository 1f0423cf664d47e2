"""The book's website in a real headless browser: Chromium (Debian's /usr/bin/chromium) driven by
Playwright, the site served from 127.0.0.1 inside the test.

These tests run after the chapters (marker `site`, ordered last by the root conftest.py). When
every chapter has an executed notebook from its current source (the chapter tests of this run or
an earlier one wrote them) and the site is older than them, the site is built first
(`tools/build_site.py`). Without a site, Chromium or Playwright they skip, saying why; with
PRUNELIB_SITE_REQUIRED=1 (set by .ci/run) they fail instead.
"""
from __future__ import annotations

import functools
import http.server
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("book_exec", ROOT / "tools" / "book_exec.py")
book_exec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(book_exec)

pytestmark = pytest.mark.site
HTML = book_exec.BUILD / "html"
SCREENSHOT = book_exec.BUILD / "screenshot_ch2.png"
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHAPTERS = [py.stem for py in book_exec.chapters()]
PAGES = ["index"] + [Path(p).stem for p in ("00_preface.md", "notation.md")
                     if (book_exec.BOOK / p).exists()] + CHAPTERS
RAW_TEX = re.compile(r"\$\$|\\[A-Za-z]{2,}|(?<![\w$])\$[^\s$][^$\n]{0,80}\$")
# The article's visible prose: code, outputs and typeset maths removed.
PROSE_JS = """() => { const a = document.querySelector('article').cloneNode(true);
  a.querySelectorAll('pre, code, mjx-container, script, style, .cell_output')
   .forEach(e => e.remove()); return a.innerText; }"""


def unavailable(reason: str):
    """Skip on a developer machine; fail where the site is required (CI)."""
    if os.environ.get("PRUNELIB_SITE_REQUIRED") == "1":
        pytest.fail(f"{reason} (PRUNELIB_SITE_REQUIRED=1)")
    pytest.skip(reason)


def say(request, text: str) -> None:
    """A line in the test log, shown even when output is captured."""
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\n{text}", flush=True)


@pytest.fixture(scope="module")
def site(request) -> Path:
    """The built site, (re)built first if the executed chapters are newer than it."""
    index = HTML / "index.html"
    stale = [why for py in book_exec.chapters() if (why := book_exec.stale(py))]
    newest = max([p.stat().st_mtime for p in book_exec.EXECUTED.glob("*.ipynb")], default=0)
    if not stale and (not index.exists() or index.stat().st_mtime < newest):
        t0 = time.time()
        done = subprocess.run([sys.executable, ROOT / "tools" / "build_site.py"], cwd=ROOT,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"site build failed:\n{done.stdout}\n{done.stderr}"
        say(request, f"site built in {time.time() - t0:.0f} s: {index}")
    if stale or not index.exists():     # a site older than the chapters shows other numbers
        unavailable("the site is not built from the current chapters: execute them (pytest) "
                    "and run `python tools/build_site.py`" + (f" ({stale[0]})" if stale else ""))
    return HTML


@pytest.fixture(scope="module")
def server(site):
    """http.server on 127.0.0.1 (a free port), serving the site; stopped after the module."""
    handler = functools.partial(Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser(site):
    if not CHROMIUM.exists():
        unavailable(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=ARGS,
            viewport={"width": 1280, "height": 900})
        context.set_default_timeout(30_000)
        yield context
        context.close()


def open_page(browser, url: str):
    """Load `url`; returns the page and the problems seen (console errors, page errors, failed
    or non-local requests, HTTP errors). Requests off 127.0.0.1 are refused: the site works
    offline."""
    page, problems = browser.new_page(), []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url} {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status}: {r.url}"))

    def local_only(route):
        if urlsplit(route.request.url).hostname in ("127.0.0.1", None):
            return route.continue_()
        problems.append(f"off-site request: {route.request.url}")
        return route.abort()

    page.route("**/*", local_only)
    page.goto(url, wait_until="load")
    if page.evaluate("() => !!window.MathJax"):
        page.wait_for_function("() => window.MathJax.startup && MathJax.startup.promise")
        page.evaluate("() => MathJax.startup.promise")
    return page, problems


def image_outputs(name: str) -> int:
    """The number of figures in the notebook the page was rendered from."""
    nb = json.loads((book_exec.BUILD / "site_src" / f"{name}.ipynb").read_text())
    return sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


def blank(png: bytes) -> bool:
    """True if the image is a single colour."""
    from PIL import Image

    lo_hi = Image.open(io.BytesIO(png)).convert("RGBA").getextrema()
    return all(lo == hi for lo, hi in lo_hi)


def broken_links(page, base: str, site: Path) -> list[str]:
    """Same-site hrefs/srcs of the page that point to no file, or to no anchor in it."""
    bad = []
    refs = page.eval_on_selector_all("a[href], img[src], link[href], script[src]",
                                     "es => es.map(e => e.href || e.src)")
    for ref in set(refs):
        parts = urlsplit(ref)
        if not ref.startswith(base):
            continue
        path = site / unquote(parts.path[len(urlsplit(base).path):])
        path = path / "index.html" if path.is_dir() else path
        if not path.is_file():
            bad.append(f"{ref}: no such file")
        elif parts.fragment and path.suffix == ".html":
            ids = set(re.findall(r'\bid="([^"]+)"', path.read_text(encoding="utf-8")))
            if unquote(parts.fragment) not in ids:
                bad.append(f"{ref}: no anchor #{parts.fragment}")
    return bad


@pytest.mark.parametrize("name", PAGES)
def test_page(name, site, server, browser):
    """A reader's view of one page: it loads cleanly, its figures are there and not blank, its
    maths is typeset with no raw TeX left in the prose, and its internal links resolve."""
    if not (site / f"{name}.html").exists():
        unavailable(f"{name}.html is not in the built site: run `python tools/build_site.py`")
    url = urljoin(server, f"{name}.html")
    page, problems = open_page(browser, url)
    try:
        assert not problems, "\n".join(problems)
        assert page.title() and page.locator("article h1").count() == 1
        assert not (bad := broken_links(page, server, site)), "\n".join(bad)
        raw = RAW_TEX.findall(page.evaluate(PROSE_JS))
        assert not raw, f"raw TeX in the visible text: {raw[:5]}"
        assert page.locator("mjx-merror, [data-mjx-error]").count() == 0, "MathJax errors"
        if name not in CHAPTERS:
            return
        assert page.locator("mjx-container").count() > 0, "no typeset maths"
        imgs = page.locator("article .cell_output img")
        assert imgs.count() == image_outputs(name) > 0, "figures missing from the page"
        for i in range(imgs.count()):
            img = imgs.nth(i)
            img.scroll_into_view_if_needed()
            assert img.evaluate("e => e.complete && e.naturalWidth > 50 && e.naturalHeight > 50")
            src = img.evaluate("e => e.src")
            png = (site / unquote(urlsplit(src).path[1:])).read_bytes()
            assert not blank(png), f"blank figure: {src}"
    finally:
        page.close()


def test_screenshot(request, site, server, browser):
    """A screenshot of chapter 2 (or the first chapter) at its first figure, kept at a fixed
    path for a person to look at."""
    name = next((c for c in CHAPTERS if c.startswith("02_")), CHAPTERS[0])
    page, _ = open_page(browser, urljoin(server, f"{name}.html"))
    figure = page.locator("article .cell_output img").first
    if figure.count():
        figure.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOT))
    page.close()
    assert SCREENSHOT.stat().st_size > 10_000
    say(request, f"screenshot of {name}.html: {SCREENSHOT}")


def test_blank_tells_a_single_colour_from_a_figure():
    """The figure check itself (needs no browser): one colour is blank, two are not."""
    from PIL import Image

    def png(image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return buf.getvalue()

    white = Image.new("RGBA", (60, 60), (255, 255, 255, 255))
    assert blank(png(white))
    white.putpixel((30, 30), (0, 0, 255, 255))
    assert not blank(png(white))


def test_one_line_math():
    """Maths spans are joined to one line (a `- ` line inside them is no list item), code and
    text across a blank line are not."""
    spec = importlib.util.spec_from_file_location("build_site", ROOT / "tools" / "build_site.py")
    build_site = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_site)
    f = build_site.one_line_math
    assert f("a $x\n- y$ b\n$$a\n+ b$$") == "a $x - y$ b\n$$a + b$$"
    assert f("`$a\n` $b$") == "`$a\n` $b$"
    assert f("costs $5\n\n# Head $x$") == "costs $5\n\n# Head $x$"
