"""End-to-end training throughput: audio-seconds trained per wall-second, DP recipe vs the
non-private recipe, through ``privasr train`` on the embedded corpus.

    python benchmarks/e2e_throughput.py [--recipes nonprivate dpsgd_eps8] [--steps 60]
                                        [--repeats 2] [--threads 2] [--work runs/e2e_throughput]

Unlike ``clipping_overhead.py`` (one fixed batch, one step), this times what a user's run
does per step: data loading and collation, SpecAugment, Poisson sampling, per-example clipping
in physical chunks, secure noise, the ledger, the optimizer. Every recipe runs ``--steps``
optimizer steps from scratch (no dev evaluation until the last step, one checkpoint at the
end), ``--repeats`` times, alternating recipes (A B A B: the machine's drift hits both). The
rate is the trainer's own ``audio_s_per_s`` of each logging window after the first
(``log_every`` steps each; it excludes evaluation and checkpoints); the DP recipe runs with
``privacy.log_private_stats=true`` so that its train.csv carries the rate (a statistic of
the private batches: fine for a benchmark on the synthetic corpus, not for a release).
Writes benchmarks/results/e2e_throughput.json: every window's rate, medians with their
spread, and the ratio of medians DP / non-private.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from interleave import spread  # noqa: E402

OUT = Path(__file__).parent / "results" / "e2e_throughput.json"


def run_once(recipe: str, out_dir: Path, steps: int, threads: int, log_every: int,
             extra: list[str]) -> dict:
    """One fresh ``privasr train`` run of ``steps`` steps; its windows' audio_s_per_s."""
    if out_dir.exists():
        import shutil
        shutil.rmtree(out_dir)
    private = recipe != "nonprivate"
    cmd = [sys.executable, "-m", "privasr.cli", "train", recipe, f"out_dir={out_dir}",
           f"optim.max_steps={steps}", f"eval_every={10 ** 9}", f"ckpt_every={10 ** 9}",
           f"log_every={log_every}", "progress=false", f"threads={threads}",
           "data.max_dev_utts=8"] + (["privacy.log_private_stats=true"] if private else []) + extra
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(r.stderr or r.stdout)[-3000:]}")
    rows = list(csv.DictReader(open(out_dir / "train.csv")))
    rates = [float(row["audio_s_per_s"]) for row in rows if row.get("audio_s_per_s")]
    res = json.loads((out_dir / "results.json").read_text())
    return {"rates_audio_s_per_s": rates[1:], "first_window_dropped": rates[:1],
            "step_seconds_median": res.get("step_seconds"), "process_wall_s": wall,
            "train_wall_s": res.get("train_wall_seconds"), "steps": res.get("steps"),
            "privacy": (res.get("privacy") or {}).get("summary")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="+", default=["nonprivate", "dpsgd_eps8"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/e2e_throughput")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("overrides", nargs="*", help="key=value for every recipe (e.g. device=cuda)")
    a = ap.parse_args()
    work = Path(a.work)
    runs: dict[str, list[dict]] = {r: [] for r in a.recipes}
    for k in range(a.repeats):
        for recipe in a.recipes:
            print(f"repeat {k + 1}/{a.repeats}: {recipe}, {a.steps} steps ...", flush=True)
            one = run_once(recipe, work / f"{recipe}-{k}", a.steps, a.threads, a.log_every,
                           a.overrides)
            runs[recipe].append(one)
            print(f"  median {statistics.median(one['rates_audio_s_per_s']):.1f} audio-s/s "
                  f"({len(one['rates_audio_s_per_s'])} windows)", flush=True)
    summary = {}
    for recipe, rs in runs.items():
        rates = [x for r in rs for x in r["rates_audio_s_per_s"]]
        summary[recipe] = {"audio_s_per_s": spread(rates),
                           "per_repeat_median": [statistics.median(r["rates_audio_s_per_s"])
                                                 for r in rs]}
    base = a.recipes[0]
    for recipe in a.recipes[1:]:
        summary[recipe]["throughput_ratio_to_" + base] = (
            summary[recipe]["audio_s_per_s"]["median"] / summary[base]["audio_s_per_s"]["median"])
        summary[recipe]["slowdown_vs_" + base] = 1 / summary[recipe]["throughput_ratio_to_" + base]
    info = {"benchmark": "e2e_throughput",
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cores_available": len(os.sched_getaffinity(0))},
            "settings": {"steps": a.steps, "repeats": a.repeats, "log_every": a.log_every,
                         "threads": a.threads, "overrides": a.overrides,
                         "order": "alternating recipes per repeat, fresh out_dir each run"},
            "summary": summary, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(info, indent=1))
    for recipe in a.recipes:
        s = summary[recipe]
        extra = (f", {s['slowdown_vs_' + base]:.2f}x slower than {base}"
                 if recipe != base else "")
        print(f"{recipe:>14}: {s['audio_s_per_s']['median']:.1f} audio-s/s (IQR "
              f"{s['audio_s_per_s']['q1']:.1f}-{s['audio_s_per_s']['q3']:.1f}){extra}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
