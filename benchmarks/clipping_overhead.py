"""Cost of per-example clipping: privasr vs a non-private step vs Opacus 1.6, side by side.

    python benchmarks/clipping_overhead.py [--size small] [--rounds 9] [--warmup 2] [--threads 2]
                                           [--profile] [--no-memory]
    python benchmarks/clipping_overhead.py --memory-variant NAME     # internal: one fresh process

Variants (same model init, same batch, same per-example CTC loss, AdamW(lr=1e-4) step each):

    nonprivate      BatchClipGradient(max_norm=5) -- mean loss, global-norm clipping
    per_example     ClippedGradient(unit=example, C=1, sigma=1, E[B]=16, engine="bookkeeping")
    per_example_secure  as per_example with secure_noise=True (the CSPRNG noise of a DP run)
    microbatch      ClippedGradient(unit=microbatch, m=4, C=1, sigma=1, E[B]=16, "bookkeeping")
    per_example_vmap  as per_example with engine="vectorized" (vmap per-example gradients)
    opacus_hooks    Opacus PrivacyEngine.make_private(grad_sample_mode="hooks"), C=1, sigma=1
    opacus_ghost    Opacus PrivacyEngine.make_private(grad_sample_mode="ghost", criterion=CTC)

Before timing, the per-example clipped gradient (sigma=0) of both Opacus modes is compared with
privasr's on the same batch and weights. Timing follows shared BENCHMARKING.md: warm-up, then
round-robin rounds; wall and CPU (process_time) per step; medians, median of per-round ratios
and ratio of medians. Peak memory: every variant in a fresh subprocess, VmHWM minus the RSS
after building the model, over 3 steps. Writes benchmarks/results/clipping_overhead.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="Full backward hook is firing")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from interleave import (add_step_arguments, interleave, interleave_processes,  # noqa: E402
                        spread)
from train_throughput import make_batch  # noqa: E402

from privasr.clipping.policy import ClipPolicy  # noqa: E402
from privasr.clipping.strategy import ClippedGradient  # noqa: E402
from privasr.data.dataset import Batch  # noqa: E402
from privasr.models.conformer import ConformerCTC, config_for, count_parameters  # noqa: E402
from privasr.train.gradient import BatchClipGradient  # noqa: E402
from privasr.models.loss import per_example_ctc  # noqa: E402
from privasr.train.host_memory import keep_freed_memory  # noqa: E402

VARIANTS = ("nonprivate", "per_example", "per_example_secure", "microbatch", "per_example_vmap",
            "opacus_hooks",
            "opacus_ghost")
ENGINE = "bookkeeping"      # privasr's per-example engine for per_example / microbatch
BASELINE = "nonprivate"
OUT = Path(__file__).parent / "results" / "clipping_overhead.json"      # CPU
OUT_CUDA = Path(__file__).parent / "results" / "clipping_overhead_cuda.json"
DEVICE = torch.device("cpu")          # set by --device
BF16 = False                          # set by --bf16: the forward under bf16 autocast


def _amp():
    """bf16 autocast on DEVICE when --bf16 (as ``train.bf16`` does on CUDA), else nothing."""
    if BF16:
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """``per_example_ctc`` under ``_amp()`` (the loss itself is float32 either way)."""
    with _amp():
        return per_example_ctc(model, batch)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
CLIP, SIGMA, MICRO = 1.0, 1.0, 4


# ---------------------------------------------------------------------------------------------
# the loss, as an Opacus-style criterion (ghost mode needs a `reduction` it can switch to none)
# ---------------------------------------------------------------------------------------------
class PerExampleCTC(nn.Module):
    """Exactly ``per_example_ctc``'s loss (CTC NLL / target length), with a ``reduction``."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, log_probs, out_lens, targets, target_lens):
        losses = F.ctc_loss(log_probs.float().transpose(0, 1), targets, out_lens, target_lens,
                            blank=0, reduction="none", zero_infinity=False)
        losses = losses / target_lens.clamp(min=1).to(losses.dtype)
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()


# ---------------------------------------------------------------------------------------------
# building one variant: returns (module that holds the parameters, step function)
# ---------------------------------------------------------------------------------------------
def build_model(size: str, init: dict | None = None) -> ConformerCTC:
    torch.manual_seed(0)
    m = ConformerCTC(config_for(size, vocab_size=29, dropout=0.0))
    if init is not None:
        m.load_state_dict(init)
    return m.to(DEVICE).train()


def _opacus_loader(batch_size: int):
    from torch.utils.data import DataLoader, TensorDataset
    # only its length matters: sample_rate = 1/len(loader), expected batch = batch_size
    return DataLoader(TensorDataset(torch.zeros(4 * batch_size, 1)), batch_size=batch_size)


def build_variant(name: str, size: str, batch: Batch, init: dict | None = None, *,
                  sigma: float = SIGMA, lr: float = 1e-4) -> tuple[nn.Module, Callable, dict]:
    """(the module whose parameters are trained, step(), info)."""
    model = build_model(size, init)
    ebs = len(batch)
    info: dict = {}
    if name in ("nonprivate", "per_example", "per_example_secure", "microbatch",
                "per_example_vmap"):
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        if name == "nonprivate":
            strat = BatchClipGradient(max_norm=5.0)
        else:
            pol = (ClipPolicy(unit="example", clip_norm=CLIP, noise_multiplier=sigma,
                              expected_batch_size=ebs) if name != "microbatch" else
                   ClipPolicy(unit="microbatch", microbatch_size=MICRO, clip_norm=CLIP,
                              noise_multiplier=sigma, expected_batch_size=ebs))
            engine = "vectorized" if name == "per_example_vmap" else ENGINE
            secure = name == "per_example_secure"    # the noise a DP run really draws
            strat = ClippedGradient(pol, engine=engine, secure_noise=secure)
            info["engine"] = engine
            info["secure_noise"] = secure
            info["policy"] = pol.to_dict()

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            strat.fill_grads(model, [batch], loss_fn)
            opt.step()

        return model, step, info

    from opacus import PrivacyEngine
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()
        if name == "opacus_hooks":
            gsm, dpopt, _ = engine.make_private(
                module=model, optimizer=opt, data_loader=_opacus_loader(ebs),
                noise_multiplier=sigma, max_grad_norm=CLIP, loss_reduction="mean",
                grad_sample_mode="hooks")

            def step() -> None:
                dpopt.zero_grad(set_to_none=True)
                loss_fn(gsm, batch).mean().backward()
                dpopt.step()
        elif name == "opacus_ghost":
            gsm, dpopt, crit, _ = engine.make_private(
                module=model, optimizer=opt, data_loader=_opacus_loader(ebs),
                criterion=PerExampleCTC("mean"), noise_multiplier=sigma, max_grad_norm=CLIP,
                loss_reduction="mean", grad_sample_mode="ghost")
            info["_crit"] = crit
            ns = type(gsm).NORM_SAMPLERS
            gs = type(gsm).GRAD_SAMPLERS
            kinds = sorted({type(m).__name__ for m in model.modules()
                            if any(p.requires_grad for p in m.parameters(recurse=False))})
            info["layer_handling"] = {
                k: ("ghost norm (no per-sample grads)" if any(t.__name__ == k for t in ns)
                    else "fast gradient clipping: per-sample grads via Opacus grad sampler"
                    if any(t.__name__ == k for t in gs) else "functorch fallback")
                for k in kinds}

            def step() -> None:
                dpopt.zero_grad(set_to_none=True)
                with _amp():
                    log_probs, out_lens = gsm(batch.feats, batch.feat_lens)
                crit(log_probs, out_lens, batch.targets, batch.target_lens).backward()
                dpopt.step()
        else:
            raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
    info["dp_optimizer"] = type(dpopt).__name__
    info["grad_sample_module"] = type(gsm).__name__
    info["_dpopt"] = dpopt
    return gsm, step, info


def opacus_layer_support(model: nn.Module) -> dict:
    """Every trainable layer type of the model and which Opacus mechanism covers it."""
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
        GradSampleModuleFastGradientClipping as Ghost)
    out = {}
    for m in model.modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        t = type(m)
        desc = t.__name__
        if isinstance(m, nn.Conv1d) and m.groups > 1:
            desc += f"(groups={m.groups})"
        out.setdefault(desc, {"count": 0, "hooks_grad_sampler": t in GradSampleModule.GRAD_SAMPLERS,
                              "ghost_norm_sampler": t in Ghost.NORM_SAMPLERS})
        out[desc]["count"] += 1
    return out


# ---------------------------------------------------------------------------------------------
# numerical agreement (sigma = 0): Opacus' Σ clip(g_i)/B vs privasr's
# ---------------------------------------------------------------------------------------------
def check_agreement(size: str, batch: Batch) -> dict:
    init = build_model(size).state_dict()
    init = {k: v.clone() for k, v in init.items()}
    ref_model = build_model(size, init)
    pol = ClipPolicy(unit="example", clip_norm=CLIP, noise_multiplier=0.0,
                     expected_batch_size=len(batch))
    stats = ClippedGradient(pol, engine=ENGINE).fill_grads(ref_model, [batch], per_example_ctc)
    ref = {n: p.grad.detach().clone() for n, p in ref_model.named_parameters()}
    ref_flat = torch.cat([g.flatten() for g in ref.values()]).double()
    out = {"privasr_stats": {k: float(v) for k, v in stats.items()}}
    for name in ("opacus_hooks", "opacus_ghost"):
        try:
            gsm, _, info = build_variant(name, size, batch, init, sigma=0.0)
            dpopt = info["_dpopt"]
            dpopt.zero_grad(set_to_none=True)
            if name == "opacus_hooks":
                per_example_ctc(gsm, batch).mean().backward()
            else:
                lp, ol = gsm(batch.feats, batch.feat_lens)
                info["_crit"](lp, ol, batch.targets, batch.target_lens).backward()
                out.setdefault("opacus_ghost_per_sample_norms",
                               [float(x) for x in gsm.per_sample_gradient_norms])
            dpopt.pre_step()         # clip, sum, (zero) noise, / expected batch size -> p.grad
            got = {n.removeprefix("_module."): p.grad.detach()
                   for n, p in gsm.named_parameters()}
            flat = torch.cat([got[n].flatten() for n in ref]).double()
            per_tensor = max(float((got[n] - ref[n]).norm() / ref[n].norm().clamp(min=1e-30))
                             for n in ref if ref[n].norm() > 1e-8 * ref_flat.norm())
            out[name] = {"rel_diff_global": float((flat - ref_flat).norm() / ref_flat.norm()),
                         "max_rel_diff_per_tensor": per_tensor, "ok": True}
        except Exception as e:  # noqa: BLE001 -- reported, not hidden
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return out


# ---------------------------------------------------------------------------------------------
# memory: one fresh process per variant
# ---------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def memory_child(a: argparse.Namespace) -> None:
    global DEVICE, BF16
    DEVICE, BF16 = torch.device(a.device), a.bf16
    torch.set_num_threads(a.threads)
    if a.malloc == "keep":
        keep_freed_memory()
    batch = make_batch(a.batch, a.seconds, DEVICE)
    _, step, _ = build_variant(a.memory_variant, a.size, batch)
    if DEVICE.type == "cuda":      # CUDA: torch's allocator peak, not the process RSS
        _sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        _sync()
        peak = torch.cuda.max_memory_allocated()
        print("MEMORY_JSON " + json.dumps({
            "variant": a.memory_variant, "rss_after_build_mib": base / 2 ** 20,
            "vmhwm_mib": peak / 2 ** 20, "peak_minus_build_mib": (peak - base) / 2 ** 20,
            "steps": 3, "wall_s_3_steps": time.perf_counter() - t0,
            "measure": "torch.cuda.max_memory_allocated"}))
        return
    rss_build = _status_kb("VmRSS")
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    hwm = _status_kb("VmHWM")
    print("MEMORY_JSON " + json.dumps({
        "variant": a.memory_variant, "rss_after_build_mib": rss_build / 1024,
        "vmhwm_mib": hwm / 1024, "peak_minus_build_mib": (hwm - rss_build) / 1024,
        "steps": 3, "wall_s_3_steps": time.perf_counter() - t0}))


def measure_memory(a: argparse.Namespace, variants: list[str]) -> dict:
    out = {}
    for v in variants:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-variant", v,
               "--size", a.size, "--batch", str(a.batch), "--seconds", str(a.seconds),
               "--threads", str(a.threads), "--device", a.device, "--malloc", a.malloc
               ] + (["--bf16"] if a.bf16 else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("MEMORY_JSON ")]
        if r.returncode or not line:
            out[v] = {"error": (r.stderr or r.stdout)[-2000:]}
        else:
            out[v] = json.loads(line[-1].split(" ", 1)[1])
            out[v].pop("variant")
        print(f"  memory {v:>13}: " + (f"{out[v]['peak_minus_build_mib']:.0f} MiB above build"
                                       if "error" not in out[v] else "FAILED"))
    return out


# ---------------------------------------------------------------------------------------------
# profile of the privasr per-example step
# ---------------------------------------------------------------------------------------------
def profile_per_example(step: Callable, top: int = 15) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function
    import privasr.clipping.engines as eng
    import privasr.clipping.strategy as strat_mod

    # time the phases: per-example grads (forward+backward), clipping/sum, noise, optimizer
    orig_peg, orig_add = eng.VectorizedEngine.per_example, eng._UnitClipper.add
    orig_bk = eng.BookkeepingEngine.per_example

    def peg(*args, **kw):
        with record_function("privasr::per_example_grads(fwd+bwd)"):
            return orig_peg(*args, **kw)

    def bk(*args, **kw):
        with record_function("privasr::per_example_grads(fwd+bwd)"):
            return orig_bk(*args, **kw)

    def add(self, g):
        with record_function("privasr::clip_and_sum"):
            return orig_add(self, g)

    orig_sample = strat_mod.GaussianNoise.sample

    def sample(self, *args, **kw):
        with record_function("privasr::noise"):
            return orig_sample(self, *args, **kw)

    eng.VectorizedEngine.per_example, eng._UnitClipper.add = peg, add
    eng.BookkeepingEngine.per_example = bk
    strat_mod.GaussianNoise.sample = sample
    try:
        step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda"
                                         else [])
        with profile(activities=acts) as prof:
            for _ in range(2):
                with record_function("privasr::step"):
                    step()
    finally:
        eng.VectorizedEngine.per_example, eng._UnitClipper.add = orig_peg, orig_add
        eng.BookkeepingEngine.per_example = orig_bk
        strat_mod.GaussianNoise.sample = orig_sample
    avg = prof.key_averages()
    rows = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)
    phases = {e.key: e.cpu_time_total / 2e6 for e in avg if e.key.startswith("privasr::")}
    table = [{"op": e.key, "self_cpu_s_per_step": e.self_cpu_time_total / 2e6,
              "calls_per_step": e.count / 2} for e in rows[:top]]
    out = {"phases_s_per_step": phases, "top_ops_by_self_cpu": table}
    if DEVICE.type == "cuda":          # which kernels dominate the GPU time
        def dev(e) -> float:
            return getattr(e, "self_device_time_total", 0.0) or getattr(
                e, "self_cuda_time_total", 0.0)
        rows = sorted(avg, key=dev, reverse=True)
        out["top_ops_by_self_device"] = [{"op": e.key, "self_device_s_per_step": dev(e) / 2e6,
                                          "calls_per_step": e.count / 2} for e in rows[:top]]
    return out


def make_step(name: str, settings: dict) -> tuple[Callable[[], None], Callable[[], None]]:
    """A variant's (step, sync) in a fresh worker process (``interleave_processes``): the same
    seeded init and batch as in the parent."""
    global DEVICE, BF16
    DEVICE, BF16 = torch.device(settings["device"]), settings.get("bf16", False)
    torch.set_num_threads(settings["threads"])
    batch = make_batch(settings["batch"], settings["seconds"], DEVICE)
    init = {k: v.clone() for k, v in build_model(settings["size"]).state_dict().items()}
    _, step, _ = build_variant(name, settings["size"], batch, init)
    return step, _sync


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    add_step_arguments(ap)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--memory-variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu (the issue's target) or cuda")
    ap.add_argument("--bf16", action="store_true",
                    help="forward under bf16 autocast (train.bf16); per-example gradients are "
                         "still formed and clipped in float32")
    ap.add_argument("--out", default=None, help="default: results/clipping_overhead[_cuda].json")
    ap.add_argument("--shared-process", action="store_true",
                    help="time every variant in this process (default: one worker process "
                         "per variant, see benchmarks/interleave.py)")
    a = ap.parse_args()
    if a.memory_variant:
        return memory_child(a)

    global DEVICE, BF16
    DEVICE, BF16 = torch.device(a.device), a.bf16
    a.out = a.out or str(OUT_CUDA if DEVICE.type == "cuda" else OUT)
    torch.set_num_threads(a.threads)
    if a.malloc == "keep":
        keep_freed_memory()
    batch = make_batch(a.batch, a.seconds, DEVICE)
    import opacus
    probe = build_model(a.size)
    info = {
        "benchmark": "clipping_overhead",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": _cpu_model(), "cpu_count": os.cpu_count(),
                    "cores_available": len(os.sched_getaffinity(0)),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "opacus": opacus.__version__, "device": str(DEVICE),
                    "gpu": (torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda"
                            else None)},
        "settings": {"model": a.size, "params": count_parameters(probe), "dropout": 0.0,
                     "batch": a.batch, "seconds_per_utt": a.seconds,
                     "frames": batch.feats.shape[1], "target_len": batch.targets.shape[1],
                     "rounds": a.rounds, "warmup": a.warmup, "clip_norm": CLIP,
                     "noise_multiplier": SIGMA, "expected_batch_size": a.batch,
                     "microbatch_size": MICRO, "optimizer": "AdamW(lr=1e-4)",
                     "nonprivate": "BatchClipGradient(max_norm=5.0), no noise",
                     "loss": "per_example_ctc (CTC NLL / target length); Opacus: mean over "
                             "batch with loss_reduction='mean' -> same Σclip(g_i)/16",
                     "noise": "on (sigma=1) for every private variant, off for nonprivate",
                     "bf16_autocast": a.bf16,
                     "host_allocator": ("keep-freed (privasr.train.host_memory, as in "
                                        "training)" if a.malloc == "keep" else "glibc default"),
                     "opacus_layer_support": opacus_layer_support(probe)},
    }
    del probe

    if not a.no_check:
        print("checking Opacus vs privasr clipped gradient (sigma=0) ...")
        info["agreement_sigma0"] = check_agreement(a.size, batch)
        for k in ("opacus_hooks", "opacus_ghost"):
            r = info["agreement_sigma0"][k]
            print(f"  {k}: " + (f"rel diff {r['rel_diff_global']:.2e} (max per tensor "
                                f"{r['max_rel_diff_per_tensor']:.2e})" if r["ok"] else r["error"]))

    steps, build_info = {}, {}
    init = {k: v.clone() for k, v in build_model(a.size).state_dict().items()}
    for v in a.variants:
        try:
            _, steps[v], bi = build_variant(v, a.size, batch, init)
            bi.pop("_dpopt", None)
            bi.pop("_crit", None)
            build_info[v] = bi
        except Exception as e:  # noqa: BLE001
            build_info[v] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {v}: cannot build: {build_info[v]['error']}")
    info["variants"] = build_info
    names = [v for v in a.variants if v in steps]

    print(f"warm-up ({a.warmup} steps each), then {a.rounds} interleaved rounds "
          f"({'one shared process' if a.shared_process else 'one process per variant'}) ...")
    info["settings"]["isolation"] = ("shared process" if a.shared_process
                                     else "one spawned worker process per variant")
    if a.shared_process:
        raw = interleave({v: steps[v] for v in names}, a.rounds, a.warmup, _sync)
    else:
        steps.clear()                   # free the parent's copies; the workers build their own
        raw = interleave_processes("clipping_overhead:make_step", names,
                                   {"device": a.device, "threads": a.threads, "batch": a.batch,
                                    "seconds": a.seconds, "size": a.size, "malloc": a.malloc,
                                    "bf16": a.bf16},
                                   a.rounds, a.warmup)

    med = {v: {k: statistics.median(raw[v][k]) for k in ("wall_s", "cpu_s")} for v in names}
    res = {v: {"raw_wall_s": raw[v]["wall_s"], "raw_cpu_s": raw[v]["cpu_s"],
               "median_wall_s": med[v]["wall_s"], "median_cpu_s": med[v]["cpu_s"]}
           for v in names}

    def ratios(v: str, base: str) -> dict:
        out = {}
        for k, short in (("wall_s", "wall"), ("cpu_s", "cpu")):
            out[f"ratio_of_medians_{short}"] = med[v][k] / med[base][k]
            per_round = [x / y for x, y in zip(raw[v][k], raw[base][k])]
            out[f"median_of_round_ratios_{short}"] = statistics.median(per_round)
            out[f"round_ratios_{short}_spread"] = spread(per_round)
        return out

    if BASELINE in names:
        for v in names:
            res[v]["vs_nonprivate"] = ratios(v, BASELINE)
    info["results"] = res

    summary: dict = {}
    opacus = [v for v in ("opacus_hooks", "opacus_ghost") if v in names]
    best = min(opacus, key=lambda v: med[v]["wall_s"]) if opacus else None
    if BASELINE in names and "per_example" in names:
        r = ratios("per_example", BASELINE)
        summary["per_example_vs_nonprivate"] = r["ratio_of_medians_wall"]
        summary["per_example_vs_nonprivate_detail"] = r
    if BASELINE in names and "microbatch" in names:
        r = ratios("microbatch", BASELINE)
        summary["microbatch_vs_nonprivate"] = r["ratio_of_medians_wall"]
        summary["microbatch_vs_nonprivate_detail"] = r
    if best and "per_example" in names:
        r = ratios("per_example", best)
        summary["opacus_best"] = best
        summary["per_example_vs_opacus_best"] = r["ratio_of_medians_wall"]
        summary["per_example_vs_opacus_best_detail"] = r
        for v in opacus:
            summary[f"per_example_vs_{v}"] = ratios("per_example", v)

    if not a.no_memory:
        print("peak memory, one fresh process per variant ...")
        mem = measure_memory(a, names)
        info["memory"] = mem
        okm = {v: m["peak_minus_build_mib"] for v, m in mem.items() if "error" not in m}
        if BASELINE in okm:
            for v in okm:
                mem[v]["vs_nonprivate"] = okm[v] / okm[BASELINE]
            if "per_example" in okm:
                summary["memory_per_example_vs_nonprivate"] = okm["per_example"] / okm[BASELINE]
            if "microbatch" in okm:
                summary["memory_microbatch_vs_nonprivate"] = okm["microbatch"] / okm[BASELINE]
            if best in okm and "per_example" in okm:
                summary["memory_per_example_vs_opacus_best"] = okm["per_example"] / okm[best]

    # the goals ("DP training near the non-private floor"): CPU <= 1.25x non-private,
    # <= 0.7x the faster Opacus mode, peak memory <= 1.4x; on CUDA <= 1.5x and <= 0.6x
    cuda = DEVICE.type == "cuda"
    tg = {"per_example_vs_nonprivate": 1.5 if cuda else 1.25,
          "per_example_vs_opacus_best": 0.6 if cuda else 0.7,
          "memory_per_example_vs_nonprivate": 1.4}
    summary["targets"] = {k: {"target_max": t, "value": summary.get(k),
                              "met": (summary[k] <= t) if k in summary else None}
                          for k, t in tg.items()}
    info["summary"] = summary

    if a.profile and "per_example" in names:
        print("profiling the privasr per-example step (and the non-private one) ...")
        for v in ("per_example", BASELINE):
            if v in names:
                step = steps.get(v) or build_variant(v, a.size, batch, init)[1]
                info[f"profile_{v}"] = profile_per_example(step)

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1))
    print_table(info, names)
    print(f"wrote {out}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_table(info: dict, names: list[str]) -> None:
    res, mem = info["results"], info.get("memory", {})
    s = info["settings"]
    print(f"\n{s['model']} Conformer-CTC ({s['params'] / 1e6:.2f}M params), batch {s['batch']} x "
          f"{s['seconds_per_utt']:.0f} s, {info['machine']['torch_threads']} threads, "
          f"{s['rounds']} rounds")
    print(f"{'variant':>13} {'wall s':>7} {'cpu s':>7} {'x wall':>7} {'x wall/rd':>9} "
          f"{'x cpu':>6} {'x cpu/rd':>8} {'peak MiB':>9} {'x mem':>6}")
    for v in names:
        r = res[v]
        q = r.get("vs_nonprivate", {})
        m = mem.get(v, {})
        pk = m.get("peak_minus_build_mib")
        print(f"{v:>13} {r['median_wall_s']:7.3f} {r['median_cpu_s']:7.3f} "
              f"{q.get('ratio_of_medians_wall', float('nan')):7.2f} "
              f"{q.get('median_of_round_ratios_wall', float('nan')):9.2f} "
              f"{q.get('ratio_of_medians_cpu', float('nan')):6.2f} "
              f"{q.get('median_of_round_ratios_cpu', float('nan')):8.2f} "
              + (f"{pk:9.0f} {m.get('vs_nonprivate', float('nan')):6.2f}" if pk is not None
                 else f"{'-':>9} {'-':>6}"))
    sm = info["summary"]
    if "per_example_vs_opacus_best" in sm:
        d = sm["per_example_vs_opacus_best_detail"]
        print(f"per_example vs {sm['opacus_best']} (faster Opacus): wall {d['ratio_of_medians_wall']:.2f}"
              f" (per-round {d['median_of_round_ratios_wall']:.2f}), cpu "
              f"{d['ratio_of_medians_cpu']:.2f} (per-round {d['median_of_round_ratios_cpu']:.2f})")
    for k, t in sm["targets"].items():
        val = "n/a" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  target {k} <= {t['target_max']}: {val} -> "
              f"{'met' if t['met'] else 'NOT met' if t['met'] is not None else 'n/a'}")
    prof = info.get("profile_per_example")
    if prof:
        print("per-example step phases (s/step): " +
              ", ".join(f"{k.split('::')[1]} {v:.3f}" for k, v in prof["phases_s_per_step"].items()))


if __name__ == "__main__":
    main()
