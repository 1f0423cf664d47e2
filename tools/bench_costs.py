"""Rewrite the cost table of a sweep's README from the run files themselves.

    python tools/bench_costs.py [book/results/bench]

Reads every `*.json` result of `prunelib sweep` in the folder (plain JSON, `report.load_results`)
and replaces the text between `<!-- costs:start -->` and `<!-- costs:end -->` in its README.md
with the number of runs, their total wall time and one row per run: `seconds.total` and the
phases' seconds (sparse = `regularize`, fine-tuning = `finetune`, removal = `remove`, which for
EagleEye is its search over candidates). The README's own prose around the markers is kept.
The file is written to a temporary name and renamed.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prunelib.fileio import atomic_write_text  # noqa: E402
from prunelib.report import ResultError, load_results, row_name, settings_note  # noqa: E402

START, END = "<!-- costs:start -->", "<!-- costs:end -->"


def cost_table(results: list[dict]) -> str:
    """The markdown between the markers: a total line and a table sorted by budget, run name."""
    def key(r: dict) -> tuple:
        return (-r["target"]["macs"], row_name(r), r["seed"])
    rows = sorted(results, key=key)
    total = sum(r["seconds"]["total"] for r in rows)
    lines = [f"{len(rows)} runs, {total / 3600:.2f} h in all "
             f"(sum of their `seconds.total`).", "",
             "| run | minutes | sparse phase | fine-tuning | removal (EagleEye: its search) |",
             "|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {row_name(r)}{settings_note(r)} @ {r['target']['macs']:g}, "
                     f"seed {r['seed']} "
                     f"| {s['total'] / 60:.1f} | {s.get('regularize', 0) / 60:.1f} "
                     f"| {s.get('finetune', 0) / 60:.1f} | {s.get('remove', 0) / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    folder = Path(argv[0]) if argv else ROOT / "book" / "results" / "bench"
    readme = folder / "README.md"
    if not readme.is_file():
        print(f"bench_costs: error: {readme} not found (the folder's README holds the table)",
              file=sys.stderr)
        return 2
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"bench_costs: error: {readme} has no {START} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    try:
        results = load_results([folder])
    except ResultError as e:
        print(f"bench_costs: error: {e}", file=sys.stderr)
        return 2
    atomic_write_text(readme, f"{head}{START}\n{cost_table(results)}\n{END}{tail}")
    print(f"{readme}: {len(results)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
