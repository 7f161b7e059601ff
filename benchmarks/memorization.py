"""Reproduce the memorization finding: per clipping policy, train on corpus + canaries, audit.

    python benchmarks/memorization.py [--config configs/memorization.yaml]
        [--policies none per_example per_core] [--steps N] [--fresh]
        [--out benchmarks/results/memorization.json]
        [train overrides key=value ..., e.g. device=cuda bf16=true model.size=tiny]

Makes the canaries once (``<out_dir>/canaries``), trains one run per policy under
``<out_dir>/<policy>`` (resuming if interrupted), audits each with ``privasr audit run``'s code,
and writes a list of rows (policy × repetitions) with ``policy, repetitions,
inserted_exact_match, heldout_exact_match, exposure, epsilon_lower_bound, test_wer`` (+ CER,
matched held-out, AUC, TPR@1%FPR, timing) and an HTML report with the memorization plots.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from privasr.atomic import atomic_write_text  # noqa: E402
from privasr.audit.canaries import (CanaryConfig, make_canaries, read_canaries,  # noqa: E402
                                    speech_rate)
from privasr.audit.report import write_audit_report  # noqa: E402
from privasr.audit.run import run_audit  # noqa: E402
from privasr.config import TrainConfig, apply_overrides, from_dict  # noqa: E402
from privasr.data.manifest import read_manifest  # noqa: E402
from privasr.report.html import write_report  # noqa: E402
from privasr.audit.report import memorization_section  # noqa: E402
from privasr.data.splits import ensure_corpus, manifest_paths  # noqa: E402
from privasr.recipes.train import run_training


def rows_for(policy: str, audit: dict, train: dict) -> list[dict]:
    eps = audit["one_run"]["epsilon"]
    return [{"policy": policy, "repetitions": r["repetitions"],
             "inserted": r["inserted"],
             "inserted_exact_match": r["inserted_exact_match"],
             "inserted_cer": r["inserted_cer"],
             "heldout_exact_match": audit["heldout_exact_match"],
             "heldout_cer": audit["heldout_cer"],
             "heldout_matched_exact_match": r["heldout_matched_exact_match"],
             "exposure": r["exposure"], "exposure_extrapolated": r["exposure_extrapolated"],
             "epsilon_lower_bound": eps, "epsilon_confidence": audit["one_run"]["confidence"],
             "auc": audit["auc"], "tpr_at_1pct_fpr": audit["tpr_at_1pct_fpr"],
             "test_wer": train["test_wer"], "test_cer": train["test_cer"],
             "steps": train["steps"], "train_wall_seconds": train["train_wall_seconds"],
             "device": train["device"]}
            for r in audit["by_repetitions"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "memorization.yaml"))
    p.add_argument("--policies", nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None, help="optim.max_steps for every policy")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memorization.json"))
    p.add_argument("--canaries", default=None, help="use this canaries.jsonl instead of making one")
    p.add_argument("--fresh", action="store_true",
                   help="overwrite --out; by default rows of other policies already in it are "
                        "kept (so policies can be run one at a time)")
    p.add_argument("overrides", nargs="*", help="train recipe overrides key=value")
    a = p.parse_args(argv)
    spec = yaml.safe_load(Path(a.config).read_text())
    base = apply_overrides(copy.deepcopy(spec["train"]), list(a.overrides) +
                           ([f"optim.max_steps={a.steps}"] if a.steps else []))
    out_dir = Path(base["out_dir"])
    policies = a.policies or list(spec["policies"])
    unknown = set(policies) - set(spec["policies"])
    if unknown:
        raise SystemExit(f"unknown policies {sorted(unknown)}; in {a.config}: "
                         f"{', '.join(spec['policies'])}")
    if a.canaries:
        canaries = Path(a.canaries)
    else:
        canaries = out_dir / "canaries" / "canaries.jsonl"
        if not canaries.exists():
            c = dict(spec.get("canaries", {}))
            if "repetitions" in c:
                c["repetitions"] = tuple(c["repetitions"])
            make_canaries(canaries.parent, CanaryConfig(**c))
    confidence = spec.get("audit", {}).get("confidence", 0.95)
    cfg0 = from_dict(TrainConfig, {**copy.deepcopy(base), "out_dir": str(out_dir / "_probe")})
    ensure_corpus(cfg0)
    rates = {"canaries": speech_rate([c.utt for c in read_canaries(canaries)]),
             "training_corpus": speech_rate(read_manifest(manifest_paths(cfg0)["train"]))}
    print(f"speech rate (characters/s): {json.dumps(rates)}", flush=True)
    out = Path(a.out)
    rows = [] if a.fresh or not out.exists() else [
        r for r in json.loads(out.read_text()) if r["policy"] not in policies]
    audits, runs = {}, {}
    for name in policies:
        d = copy.deepcopy(base)
        d["out_dir"] = str(out_dir / name)
        d.setdefault("audit", {})["canaries"] = str(canaries)
        if spec["policies"][name]:
            d["privacy"] = {**d.get("privacy", {}), **copy.deepcopy(spec["policies"][name])}
        cfg = from_dict(TrainConfig, d)
        print(f"== {name}: training {cfg.optim.max_steps} steps in {cfg.out_dir}", flush=True)
        t = time.time()
        train = run_training(cfg)
        print(f"== {name}: test WER {train['test_wer']:.3f} ({time.time() - t:.0f} s); auditing",
              flush=True)
        audit = run_audit(Path(cfg.out_dir) / "last.pt", canaries,
                          out=Path(cfg.out_dir) / "audit.json", device=str(train["device"]),
                          confidence=confidence)
        audits[name], runs[name] = audit, train
        write_report(cfg.out_dir, f"privasr memorization: {name}",
                     {"Test": [{"test WER": train["test_wer"], "test CER": train["test_cer"],
                                "steps": train["steps"]}]},
                     sections=[memorization_section({name: audit})])
        rows += rows_for(name, audit, train)
        order = list(spec["policies"])
        rows.sort(key=lambda r: (order.index(r["policy"]) if r["policy"] in order else 99,
                                 r["repetitions"]))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(rows, indent=1))  # after every policy: partial results
    # the plots compare every policy audited in out_dir so far, not only this invocation's
    audits_all = {k: json.loads((out_dir / k / "audit.json").read_text())
                  for k in spec["policies"] if (out_dir / k / "audit.json").exists()}
    write_audit_report(audits_all, out_dir / "memorization.html")
    meta = {"command": " ".join(sys.argv), "platform": platform.platform(),
            "config": a.config, "canaries": str(canaries), "overrides": a.overrides,
            "speech_rate_chars_per_second": rates,
            "runs": {k: {"out_dir": str(out_dir / k), "test_wer": v["test_wer"],
                         "steps": v["steps"]} for k, v in runs.items()}}
    atomic_write_text(Path(a.out).with_suffix(".meta.json"), json.dumps(meta, indent=1))
    print(f"{'policy':<12} {'r':>3} {'ins EM':>7} {'held EM':>7} {'exposure':>8} {'ε lb':>6} "
          f"{'test WER':>8}")
    for r in [r for r in rows if r["policy"] in policies]:
        em = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        ex = "-" if r["exposure"] is None else f"{r['exposure']:.2f}"
        print(f"{r['policy']:<12} {r['repetitions']:>3} {em(r['inserted_exact_match']):>7} "
              f"{em(r['heldout_exact_match']):>7} {ex:>8} {r['epsilon_lower_bound']:6.3f} "
              f"{100 * r['test_wer']:7.1f}%")
    print(f"wrote {a.out} and {out_dir / 'memorization.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
