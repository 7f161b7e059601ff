"""Seconds of audio trained per wall-second, for each model size, on this machine.

    python benchmarks/train_throughput.py [--sizes small] [--rounds 7] [--device auto]

Builds a fixed synthetic batch (same shapes, content and seed for every variant), runs
warm-up steps, then interleaves the variants round-robin (see shared BENCHMARKING.md) and
writes benchmarks/results/train_throughput.json with every round's raw times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privasr.data.dataset import Batch  # noqa: E402
from privasr.models.conformer import ConformerCTC, config_for, count_parameters  # noqa: E402
from privasr.train.gradient import BatchClipGradient  # noqa: E402
from privasr.models.loss import per_example_ctc  # noqa: E402
from privasr.train.host_memory import host_allocator, keep_freed_memory  # noqa: E402


def make_batch(batch_size: int, seconds: float, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    T = int(seconds * 100)
    feats = torch.randn(batch_size, T, 80, generator=g)
    lens = torch.full((batch_size,), T)
    S = int(seconds * 14)  # ~14 characters per second, like the corpus
    targets = torch.randint(1, 29, (batch_size, S), generator=g)
    return Batch([str(i) for i in range(batch_size)], feats, lens, targets,
                 torch.full((batch_size,), S)).to(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["small"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--malloc", choices=("keep", "system"), default="keep",
                    help="keep: freed host memory stays in the process, as in privasr training")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    a = ap.parse_args()
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    if a.malloc == "keep":
        keep_freed_memory()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    batch = make_batch(a.batch, a.seconds, dev)
    models = {}
    for s in a.sizes:
        torch.manual_seed(0)
        m = ConformerCTC(config_for(s, vocab_size=29)).to(dev)
        models[s] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4))
    strat = BatchClipGradient(max_norm=5.0)

    def step(name: str) -> tuple[float, float]:
        m, opt = models[name]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if a.bf16 and dev.type == "cuda" \
            else torch.autocast("cpu", enabled=False)
        with ctx:
            strat.fill_grads(m, [batch], per_example_ctc)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - w, time.process_time() - c

    for s in a.sizes:
        for _ in range(a.warmup):
            step(s)
    raw = {s: [] for s in a.sizes}
    for _ in range(a.rounds):
        for s in a.sizes:
            raw[s].append(step(s))
    audio = a.batch * a.seconds
    results = {}
    for s in a.sizes:
        wall = statistics.median(t for t, _ in raw[s])
        cpu = statistics.median(c for _, c in raw[s])
        results[s] = {"params": count_parameters(models[s][0]), "median_step_wall_s": wall,
                      "median_step_cpu_s": cpu, "audio_seconds_per_wall_second": audio / wall,
                      "raw_wall_s": [t for t, _ in raw[s]], "raw_cpu_s": [c for _, c in raw[s]]}
        print(f"{s:>6}: {results[s]['params'] / 1e6:.2f}M params, step {wall:.3f} s wall "
              f"({cpu:.3f} s CPU), {audio / wall:.1f} audio-s per s "
              f"(batch {a.batch} x {a.seconds:.0f} s)")
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(dev),
            "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
            "threads": threads, "batch": a.batch, "seconds_per_utt": a.seconds,
            "rounds": a.rounds, "warmup": a.warmup, "bf16": a.bf16, "host_allocator": host_allocator(),
            "results": results}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
