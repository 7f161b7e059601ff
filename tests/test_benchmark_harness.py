"""The benchmark harness (benchmarks/interleave.py): variants timed round-robin, each in its own
worker process, with the per-round ratios' spread."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from interleave import interleave_processes, spread  # noqa: E402


def make_sleep_step(name: str, settings: dict):
    """A worker's (step, sync): sleep for the variant's time."""
    seconds = settings[name]
    return (lambda: time.sleep(seconds)), (lambda: None)


def test_each_variant_runs_in_its_own_process_round_robin():
    raw = interleave_processes("test_benchmark_harness:make_sleep_step", ["a", "b"],
                               {"a": 0.01, "b": 0.04}, rounds=5, warmup=1)
    assert set(raw) == {"a", "b"} and all(len(raw[v]["wall_s"]) == 5 for v in raw)
    ratios = [b / a for a, b in zip(raw["a"]["wall_s"], raw["b"]["wall_s"])]
    s = spread(ratios)
    assert 2.0 < s["median"] < 5.0 and s["q1"] <= s["median"] <= s["q3"]
    assert max(raw["a"]["cpu_s"]) < 0.01          # sleeping costs no CPU time in the worker
