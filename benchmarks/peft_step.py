"""Cost of one DP-SGD step vs what is trained: frozen parameters should cost nothing.

    python benchmarks/peft_step.py [--size small] [--batch 16] [--seconds 4] [--rounds 9]
                                   [--warmup 2] [--threads 2] [--device auto] [--engine vectorized]
                                   [--top-blocks K] [--cache | --no-cache]
                                   [--variants ...] [--no-memory] [--out PATH]
    python benchmarks/peft_step.py --memory-variant NAME ...     # internal: one fresh process

Issue 16 (DP-PEFT whose cost scales with what it trains; goal: the best PEFT method's DP step
costs <= 0.5x a DP full fine-tuning step at the same batch), the recommended command:

    python benchmarks/peft_step.py --size small --batch 64 --seconds 3 --top-blocks 2 \\
        --rounds 9 --warmup 2 --threads 2 --out benchmarks/results/peft_step_top2.json

Variants (same weights, same batch, same per-example CTC loss, AdamW(lr=1e-4) step each):

    nonprivate_full  BatchClipGradient(max_norm=5): ordinary step, every parameter trained
    dp_full          ClippedGradient(unit=example, C=1, σ=1, E[B]=batch), every parameter
    dp_bitfit        ... biases + LayerNorm gains + CTC head          (peft=bitfit)
    dp_lora          ... LoRA r=8 on attention + FFN linears + head   (peft=lora)
    dp_rp            ... LoRA with frozen random A (projection) + head (peft=rp)
    dp_adapters      ... residual adapters (dim 32) + head            (peft=adapters)
    dp_head          ... the CTC head only                            (peft=head)

``--top-blocks K`` (default 0: every block) builds bitfit / lora / rp / adapters with
``FinetuneConfig(top_blocks=K)``: they train only in the top K encoder blocks (+ the CTC
head). dp_head is the same for every K (it trains no block).

``--cache`` (default; ``--no-cache`` turns it off): a PEFT variant whose lowest trainable block
is k > 0 (``privasr.peft.frozen_prefix.lowest_trainable_block``: dp_head always, the others with
K > 0) trains as the recipes do with the frozen prefix cached: its timed step runs on the
outputs of the front end + blocks 0..k-1 (computed once before timing, eval mode,
``torch.inference_mode()``; ``Batch.seconds_per_frame`` = 0.04, same targets), with the model set
to start at block k (``start_at``). The one-time cost of that prefix, which the cache amortises
over an epoch's steps, is timed separately (median of 3 calls after one warm-up) and written
per variant in ``variants.NAME.prefix_seconds_per_batch`` (and ``..._per_utt``).
nonprivate_full and dp_full always run the whole model on the audio features.

Before timing, every variant takes one step and the script checks that frozen parameters got
no gradient and did not move (cached variants included: their frozen parameters are still in
the model). Timing follows shared BENCHMARKING.md: warm-up, then round-robin rounds; wall and CPU
time per step (CUDA synchronised); medians, and the median of per-round ratios (and ratio of
medians) to both baselines, dp_full and nonprivate_full. ``goal`` in the JSON names the PEFT
variant (dp_head aside: it trains no encoder weight) with the lowest median per-round wall
ratio to dp_full. Memory: each variant in a fresh process, with the same cache; CPU: VmHWM
(reset after building the model and the cached inputs, where /proc/self/clear_refs allows)
minus the RSS after building, over 3 steps; CUDA: max_memory_allocated over 3 steps minus the
memory allocated after building. Writes benchmarks/results/peft_step.json by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleave import add_step_arguments, interleave, summarize  # noqa: E402
from train_throughput import make_batch  # noqa: E402

from privasr.clipping.policy import ClipPolicy  # noqa: E402
from privasr.clipping.strategy import ClippedGradient  # noqa: E402
from privasr.data.dataset import Batch  # noqa: E402
from privasr.models.conformer import ConformerCTC, config_for  # noqa: E402
from privasr.peft.apply import apply_peft  # noqa: E402
from privasr.peft.frozen_prefix import lowest_trainable_block, start_at  # noqa: E402
from privasr.config import FinetuneConfig  # noqa: E402
from privasr.train.gradient import BatchClipGradient  # noqa: E402
from privasr.models.loss import per_example_ctc  # noqa: E402

VARIANTS = ("nonprivate_full", "dp_full", "dp_bitfit", "dp_lora", "dp_rp", "dp_adapters",
            "dp_head")
BASELINE = "dp_full"
BASELINES = (BASELINE, "nonprivate_full")      # every variant's ratios are given to both
FULL = ("nonprivate_full", "dp_full")          # always the whole model on the audio features
PLACED = ("dp_bitfit", "dp_lora", "dp_rp", "dp_adapters")   # built with top_blocks=K
OUT = Path(__file__).parent / "results" / "peft_step.json"
FT = FinetuneConfig(lora_rank=8, lora_alpha=16, adapter_dim=32)
PREFIX_REPS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def finetune_config(name: str, top_blocks: int = 0) -> FinetuneConfig:
    """The variant's FinetuneConfig: ``FT``, with ``top_blocks`` for the placed PEFT methods."""
    return dataclasses.replace(FT, top_blocks=top_blocks) if name in PLACED else FT


@torch.inference_mode()
def _prefix(model: torch.nn.Module, batch: Batch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        return model.encoder.prefix(batch.feats, batch.feat_lens, k)
    finally:
        model.train(was_training)


def cached_batch(model: torch.nn.Module, batch: Batch, k: int) -> Batch:
    """``batch`` with its features replaced by the frozen front end + blocks 0..k-1's outputs
    (what ``privasr.peft.frozen_prefix.cache_prefix`` stores), the same targets."""
    x, lens = _prefix(model, batch, k)
    x, lens = x.clone(), lens.clone()      # ordinary tensors (autograd may save them)
    spf = batch.frame_seconds * getattr(model, "subsampling", 4)
    return Batch(list(batch.ids), x, lens, batch.targets, batch.target_lens, batch.speakers,
                 seconds_per_frame=spf)


def time_prefix(model: torch.nn.Module, batch: Batch, k: int, device: torch.device,
                reps: int = PREFIX_REPS) -> dict:
    """The one-time cost the cache amortises: the prefix on ``batch`` (one warm-up call, then
    the median of ``reps`` calls; wall seconds, CUDA synchronised)."""
    _prefix(model, batch, k)
    times = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        _prefix(model, batch, k)
        _sync(device)
        times.append(time.perf_counter() - t)
    per_batch = statistics.median(times)
    return {"prefix_seconds_per_batch": per_batch,
            "prefix_seconds_per_utt": per_batch / len(batch), "prefix_raw_s": times}


def build_variant(name: str, size: str, batch: Batch, device: torch.device, engine: str,
                  *, top_blocks: int = 0, cache: bool = True, noise_multiplier: float = 1.0
                  ) -> tuple[torch.nn.Module, Callable[[], None], dict]:
    """The variant's model, its step (one optimizer step on ``batch``, or on the cached prefix
    outputs of ``batch`` when ``cache`` and the lowest trainable block k > 0) and its info
    (``peft_summary`` + ``start_block``, ``cached``, ``finetune_top_blocks``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    model = ConformerCTC(config_for(size, vocab_size=29, dropout=0.0))
    method = name.split("_", 1)[1]
    fc = finetune_config(name, top_blocks)
    info = apply_peft(model, method, fc)
    model.to(device).train()
    k = 0 if name in FULL else lowest_trainable_block(model)
    info.update(lowest_trainable_block=k, finetune_top_blocks=fc.top_blocks,
                cached=bool(cache and k > 0))
    if info["cached"]:
        batch = cached_batch(model, batch, k)
        start_at(model, k)
    info["start_block"] = model.encoder.start_block
    info["step_input_shape"] = list(batch.feats.shape)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if name == "nonprivate_full":
        strat = BatchClipGradient(max_norm=5.0)
    else:
        pol = ClipPolicy(unit="example", clip_norm=1.0, noise_multiplier=noise_multiplier,
                         expected_batch_size=len(batch))
        strat = ClippedGradient(pol, engine=engine)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        strat.fill_grads(model, [batch], per_example_ctc)
        opt.step()

    return model, step, info
def check_frozen(model: torch.nn.Module, step: Callable[[], None]) -> dict:
    """One step: frozen parameters must get no gradient and stay bit-identical."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    step()
    got_grad = [n for n, p in model.named_parameters() if n in frozen and p.grad is not None]
    moved = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    trained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    ok = not got_grad and not moved and not trained
    if not ok:
        raise AssertionError(f"frozen with grad {got_grad[:3]}, frozen moved {moved[:3]}, "
                             f"trainable without grad {trained[:3]}")
    return {"frozen_tensors": len(frozen), "ok": ok}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_child(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    dev = _device(a.device)
    batch = make_batch(a.batch, a.seconds, dev)
    _, step, _ = build_variant(a.memory_variant, a.size, batch, dev, a.engine,
                               top_blocks=a.top_blocks, cache=a.cache)
    out = {"rss_after_build_mib": _status_kb("VmRSS") / 1024,
           "vmhwm_reset_after_build": _reset_hwm()}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    _sync(dev)
    out["vmhwm_mib"] = _status_kb("VmHWM") / 1024
    out["peak_minus_build_mib"] = out["vmhwm_mib"] - out["rss_after_build_mib"]
    if dev.type == "cuda":
        out["cuda_peak_minus_build_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    print("MEMORY_JSON " + json.dumps(out))


def measure_memory(a: argparse.Namespace, variants: list[str]) -> dict:
    out = {}
    for v in variants:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-variant", v,
               "--size", a.size, "--batch", str(a.batch), "--seconds", str(a.seconds),
               "--threads", str(a.threads), "--device", a.device, "--engine", a.engine,
               "--top-blocks", str(a.top_blocks), "--cache" if a.cache else "--no-cache"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("MEMORY_JSON ")]
        out[v] = (json.loads(line[-1].split(" ", 1)[1]) if not r.returncode and line
                  else {"error": (r.stderr or r.stdout)[-2000:]})
        key = "cuda_peak_minus_build_mib" if "cuda_peak_minus_build_mib" in out[v] else \
            "peak_minus_build_mib"
        print(f"  memory {v:>15}: " + (f"{out[v][key]:.0f} MiB above build ({key})"
                                       if "error" not in out[v] else "FAILED"), flush=True)
    return out


def summarize_baselines(raw: dict[str, dict[str, list[float]]],
                        baselines: tuple[str, ...] = BASELINES) -> dict[str, dict]:
    """``interleave.summarize`` with the ratios to every baseline that ran (the first one's
    result, plus the ``..._to_{baseline}`` keys of the others)."""
    res = summarize(raw, baselines[0])
    for b in baselines[1:]:
        for v, r in summarize(raw, b).items():
            res[v].update({key: x for key, x in r.items() if key.endswith(f"_to_{b}")})
    return res


def best_peft(summary: list[dict]) -> dict | None:
    """The PEFT variant (dp_head aside) with the lowest median per-round wall ratio to dp_full,
    against issue 16's goal (<= 0.5)."""
    key = f"wall_ratio_to_{BASELINE}"
    rows = [r for r in summary if r["variant"] not in FULL + ("dp_head",)
            and r.get(key) is not None]
    if not rows:
        return None
    best = min(rows, key=lambda r: r[key])
    return {"best_peft_variant": best["variant"], key: best[key],
            "wall_ratio_to_nonprivate_full": best.get("wall_ratio_to_nonprivate_full"),
            "target": 0.5, "met": best[key] <= 0.5, "excluding": ["dp_head"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    add_step_arguments(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--engine", default="auto", help="clipping engine of the DP variants")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--top-blocks", type=int, default=0,
                    help="bitfit/lora/rp/adapters train only in the top K blocks (0: all)")
    ap.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                    help="PEFT variants with a frozen prefix train on its cached outputs")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    if a.memory_variant:
        return memory_child(a)

    torch.set_num_threads(a.threads)
    dev = _device(a.device)
    batch = make_batch(a.batch, a.seconds, dev)
    info: dict = {
        "benchmark": "peft_step",
        "command": " ".join(["python"] + (sys.argv if argv is None else [sys.argv[0], *argv])),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": str(dev),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "settings": {"model": a.size, "batch": a.batch, "seconds_per_utt": a.seconds,
                     "frames": batch.feats.shape[1], "rounds": a.rounds, "warmup": a.warmup,
                     "engine": a.engine, "clip_norm": 1.0, "noise_multiplier": 1.0,
                     "optimizer": "AdamW(lr=1e-4) over trainable parameters",
                     "top_blocks": a.top_blocks, "cache": a.cache,
                     "top_blocks_applies_to": list(PLACED),
                     "finetune": vars(finetune_config(PLACED[0], a.top_blocks)),
                     "baselines": list(BASELINES)},
    }
    steps, variants = {}, {}
    for v in a.variants:
        model, steps[v], bi = build_variant(v, a.size, batch, dev, a.engine,
                                            top_blocks=a.top_blocks, cache=a.cache)
        bi["frozen_check"] = check_frozen(model, steps[v])
        if bi["cached"]:              # the one-time cost, from the audio features
            bi.update(time_prefix(model, batch, bi["lowest_trainable_block"], dev))
        variants[v] = bi
        print(f"  {v:>15}: {bi['trainable_params']:>10,} trainable of {bi['total_params']:,}"
              + (f"; cached prefix (front end + {bi['start_block']} blocks) "
                 f"{bi['prefix_seconds_per_batch']:.3f}s/batch once" if bi["cached"] else ""),
              flush=True)
    info["variants"] = variants
    names = list(steps)
    print(f"warm-up ({a.warmup} steps each), then {a.rounds} interleaved rounds ...")

    res = summarize_baselines(interleave(steps, a.rounds, a.warmup, sync=lambda: _sync(dev)))
    info["results"] = res
    if not a.no_memory:
        info["memory"] = measure_memory(a, names)
    info["summary"] = [
        {"variant": v, "trainable_params": variants[v]["trainable_params"],
         "start_block": variants[v]["start_block"],
         "median_wall_s": res[v]["median_wall_s"],
         **{f"wall_ratio_to_{b}": res[v].get(f"median_round_ratio_wall_s_to_{b}")
            for b in BASELINES},
         **{f"cpu_ratio_to_{b}": res[v].get(f"median_round_ratio_cpu_s_to_{b}")
            for b in BASELINES},
         "prefix_seconds_per_batch": variants[v].get("prefix_seconds_per_batch"),
         "memory_mib": (info.get("memory", {}).get(v, {}).get("cuda_peak_minus_build_mib")
                        or info.get("memory", {}).get(v, {}).get("peak_minus_build_mib"))}
        for v in names]
    info["goal"] = best_peft(info["summary"])
    for row in info["summary"]:
        print(json.dumps(row))
    print("goal " + json.dumps(info["goal"]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
