"""`privasr audit make-canaries | run`: the argparse glue (imports stay lazy)."""

from __future__ import annotations

import argparse
import json


def _factor(s: str) -> float | str:
    if s == "auto":
        return s
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--factor must be a number or 'auto', got {s!r}") from None


def _make(a: argparse.Namespace) -> int:
    from privasr.audit.canaries import CanaryConfig, make_canaries

    cfg = CanaryConfig(n=a.n, words=a.words, seed=a.seed, voice=a.voice, variant=a.variant,
                       pitch=a.pitch, rate=a.rate, factor=a.factor, method=a.method,
                       repetitions=tuple(a.repetitions), subsampling=a.subsampling,
                       margin=a.margin, on_infeasible=a.on_infeasible)
    cs = make_canaries(a.out, cfg)
    ins = [c for c in cs if c.inserted]
    print(f"wrote {a.out}/canaries.jsonl: {len(cs)} canaries, {len(ins)} inserted "
          f"({sum(c.repetitions for c in ins)} training copies), {len(cs) - len(ins)} held out; "
          f"speed-up {cs[0].factor}x by {cs[0].method}")
    print(f"train with: privasr train RECIPE.yaml audit.canaries={a.out}/canaries.jsonl")
    return 0


def _run(a: argparse.Namespace) -> int:
    from privasr.audit.run import run_audit

    run_audit(a.checkpoint, a.canaries, out=a.out, device=a.device, confidence=a.confidence,
              delta=a.delta)
    return 0


def add_audit_parser(sub) -> None:
    """Register ``privasr audit`` on the top-level subparsers."""
    au = sub.add_parser("audit", help="memorization audit: sped-up canaries, exposure, one-run ε")
    asub = au.add_subparsers(dest="audit_cmd", required=True)
    m = asub.add_parser("make-canaries", help="synthesise sped-up random-word canaries")
    m.add_argument("--out", required=True, help="output folder (canaries.jsonl, audio/)")
    m.add_argument("--n", type=int, default=60, help="number of canaries")
    m.add_argument("--words", type=int, default=8, help="random words per canary")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--voice", default="en-us")
    m.add_argument("--variant", default="m1", help="espeak-ng voice variant")
    m.add_argument("--pitch", type=int, default=50)
    m.add_argument("--rate", type=int, default=120, help="espeak-ng words/min before speed-up")
    m.add_argument("--factor", default="auto", type=_factor,
                   help="speed-up factor, or 'auto': the largest that keeps every canary "
                        "--margin x CTC-feasible at --subsampling")
    m.add_argument("--method", default="resample", choices=("resample", "tempo", "espeak_rate"),
                   help="resample (pitch rises), tempo (sox, pitch kept), espeak_rate (-s x f)")
    m.add_argument("--repetitions", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    m.add_argument("--subsampling", type=int, default=4, help="the model's frame reduction")
    m.add_argument("--margin", type=float, default=1.15)
    m.add_argument("--on-infeasible", default="refuse", choices=("refuse", "warn"))
    m.set_defaults(fn=_make)
    r = asub.add_parser("run", help="score canaries with a checkpoint; tables + JSON + HTML")
    r.add_argument("checkpoint")
    r.add_argument("canaries", help="canaries.jsonl from make-canaries")
    r.add_argument("--out", help="JSON path (default CKPT.audit.json; HTML next to it)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--confidence", type=float, default=0.95)
    r.add_argument("--delta", type=float, default=None,
                   help="δ for the ε bound (default: the checkpoint's claimed δ, else 0)")
    r.set_defaults(fn=_run)
