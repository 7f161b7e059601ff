"""Cost of one DP-SGD step vs what is trained: frozen parameters should cost nothing.

    python benchmarks/peft_step.py [--size small] [--batch 16] [--seconds 4] [--rounds 9]
                                   [--warmup 2] [--threads 2] [--device auto] [--engine vectorized]
                                   [--variants ...] [--no-memory]
    python benchmarks/peft_step.py --memory-variant NAME ...     # internal: one fresh process

Variants (same weights, same batch, same per-example CTC loss, AdamW(lr=1e-4) step each):

    nonprivate_full  BatchClipGradient(max_norm=5): ordinary step, every parameter trained
    dp_full          ClippedGradient(unit=example, C=1, σ=1, E[B]=batch), every parameter
    dp_bitfit        ... biases + LayerNorm gains + CTC head          (peft=bitfit)
    dp_lora          ... LoRA r=8 on attention + FFN linears + head   (peft=lora)
    dp_rp            ... LoRA with frozen random A (projection) + head (peft=rp)
    dp_adapters      ... residual adapters (dim 32) + head            (peft=adapters)
    dp_head          ... the CTC head only                            (peft=head)

Before timing, every DP variant takes one step and the script checks that frozen parameters got
no gradient and did not move. Timing follows shared BENCHMARKING.md: warm-up, then round-robin
rounds; wall and CPU time per step (CUDA synchronised); medians, and the median of per-round
ratios to dp_full. Memory: each variant in a fresh process; CPU: VmHWM minus the RSS after
building the model, over 3 steps; CUDA: max_memory_allocated over 3 steps minus the memory
allocated after building. Writes benchmarks/results/peft_step.json.
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
from privasr.config import FinetuneConfig  # noqa: E402
from privasr.train.gradient import BatchClipGradient  # noqa: E402
from privasr.models.loss import per_example_ctc  # noqa: E402

VARIANTS = ("nonprivate_full", "dp_full", "dp_bitfit", "dp_lora", "dp_rp", "dp_adapters",
            "dp_head")
BASELINE = "dp_full"
OUT = Path(__file__).parent / "results" / "peft_step.json"
FT = FinetuneConfig(lora_rank=8, lora_alpha=16, adapter_dim=32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_variant(name: str, size: str, batch: Batch, device: torch.device, engine: str
                  ) -> tuple[torch.nn.Module, Callable[[], None], dict]:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    torch.manual_seed(0)
    model = ConformerCTC(config_for(size, vocab_size=29, dropout=0.0))
    method = name.split("_", 1)[1]
    info = apply_peft(model, method, FT)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if name == "nonprivate_full":
        strat = BatchClipGradient(max_norm=5.0)
    else:
        pol = ClipPolicy(unit="example", clip_norm=1.0, noise_multiplier=1.0,
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


def memory_child(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    dev = _device(a.device)
    batch = make_batch(a.batch, a.seconds, dev)
    _, step, _ = build_variant(a.memory_variant, a.size, batch, dev, a.engine)
    out = {"rss_after_build_mib": _status_kb("VmRSS") / 1024}
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
               "--threads", str(a.threads), "--device", a.device, "--engine", a.engine]
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("MEMORY_JSON ")]
        out[v] = (json.loads(line[-1].split(" ", 1)[1]) if not r.returncode and line
                  else {"error": (r.stderr or r.stdout)[-2000:]})
        key = "cuda_peak_minus_build_mib" if "cuda_peak_minus_build_mib" in out[v] else \
            "peak_minus_build_mib"
        print(f"  memory {v:>15}: " + (f"{out[v][key]:.0f} MiB above build ({key})"
                                       if "error" not in out[v] else "FAILED"), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    add_step_arguments(ap)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--engine", default="auto", help="clipping engine of the DP variants")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    if a.memory_variant:
        return memory_child(a)

    torch.set_num_threads(a.threads)
    dev = _device(a.device)
    batch = make_batch(a.batch, a.seconds, dev)
    info: dict = {
        "benchmark": "peft_step",
        "command": " ".join(["python"] + sys.argv),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": str(dev),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "settings": {"model": a.size, "batch": a.batch, "seconds_per_utt": a.seconds,
                     "frames": batch.feats.shape[1], "rounds": a.rounds, "warmup": a.warmup,
                     "engine": a.engine, "clip_norm": 1.0, "noise_multiplier": 1.0,
                     "optimizer": "AdamW(lr=1e-4) over trainable parameters",
                     "finetune": vars(FT)},
    }
    steps, variants = {}, {}
    for v in a.variants:
        model, steps[v], bi = build_variant(v, a.size, batch, dev, a.engine)
        bi["frozen_check"] = check_frozen(model, steps[v])
        variants[v] = bi
        print(f"  {v:>15}: {bi['trainable_params']:>10,} trainable of {bi['total_params']:,}",
              flush=True)
    info["variants"] = variants
    names = list(steps)
    print(f"warm-up ({a.warmup} steps each), then {a.rounds} interleaved rounds ...")

    res = summarize(interleave(steps, a.rounds, a.warmup, sync=lambda: _sync(dev)), BASELINE)
    info["results"] = res
    if not a.no_memory:
        info["memory"] = measure_memory(a, names)
    info["summary"] = [
        {"variant": v, "trainable_params": variants[v]["trainable_params"],
         "median_wall_s": res[v]["median_wall_s"],
         f"wall_ratio_to_{BASELINE}": res[v].get(f"median_round_ratio_wall_s_to_{BASELINE}"),
         "memory_mib": (info.get("memory", {}).get(v, {}).get("cuda_peak_minus_build_mib")
                        or info.get("memory", {}).get(v, {}).get("peak_minus_build_mib"))}
        for v in names]
    for row in info["summary"]:
        print(json.dumps(row))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
