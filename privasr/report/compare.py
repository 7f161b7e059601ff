"""`privasr compare RUN_DIR ...`: the results of several runs side by side (e.g. DP-SGD at
ε = 8 next to the non-private baseline), as a printed table, JSON and an HTML report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privasr.atomic import atomic_write_text

COLUMNS = ("run", "test_wer", "test_cer", "epsilon", "delta", "privacy_unit", "steps",
           "train_wall_seconds", "device", "parameters")


def load_row(run_dir: str | Path) -> dict[str, Any]:
    """One table row from ``run_dir/results.json`` (raises naming the file if absent)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (has the run finished?)")
    r = json.loads(path.read_text())
    p = r.get("privacy") or {}
    return {"run": Path(run_dir).name, "test_wer": r["test_wer"], "test_cer": r["test_cer"],
            "epsilon": p.get("epsilon"), "delta": p.get("delta"),
            "privacy_unit": p.get("unit") or ("none (clipping only)" if r.get("clip_policy")
                                              else "none"),
            "steps": r.get("steps"), "train_wall_seconds": r.get("train_wall_seconds"),
            "device": r.get("device"), "parameters": r.get("parameters"),
            "clip_policy": r.get("clip_policy"), "privacy_summary": p.get("summary")}


def compare(run_dirs: list[str | Path], baseline: int = 0) -> list[dict[str, Any]]:
    """Rows for ``run_dirs``; each gains ``wer_vs_baseline`` (ratio to run ``baseline``)."""
    rows = [load_row(d) for d in run_dirs]
    base = rows[baseline]["test_wer"] if rows else None
    for r in rows:
        r["wer_vs_baseline"] = r["test_wer"] / base if base else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    cols = ("run", "test_wer", "test_cer", "wer_vs_baseline", "epsilon", "delta",
            "privacy_unit", "steps")
    table = [list(cols)] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table)


def write_comparison(rows: list[dict[str, Any]], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(rows, indent=1))
    return out
