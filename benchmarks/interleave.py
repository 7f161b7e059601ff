"""Round-robin timing of benchmark variants (shared BENCHMARKING.md): warm-up, then rounds
A, B, C, A, B, C, ...; wall and CPU time per step; medians and per-round ratios to a baseline.

``interleave`` runs every variant in this process. ``interleave_processes`` runs each variant
in its own worker process (spawned, one at a time: the parent waits for each step), still
round-robin: measured on a 2-core CPU, a variant's step time in one shared process depends on
which other variants ran before it (after an Opacus step the non-private step was ~20 %
slower: allocator and cache state carry over), so the ratio of medians moved from 1.20 to 1.61
with the set of variants. Isolated workers remove that coupling.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import statistics
import time
from typing import Any, Callable


def add_step_arguments(ap: argparse.ArgumentParser) -> None:
    """The model / batch / timing options every step benchmark shares."""
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=("keep", "system"), default="keep",
                    help="keep: privasr's training setting (privasr.train.host_memory, freed "
                         "host memory stays in the process); system: glibc's defaults")


def interleave(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
               sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, list[float]]]:
    """{variant: {"wall_s": [...], "cpu_s": [...]}} over ``rounds`` interleaved rounds."""

    def timed(v: str) -> tuple[float, float]:
        sync()
        w, c = time.perf_counter(), time.process_time()
        steps[v]()
        sync()
        return time.perf_counter() - w, time.process_time() - c

    return round_robin(list(steps), timed, rounds, warmup)


def round_robin(names: list[str], timed: Callable[[str], tuple[float, float]], rounds: int,
                warmup: int) -> dict[str, dict[str, list[float]]]:
    """Warm-up steps of every variant, then ``rounds`` rounds A, B, C, ...; ``timed(v)`` runs
    one step of v and returns its (wall, CPU) seconds."""
    for v in names:
        for _ in range(warmup):
            timed(v)
    raw = {v: {"wall_s": [], "cpu_s": []} for v in names}
    for r in range(rounds):
        for v in names:
            w, c = timed(v)
            raw[v]["wall_s"].append(w)
            raw[v]["cpu_s"].append(c)
        print(f"  round {r + 1}/{rounds}: " +
              "  ".join(f"{v} {raw[v]['wall_s'][-1]:.3f}s" for v in names), flush=True)
    return raw


def _worker(factory: str, name: str, settings: dict[str, Any], conn) -> None:
    """A variant's process: build its step with ``module:function(name, settings)`` (which
    returns (step, sync)), then time one step per request until told to stop."""
    module, func = factory.split(":")
    if settings.get("malloc", "keep") == "keep":
        from privasr.train.host_memory import keep_freed_memory
        keep_freed_memory()
    step, sync = getattr(importlib.import_module(module), func)(name, settings)
    conn.send("ready")
    while conn.recv() == "step":
        sync()
        w, c = time.perf_counter(), time.process_time()
        step()
        sync()
        conn.send((time.perf_counter() - w, time.process_time() - c))
    conn.close()


def interleave_processes(factory: str, names: list[str], settings: dict[str, Any], rounds: int,
                         warmup: int) -> dict[str, dict[str, list[float]]]:
    """``interleave``'s rounds with every variant in its own spawned process (see the module
    docstring); ``factory`` = "module:function" building a variant's (step, sync)."""
    ctx = mp.get_context("spawn")
    workers = {}
    for v in names:
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(factory, v, settings, theirs), daemon=True)
        proc.start()
        workers[v] = (proc, mine)
    for v, (_, conn) in workers.items():
        if conn.recv() != "ready":
            raise RuntimeError(f"variant {v}: worker did not start")

    def timed(v: str) -> tuple[float, float]:
        conn = workers[v][1]
        conn.send("step")
        return conn.recv()

    try:
        raw = round_robin(names, timed, rounds, warmup)
    finally:
        for proc, conn in workers.values():
            conn.send("stop")
            proc.join(timeout=60)
    return raw


def spread(xs: list[float]) -> dict[str, float]:
    """Median and interquartile range (the spread a quoted median comes with)."""
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs),
            "max": max(xs)}


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
