"""`privasr audit make-canaries | run`: paths are arguments, settings are key=value.

    privasr audit make-canaries --out DIR [key=value ...]   # keys: CanaryConfig's (n, words, ...)
    privasr audit run CKPT CANARIES [--out PATH] [key=value ...]   # keys: AuditRunConfig's

The settings are read with the recipes' machinery (``privasr.config``): unknown keys and
values of the wrong type are refused by name. Heavy imports stay lazy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from privasr.config import apply_overrides, from_dict
from privasr.errors import ConfigError

__all__ = ["AuditRunConfig", "audit_run_config", "canary_config", "make_canaries_command",
           "run_command"]


@dataclass
class AuditRunConfig:
    device: str = "cpu"
    confidence: float = 0.95
    delta: float | None = None  # δ of the ε bound; default: the checkpoint's claimed δ, else 0


def canary_config(overrides: Sequence[str]) -> Any:
    """A ``privasr.audit.canaries.CanaryConfig`` from ``key=value`` overrides."""
    from privasr.audit.canaries import CanaryConfig

    d = apply_overrides({}, list(overrides))
    reps = d.pop("repetitions", None)              # a variable-length tuple: checked here
    cfg = from_dict(CanaryConfig, d)
    if reps is not None:
        reps = [reps] if isinstance(reps, int) else reps
        if not isinstance(reps, list) or not all(type(r) is int for r in reps):
            raise ConfigError(f"repetitions: expected a list of integers, got {reps!r}")
        cfg = dataclasses.replace(cfg, repetitions=tuple(reps))
    return cfg


def audit_run_config(overrides: Sequence[str]) -> AuditRunConfig:
    return from_dict(AuditRunConfig, apply_overrides({}, list(overrides)))


def make_canaries_command(out: str | Path, overrides: Sequence[str] = ()) -> int:
    from privasr.audit.canaries import make_canaries

    cs = make_canaries(out, canary_config(overrides))
    ins = [c for c in cs if c.inserted]
    print(f"wrote {out}/canaries.jsonl: {len(cs)} canaries, {len(ins)} inserted "
          f"({sum(c.repetitions for c in ins)} training copies), {len(cs) - len(ins)} held out; "
          f"speed-up {cs[0].factor}x by {cs[0].method}")
    print(f"train with: privasr train RECIPE.yaml audit.canaries={out}/canaries.jsonl")
    return 0


def run_command(checkpoint: str | Path, canaries: str | Path, out: str | Path | None = None,
                overrides: Sequence[str] = ()) -> int:
    from privasr.audit.run import run_audit

    cfg = audit_run_config(overrides)
    run_audit(checkpoint, canaries, out=out, device=cfg.device, confidence=cfg.confidence,
              delta=None if cfg.delta is None else float(cfg.delta))
    return 0
