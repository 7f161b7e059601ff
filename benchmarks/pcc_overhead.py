"""The cost of per-core clipping: a plain DDP step vs PCC and APCC steps, K processes, one run.

    python benchmarks/pcc_overhead.py                       # 2 CPU processes (gloo), small model
    python benchmarks/pcc_overhead.py --threads 4 --rounds 15 --batch 32
    python benchmarks/pcc_overhead.py --device cuda --nproc 1   # NCCL, one GPU per process

Relaunches itself under ``python -m torch.distributed.run --nproc_per_node=NPROC``. Each rank
holds the same model (seed 0) and its own fixed local batch (global batch ``--batch`` split
evenly; content seeded by the rank), identical for every variant:

    ddp   DistributedDataParallel: forward, backward (bucketed all-reduce overlapped with it)
    pcc   PerCoreGradient, fixed bound: backward into a flat buffer, local norm, scale, ONE
          all-reduce (privasr.clipping.percore)
    apcc  PerCoreGradient, bound=adaptive_min (same single all-reduce)

each followed by the same AdamW step. Before timing, the variants are checked numerically:
PCC with an infinite bound must equal DDP's average, and PCC/APCC must equal
mean_k g_k·min(1, C/‖g_k‖) computed from all-gathered local gradients. Then warm-up, and the
variants run round-robin (BENCHMARKING.md); a step's time is the slowest rank's. Writes
``benchmarks/results/pcc_overhead.json``: every round's raw wall and CPU times, and
``pcc_vs_ddp`` / ``apcc_vs_ddp`` = median of per-round wall-time ratios (target ≤ 1.03).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from interleave import interleave, summarize  # noqa: E402

VARIANTS = ("ddp", "pcc", "apcc")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per process (0: available cores // nproc)")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=16, help="global batch (split over ranks)")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per utterance")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pcc_overhead.json"))
    return ap.parse_args()


def launch(a: argparse.Namespace) -> int:
    if a.threads == 0:
        a.threads = max(1, len(os.sched_getaffinity(0)) // a.nproc)
        sys.argv += ["--threads", str(a.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={a.nproc}", __file__, *sys.argv[1:]]
    return subprocess.call(cmd, env=env)


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from privasr.clipping.percore import PerCoreGradient
    from privasr.clipping.policy import ClipPolicy
    from privasr.data.dataset import Batch
    from privasr.models.conformer import ConformerCTC, config_for, count_parameters
    from privasr.train.distributed import init_distributed
    from privasr.models.loss import checked, per_example_ctc

    torch.set_num_threads(a.threads)
    ctx = init_distributed(torch.device(a.device))
    rank, k, dev = ctx.rank, ctx.world_size, ctx.device
    if a.batch % k:
        raise SystemExit(f"--batch {a.batch} must be a multiple of the {k} processes")
    torch.manual_seed(0)
    model = ConformerCTC(config_for(a.size, vocab_size=29, dropout=0.0)).to(dev)
    ddp = DDP(model)                                       # broadcasts rank 0's parameters
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)   # same (negligible) drift for all
    loss_fn = checked(per_example_ctc)

    g = torch.Generator().manual_seed(1000 + rank)
    n, t, s = a.batch // k, int(a.seconds * 100), int(a.seconds * 14)
    batch = Batch([f"r{rank}u{i}" for i in range(n)], torch.randn(n, t, 80, generator=g),
                  torch.full((n,), t), torch.randint(1, 29, (n, s), generator=g),
                  torch.full((n,), s)).to(dev)

    def flat_grad() -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    # -- numerical checks -------------------------------------------------------------------
    model.zero_grad(set_to_none=True)
    with ddp.no_sync():
        loss_fn(ddp, batch).mean().backward()
    local = flat_grad()
    every = [torch.empty_like(local) for _ in range(k)]
    dist.all_gather(every, local)
    # float64: a float32 norm over millions of entries is off by ~1e-4 on CPU (measured)
    norms = torch.stack([e.double().norm() for e in every]).float()
    c = float(norms.log().mean().exp())          # between the cores' norms: some are clipped
    strategies = {
        "pcc": PerCoreGradient(ClipPolicy(unit="core", num_cores=k, clip_norm=c)),
        "apcc": PerCoreGradient(ClipPolicy(unit="core", num_cores=k, bound="adaptive_min",
                                           clip_norm=None)),
    }
    checks = {}
    model.zero_grad(set_to_none=True)
    loss_fn(ddp, batch).mean().backward()
    ddp_grad = flat_grad()
    model.zero_grad(set_to_none=True)
    PerCoreGradient(ClipPolicy(unit="core", num_cores=k, clip_norm=1e30)).fill_grads(
        model, [batch], loss_fn)
    checks["unclipped_pcc_vs_ddp"] = float((flat_grad() - ddp_grad).abs().max()
                                           / ddp_grad.abs().max())
    for name, bound in (("pcc", torch.full_like(norms, c)), ("apcc", norms.min().expand(k))):
        want = sum(e * min(1.0, float(b / nk)) for e, b, nk in zip(every, bound, norms)) / k
        model.zero_grad(set_to_none=True)
        strategies[name].fill_grads(model, [batch], loss_fn)
        checks[f"{name}_vs_formula"] = float((flat_grad() - want).abs().max() / want.abs().max())
    bad = {kk: v for kk, v in checks.items() if not v <= 1e-5}
    if bad:
        raise SystemExit(f"numerical check failed (max relative difference): {bad}")

    # -- timing (benchmarks/interleave.py; rank 0's record is the one written) ----------------
    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()            # before: all ranks start together; after: the step ends with
                                  # the slowest rank (a barrier's latency, same for all variants)

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            if name == "ddp":
                loss_fn(ddp, batch).mean().backward()
            else:
                strategies[name].fill_grads(model, [batch], loss_fn)
            opt.step()
        return run

    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    raw = interleave({v: step(v) for v in VARIANTS}, a.rounds, a.warmup, sync)
    if rank != 0:
        dist.destroy_process_group()
        return
    timing = summarize(raw, "ddp")
    summary = {}
    for v in ("pcc", "apcc"):
        summary[f"{v}_vs_ddp"] = timing[v]["median_round_ratio_wall_s_to_ddp"]
        summary[f"{v}_vs_ddp_ratio_of_medians"] = timing[v]["ratio_of_medians_wall_s_to_ddp"]
        summary[f"{v}_vs_ddp_cpu"] = timing[v]["median_round_ratio_cpu_s_to_ddp"]
    result = {
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "cores_available": len(os.sched_getaffinity(0)), "nproc": k,
        "threads_per_process": a.threads, "backend": dist.get_backend(),
        "model": a.size, "params": count_parameters(model), "global_batch": a.batch,
        "seconds_per_utt": a.seconds, "rounds": a.rounds, "warmup": a.warmup,
        "pcc_clip_norm": c, "checks_max_rel_diff": checks, "target": 1.03,
        **summary,
        "median_step_wall_s": {v: timing[v]["median_wall_s"] for v in VARIANTS},
        "variants": timing,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({kk: result[kk] for kk in ("pcc_vs_ddp", "apcc_vs_ddp",
                                                 "median_step_wall_s", "checks_max_rel_diff")},
                     indent=1))
    print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    args = parse()
    if "WORLD_SIZE" in os.environ:
        worker(args)
    else:
        sys.exit(launch(args))
