"""benchmarks/gpu_dp_step.sh -- the issue's GPU measurement as one command -- runs end to end
with DEVICE=cpu (tiny model, one round), so a session that is lent a GPU only has to run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_runs_on_cpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", SIZE="tiny", BATCH="2",
               ROUNDS="1", WARMUP="0", THREADS="1", E2E_STEPS="0", OUT=str(tmp_path),
               BENCH_ARGS="--no-memory --no-check")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_dp_step.sh")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "clipping_overhead_cpu_tiny_bf16.json").read_text())
    assert info["settings"]["bf16_autocast"] is True and info["settings"]["model"] == "tiny"
    assert set(info["results"]) == {"nonprivate", "per_example", "per_example_secure",
                                    "opacus_hooks", "opacus_ghost"}
    assert all(r["median_wall_s"] > 0 for r in info["results"].values())
    assert info["summary"]["per_example_vs_nonprivate"] > 0
    phases = info["profile_per_example"]["phases_s_per_step"]
    assert phases["privasr::per_example_grads(fwd+bwd)"] > 0
    assert info["profile_nonprivate"]["top_ops_by_self_cpu"]
