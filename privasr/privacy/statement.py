"""The privacy statement of a run: what its ε covers, and what it does not.

Every ``results.json`` and ``report.html`` carries one (``privacy_statement``): the unit
protected, (ε, δ) with δ·N, the accountant, the sampling, whether the randomness was secret,
steps and segments, what the run released outside the guarantee, and -- when an audit was run
on the model -- the audited ε lower bound beside the claim. A run without a guarantee says so
and why, and shows no ε.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from privasr.privacy.ledger import NO_GUARANTEE, PrivacyLedger

__all__ = ["privacy_statement", "statement_text", "ALWAYS_OUTSIDE"]

# released by every run; add/remove DP of the training data does not cover them
ALWAYS_OUTSIDE = (
    "N, the number of training units, printed exactly (q = E[B]/N and δ·N derive from it)",
    "wall-clock timings (step_seconds, train/wall seconds): they depend on the realised batches",
    "counts of unusable input (data_skipped) and of skipped non-finite steps",
)
PRIVATE_STATS = ("per-step statistics of the private batch: train loss, per-unit gradient "
                 "norm quantiles, fraction clipped, realised batch size, audio seconds per second "
                 "(log_private_stats=true)")


def privacy_statement(ledger: PrivacyLedger | None, *, clipped: bool, private_stats: bool,
                      protects: str = "example", sampling: str = "", extra_outside:
                      Sequence[str] = (), audit: dict | None = None) -> dict[str, Any]:
    """The statement dict (JSON-able). ``ledger`` None: no DP claim (σ = 0 or no noise);
    ``clipped`` says whether per-unit clipping was used; ``private_stats`` whether the per-step
    statistics of the private batch were released; ``audit`` an ``analyze()`` result."""
    out: list[str] = list(ALWAYS_OUTSIDE) + list(extra_outside)
    if private_stats:
        out.insert(0, PRIVATE_STATS)
    if ledger is None:
        why = ("clipping only (σ = 0): memorization mitigation, no formal DP guarantee"
               if clipped else "ordinary training: no DP guarantee")
        return {"guarantee": False, "why": why, "epsilon": None, "outside_guarantee": [],
                "audit": _audit(audit, None)}
    eps = ledger.claimed_epsilon()
    st = {
        "guarantee": bool(ledger.secret_randomness and eps is not None and math.isfinite(eps)),
        "why": None if ledger.secret_randomness else NO_GUARANTEE,
        "unit": ledger.unit.value, "protects": protects,
        "description": ledger.unit.description,
        "epsilon": None if eps is None else (eps if math.isfinite(eps) else "inf"),
        "delta": ledger.delta, "population": ledger.population,
        "delta_times_n": ledger.delta_times_n(),
        "accountant": f"dp-accounting {ledger.method.upper()}, add/remove adjacency",
        "sampling": sampling or f"Poisson, q = {ledger.sample_rate:.4g}",
        "secret_randomness": bool(ledger.secret_randomness),
        "steps": ledger.steps, "segments": [list(s) for s in ledger.segments],
        "sensitivity_factor": ledger.sensitivity_factor,
        "target_epsilon": ledger.target_epsilon,
        "outside_guarantee": out,
        "audit": _audit(audit, eps),
    }
    return st


def _audit(audit: dict | None, claim: float | None) -> dict | None:
    if not audit:
        return None
    one = audit.get("one_run") or {}
    fdp = audit.get("one_run_fdp") or {}
    return {"epsilon_lower_bound": one.get("epsilon"),
            "epsilon_lower_bound_fdp": fdp.get("epsilon"),
            "confidence": one.get("confidence"), "claimed_epsilon": claim}


def statement_text(st: dict[str, Any]) -> str:
    """One paragraph for logs and report.html."""
    if not st.get("unit"):
        return f"Privacy: {st['why']}."
    if not st["guarantee"]:
        head = f"Privacy: {st['why'] or 'no guarantee (ε is infinite)'}."
    else:
        dn = st["delta_times_n"]
        dn_txt = "" if dn is None else f"; δ·N = {dn:.3g}"
        head = (f"Privacy: ({st['epsilon']:.3g}, {st['delta']:.3g})-DP per {st['protects']} "
                f"(unit {st['unit']}{dn_txt}), {st['accountant']}, {st['sampling']}, secret "
                f"randomness, {st['steps']} steps in {len(st['segments'])} segment(s).")
    parts = [head]
    a = st.get("audit") or {}
    if a.get("epsilon_lower_bound") is not None:
        fdp = a.get("epsilon_lower_bound_fdp")
        parts.append(f"Audited ε lower bound {a['epsilon_lower_bound']:.3g}"
                     + (f" (f-DP {fdp:.3g})" if fdp is not None else "") + ".")
    if st.get("outside_guarantee"):
        parts.append("Outside the guarantee: " + "; ".join(st["outside_guarantee"]) + ".")
    return " ".join(parts)
