"""tools/bench_costs.py: the cost table of a sweep's README, rewritten from its run files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "book" / "results" / "bench"
TOOL = [sys.executable, str(ROOT / "tools" / "bench_costs.py")]


def fake_run(src: Path, dst: Path, total: float, budget: float) -> None:
    r = json.loads(src.read_text())
    r["seconds"] = {**r["seconds"], "total": total, "regularize": 60.0, "finetune": 120.0}
    r["target"] = {**r["target"], "macs": budget}
    dst.write_text(json.dumps(r))


def test_the_table_between_the_markers_is_rewritten_from_the_files_and_the_prose_kept(tmp_path):
    l1 = BENCH / "resnet20-bench-l1-macs0.5-seed0.json"
    fake_run(l1, tmp_path / "a.json", 600.0, 0.5)
    fake_run(l1, tmp_path / "b.json", 1200.0, 0.3)
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\nprose before\n<!-- costs:start -->\nold\n"
                      "<!-- costs:end -->\nprose after\n")
    out = subprocess.run(TOOL + [str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = readme.read_text()
    assert text.startswith("# Results\n\nprose before\n") and text.endswith("prose after\n")
    assert "old" not in text and "2 runs, 0.50 h in all" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| l1 @")]
    assert rows == ["| l1 @ 0.5, seed 0 | 10.0 | 1.0 | 2.0 | 0.0 |",
                    "| l1 @ 0.3, seed 0 | 20.0 | 1.0 | 2.0 | 0.0 |"]


def test_a_readme_without_markers_or_a_folder_without_results_is_an_error(tmp_path):
    out = subprocess.run(TOOL + [str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "README.md").write_text("no markers\n")
    out = subprocess.run(TOOL + [str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "markers" in out.stderr
    (tmp_path / "README.md").write_text("<!-- costs:start -->\n<!-- costs:end -->\n")
    out = subprocess.run(TOOL + [str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "no *.json" in out.stderr
    assert (tmp_path / "README.md").read_text() == "<!-- costs:start -->\n<!-- costs:end -->\n"
