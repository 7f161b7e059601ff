"""From per-canary scores to the audit's tables: by-repetition accuracy/CER, exposure,
one-run ε lower bounds (Steinke et al.; f-DP of Mahloujifar et al.), AUC and TPR at 1 % FPR."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from privasr.audit.fdp import one_run_fdp_epsilon
from privasr.audit.metrics import (auc, exposure_extrapolation, exposure_interpolation,
                                   one_run_epsilon, tpr_at_fpr)
from privasr.audit.scoring import CanaryScore


def _mean(xs) -> float | None:
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


def _heldout_exposure(losses: np.ndarray) -> float | None:
    """Mean leave-one-out interpolation exposure of the held-out canaries: the baseline an
    un-memorized canary gets (≈ log2(e) ≈ 1.44 bits for a uniform rank)."""
    if losses.size < 2:
        return None
    return float(np.mean([exposure_interpolation([x], np.delete(losses, i))[0]
                          for i, x in enumerate(losses)]))


def analyze(scores: Sequence[CanaryScore], *, confidence: float = 0.95,
            delta: float = 0.0) -> dict:
    """Summary dict (JSON-able). Exposure ranks by CTC loss (lower = more likely) against the
    held-out canaries (``exposure_cer``: by CER); the one-run audits' membership score is
    −loss. ``one_run``: the Steinke-Nasr-Jagielski bound; ``one_run_fdp``: the f-DP bound
    (``privasr.audit.fdp``) on the same (k+, k−) grid with the same Bonferroni correction, for
    the Gaussian-DP family when δ > 0 (the ε at δ of the largest rejected μ) and for f_{ε,0}
    (pure DP) when δ = 0. The Gaussian family assumes the trade-off curve is Gaussian-shaped
    (exact for full-batch DP-SGD; for Poisson-subsampled runs an assumption, as in the paper
    and jax_privacy), so it refutes "μ(ε,δ)-GDP", a stronger claim than (ε, δ)-DP."""
    ins = [s for s in scores if s.inserted]
    out = [s for s in scores if not s.inserted]
    if not ins or not out:
        raise ValueError(f"the audit needs inserted and held-out canaries (got {len(ins)} "
                         f"inserted, {len(out)} held out)")
    ref = np.array([s.loss for s in out])
    can_extrapolate = ref.size >= 3 and np.ptp(ref) > 0
    exp_i = exposure_interpolation([s.loss for s in ins], ref)
    exp_e = exposure_extrapolation([s.loss for s in ins], ref) if can_extrapolate else None
    # the same rank with CER as the score (Thakkar's talk notes), coarser: CER ties are common
    exp_c = exposure_interpolation([s.cer for s in ins], [s.cer for s in out])
    by_r = []
    for r in sorted({s.repetitions for s in scores}):
        sel = [i for i, s in enumerate(ins) if s.repetitions == r]
        held = [s for s in out if s.repetitions == r]
        by_r.append({
            "repetitions": r,
            "inserted": len(sel),
            "inserted_exact_match": _mean(ins[i].exact_match for i in sel),
            "inserted_cer": _mean(ins[i].cer for i in sel),
            "inserted_loss": _mean(ins[i].loss for i in sel),
            "heldout_matched": len(held),
            "heldout_matched_exact_match": _mean(s.exact_match for s in held),
            "heldout_matched_cer": _mean(s.cer for s in held),
            "exposure": _mean(exp_i[i] for i in sel),
            "exposure_extrapolated": _mean(exp_e[i] for i in sel) if exp_e is not None else None,
            "exposure_cer": _mean(exp_c[i] for i in sel),
        })
    member = -np.array([s.loss for s in scores])
    audit = one_run_epsilon(member, [s.inserted for s in scores], delta=delta,
                            confidence=confidence)
    fdp = one_run_fdp_epsilon(member, [s.inserted for s in scores], delta=delta,
                              confidence=confidence,
                              family="gaussian" if delta > 0 else "eps_delta")
    pos, neg = -np.array([s.loss for s in ins]), -ref
    return {
        "n": len(scores), "inserted": len(ins), "held_out": len(out),
        "inserted_exact_match": _mean(s.exact_match for s in ins),
        "inserted_cer": _mean(s.cer for s in ins),
        "heldout_exact_match": _mean(s.exact_match for s in out),
        "heldout_cer": _mean(s.cer for s in out),
        "heldout_exposure_baseline": _heldout_exposure(ref),
        "max_exposure": math.log2(ref.size),
        "by_repetitions": by_r,
        "auc": auc(pos, neg), "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01),
        "one_run": audit.to_dict(),
        "one_run_fdp": fdp.to_dict(),
        "scores": [s.to_dict() for s in scores],
    }


def format_tables(res: dict) -> str:
    """The audit as plain-text tables."""
    pct = lambda x: "   -" if x is None else f"{100 * x:5.1f}%"  # noqa: E731
    num = lambda x: "   -" if x is None else f"{x:6.2f}"  # noqa: E731
    lines = [f"{'r':>3} {'ins':>4} {'ins EM':>7} {'ins CER':>7} {'held':>4} {'held EM':>7} "
             f"{'held CER':>8} {'exposure':>8} {'extrap':>7}"]
    for row in res["by_repetitions"]:
        lines.append(f"{row['repetitions']:>3} {row['inserted']:>4} "
                     f"{pct(row['inserted_exact_match']):>7} {pct(row['inserted_cer']):>7} "
                     f"{row['heldout_matched']:>4} {pct(row['heldout_matched_exact_match']):>7} "
                     f"{pct(row['heldout_matched_cer']):>8} {num(row['exposure']):>8} "
                     f"{num(row['exposure_extrapolated']):>7}")
    a = res["one_run"]
    lines += [
        f"all: inserted {res['inserted']} EM {pct(res['inserted_exact_match'])} CER "
        f"{pct(res['inserted_cer'])} | held-out {res['held_out']} EM "
        f"{pct(res['heldout_exact_match'])} CER {pct(res['heldout_cer'])}",
        f"exposure: max possible {res['max_exposure']:.2f} bits; held-out baseline "
        f"{num(res['heldout_exposure_baseline']).strip()} bits",
        f"AUC {res['auc']:.3f}, TPR at 1% FPR {res['tpr_at_1pct_fpr']:.3f}",
        f"one-run ε lower bound {a['epsilon']:.3f} at {a['confidence']:.0%} confidence "
        f"(δ={a['delta']:g}; k+={a['k_pos']}, k-={a['k_neg']}: {a['correct']}/{a['guesses']} "
        f"correct; {a['correction']})",
    ]
    f = res.get("one_run_fdp")
    if f:
        fam = (f"Gaussian-DP family, μ ≥ {f['mu']:.3f}" if f["family"] == "gaussian"
               else "f_(ε,δ) family")
        lines.append(f"f-DP one-run ε lower bound {f['epsilon']:.3f} at {f['confidence']:.0%} "
                     f"confidence (δ={f['delta']:g}, {fam}; k+={f['k_pos']}, k-={f['k_neg']}: "
                     f"{f['correct']}/{f['guesses']} correct; {f['correction']})")
    return "\n".join(lines)
