"""Join DP rows run on this machine with reference rows measured earlier, into one results file.

`privasr dp-peft` runs zero-shot, the non-private references and the DP grid in one out_dir and
reuses finished runs. When the reference runs were made on another machine (their folders are
not here) and only the DP grid is run here (`nonprivate=false 'nonprivate_peft=[]'`), this joins
the two: the reference rows (epsilon null) of REFERENCES, every row of NEW but its zero-shot
one (its DP rows, and a non-private PEFT reference it ran itself, e.g. width-8 adapters; rows
are told apart by their ``overrides``), gap_closed recomputed; the targets come from NEW's experiment.json beside it. It refuses unless both
files' zero-shot rows agree (same public model, same test set).

    python tools/merge_peft_references.py benchmarks/results/dp_peft_top6.json \
        runs/dp_peft_assistant/dp_peft_top6.json --out benchmarks/results/dp_peft_top6.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from privasr.atomic import atomic_write_text
from privasr.recipes.dp_peft import summarize, with_gaps


def merge(references: list[dict], new: list[dict]) -> list[dict]:
    refs = [r for r in references if r["epsilon"] is None]
    zero = [[r["test_wer"] for r in rows if r["method"] == "zero_shot"] for rows in (refs, new)]
    if not zero[0] or zero[0] != zero[1]:
        raise SystemExit(f"zero-shot rows differ or are missing ({zero}): not the same public "
                         "model and test set")
    return with_gaps(refs + [r for r in new if r["method"] != "zero_shot"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("references", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    rows = merge(json.loads(a.references.read_text()), json.loads(a.new.read_text()))
    atomic_write_text(a.out, json.dumps(rows, indent=1))
    exp = json.loads((a.new.parent / "experiment.json").read_text())  # the DP run's targets
    gaps = {float(k): v for k, v in exp["gap_targets"].items()}
    print(json.dumps(summarize(rows, exp["target_ratio"], gaps), indent=1))
    for r in rows:
        print(r["method"], r["epsilon"], r.get("seed"), f"{100 * r['test_wer']:.2f} %",
              r.get("gap_closed"), r.get("noise_multiplier"), r.get("step_seconds"))


if __name__ == "__main__":
    main()
