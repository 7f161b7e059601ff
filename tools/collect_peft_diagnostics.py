"""Collect the DP-PEFT diagnostic runs (runs/peft_diag/*, adapters_top6_nonprivate) into one JSON."""
import json, sys
from pathlib import Path
from privasr.recipes.dp_peft import _row, gap_closed
grid = json.loads(Path("benchmarks/results/dp_peft.json").read_text())
zs = next(r["test_wer"] for r in grid if r["method"] == "zero_shot")
full = next(r["test_wer"] for r in grid if r["method"] == "full" and r["epsilon"] is None)
runs = {"adapters_top2_cliponly": "runs/peft_diag/adapters_top2_cliponly",
        "adapters_top6_nonprivate": "runs/dp_peft_assistant/adapters_top6_nonprivate",
        "adapters_top2_eps8_B1024": "runs/peft_diag/adapters_top2_eps8_B1024",
        "adapters_top2_eps8_B4096": "runs/peft_diag/adapters_top2_eps8_B4096"}
rows = []
for name, d in runs.items():
    res = json.loads((Path(d) / "results.json").read_text())
    cfg = json.loads((Path(d) / "config.json").read_text())
    row = _row("adapters", res, cfg["optim"]["lr"], d, cfg["seed"])
    row.update(name=name, top_blocks=cfg["finetune"]["top_blocks"],
               expected_batch_size=cfg["privacy"]["expected_batch_size"],
               clip_norm=(cfg["privacy"]["policy"] or {}).get("clip_norm"),
               epsilon=cfg["privacy"]["target_epsilon"],
               gap_closed=gap_closed(res["test_wer"], zs, full))
    rows.append(row)
out = {"what": "issue 16 diagnostics: which limit binds DP-PEFT on the assistant domain",
       "zero_shot_wer": zs, "nonprivate_full_wer": full,
       "command": "python tools/collect_peft_diagnostics.py (runs listed in rows[].run_dir; each an ordinary privasr train run)",
       "rows": rows}
Path("benchmarks/results/dp_peft_diagnostics.json").write_text(json.dumps(out, indent=1))
for r in rows:
    print(r["name"], r["top_blocks"], r["expected_batch_size"], r["steps"], r["epsilon"], r["noise_multiplier"], round(r["test_wer"]*100, 1), round(r["gap_closed"], 3), r["step_seconds"])
