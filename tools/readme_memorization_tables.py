"""Recompute the memorization summary from the rows of benchmarks/results/memorization.json with
the current code, then replace each README table whose header line equals one that
``benchmarks/memorization.py --table`` prints.

    python tools/readme_memorization_tables.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import memorization  # noqa: E402

from privasr.atomic import atomic_write_text  # noqa: E402


def main() -> int:
    results = ROOT / "benchmarks" / "results" / "memorization.json"
    data = json.loads(results.read_text())
    data["summary"] = memorization.summarize(data["rows"])
    atomic_write_text(results, json.dumps(data, indent=1))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memorization.py"), "--table"],
                         capture_output=True, text=True, check=True).stdout.strip()
    readme = ROOT / "README.md"
    lines = readme.read_text().split("\n")
    for table in out.split("\n\n"):
        new = table.split("\n")
        if new[0] not in lines:
            raise SystemExit(f"README has no table with the header {new[0]!r}")
        start = end = lines.index(new[0])
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        lines[start:end] = new
    atomic_write_text(readme, "\n".join(lines))
    print(f"summary of {len(data['rows'])} rows; {len(out.split(chr(10) * 2))} README tables updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
