"""Round-robin timing of benchmark variants (shared BENCHMARKING.md): warm-up, then rounds
A, B, C, A, B, C, ...; wall and CPU time per step; medians and per-round ratios to a baseline."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable


def add_step_arguments(ap: argparse.ArgumentParser) -> None:
    """The model / batch / timing options every step benchmark shares."""
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)


def interleave(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
               sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, list[float]]]:
    """{variant: {"wall_s": [...], "cpu_s": [...]}} over ``rounds`` interleaved rounds."""

    def timed(v: str) -> tuple[float, float]:
        sync()
        w, c = time.perf_counter(), time.process_time()
        steps[v]()
        sync()
        return time.perf_counter() - w, time.process_time() - c

    for v in steps:
        for _ in range(warmup):
            timed(v)
    raw = {v: {"wall_s": [], "cpu_s": []} for v in steps}
    for r in range(rounds):
        for v in steps:
            w, c = timed(v)
            raw[v]["wall_s"].append(w)
            raw[v]["cpu_s"].append(c)
        print(f"  round {r + 1}/{rounds}: " +
              "  ".join(f"{v} {raw[v]['wall_s'][-1]:.3f}s" for v in steps), flush=True)
    return raw


def summarize(raw: dict[str, dict[str, list[float]]], baseline: str | None) -> dict[str, dict]:
    """Raw times, medians, and (if ``baseline`` ran) median per-round ratio and ratio of
    medians to it, for wall and CPU time."""
    res = {v: {"raw_wall_s": r["wall_s"], "raw_cpu_s": r["cpu_s"],
               "median_wall_s": statistics.median(r["wall_s"]),
               "median_cpu_s": statistics.median(r["cpu_s"])} for v, r in raw.items()}
    if baseline in raw:
        b = raw[baseline]
        for v in raw:
            for k in ("wall_s", "cpu_s"):
                res[v][f"median_round_ratio_{k}_to_{baseline}"] = statistics.median(
                    x / y for x, y in zip(raw[v][k], b[k]))
                res[v][f"ratio_of_medians_{k}_to_{baseline}"] = (
                    res[v][f"median_{k}"] / res[baseline][f"median_{k}"])
    return res
