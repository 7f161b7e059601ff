"""FL + user-level DP, the 2 × 2 factorial (docs/federated.md, issue 18): {global, per-layer}
clipping × {FedAvg, LAMB}, plus FL without DP, from one seed model, ≥ 2 seeds, resumable.

    python benchmarks/fl_dp.py --config configs/fl_dp_assistant.yaml --seeds 0,1 --tune
        [--seed-checkpoint runs/demo/last.pt] [--variants none:fedavg,global:lamb,...]
        [--work runs/fl_dp] [--out benchmarks/results/fl_dp.json] [FL overrides ...]

1. The seed model: ``--seed-checkpoint`` (default: the recipe's ``init_checkpoint``), or, with
   ``--seed-fraction F``, a model trained centrally (``--seed-recipe``) on a fraction F of the
   training speakers, the others being the clients. Its test WER is the row every variant
   starts from.
2. ``--tune`` chooses on the DEV speakers only (never the test speakers, never the clients):
   - the clip bound C: the median L2 norm of the dev speakers' local updates from the seed model
     (the local recipe the clients run; ``--tune-probe-rounds`` draws of each speaker's batches),
     the usual "clip at the median update norm" rule (Andrew et al. 2021, target quantile ½),
     the same total C for global and per-layer (C/√L per tensor) clipping;
   - LAMB's server lr, separately for each clipping: a grid (``--lamb-lrs``), each a DP run of
     ``--tune-rounds`` rounds with seed 1000 whose "test" set is the dev manifest; the lowest
     dev WER wins. FedAvg's server lr is 1 (FedAvg's definition: the mean delta is applied).
3. The grid: every variant × seed at the recipe's rounds and cohort (DP variants at its
   ``extrapolate`` operating point or ``dp.target_epsilon``). Each finished run is a row kept in
   ``--out`` (keyed by everything that determines it: variant, seed, lr, C, rounds, cohort, local
   recipe, privacy, seed-model digest), so a rerun -- also in a later session, from the committed
   JSON -- skips it; an unfinished run resumes from its ``server.pt``.
4. ``summary``: per variant the test WER over seeds (mean, sd, values), FL-without-DP's gain over
   the seed model, which DP variant is lowest and by how much relative to the seed spread, the
   per-layer + LAMB gap to FL without DP, and the round-time ratio (round wall time / (Σ client
   training time / workers), measured in the non-DP runs: under DP client times are private).
   Plus ``<work>/fl_dp_curves.png`` (test WER per round) and ``<work>/report.html``.
Every row carries both ε: ``epsilon_extrapolated`` (holds for the stated population and cohort
only) and ``epsilon_simulated`` (the true guarantee of this run's speakers), each with its label;
FL without DP has neither (null, with the reason).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privasr.atomic import atomic_write_text  # noqa: E402
from privasr.config import load_config, to_dict  # noqa: E402
from privasr.data.manifest import read_manifest, write_manifest  # noqa: E402
from privasr.data.splits import ensure_corpus, manifest_paths  # noqa: E402
from privasr.federated.config import FLConfig, load_fl_config  # noqa: E402

DEFAULT_VARIANTS = ("none:fedavg,global:fedavg,global:lamb,per_layer_uniform:fedavg,"
                    "per_layer_uniform:lamb")
CLIPPINGS = ("none", "global", "per_layer_uniform")
TUNE_SEED = 1000
NO_DP = {"epsilon": None, "label": "FL without DP: no clipping, no noise, no guarantee"}


# -- variants ----------------------------------------------------------------------------------
def parse_variants(spec: str) -> list[tuple[str, str, float | None]]:
    """``clipping:server_optimizer[:lr]`` items; lr None = FedAvg's 1.0 or LAMB's tuned lr."""
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (2, 3) or parts[0] not in CLIPPINGS:
            raise SystemExit(f"--variants: {item!r} is not clipping:server_optimizer[:lr] with "
                             f"clipping in {', '.join(CLIPPINGS)}")
        out.append((parts[0], parts[1], float(parts[2]) if len(parts) == 3 else None))
    return out


def policy_yaml(clipping: str, clip_norm: float) -> str:
    """The dp.policy override of a clipping (``none``: {} = plain FedAvg)."""
    return {"none": "{}",
            "global": f"{{unit: client, clip_norm: {clip_norm}}}",
            "per_layer_uniform": f"{{unit: client, scope: per_layer, per_layer_rule: uniform, "
                                 f"clip_norm: {clip_norm}}}"}[clipping]


def privacy_overrides(clipping: str) -> list[str]:
    """FL without DP drops the recipe's noise; the DP variants keep it."""
    if clipping != "none":
        return []
    return ["extrapolate=null", "dp.target_epsilon=null", "dp.noise_multiplier=null"]


def run_key(cfg: FLConfig, *, clipping: str, seed_digest: str) -> dict:
    """Everything a run's result depends on (a finished row is reused only on an exact match)."""
    return {"clipping": clipping, "server_optimizer": cfg.server.optimizer,
            "server_lr": cfg.server.lr, "seed": cfg.seed, "dp_policy": cfg.dp.policy,
            "rounds": cfg.server.rounds, "cohort": cfg.server.cohort_size,
            "local": to_dict(cfg.local), "dp": {k: v for k, v in to_dict(cfg.dp).items()
                                                if k != "policy"},
            "extrapolate": to_dict(cfg.extrapolate) if cfg.extrapolate else None,
            "train": str(manifest_paths(cfg)["train"]), "test": str(manifest_paths(cfg)["test"]),
            "max_test_utts": cfg.max_test_utts, "seed_model": seed_digest}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# -- one run -------------------------------------------------------------------------------------
def curve(run_dir: Path) -> list[dict]:
    path = run_dir / "test.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{"round": int(float(r["step"])), "wer": float(r["wer"]), "cer": float(r["cer"])}
                for r in csv.DictReader(f)]


def epsilon_fields(res: dict) -> dict:
    """Both ε of a run, labelled; FL without DP has neither."""
    if res.get("noise_multiplier", 0) == 0:
        return {"epsilon_extrapolated": NO_DP, "epsilon_simulated": NO_DP}
    sim = res.get("epsilon_simulated") or {"epsilon": res.get("epsilon"),
                                           "label": "this run's own speakers (no extrapolation)"}
    ext = res.get("epsilon_extrapolated") or {
        "epsilon": None, "label": "no extrapolate section: the run's ε is its simulated one"}
    return {"epsilon_extrapolated": ext, "epsilon_simulated": sim}


def make_row(res: dict, *, clipping: str, key: dict, run_dir: Path) -> dict:
    hist = res["history"]
    return {
        "clipping": clipping, "server_optimizer": key["server_optimizer"],
        "server_lr": key["server_lr"], "seed": key["seed"],
        "clip_bound": res["clip_bound"], "noise_multiplier": res["noise_multiplier"],
        **epsilon_fields(res),
        "delta": res["delta"] if res["noise_multiplier"] else None,
        "rounds": res["rounds"], "population": res["population"],
        "expected_cohort": res["expected_cohort"],
        "test_wer": res["test_wer"], "test_cer": res["test_cer"], "test_loss": res["test_loss"],
        "mean_round_seconds": res["mean_round_seconds"],
        "round_time_ratio_median": res.get("round_time_ratio_median"),
        "delta_norm_median": (statistics.median(r["delta_norm_median"] for r in hist)
                              if hist and not res["noise_multiplier"] else None),
        "stopped": res["stopped"], "curve": curve(run_dir), "run_dir": str(run_dir),
        "key": key,
    }


def run_one(cfg: FLConfig) -> dict:
    from privasr.federated.app import run_simulation_fl

    done = Path(cfg.out_dir) / "results.json"
    if done.exists():
        res = json.loads(done.read_text())
        if res.get("rounds") == cfg.server.rounds:
            return res
    return run_simulation_fl(cfg)


# -- tuning on the dev speakers -----------------------------------------------------------------
def probe_clip_norm(cfg: FLConfig, seed_ckpt: Path, dev: Path, draws: int) -> dict:
    """Norms of the dev speakers' local updates from the seed model (the clients' recipe)."""
    import torch

    from privasr.checkpoint import load_checkpoint
    from privasr.data.tokenizer import CharTokenizer
    from privasr.federated.client import local_update, speakers_of
    from privasr.models.build import build_model

    from privasr.train.host_memory import keep_freed_memory

    keep_freed_memory()                 # as a client does (glibc would return memory per step)
    torch.set_num_threads(2)
    model = build_model(cfg, len(CharTokenizer().symbols))
    model.load_state_dict(load_checkpoint(seed_ckpt)["model"])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dev_cfg = replace(cfg, data=replace(cfg.data, train=str(dev)))
    norms, speakers = [], speakers_of(dev)
    for d in range(draws):
        for i, spk in enumerate(speakers):
            res = local_update(dev_cfg, state, spk, round_=d, client_seed=i)
            norms.append(math.sqrt(sum(float(t.double().pow(2).sum())
                                       for t in res.delta.values())))
    return {"rule": "median L2 norm of the dev speakers' local updates from the seed model",
            "dev_speakers": len(speakers), "draws": draws, "norms": norms,
            "clip_norm": float(statistics.median(norms))}


def tune(a, base_over: list[str], seed_ckpt: Path, paths: dict, work: Path, stored: dict,
         seed_digest: str) -> dict:
    """C and LAMB's lr per clipping, chosen on the dev speakers (module docstring, step 2)."""
    base = load_fl_config(a.config, base_over)
    tag = {"seed_model": seed_digest, "local": to_dict(base.local),
           "probe_rounds": a.tune_probe_rounds, "tune_rounds": a.tune_rounds,
           "lamb_lrs": a.lamb_lrs, "cohort": base.server.cohort_size,
           "extrapolate": to_dict(base.extrapolate) if base.extrapolate else None}
    if stored.get("tag") == tag and stored.get("lamb_lr"):
        print(f"tuning: reused (C = {stored['clip']['clip_norm']:.4g}, LAMB lr "
              f"{stored['lamb_lr']})")
        return stored
    print("tuning C on the dev speakers ...")
    clip = probe_clip_norm(base, seed_ckpt, paths["dev"], a.tune_probe_rounds)
    c = round(clip["clip_norm"], 4)
    print(f"C = {c} (median of {len(clip['norms'])} dev local-update norms)")
    grid, best = {}, {}
    for clipping in ("global", "per_layer_uniform"):
        for lr in a.lamb_lrs:
            name = f"{clipping}-lamb-lr{lr:g}"
            cfg = load_fl_config(a.config, base_over + [
                f"dp.policy={policy_yaml(clipping, c)}", "server.optimizer=lamb",
                f"server.lr={lr}", f"seed={TUNE_SEED}", f"server.rounds={a.tune_rounds}",
                f"eval_every={10 ** 6}", f"data.test={paths['dev']}",
                f"out_dir={work / 'tune' / name}", f"init_checkpoint={seed_ckpt}"])
            print(f"== tuning {name} ({a.tune_rounds} rounds, WER on the dev speakers)")
            res = run_one(cfg)
            grid[name] = {"clipping": clipping, "lr": lr, "dev_wer": res["test_wer"],
                          "dev_cer": res["test_cer"]}
        rows = [g for g in grid.values() if g["clipping"] == clipping]
        best[clipping] = min(rows, key=lambda g: g["dev_wer"])["lr"]
    return {"tag": tag, "clip": clip, "clip_norm": c, "lamb_grid": grid, "lamb_lr": best,
            "how": "C: median dev local-update norm; LAMB lr: lowest dev WER after "
                   f"{a.tune_rounds} DP rounds (seed {TUNE_SEED}); FedAvg lr 1"}


# -- summary -------------------------------------------------------------------------------------
def variant_name(row: dict) -> str:
    return f"{row['clipping']}+{row['server_optimizer']}"


def summarize(rows: list[dict], seed_wer: float, *, within: float = 0.02,
              gain: float = 0.03) -> dict:
    """Per-variant WER over seeds and the issue's criteria, from the rows alone."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(variant_name(r), []).append(r)
    stats = {}
    for name, rs in sorted(by.items()):
        w = [r["test_wer"] for r in sorted(rs, key=lambda r: r["seed"])]
        stats[name] = {"seeds": sorted(r["seed"] for r in rs), "test_wer": w,
                       "mean": statistics.fmean(w),
                       "sd": statistics.stdev(w) if len(w) > 1 else None,
                       "server_lr": sorted({r["server_lr"] for r in rs})}
    out: dict = {"seed_model_test_wer": seed_wer, "variants": stats}
    nodps = {k: v for k, v in stats.items() if k.startswith("none+")}
    nodp = min(nodps.values(), key=lambda v: v["mean"]) if nodps else None
    if nodp:   # the reference: the best FL without DP (any server optimizer)
        out["nodp_reference"] = min(nodps, key=lambda k: nodps[k]["mean"])
        out["nodp_gain_points"] = 100 * (seed_wer - nodp["mean"])
        out["nodp_gain_target_met"] = seed_wer - nodp["mean"] >= gain
    dp = {k: v for k, v in stats.items() if not k.startswith("none+")}
    if dp:
        lowest = min(dp, key=lambda k: dp[k]["mean"])
        ranked = sorted(dp, key=lambda k: dp[k]["mean"])
        sds = [v["sd"] for v in dp.values() if v["sd"] is not None]
        out["lowest_dp_variant"] = lowest
        out["dp_ranking"] = ranked
        out["max_seed_sd"] = max(sds) if sds else None
        if len(ranked) > 1:
            margin = dp[ranked[1]]["mean"] - dp[lowest]["mean"]
            out["lowest_margin_points"] = 100 * margin
            out["lowest_margin_exceeds_seed_sd"] = (margin > max(sds)) if sds else None
        pl = dp.get("per_layer_uniform+lamb")
        if pl is not None:
            out["per_layer_lamb_is_lowest"] = lowest == "per_layer_uniform+lamb"
            if nodp:
                out["per_layer_lamb_gap_to_nodp_points"] = 100 * (pl["mean"] - nodp["mean"])
                out["per_layer_lamb_within_2_points"] = pl["mean"] - nodp["mean"] <= within
    ratios = [r["round_time_ratio_median"] for r in rows
              if r.get("round_time_ratio_median") is not None]
    if ratios:
        out["round_time_ratio_median"] = statistics.median(ratios)
        out["round_time_ratio_runs"] = ratios
        out["round_time_ratio_target_met"] = statistics.median(ratios) <= 1.2
    return out


def plot_curves(rows: list[dict], seed_wer: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: (variant_name(r), r["seed"])):
        name = variant_name(r)
        c = r["curve"]
        first = name not in colors
        line = ax.plot([0] + [p["round"] for p in c], [seed_wer] + [p["wer"] for p in c],
                       marker=".", color=colors.get(name), alpha=0.85,
                       linestyle="-" if r["seed"] == min(x["seed"] for x in rows) else "--",
                       label=f"{name} (lr {r['server_lr']:g})" if first else None)
        colors.setdefault(name, line[0].get_color())
    ax.axhline(seed_wer, color="grey", linewidth=0.8, label="seed model")
    ax.set_xlabel("round")
    ax.set_ylabel("test WER")
    ax.set_title("FL fine-tuning, user-level DP at the extrapolated operating point "
                 "(seeds: solid / dashed)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- driver --------------------------------------------------------------------------------------
def split_speakers(train: Path, out: Path, fraction: float, seed: int
                   ) -> tuple[Path, Path, int, int]:
    """Seed speakers (a seeded random fraction) and FL speakers, as two manifests."""
    import numpy as np

    utts = read_manifest(train)
    speakers = sorted({u.speaker for u in utts})
    k = max(1, round(fraction * len(speakers)))
    if k >= len(speakers):
        raise SystemExit(f"--seed-fraction {fraction} leaves no FL speakers ({len(speakers)})")
    rng = np.random.default_rng([seed, 4242])
    seed_spk = {speakers[i] for i in rng.permutation(len(speakers))[:k]}
    out.mkdir(parents=True, exist_ok=True)
    seed_m, fl_m = out / "seed_train.jsonl", out / "fl_train.jsonl"
    write_manifest(seed_m, [u for u in utts if u.speaker in seed_spk])
    write_manifest(fl_m, [u for u in utts if u.speaker not in seed_spk])
    return seed_m, fl_m, k, len(speakers) - k


def seed_model(a, base: FLConfig, work: Path) -> tuple[Path, Path, dict, dict]:
    """(checkpoint, FL training manifest, manifests, seed-model facts)."""
    d = base.data
    over = [f"out_dir={work / 'seed'}", f"seed={base.seed}", f"device={base.device}",
            f"model.size={base.model.size}", f"data.corpus_dir={d.corpus_dir}",
            f"data.synth_hours={d.synth_hours}", f"data.synth_speakers={d.synth_speakers}",
            f"data.feature_workers={d.feature_workers}", "progress=false"]
    over += [f"data.synth_domain={d.synth_domain}"] if d.synth_domain else []
    seed_cfg = load_config(a.seed_recipe, over + list(a.seed_override))
    ensure_corpus(seed_cfg)
    paths = manifest_paths(seed_cfg)
    if a.seed_fraction:
        from privasr.recipes.train import run_training

        seed_m, fl_m, n_seed, _ = split_speakers(paths["train"], work / "manifests",
                                                 a.seed_fraction, base.seed)
        seed_cfg = load_config(a.seed_recipe, over + list(a.seed_override) + [
            f"data.train={seed_m}", f"data.dev={paths['dev']}", f"data.test={paths['test']}"])
        res = run_training(seed_cfg)
        ckpt = work / "seed" / "last.pt"
        return ckpt, fl_m, paths, {"speakers": n_seed, "test_wer": res["test_wer"],
                                   "test_cer": res["test_cer"], "checkpoint": str(ckpt)}
    from privasr.recipes.train import evaluate_checkpoint

    ckpt = Path(a.seed_checkpoint or base.init_checkpoint)
    if not ckpt.is_file():
        raise SystemExit(f"seed model {ckpt}: no such file (make demo builds runs/demo/last.pt)")
    ev = evaluate_checkpoint(ckpt, seed_cfg)
    return ckpt, paths["train"], paths, {"speakers": 0, "test_wer": ev["wer"],
                                         "test_cer": ev["cer"], "checkpoint": str(ckpt)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/fl_dp_assistant.yaml")
    ap.add_argument("--work", default="runs/fl_dp")
    ap.add_argument("--out", default="benchmarks/results/fl_dp.json")
    ap.add_argument("--seed-recipe", default="configs/demo.yaml")
    ap.add_argument("--seed-fraction", type=float, default=0.0,
                    help="train the seed model on this fraction of the speakers (0: use "
                         "--seed-checkpoint / the recipe's init_checkpoint)")
    ap.add_argument("--seed-override", action="append", default=[])
    ap.add_argument("--seed-checkpoint", default="")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--fedavg-lr", type=float, default=1.0)
    ap.add_argument("--lamb-lr", type=float, default=None,
                    help="LAMB's server lr without --tune (default: the recipe's server.lr)")
    ap.add_argument("--tune", action="store_true", help="choose C and LAMB's lr on dev speakers")
    ap.add_argument("--tune-rounds", type=int, default=8)
    ap.add_argument("--tune-probe-rounds", type=int, default=3)
    ap.add_argument("--lamb-lrs", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.002, 0.005, 0.01])
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the FL recipe")
    a = ap.parse_args(argv)
    t0 = time.time()
    work, out = Path(a.work), Path(a.out)
    variants = parse_variants(a.variants)
    seeds = [int(s) for s in a.seeds.split(",")]
    base = load_fl_config(a.config, a.overrides)
    previous = json.loads(out.read_text()) if out.exists() else {}

    ckpt, fl_m, paths, seed_facts = seed_model(a, base, work)
    digest = file_digest(ckpt)
    seed_wer = seed_facts["test_wer"]
    print(f"seed model {ckpt} ({digest}): test WER {seed_wer:.4f}")
    base_over = list(a.overrides) + [f"data.train={fl_m}", f"data.dev={paths['dev']}",
                                     f"data.test={paths['test']}", f"init_checkpoint={ckpt}"]
    tuning = None
    clip_norm = float(base.dp.policy.get("clip_norm") or 0.1)
    lamb_lr = {c: a.lamb_lr or base.server.lr for c in CLIPPINGS}
    if a.tune:
        tuning = tune(a, base_over, ckpt, paths, work, previous.get("tuning") or {}, digest)
        clip_norm, lamb_lr = tuning["clip_norm"], {**lamb_lr, **tuning["lamb_lr"]}
    kept = [r for r in previous.get("rows", []) if "key" in r]
    rows: list[dict] = []

    def save(final: bool = False) -> dict:
        result = {
            "experiment": "fl_dp", "issue": 18, "paper": "Pelikan et al. 2025, docs/federated.md",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "device": base.device},
            "privacy_unit": "speaker (user-level, one client = one speaker)",
            "operating_point": to_dict(base.extrapolate) if base.extrapolate else None,
            "seed_model": {**seed_facts, "digest": digest},
            "fl_speakers": len({u.speaker for u in read_manifest(fl_m)}),
            "tuning": tuning, "rows": rows,
            "summary": summarize(rows, seed_wer) if rows else None,
            "complete": final, "fl_config": to_dict(base),
            "wall_seconds_this_session": time.time() - t0,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=1))
        return result

    for seed in seeds:
        for clipping, opt, lr in variants:
            lr = lr if lr is not None else (a.fedavg_lr if opt == "fedavg" else lamb_lr[clipping])
            name = f"{clipping}-{opt}-lr{lr:g}-s{seed}"
            run_dir = work / name
            cfg = load_fl_config(a.config, base_over + privacy_overrides(clipping) + [
                f"dp.policy={policy_yaml(clipping, clip_norm)}", f"server.optimizer={opt}",
                f"server.lr={lr}", f"seed={seed}", f"out_dir={run_dir}"])
            key = run_key(cfg, clipping=clipping, seed_digest=digest)
            old = next((r for r in kept if r["key"] == key), None)
            if old is not None:
                print(f"== {name}: kept from {out} (test WER {old['test_wer']:.4f})")
                rows.append(old)
                continue
            print(f"== {name}")
            res = run_one(cfg)
            rows.append(make_row(res, clipping=clipping, key=key, run_dir=run_dir))
            save()
    mine = {json.dumps(r["key"], sort_keys=True) for r in rows}
    rows += [r for r in kept if r["key"].get("seed_model") == digest      # other variants' rows
             and json.dumps(r["key"], sort_keys=True) not in mine]
    result = save(final=True)
    png = work / "fl_dp_curves.png"
    plot_curves(rows, seed_wer, png)
    import base64

    from privasr.report.html import write_report

    summary = result["summary"]
    per_variant = [{"variant": k, **v} for k, v in summary["variants"].items()]
    criteria = [{"criterion": k, "value": v} for k, v in summary.items() if k != "variants"]
    table = [{k: (v.get("epsilon") if isinstance(v, dict) and "label" in v else v)
              for k, v in r.items() if k not in ("curve", "run_dir", "key")} for r in rows]
    write_report(work, "FL + user-level DP (docs/federated.md)",
                 {"test WER over seeds": per_variant, "criteria": criteria, "runs": table},
                 notes=f"seed model test WER {seed_wer:.4f}; {result['fl_speakers']} FL "
                       "speakers; epsilon_extrapolated holds for the stated population only, "
                       "epsilon_simulated is this run's own guarantee",
                 figures={"test WER per round": base64.b64encode(png.read_bytes()).decode()})
    for name, s in result["summary"]["variants"].items():
        sd = f" ± {100 * s['sd']:.2f}" if s["sd"] is not None else ""
        print(f"{name:>26}: test WER {100 * s['mean']:.2f}{sd} % over seeds {s['seeds']} "
              f"(lr {s['server_lr']})")
    print(json.dumps({k: v for k, v in result["summary"].items() if k != "variants"}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
