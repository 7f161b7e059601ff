"""FL + user-level DP experiment (docs/federated.md): per-layer clipping + LAMB vs global + FedAvg.

    python benchmarks/fl_dp.py [--config configs/fl_dp.yaml] [--work runs/fl_dp]
        [--out benchmarks/results/fl_dp.json] [--seed-recipe configs/demo.yaml]
        [--seed-fraction 0.2] [--seed-override optim.max_steps=1700 ...]
        [--seed-checkpoint runs/dp_peft/pretrain/last.pt]
        [--variants global:fedavg:1.0,per_layer_uniform:lamb:0.005,...] [FL overrides ...]

1. Splits the training speakers of the corpus: a seed fraction ("public" speakers) trains the
   seed model centrally (`privasr train` with --seed-recipe); the other speakers are the FL
   clients. Test speakers are unseen by both. --seed-checkpoint instead starts from a model
   trained elsewhere (e.g. the DP-PEFT experiment's model pre-trained on the *public* corpus,
   which shares no speaker and no sentence with this one); every training speaker is a client.
2. Runs every variant clipping:server_optimizer:server_lr as `privasr fl` (Flower Simulation
   Runtime) from the seed model, all at the recipe's target user-level ε (same rounds, q, δ,
   hence the same σ). clipping per_layer uses static bounds C/√L on every tensor.
3. Writes --out: one row per variant (clipping, server_optimizer, epsilon, delta, rounds,
   test_wer, test_cer, curves, round time), the seed model's WER, and the extrapolation table
   (ε of the same noise on the average at 10^4-10^7 users); plus <work>/report.html and
   <work>/fl_dp_curves.png.
FL overrides apply to every variant and to the seed training's device, e.g. ``device=cuda
server.rounds=200 simulation.num_cpus=8 simulation.client_gpus=0.1``. Each part resumes from
its checkpoint when re-run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privasr.atomic import atomic_write_text  # noqa: E402
from privasr.config import load_config, to_dict  # noqa: E402
from privasr.data.manifest import read_manifest, write_manifest  # noqa: E402
from privasr.federated.config import load_fl_config  # noqa: E402
from privasr.data.splits import ensure_corpus, manifest_paths  # noqa: E402

DEFAULT_VARIANTS = ("global:fedavg:1.0,per_layer:fedavg:1.0,per_layer_uniform:fedavg:1.0,"
                    "per_layer_uniform:adam:0.001,per_layer_uniform:lamb:0.005,global:lamb:0.005")


def parse_variants(spec: str) -> list[tuple[str, str, float]]:
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise SystemExit(f"--variants: {item!r} is not clipping:server_optimizer:lr")
        out.append((parts[0], parts[1], float(parts[2])))
    return out


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


def curve(run_dir: Path) -> list[dict]:
    path = run_dir / "test.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{"round": int(float(r["step"])), "wer": float(r["wer"]), "cer": float(r["cer"])}
                for r in csv.DictReader(f)]


def plot_curves(rows: list[dict], seed_wer: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        c = r["curve"]
        ax.plot([0] + [p["round"] for p in c], [seed_wer] + [p["wer"] for p in c], marker=".",
                label=f"{r['clipping']} + {r['server_optimizer']} (lr {r['server_lr']:g})")
    ax.set_xlabel("round")
    ax.set_ylabel("test WER")
    ax.set_title(f"FL + DP, user-level ε = {rows[0]['epsilon']:.3g}" if rows else "FL + DP")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/fl_dp.yaml")
    ap.add_argument("--work", default="runs/fl_dp")
    ap.add_argument("--out", default="benchmarks/results/fl_dp.json")
    ap.add_argument("--seed-recipe", default="configs/demo.yaml")
    ap.add_argument("--seed-fraction", type=float, default=0.2)
    ap.add_argument("--seed-override", action="append", default=[],
                    help="key=value for the seed model's training recipe (repeatable)")
    ap.add_argument("--seed-checkpoint", default="",
                    help="start every variant from this model instead of training a seed model "
                         "on --seed-fraction of the speakers (all speakers are then clients)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the FL recipe")
    a = ap.parse_args(argv)
    t0 = time.time()
    work = Path(a.work)
    variants = parse_variants(a.variants)
    base = load_fl_config(a.config, a.overrides)

    # 1. corpus, speaker split, central seed model
    d = base.data
    seed_over = [f"out_dir={work / 'seed'}", f"seed={base.seed}", f"device={base.device}",
                 f"model.size={base.model.size}", f"data.corpus_dir={d.corpus_dir}",
                 f"data.synth_hours={d.synth_hours}", f"data.synth_speakers={d.synth_speakers}",
                 f"data.feature_workers={d.feature_workers}", "progress=false"]
    seed_cfg = load_config(a.seed_recipe, seed_over + list(a.seed_override))
    ensure_corpus(seed_cfg)
    paths = manifest_paths(seed_cfg)
    if a.seed_checkpoint:
        from privasr.recipes.train import evaluate_checkpoint

        seed_ckpt, fl_m = Path(a.seed_checkpoint), paths["train"]
        if not seed_ckpt.is_file():
            raise SystemExit(f"--seed-checkpoint {seed_ckpt}: no such file")
        n_seed, n_fl = 0, len({u.speaker for u in read_manifest(fl_m)})
        ev = evaluate_checkpoint(seed_ckpt, seed_cfg)
        seed_res = {"test_wer": ev["wer"], "test_cer": ev["cer"], "steps": None,
                    "checkpoint": str(seed_ckpt)}
        print(f"seed model {seed_ckpt}: test WER {ev['wer']:.3f} CER {ev['cer']:.3f}")
    else:
        seed_m, fl_m, n_seed, n_fl = split_speakers(paths["train"], work / "manifests",
                                                    a.seed_fraction, base.seed)
        seed_cfg = load_config(a.seed_recipe, seed_over + list(a.seed_override) + [
            f"data.train={seed_m}", f"data.dev={paths['dev']}", f"data.test={paths['test']}"])
        from privasr.recipes.train import run_training

        print(f"seed model: {n_seed} speakers, central training ({seed_cfg.optim.max_steps} "
              f"steps)")
        seed_res = run_training(seed_cfg)
        seed_ckpt = work / "seed" / "last.pt"
        print(f"seed model test WER {seed_res['test_wer']:.3f} CER {seed_res['test_cer']:.3f}")

    # 2. FL + DP variants from the seed model
    from privasr.federated.app import run_simulation_fl
    from privasr.models.conformer import ConformerCTC, config_for
    from privasr.data.tokenizer import CharTokenizer

    n_tensors = sum(1 for p in ConformerCTC(config_for(
        base.model.size, vocab_size=len(CharTokenizer().symbols))).parameters() if p.requires_grad)
    rows = []
    for clipping, opt, lr in variants:
        name = f"{clipping}-{opt}-lr{lr:g}"
        c = base.dp.policy["clip_norm"]
        policy = {"global": f"{{unit: client, clip_norm: {c}}}",
                  "per_layer_uniform": f"{{unit: client, scope: per_layer, "
                                       f"per_layer_rule: uniform, clip_norm: {c}}}",
                  # static bounds: the uniform rule's C/√L on every tensor
                  "per_layer": f"{{unit: client, scope: per_layer, clip_norm: null, "
                               f"layer_bounds: {{'*': {c / math.sqrt(n_tensors)}}}}}"}[clipping]
        extra = [f"dp.policy={policy}", f"server.optimizer={opt}", f"server.lr={lr}",
                 f"out_dir={work / name}", f"init_checkpoint={seed_ckpt}",
                 f"data.train={fl_m}", f"data.dev={paths['dev']}", f"data.test={paths['test']}"]
        cfg = load_fl_config(a.config, list(a.overrides) + extra)
        print(f"== {name}")
        res = run_simulation_fl(cfg)
        hist = res["history"]
        rows.append({
            "clipping": clipping, "server_optimizer": opt, "server_lr": lr,
            "epsilon": res["epsilon"], "delta": res["delta"], "rounds": res["rounds"],
            "test_wer": res["test_wer"], "test_cer": res["test_cer"],
            "noise_multiplier": res["noise_multiplier"], "clip_bound": res["clip_bound"],
            "population": res["population"], "expected_cohort": res["expected_cohort"],
            "mean_clients_per_round": sum(r["sampled"] for r in hist) / max(len(hist), 1),
            "mean_round_seconds": res["mean_round_seconds"],
            "failed_clients": res["failed_clients"], "stopped": res["stopped"],
            "curve": curve(work / name), "run_dir": str(work / name),
        })
        extrapolation = res.get("extrapolation")

    # 3. results
    best = {(r["clipping"], r["server_optimizer"]): r["test_wer"] for r in rows}
    result = {
        "experiment": "fl_dp", "paper": "Pelikan et al. 2025, docs/federated.md",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "device": base.device},
        "privacy_unit": "speaker (user-level, one client = one speaker)",
        "seed_model": {"speakers": n_seed, "test_wer": seed_res["test_wer"],
                       "test_cer": seed_res["test_cer"], "steps": seed_res["steps"],
                       "checkpoint": str(seed_ckpt)},
        "fl_speakers": n_fl, "rows": rows, "extrapolation": extrapolation,
        "per_layer_lamb_beats_global_fedavg": (
            best[("per_layer_uniform", "lamb")] < best[("global", "fedavg")]
            if ("per_layer_uniform", "lamb") in best and ("global", "fedavg") in best else None),
        "fl_config": to_dict(base), "wall_seconds": time.time() - t0,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=1))
    if rows:
        plot_curves(rows, seed_res["test_wer"], work / "fl_dp_curves.png")
    from privasr.report.html import write_report

    table = [{k: v for k, v in r.items() if k not in ("curve", "run_dir")} for r in rows]
    write_report(work, "FL + user-level DP (docs/federated.md)",
                 {"variants": table, "extrapolation": extrapolation or []},
                 notes=f"seed model test WER {seed_res['test_wer']:.3f}; {n_fl} FL speakers")
    for r in table:
        print(f"{r['clipping']:>18} + {r['server_optimizer']:<6} lr {r['server_lr']:<6g} "
              f"ε={r['epsilon'] if isinstance(r['epsilon'], str) else round(r['epsilon'], 3)} "
              f"WER {r['test_wer']:.3f} CER {r['test_cer']:.3f} "
              f"round {r['mean_round_seconds'] or float('nan'):.1f} s "
              f"({r['mean_clients_per_round']:.1f} clients)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
