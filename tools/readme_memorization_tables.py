"""Recompute the memorization summary from the rows of benchmarks/results/memorization.json with
the current code, then replace each README table whose header line equals one of the tables
that ``benchmarks/memorization.py --table`` prints (same functions).

    python tools/readme_memorization_tables.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memorization  # noqa: E402

from privasr.atomic import atomic_write_text  # noqa: E402


def main() -> int:
    results = ROOT / "benchmarks" / "results" / "memorization.json"
    data = json.loads(results.read_text())
    summary = data["summary"] = memorization.summarize(data["rows"])
    atomic_write_text(results, json.dumps(data, indent=1))
    tables = [memorization.markdown_table(summary)] + (
        [memorization.per_core_table(summary)] if summary["per_core"] else [])
    readme = ROOT / "README.md"
    lines = readme.read_text().split("\n")
    for table in tables:
        new = table.split("\n")
        if new[0] not in lines:
            raise SystemExit(f"README has no table with the header {new[0]!r}")
        start = end = lines.index(new[0])
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = new
    atomic_write_text(readme, "\n".join(lines))
    print(f"summary of {len(data['rows'])} rows; {len(tables)} README tables updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
