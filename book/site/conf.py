"""Sphinx configuration of the book's website, built by `python tools/build_site.py` from the
chapters' executed notebooks (myst-nb, execution off), with MathJax served from the site."""
import importlib.util
import shutil
from pathlib import Path

project = "prunelib: regularization-based structured pruning"
author = "the prunelib authors"
extensions = ["myst_nb"]
nb_execution_mode = "off"  # the chapter tests executed them; this only renders
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_dmath_double_inline = True  # $$...$$ inside a paragraph is display maths, as in Jupyter
myst_heading_anchors = 3
html_theme = "sphinx_book_theme"
html_title = "Structured pruning, the book"
html_copy_source = False
html_show_sourcelink = False
html_theme_options = {"show_toc_level": 2, "use_download_button": False}
html_context = {"default_mode": "light"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
suppress_warnings = ["mystnb.unknown_mime_type"]

# MathJax 3 from the sphinx-mathjax-offline package, copied into the site: no CDN at read time.
mathjax_path = "mathjax/tex-chtml.js"
MATHJAX_PARTS = ["tex-chtml.js", "input/tex", "output/chtml", "ui", "a11y"]


def _copy_mathjax(app, exc):
    if exc is not None or app.builder.format != "html":
        return
    src = Path(importlib.util.find_spec("sphinx-mathjax-offline").origin).parent
    src, dst = src / "static" / "mathjax", Path(app.outdir) / "_static" / "mathjax"
    for part in MATHJAX_PARTS:
        (dst / part).parent.mkdir(parents=True, exist_ok=True)
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part, dirs_exist_ok=True)
        else:
            shutil.copy2(src / part, dst / part)


def setup(app):
    app.connect("build-finished", _copy_mathjax)
