"""`privasr audit run CKPT CANARIES`: score, analyse, print tables, write JSON (+ HTML)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from privasr.atomic import atomic_write_text
from privasr.audit.analysis import analyze, format_tables
from privasr.audit.canaries import read_canaries
from privasr.audit.scoring import score_canaries


def claimed_privacy(ckpt: dict) -> dict | None:
    """The (ε, δ) a checkpoint's privacy ledger claims, if it has one."""
    from privasr.privacy.ledger import PrivacyLedger

    state = (ckpt.get("strategy") or {}).get("ledger") if isinstance(ckpt.get("strategy"), dict) \
        else None
    if not state:
        return None
    ledger = PrivacyLedger.from_dict(state)
    return {"epsilon": ledger.epsilon(), "delta": ledger.delta, "unit": str(ledger.unit)}


def run_audit(ckpt_path: str | Path, canaries_path: str | Path, *, out: str | Path | None = None,
              device: str = "cpu", confidence: float = 0.95, delta: float | None = None,
              log=print) -> dict:
    """Audit a checkpoint with its canaries. δ defaults to the checkpoint's claimed δ (0 if it
    makes no DP claim)."""
    from privasr.inference import load_model
    from privasr.checkpoint import load_checkpoint

    t0 = time.time()
    claim = claimed_privacy(load_checkpoint(ckpt_path))
    if delta is None:
        delta = claim["delta"] if claim else 0.0
    model, vocab = load_model(ckpt_path, device=device)
    canaries = read_canaries(canaries_path)
    scores = score_canaries(model, vocab, canaries, device=device,
                            subsampling=getattr(model, "subsampling", 4),
                            cache_dir=Path(canaries_path).parent / "feats")
    res = analyze(scores, confidence=confidence, delta=delta)
    res.update({"checkpoint": str(ckpt_path), "canaries": str(canaries_path),
                "claimed_privacy": claim, "seconds": time.time() - t0,
                "speedup": {"factor": canaries[0].factor, "method": canaries[0].method}})
    log(format_tables(res))
    if claim and any(c.inserted and c.repetitions > 1 for c in canaries):
        res["warning"] = ("canaries inserted more than once: a per-example ε claim covers one "
                          "copy; comparing the audited bound with it needs repetitions=1 "
                          "(r copies are protected only at group-privacy level r·ε)")
        log(f"warning: {res['warning']}")
    if claim:
        log(f"claimed: ε = {claim['epsilon']:.3f} at δ = {claim['delta']:.3g} ({claim['unit']}); "
            f"audited lower bound {res['one_run']['epsilon']:.3f} (Steinke), "
            f"{res['one_run_fdp']['epsilon']:.3f} (f-DP)")
    out_path = Path(out) if out else Path(ckpt_path).with_suffix(".audit.json")
    atomic_write_text(out_path, json.dumps(res, indent=1))
    from privasr.audit.report import write_audit_report

    html = write_audit_report({Path(ckpt_path).parent.name or "run": res},
                              out_path.with_suffix(".html"))
    log(f"wrote {out_path} and {html}")
    return res
