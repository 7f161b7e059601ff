"""The memorization experiment (issue 17): per clipping policy × batch size × seed, train on a
corpus plus inserted canaries, audit, and say whether clipping removes the memorization.

    python benchmarks/memorization.py [--config configs/memorization_faithful.yaml]
        [--grid cpu|full] [--policies none per_example ...] [--batch-sizes 32 128] [--seeds 0 1]
        [--max-runs N] [--plan] [--out benchmarks/results/memorization.json]
        [train overrides key=value ..., e.g. device=cuda bf16=true]

The config (``configs/memorization*.yaml``) has ``canaries`` (make-canaries settings; the seed
is the run's seed), ``train`` (a privasr train recipe; overrides on the command line apply to
it), ``policies`` (name -> privacy section, ``{}`` = ordinary training) and ``grid``: a list of
``{policies, batch_sizes, seeds}`` blocks, run in order; ``cpu_grid`` (same form) is the
slice that ``--grid cpu`` (the default) runs, sized for 2 CPU cores; ``--grid full`` runs the
whole ``grid`` (a GPU session, or several CPU sessions). Each cell (policy, B, seed):

- canaries ``<out_dir>/s<seed>/canaries`` (one set per seed, shared by the seed's cells), run
  directory ``<out_dir>/s<seed>/b<B>/<policy>``;
- batch ``B`` utterances (``batch.max_utts=B``, ``batch.max_seconds`` scaled with B) at **equal
  epochs**: ``optim.max_steps`` and ``optim.warmup_steps`` scale by ``reference_batch / B``,
  ``optim.lr`` by ``sqrt(B / reference_batch)`` (square-root scaling for Adam); the config's
  train section is the recipe at ``reference_batch``;
- its rows (one per repetition count r) land in ``--out`` keyed by everything that determines
  the run (the cell's whole train recipe and the canaries' sha256), after every cell: a rerun --
  also in a later session, from the committed JSON -- skips finished cells; an interrupted cell
  resumes from its ``last.pt``. ``--max-runs N`` stops after N new cells (session-sized slices).

``summary`` (recomputed from all rows of the full grid, whichever slice ran): per (policy, B) and r the inserted /
held-out exact match pooled over seeds and per seed, the inserted-minus-held-out gap, CER,
exposure, AUC, one-run ε lower bound, test WER (mean, sd, values), canary-copy share, and the
mechanism probe (per-example gradient norm ratio canary / ordinary, norm shares with and without
clipping; ``audit.norm_probe_every``); then the issue's criteria: does the unclipped model
memorize (r = 16 exact match ≥ 50 %, held-out ≤ 5 %, copies ≤ 2 %), at which batch sizes
per-example clipping brings every r's gap to ≤ 5 points at ≤ 5 % relative WER cost, and the
per-core / APCC WER comparison with seed spread. Plots and an HTML report go to ``out_dir``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from privasr.atomic import atomic_write_text  # noqa: E402
from privasr.audit.norm_probe import summarize_rows  # noqa: E402
from privasr.audit.canaries import (CanaryConfig, make_canaries, read_canaries,  # noqa: E402
                                    speech_rate, training_copies)
from privasr.audit.report import memorization_section, write_audit_report  # noqa: E402
from privasr.audit.run import run_audit  # noqa: E402
from privasr.config import TrainConfig, apply_overrides, from_dict, to_dict  # noqa: E402
from privasr.data.manifest import read_manifest  # noqa: E402
from privasr.data.splits import ensure_corpus, manifest_paths  # noqa: E402
from privasr.report.html import write_report  # noqa: E402

MEMORIZES_EM, MEMORIZES_HELDOUT, MAX_COPY_SHARE = 0.5, 0.05, 0.02   # issue 17, item 1
MITIGATED_GAP, MAX_WER_COST = 0.05, 0.05                             # issue 17, done-when
RUN_FIELDS_IGNORED = ("out_dir", "progress", "threads", "device", "bf16")  # not in the key


class Cell(NamedTuple):
    policy: str
    batch: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.policy}/b{self.batch}/s{self.seed}"


# -- plan ----------------------------------------------------------------------------------------
def grid_of(spec: dict, base: dict, size: str = "full") -> list[dict]:
    """The config's ``grid`` (``size="full"``) or ``cpu_grid`` (``"cpu"``, falls back to the
    full grid); without either, every policy at the recipe's batch and seed."""
    if size not in ("full", "cpu"):
        raise SystemExit(f"unknown grid size {size!r}: cpu or full")
    blocks = spec.get("cpu_grid") if size == "cpu" else None
    return blocks or spec.get("grid") or [{"policies": list(spec["policies"]),
                                           "batch_sizes": [base["batch"]["max_utts"]],
                                           "seeds": [base.get("seed", 0)]}]


def plan_cells(spec: dict, base: dict, *, policies=None, batches=None, seeds=None,
               size: str = "full") -> list[Cell]:
    """Every cell of the grid in order (duplicates once), filtered by the CLI's choices."""
    out: list[Cell] = []
    for block in grid_of(spec, base, size):
        unknown = set(block["policies"]) - set(spec["policies"])
        if unknown:
            raise SystemExit(f"grid names unknown policies {sorted(unknown)}; defined: "
                             f"{', '.join(spec['policies'])}")
        for s in block["seeds"]:
            for b in block["batch_sizes"]:
                for p in block["policies"]:
                    c = Cell(p, int(b), int(s))
                    if c in out or (policies and p not in policies) or \
                            (batches and c.batch not in batches) or (seeds and c.seed not in seeds):
                        continue
                    out.append(c)
    return out


def reference_batch(spec: dict, base: dict) -> int:
    return int(spec.get("reference_batch", base["batch"]["max_utts"]))


def cell_recipe(spec: dict, base: dict, cell: Cell, canaries: Path, out_dir: Path) -> dict:
    """The train recipe of one cell (equal epochs across batch sizes, see the module doc)."""
    d = copy.deepcopy(base)
    ref = reference_batch(spec, base)
    f = ref / cell.batch
    d["seed"] = cell.seed
    d["out_dir"] = str(out_dir / f"s{cell.seed}" / f"b{cell.batch}" / cell.policy)
    d.setdefault("batch", {})["max_utts"] = cell.batch
    if cell.batch != ref:
        d["batch"]["max_seconds"] = d["batch"]["max_seconds"] / f
        o = d.setdefault("optim", {})
        o["max_steps"] = max(1, round(o["max_steps"] * f))
        o["warmup_steps"] = max(1, round(o.get("warmup_steps", 300) * f))
        o["lr"] = o.get("lr", 2e-3) * math.sqrt(1 / f)
    d.setdefault("audit", {})["canaries"] = str(canaries)
    if spec["policies"][cell.policy]:
        d["privacy"] = {**d.get("privacy", {}), **copy.deepcopy(spec["policies"][cell.policy])}
    return d


def file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cell_key(cell: Cell, recipe: dict, canaries: Path) -> dict:
    """Everything that determines a cell's result: the whole recipe (as the config class reads
    it, so defaults count) minus where and how fast it runs, and the canaries' content."""
    cfg = to_dict(from_dict(TrainConfig, recipe))
    for k in RUN_FIELDS_IGNORED:
        cfg.pop(k, None)
    cfg.get("audit", {}).pop("canaries", None)
    return {"policy": cell.policy, "batch": cell.batch, "seed": cell.seed,
            "recipe_sha": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest(),
            "canaries_sha": file_sha(canaries)}


def ensure_canaries(spec: dict, out_dir: Path, seed: int) -> Path:
    path = out_dir / f"s{seed}" / "canaries" / "canaries.jsonl"
    if not path.exists():
        c = dict(spec.get("canaries", {}))
        if "repetitions" in c:
            c["repetitions"] = tuple(c["repetitions"])
        c["seed"] = seed
        make_canaries(path.parent, CanaryConfig(**c))
    return path


# -- rows ----------------------------------------------------------------------------------------
def probe_stats(run_dir: Path, train: dict) -> dict:
    """The mechanism numbers of a run from its ``norm_probe.csv`` (every logged probe row, also
    of a run resumed or entered again): :func:`summarize_rows`, with the clipped share named
    ``share_clipped_*`` whether C is the run's bound or the ordinary median (``clip`` says)."""
    import csv

    f = Path(run_dir) / "norm_probe.csv"
    rows = list(csv.DictReader(f.open())) if f.exists() else []
    stats = summarize_rows(rows)
    at_median = any(k.startswith("share_clipped_at_median") for k in stats)
    out = {k.replace("share_clipped_at_median", "share_clipped"): v for k, v in stats.items()}
    out.setdefault("share_clipped_median", None)
    out.setdefault("share_clipped_last", None)
    out.update(rows=len(rows), every=(train.get("norm_probe") or {}).get("every"),
               clip="C = the ordinary median (the run has no per-example bound)" if at_median
               else "the run's C")
    return out


def rows_for(cell: Cell, key: dict, audit: dict, train: dict, *, train_utts: int,
             copies: int, run_dir: Path) -> list[dict]:
    probe = probe_stats(run_dir, train)
    eps = audit["one_run"]["epsilon"]
    common = {"policy": cell.policy, "batch": cell.batch, "seed": cell.seed,
              "held_out": audit["held_out"],
              "heldout_exact_match": audit["heldout_exact_match"],
              "heldout_cer": audit["heldout_cer"],
              "epsilon_lower_bound": eps, "epsilon_confidence": audit["one_run"]["confidence"],
              "auc": audit["auc"], "tpr_at_1pct_fpr": audit["tpr_at_1pct_fpr"],
              "test_wer": train["test_wer"], "test_cer": train["test_cer"],
              "steps": train["steps"], "epochs": train["steps"] * cell.batch / (train_utts + copies),
              "train_utts": train_utts, "canary_copies": copies,
              "copy_share": copies / (train_utts + copies),
              **{f"probe_{k}": v for k, v in probe.items()},
              # all invocations of the run (None: resumed from a checkpoint older than the total)
              "train_wall_seconds": train.get("train_wall_seconds_total"),
              "train_wall_seconds_last_invocation": train["train_wall_seconds"],
              "device": train["device"],
              "key": key}
    return [{**common, "repetitions": r["repetitions"], "inserted": r["inserted"],
             "inserted_exact_match": r["inserted_exact_match"],
             "inserted_cer": r["inserted_cer"],
             "heldout_matched_exact_match": r["heldout_matched_exact_match"],
             "exposure": r["exposure"], "exposure_extrapolated": r["exposure_extrapolated"]}
            for r in audit["by_repetitions"]]


# -- summary -------------------------------------------------------------------------------------
def stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return {"values": xs, "mean": statistics.fmean(xs) if xs else None,
            "sd": statistics.stdev(xs) if len(xs) > 1 else None}


def pooled(rows: list[dict], field: str, n_field: str) -> float | None:
    """Σ rate·n / Σ n over seeds: the fraction of all canaries that matched."""
    n = sum(r[n_field] for r in rows if r[field] is not None)
    return sum(r[field] * r[n_field] for r in rows if r[field] is not None) / n if n else None


def summarize_cell(rows: list[dict]) -> dict:
    runs = {r["seed"]: r for r in rows}  # one row per seed for the run-level fields
    by_r = {}
    for rep in sorted({r["repetitions"] for r in rows}):
        rr = [r for r in rows if r["repetitions"] == rep]
        ins, held = pooled(rr, "inserted_exact_match", "inserted"), \
            pooled(list(runs.values()), "heldout_exact_match", "held_out")
        by_r[rep] = {"inserted": sum(r["inserted"] for r in rr),
                     "inserted_exact_match": ins,
                     "inserted_exact_match_per_seed": [r["inserted_exact_match"] for r in rr],
                     "heldout_exact_match": held,
                     "gap": None if ins is None or held is None else ins - held,
                     "inserted_cer": stats([r["inserted_cer"] for r in rr])["mean"],
                     "exposure": stats([r["exposure"] for r in rr])}
    one = list(runs.values())
    return {"seeds": sorted(runs), "by_repetitions": by_r,
            "heldout_exact_match": pooled(one, "heldout_exact_match", "held_out"),
            "heldout_cer": stats([r["heldout_cer"] for r in one])["mean"],
            "held_out": sum(r["held_out"] for r in one),
            "test_wer": stats([r["test_wer"] for r in one]),
            "auc": stats([r["auc"] for r in one]),
            "epsilon_lower_bound": stats([r["epsilon_lower_bound"] for r in one]),
            "copy_share_max": max(r["copy_share"] for r in one),
            "epochs": stats([r["epochs"] for r in one])["mean"],
            "mechanism": {k: stats([r.get(f"probe_{k}") for r in one])["mean"]
                          for k in ("ratio_first", "ratio_last", "ratio_median",
                                    "share_unclipped_median", "share_clipped_median",
                                    "share_unclipped_last", "share_clipped_last")}}


def versus_baseline(rows: list[dict], policy: str, batch: int, field: str,
                    baseline: str = "none", relative: bool = False) -> dict | None:
    """``field`` of ``policy`` minus ``baseline``'s (default: the unclipped run), paired by seed
    (same canaries, same data order seed): the per-seed differences (``relative``: policy /
    baseline - 1), their mean and sd, and whether the mean difference exceeds the seed spread:
    |mean| > the larger of the two policies' seed sd (relative to the baseline's mean when
    ``relative``) and > the sd of the paired differences themselves; None below 2 seeds each.
    ``p_paired_t``: two-sided one-sample t test of the differences against 0 (None below 2 seeds):
    the spread rule is a weak criterion at 2-3 seeds, the p value says how weak."""
    def per_seed(p: str) -> dict[int, float]:
        return {r["seed"]: r[field] for r in rows if r["policy"] == p and r["batch"] == batch
                and r[field] is not None}
    mine, base = per_seed(policy), per_seed(baseline)
    seeds = sorted(set(mine) & set(base))
    if not seeds:
        return None
    d = stats([mine[s] / base[s] - 1 if relative else mine[s] - base[s] for s in seeds])
    sds = [stats(list(x.values()))["sd"] for x in (mine, base)]
    spread = None if None in sds or d["sd"] is None else max(
        max(sds) / (stats(list(base.values()))["mean"] if relative else 1.0), d["sd"])
    return {"seeds": seeds, "diffs": d["values"], "mean": d["mean"], "sd": d["sd"],
            "exceeds_seed_spread": None if spread is None else abs(d["mean"]) > spread,
            "p_paired_t": paired_t_p(d["values"])}


def paired_t_p(diffs: list[float]) -> float | None:
    """Two-sided p value of a one-sample t test of ``diffs`` against 0; None below 2 values."""
    from scipy.stats import ttest_1samp

    if len(diffs) < 2:
        return None
    if max(diffs) == min(diffs):                       # no spread: t is 0 or infinite
        return 1.0 if diffs[0] == 0 else 0.0
    return float(ttest_1samp(diffs, 0.0).pvalue)


def exact_match_vs_none(rows: list[dict], policy: str, batch: int) -> dict:
    """Per r: canaries recognised exactly under ``policy`` vs without clipping, pooled over the
    seeds both have, with Fisher's exact test (two-sided, and one-sided for "``policy``
    recognises fewer")."""
    from scipy.stats import fisher_exact

    def counts(p: str, seeds: set[int]) -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for r in rows:
            if r["policy"] == p and r["batch"] == batch and r["seed"] in seeds \
                    and r["inserted_exact_match"] is not None:
                k, n = out.get(r["repetitions"], (0, 0))
                out[r["repetitions"]] = (k + round(r["inserted_exact_match"] * r["inserted"]),
                                         n + r["inserted"])
        return out

    seeds = ({r["seed"] for r in rows if r["policy"] == policy and r["batch"] == batch}
             & {r["seed"] for r in rows if r["policy"] == "none" and r["batch"] == batch})
    mine, base = counts(policy, seeds), counts("none", seeds)
    out = {}
    for rep in sorted(set(mine) & set(base)):
        (k1, n1), (k0, n0) = mine[rep], base[rep]
        table = [[k1, n1 - k1], [k0, n0 - k0]]
        out[rep] = {"matched": k1, "of": n1, "none_matched": k0, "none_of": n0,
                    "p_two_sided": float(fisher_exact(table)[1]),
                    "p_fewer": float(fisher_exact(table, alternative="less")[1])}
    return {"seeds": sorted(seeds), "by_repetitions": out}


def summarize(rows: list[dict]) -> dict:
    cells: dict[str, dict] = {}
    for p, b in sorted({(r["policy"], r["batch"]) for r in rows}, key=lambda t: (t[1], t[0])):
        cells[f"{p}/b{b}"] = {"policy": p, "batch": b, **summarize_cell(
            [r for r in rows if r["policy"] == p and r["batch"] == b])}
    out: dict = {"cells": cells, "memorizes": {}, "per_example": {}, "per_core": {}}
    for name, c in cells.items():
        if c["policy"] != "none":
            continue
        r16 = c["by_repetitions"].get(16) or c["by_repetitions"][max(c["by_repetitions"])]
        out["memorizes"][c["batch"]] = {
            "r16_exact_match": r16["inserted_exact_match"],
            "heldout_exact_match": c["heldout_exact_match"],
            "copy_share_max": c["copy_share_max"],
            "holds": bool(r16["inserted_exact_match"] is not None
                          and r16["inserted_exact_match"] >= MEMORIZES_EM
                          and c["heldout_exact_match"] is not None
                          and c["heldout_exact_match"] <= MEMORIZES_HELDOUT
                          and c["copy_share_max"] <= MAX_COPY_SHARE)}
    ok_batches = []
    for name, c in cells.items():
        base = cells.get(f"none/b{c['batch']}")
        if c["policy"] != "per_example":
            continue
        gaps = {r: v["gap"] for r, v in c["by_repetitions"].items()}
        cost = (c["test_wer"]["mean"] / base["test_wer"]["mean"] - 1) if base else None
        ok = all(g is not None and g <= MITIGATED_GAP for g in gaps.values()) and \
            cost is not None and cost <= MAX_WER_COST
        out["per_example"][c["batch"]] = {"max_gap": max(g for g in gaps.values() if g is not None),
                                          "gaps": gaps, "wer_cost_relative": cost,
                                          "wer_vs_none": versus_baseline(
                                              rows, "per_example", c["batch"], "test_wer"),
                                          "exact_match_vs_none": exact_match_vs_none(
                                              rows, "per_example", c["batch"]),
                                          "mitigates": ok}
        if ok:
            ok_batches.append(c["batch"])
    out["per_example_smallest_mitigating_batch"] = min(ok_batches) if ok_batches else None
    out["largest_batch_tried"] = max((c["batch"] for c in cells.values()), default=None)
    for b in sorted({c["batch"] for c in cells.values()}):
        group = {c["policy"]: c for c in cells.values()
                 if c["batch"] == b and (c["policy"] == "none" or c["policy"].startswith(
                     ("per_core", "pcc", "apcc")))}
        if len(group) < 2:
            continue
        wer = {p: c["test_wer"] for p, c in group.items()}
        sds = [w["sd"] for w in wer.values() if w["sd"] is not None]
        pcc = {p: w for p, w in wer.items() if p != "none" and not p.startswith("apcc")}
        best = min(pcc, key=lambda p: wer[p]["mean"]) if pcc else None
        apcc = next((p for p in wer if p.startswith("apcc")), None)
        out["per_core"][b] = {
            "test_wer": wer,
            "wer_vs_none": {p: versus_baseline(rows, p, b, "test_wer")
                            for p in group if p != "none"},
            "exposure_r16": {p: c["by_repetitions"].get(16, {}).get("exposure", {}).get("mean")
                             for p, c in group.items()},
            "auc": {p: c["auc"] for p, c in group.items()},
            "auc_vs_none": {p: versus_baseline(rows, p, b, "auc") for p in group if p != "none"},
            "exact_match_vs_none": {p: exact_match_vs_none(rows, p, b)
                                    for p in group if p != "none"},
            "epsilon_lower_bound": {p: c["epsilon_lower_bound"] for p, c in group.items()},
            "largest_seed_sd": max(sds) if sds else None,
            "best_pcc": best,
            "apcc_vs_best_pcc_relative": (wer[apcc]["mean"] / wer[best]["mean"] - 1)
            if apcc and best else None,
            "apcc_vs_best_pcc_paired": versus_baseline(rows, apcc, b, "test_wer", baseline=best,
                                                       relative=True) if apcc and best else None,
            "min_seeds": min(len(w["values"]) for w in wer.values())}
    return out


def markdown_table(summary: dict) -> str:
    """The README's table: one line per (policy, B), exact match per r pooled over seeds."""
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}"  # noqa: E731
    lines = ["| policy | B | seeds | inserted exact match % r = 1 / 2 / 4 / 8 / 16 (n at r = 16) "
             "| held-out % | exposure r = 16 | AUC | one-run ε ≥ | test WER % | norm ratio "
             "canary / ordinary |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in summary["cells"].values():
        br = c["by_repetitions"]
        ems = " / ".join(pct(br[r]["inserted_exact_match"]) for r in sorted(br))
        top = br[max(br)]
        w, eps = c["test_wer"], c["epsilon_lower_bound"]
        sd = lambda v, f=1: "" if v["sd"] is None else f" ± {f * v['sd']:.2f}"  # noqa: E731
        ratio = c["mechanism"]["ratio_median"]
        lines.append(
            f"| {c['policy']} | {c['batch']} | {','.join(map(str, c['seeds']))} | {ems} "
            f"({top['inserted']}) | {pct(c['heldout_exact_match'])} "
            f"| {top['exposure']['mean']:.2f}{sd(top['exposure'])} "
            f"| {c['auc']['mean']:.2f} | {eps['mean']:.2f} "
            f"| {100 * w['mean']:.2f}{sd(w, 100)} "
            f"| {'-' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def per_core_table(summary: dict) -> str:
    """The PCC / APCC comparison: test WER and audit vs the unclipped run, paired by seed."""
    lines = ["| B | policy | seeds | test WER % | Δ WER vs none (paired, points) | beyond seed "
             "spread | APCC vs best PCC (paired, relative %) | AUC | one-run ε ≥ | exposure "
             "r = 16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, k=100: "-" if v is None else f"{k * v:.2f}"  # noqa: E731

    def paired(d: dict | None) -> tuple[str, str]:
        if d is None:
            return "–", "–"
        delta = f(d["mean"]) + ("" if d["sd"] is None else f" ± {f(d['sd'])}")
        beyond = "–" if d["exceeds_seed_spread"] is None else \
            ("yes" if d["exceeds_seed_spread"] else "no")
        if d.get("p_paired_t") is not None:
            beyond += f", t test p = {d['p_paired_t']:.2f}"
        return delta, beyond

    for b, pc in summary["per_core"].items():
        for p, w in pc["test_wer"].items():
            delta, beyond = paired(pc["wer_vs_none"].get(p))
            vs_best = pc.get("apcc_vs_best_pcc_paired") if p.startswith("apcc") else None
            best = "–" if vs_best is None else \
                f"{paired(vs_best)[0]} vs {pc['best_pcc']} (beyond spread: {paired(vs_best)[1]})"
            sd = "" if w["sd"] is None else f" ± {f(w['sd'])}"
            lines.append(f"| {b} | {p} | {len(w['values'])} | {f(w['mean'])}{sd} | {delta} "
                         f"| {beyond} | {best} | {f(pc['auc'][p]['mean'], 1)} "
                         f"| {f(pc['epsilon_lower_bound'][p]['mean'], 1)} "
                         f"| {f(pc['exposure_r16'][p], 1)} |")
    return "\n".join(lines)


# -- plots and report -----------------------------------------------------------------------------
def plot(summary: dict, path: Path, rows: list[dict] = ()) -> Path:
    """Exact match and exposure against r per cell; with ``rows``, also each cell's test WER
    per seed (a line joins one seed's cells at one batch size: the paired comparison)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if rows else 2, figsize=(16.5 if rows else 11, 4.2))
    if rows:
        names = list(summary["cells"])
        wer = {(r["policy"], r["batch"], r["seed"]): r["test_wer"] for r in rows
               if r["test_wer"] is not None}
        for seed in sorted({k[2] for k in wer}):
            for b in sorted({k[1] for k in wer}):
                pts = [(i, 100 * wer[(c["policy"], b, seed)]) for i, (n, c) in
                       enumerate(summary["cells"].items())
                       if c["batch"] == b and (c["policy"], b, seed) in wer]
                axes[2].plot(*zip(*pts), marker="o", color=f"C{seed}", alpha=0.7,
                             label=f"seed {seed}" if b == min(k[1] for k in wer) else None)
        axes[2].set_xticks(range(len(names)), names, rotation=60, fontsize=7, ha="right")
        axes[2].set_title("test WER % per seed (line: one seed, one B)", fontsize=9)
        axes[2].legend(fontsize=7)
    for name, c in summary["cells"].items():
        reps = sorted(c["by_repetitions"])
        ins = [c["by_repetitions"][r]["inserted_exact_match"] for r in reps]
        line = axes[0].plot(reps, [100 * (x or 0) for x in ins], marker="o",
                            label=f"{name} (s {','.join(map(str, c['seeds']))})")
        axes[0].axhline(100 * (c["heldout_exact_match"] or 0), color=line[0].get_color(),
                        linestyle=":", linewidth=0.8)
        ex = [c["by_repetitions"][r]["exposure"]["mean"] for r in reps]
        axes[1].plot(reps, ex, marker="o", color=line[0].get_color(), label=name)
    for ax, t in zip(axes[:2], ("inserted exact match % (dotted: held-out)", "exposure (bits)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("repetitions r")
        ax.set_title(t, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(summary: dict, out_dir: Path, rows: list[dict] = ()) -> Path:
    import base64

    png = plot(summary, out_dir / "memorization_faithful.png", rows)
    rows = []
    for name, c in summary["cells"].items():
        for r, v in c["by_repetitions"].items():
            rows.append({"cell": name, "seeds": len(c["seeds"]), "r": r,
                         "inserted": v["inserted"],
                         "inserted EM %": round(100 * (v["inserted_exact_match"] or 0), 1),
                         "held-out EM %": round(100 * (v["heldout_exact_match"] or 0), 1),
                         "exposure": v["exposure"]["mean"],
                         "test WER %": round(100 * c["test_wer"]["mean"], 2),
                         "norm ratio (median)": c["mechanism"]["ratio_median"]})
    return write_report(out_dir, "privasr memorization: policy × batch × seed",
                        {"Cells": rows}, figures={"memorization": base64.b64encode(
                            png.read_bytes()).decode()})


# -- driver --------------------------------------------------------------------------------------
def load_rows(out: Path) -> list[dict]:
    """Earlier keyed rows of ``out`` (a list-format file of the old driver has none)."""
    if not out.exists():
        return []
    data = json.loads(out.read_text())
    return [r for r in (data.get("rows", []) if isinstance(data, dict) else []) if "key" in r]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "memorization_faithful.yaml"))
    p.add_argument("--grid", choices=("cpu", "full"), default="cpu",
                   help="cpu: the config's cpu_grid (default; sized for 2 CPU cores: ~2.5 h, the sum of "
                        "its cells' measured times); "
                        "full: its whole grid (a GPU session: add device=cuda)")
    p.add_argument("--policies", nargs="+", default=None)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None,
                   help="optim.max_steps at the reference batch (smoke tests)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after N new cells")
    p.add_argument("--plan", action="store_true", help="list the cells and which are done")
    p.add_argument("--refresh", action="store_true",
                   help="rebuild finished cells' rows from their run directories (results.json, "
                        "audit.json, norm_probe.csv) where present; trains nothing")
    p.add_argument("--table", action="store_true",
                   help="print the results' markdown table from --out and exit")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memorization.json"))
    p.add_argument("overrides", nargs="*", help="train recipe overrides key=value")
    a = p.parse_args(argv)
    if a.table:
        summary = summarize(load_rows(Path(a.out)))
        print(markdown_table(summary))
        if summary["per_core"]:
            print()
            print(per_core_table(summary))
        return 0
    spec = yaml.safe_load(Path(a.config).read_text())
    base = apply_overrides(copy.deepcopy(spec["train"]), list(a.overrides) +
                           ([f"optim.max_steps={a.steps}"] if a.steps else []))
    out_dir, out = Path(base["out_dir"]), Path(a.out)
    cells = plan_cells(spec, base, policies=a.policies, batches=a.batch_sizes, seeds=a.seeds,
                       size=a.grid)
    # the summary and --plan cover the full grid (the cpu grid is a slice of it) plus any
    # cpu-grid cell outside it
    all_cells = plan_cells(spec, base)
    all_cells += [c for c in plan_cells(spec, base, size="cpu") if c not in all_cells]
    confidence = spec.get("audit", {}).get("confidence", 0.95)
    cfg0 = from_dict(TrainConfig, {**copy.deepcopy(base), "out_dir": str(out_dir / "_probe")})
    ensure_corpus(cfg0)
    train_manifest = read_manifest(manifest_paths(cfg0)["train"])
    stored = load_rows(out)
    rows_by_key = {json.dumps(r["key"], sort_keys=True): r for r in stored}

    def keyed(cell: Cell) -> tuple[dict, dict, Path, int]:
        canaries = ensure_canaries(spec, out_dir, cell.seed)
        recipe = cell_recipe(spec, base, cell, canaries, out_dir)
        copies = len(training_copies(read_canaries(canaries)))
        return recipe, cell_key(cell, recipe, canaries), canaries, copies

    def done(key: dict) -> list[dict]:
        k = json.dumps(key, sort_keys=True)
        return [r for r in stored if json.dumps(r["key"], sort_keys=True) == k]

    rows: list[dict] = []
    current = set()
    for cell in all_cells:
        _, key, _, _ = keyed(cell)
        current.add(json.dumps(key, sort_keys=True))
        rows += done(key)
    if a.plan:
        for cell in all_cells:
            _, key, _, copies = keyed(cell)
            state = "done" if done(key) else ("selected" if cell in cells else "-")
            print(f"{cell.name:<28} {state:<9} copies {copies}")
        return 0
    rates = {"training_corpus": speech_rate(train_manifest)}
    print(f"speech rate (characters/s): {json.dumps(rates)}", flush=True)
    new = 0

    def save() -> dict:
        summary = summarize(rows)
        kept = [r for r in stored if json.dumps(r["key"], sort_keys=True) not in current]
        meta = {"command": " ".join(sys.argv), "platform": platform.platform(),
                "config": a.config, "overrides": a.overrides, "grid": grid_of(spec, base),
                "cpu_grid": grid_of(spec, base, "cpu"),
                "reference_batch": reference_batch(spec, base),
                "speech_rate_chars_per_second": rates,
                "criteria": {"memorizes_r16_exact_match": MEMORIZES_EM,
                             "memorizes_heldout_max": MEMORIZES_HELDOUT,
                             "max_copy_share": MAX_COPY_SHARE,
                             "mitigated_gap": MITIGATED_GAP, "max_wer_cost": MAX_WER_COST}}
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps({"summary": summary, "meta": meta, "rows": rows,
                                           "rows_outside_grid": kept}, indent=1))
        return summary

    for cell in cells:
        recipe, key, canaries, copies = keyed(cell)
        if done(key):
            run_dir = Path(recipe["out_dir"])
            files = [run_dir / "results.json", run_dir / "audit.json"]
            if a.refresh and all(f.exists() for f in files):
                k = json.dumps(key, sort_keys=True)
                rows = [r for r in rows if json.dumps(r["key"], sort_keys=True) != k]
                rows += rows_for(cell, key, json.loads(files[1].read_text()),
                                 json.loads(files[0].read_text()),
                                 train_utts=len(train_manifest), copies=copies, run_dir=run_dir)
                print(f"== {cell.name}: rows rebuilt from {run_dir}", flush=True)
                save()
            else:
                print(f"== {cell.name}: done (row in {out})", flush=True)
            continue
        if a.refresh:
            continue
        if a.max_runs is not None and new >= a.max_runs:
            print(f"== stopping after {new} new cell(s) (--max-runs)", flush=True)
            break
        cfg = from_dict(TrainConfig, recipe)
        print(f"== {cell.name}: {cfg.optim.max_steps} steps of {cell.batch} utterances, lr "
              f"{cfg.optim.lr:.3g}, in {cfg.out_dir}", flush=True)
        from privasr.recipes.train import run_training

        t = time.time()
        train = run_training(cfg)
        print(f"== {cell.name}: test WER {train['test_wer']:.3f} ({time.time() - t:.0f} s); "
              f"auditing", flush=True)
        audit = run_audit(Path(cfg.out_dir) / "last.pt", canaries,
                          out=Path(cfg.out_dir) / "audit.json", device=str(train["device"]),
                          confidence=confidence)
        write_report(cfg.out_dir, f"privasr memorization: {cell.name}",
                     {"Test": [{"test WER": train["test_wer"], "test CER": train["test_cer"],
                                "steps": train["steps"]}]},
                     sections=[memorization_section({cell.name: audit})])
        rows += rows_for(cell, key, audit, train, train_utts=len(train_manifest), copies=copies,
                         run_dir=Path(cfg.out_dir))
        new += 1
        save()
    summary = save()
    audits = {}
    for cell in all_cells:
        f = out_dir / f"s{cell.seed}" / f"b{cell.batch}" / cell.policy / "audit.json"
        if f.exists():
            audits[cell.name] = json.loads(f.read_text())
    if audits:
        write_audit_report(audits, out_dir / "memorization.html")
    if rows:
        report(summary, out_dir, rows)
    print(f"{'cell':<22} {'r':>3} {'ins EM':>7} {'held EM':>7} {'exposure':>8} {'test WER':>8}")
    for name, c in summary["cells"].items():
        for r, v in c["by_repetitions"].items():
            em = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
            ex = v["exposure"]["mean"]
            print(f"{name:<22} {r:>3} {em(v['inserted_exact_match']):>7} "
                  f"{em(v['heldout_exact_match']):>7} {'-' if ex is None else f'{ex:.2f}':>8} "
                  f"{100 * c['test_wer']['mean']:7.1f}%")
    print(json.dumps({k: summary[k] for k in ("memorizes", "per_example",
                                              "per_example_smallest_mitigating_batch")},
                     indent=1, default=str))
    print(f"wrote {out} and {out_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
