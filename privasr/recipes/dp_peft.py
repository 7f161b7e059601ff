"""The DP-PEFT experiment (docs/peft.md): WER on the private test speakers for
{zero-shot pre-trained, non-private full FT (+ non-private PEFT), DP {full, bitfit, lora, rp,
adapters, head}} × ε × seeds at δ = min(1e-5, N^-1.1).

    privasr dp-peft [RECIPE.yaml] [key=value ...]      # default: configs/dp_peft.yaml
    privasr dp-peft dp_peft device=cuda finetune_steps=300

The recipe and its key=value overrides are ``DpPeftConfig``'s fields, read once by
``privasr.config.load_config`` (the same machinery as ``privasr train``).

Every run is an ordinary ``privasr train`` run (``configs/pretrain.yaml`` once, then
``configs/dp_finetune.yaml`` with ``init=<pretrain>/last.pt peft=METHOD``) in its own folder
under ``out_dir``; a finished run with the same config is reused, an interrupted one resumes.
After each run the rows are rewritten to ``results`` (a JSON list: method, epsilon (null when
non-private), delta, delta_times_n, seed, test_wer, test_cer, trainable_params, step_seconds,
gap_closed = (zero-shot WER − WER) / (zero-shot WER − non-private full-FT WER), ...) and
``out_dir/report.html`` (table, WER-vs-ε plot) and ``out_dir/summary.json`` are refreshed.
Runs go one at a time, so an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from privasr.atomic import atomic_write_text
from privasr.errors import ConfigError
from privasr.config import load_config, to_dict
from privasr.config import METHODS

__all__ = ["DpPeftConfig", "run_experiment", "run_recipe"]


@dataclass
class DpPeftConfig:
    out_dir: str = "runs/dp_peft"
    results: str = "benchmarks/results/dp_peft.json"
    pretrain: str = "configs/pretrain.yaml"
    finetune: str = "configs/dp_finetune.yaml"
    methods: list[str] = field(default_factory=lambda: ["full", "bitfit", "lora", "adapters"])
    epsilons: list[float] = field(default_factory=lambda: [1.0, 3.0, 10.0])
    zero_shot: bool = True
    nonprivate: bool = True  # non-private full fine-tuning (same Poisson batches, no clipping)
    nonprivate_peft: list[str] = field(default_factory=list)  # non-private runs of these methods
    nonprivate_last: bool = False  # run the DP grid first (its rows land before the long FT)
    seeds: list[int] = field(default_factory=list)  # DP runs per (method, ε); default [seed]
    method_overrides: dict = field(default_factory=dict)  # method -> extra key=value overrides
    dp_overrides: list[str] = field(default_factory=list)  # key=value for the DP runs only
    # a variant of the grid sharing out_dir (zero-shot and non-private full FT reused): its
    # other runs live in METHOD_TAG_... folders and its rows carry variant = tag
    tag: str = ""
    gap_targets: dict = field(default_factory=dict)  # ε -> gap_closed goal of the best method
    device: str = "auto"
    seed: int = 0
    pretrain_steps: int = 0  # 0: the recipe's optim.max_steps
    pretrained: str = ""  # a checkpoint to fine-tune instead of pre-training (e.g. another run's)
    finetune_steps: int = 0
    lr: dict = field(default_factory=dict)  # method -> learning rate (default: the recipe's)
    nonprivate_lr: float = 0.0  # 0: lr of "full"
    pretrain_overrides: list[str] = field(default_factory=list)
    finetune_overrides: list[str] = field(default_factory=list)
    target_ratio: float = 1.3  # goal: best DP-PEFT WER at the largest ε ≤ ratio × non-private


def _check(cfg: DpPeftConfig) -> None:
    bad = [m for m in cfg.methods if m not in METHODS or m == "none"]
    if bad:
        raise ConfigError(f"methods: unknown {bad}; valid: {', '.join(METHODS[1:])}")
    for name in ("lr", "method_overrides"):
        bad = [m for m in getattr(cfg, name) if m not in METHODS]
        if bad:
            raise ConfigError(f"{name}: keys must be methods, got {bad}")
    if cfg.tag and not cfg.tag.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"tag must be letters, digits, - or _ (a folder name part), "
                          f"got {cfg.tag!r}")
    bad = [m for m in cfg.nonprivate_peft if m not in METHODS or m in ("none", "full")]
    if bad:
        raise ConfigError(f"nonprivate_peft: not PEFT methods: {bad}")
    if any(not isinstance(e, (int, float)) or e <= 0 for e in cfg.epsilons):
        raise ConfigError(f"epsilons must be positive numbers, got {cfg.epsilons}")


def _as_json(cfg: Any) -> Any:
    return json.loads(json.dumps(to_dict(cfg)))


def _run(recipe: str, overrides: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """``privasr train recipe overrides``, reusing a finished run with the same config."""
    from privasr.recipes.train import run_training

    cfg = load_config(recipe, overrides)
    out = Path(cfg.out_dir)
    done, saved = out / "results.json", out / "config.json"
    if saved.exists():
        # through the config class: fields added since that run take their defaults
        if _as_json(load_config(saved, [])) != _as_json(cfg):
            raise ConfigError(f"{out} holds a run with another config; delete it or choose "
                              f"another out_dir (a changed run cannot resume)")
        if done.exists():
            log(f"{out}: finished earlier, reusing its results")
            return json.loads(done.read_text())
    log(f"== {out}: {recipe} {' '.join(overrides)}")
    return run_training(cfg, log=log)


def _zero_shot(ckpt: Path, finetune: str, overrides: list[str]) -> dict[str, Any]:
    """The pre-trained model (its own CTC head) on the private test speakers."""
    from privasr.recipes.train import evaluate_checkpoint

    return evaluate_checkpoint(ckpt, load_config(finetune, overrides))


def step_seconds(run_dir: str | Path, fallback: float | None) -> float | None:
    """Median gradient-step time logged in the run's train.csv (every ``log_every`` steps, so
    it spans a resumed run's earlier processes too); ``fallback`` when nothing was logged."""
    from privasr.report.metrics_log import MetricsLogger

    if not (Path(run_dir) / "train.csv").exists():
        return fallback
    rows = MetricsLogger(run_dir, tensorboard=False).read("train")
    secs = [v for r in rows if (v := r.get("step_seconds")) is not None and math.isfinite(v)]
    return statistics.median(secs) if secs else fallback


def _row(method: str, res: dict[str, Any], lr: float | None, run_dir: str, seed: int
         ) -> dict[str, Any]:
    p = res.get("privacy") or {}
    return {"method": method, "epsilon": None, "delta": p.get("delta"),
            "delta_times_n": p.get("delta_times_n"), "seed": seed,
            "test_wer": res["test_wer"], "test_cer": res["test_cer"],
            "trainable_params": res["trainable_params"],
            "step_seconds": step_seconds(run_dir, res.get("step_seconds")),
            "achieved_epsilon": p.get("epsilon"), "noise_multiplier": p.get("noise_multiplier"),
            "sample_rate": p.get("sample_rate"), "steps": res["steps"], "lr": lr,
            "n_private": res["train_utts"], "test_utts": res["test_utts"],
            "test_speakers": res["test_speakers"], "device": res["device"], "run_dir": run_dir}


def gap_closed(wer: float, zero_shot: float | None, nonprivate: float | None) -> float | None:
    """(zero-shot WER − wer) / (zero-shot WER − non-private full-FT WER): 0 = no better than
    the public model, 1 = as good as non-private fine-tuning; None without a positive gap."""
    if zero_shot is None or nonprivate is None or zero_shot - nonprivate <= 0:
        return None
    return (zero_shot - wer) / (zero_shot - nonprivate)


def _reference_wers(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    zs = next((r["test_wer"] for r in rows if r["method"] == "zero_shot"), None)
    full = next((r["test_wer"] for r in rows if r["method"] == "full" and r["epsilon"] is None),
                None)
    return zs, full


def with_gaps(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``gap_closed`` filled in (None until both references exist)."""
    zs, full = _reference_wers(rows)
    return [{**r, "gap_closed": None if r["method"] == "zero_shot" else
             gap_closed(r["test_wer"], zs, full)} for r in rows]


def by_epsilon(rows: list[dict[str, Any]], target_ratio: float,
               gap_targets: dict[float, float]) -> dict[str, Any]:
    """Per ε: each DP method's WER over seeds (mean, sd, per seed), the best method (lowest
    mean WER), its gap_closed per seed and the goals it meets."""
    _, full = _reference_wers(rows)
    out: dict[str, Any] = {}
    for eps in sorted({r["epsilon"] for r in rows if r["epsilon"] is not None}):
        methods: dict[str, Any] = {}
        for m in dict.fromkeys(r["method"] for r in rows if r["epsilon"] == eps):
            rs = [r for r in rows if r["epsilon"] == eps and r["method"] == m]
            w = [r["test_wer"] for r in rs]
            methods[m] = {"seeds": [r.get("seed") for r in rs], "test_wer": w,
                          "mean_wer": statistics.fmean(w),
                          "sd_wer": statistics.stdev(w) if len(w) > 1 else None,
                          "gap_closed": [r.get("gap_closed") for r in rs]}
        peft = {m: v for m, v in methods.items() if m != "full"} or methods
        best = min(peft, key=lambda m: peft[m]["mean_wer"])
        entry: dict[str, Any] = {"methods": methods, "best": best,
                                 "best_gap_closed": methods[best]["gap_closed"]}
        if full:
            entry["best_wer_ratio_to_nonprivate_full"] = methods[best]["mean_wer"] / full
        goal = {float(k): v for k, v in gap_targets.items()}.get(float(eps))
        gaps = methods[best]["gap_closed"]
        if goal is not None and gaps and all(g is not None for g in gaps):
            entry["gap_target"] = goal
            entry["gap_target_met"] = min(gaps) >= goal
        out[f"{eps:g}"] = entry
    return out


def summarize(rows: list[dict[str, Any]], target_ratio: float,
              gap_targets: dict[float, float] | None = None) -> dict[str, Any]:
    """The issue's checks: WER ratio and gap closed per ε, and DP step time PEFT vs full."""
    nonpriv = next((r for r in rows if r["method"] == "full" and r["epsilon"] is None), None)
    dp = [r for r in rows if r["epsilon"] is not None]
    out: dict[str, Any] = {"target_ratio": target_ratio}
    if dp:
        top = max(r["epsilon"] for r in dp)
        peft = [r for r in dp if r["epsilon"] == top and r["method"] != "full"]
        full = next((r for r in dp if r["epsilon"] == top and r["method"] == "full"), None)
        if peft:
            best = min(peft, key=lambda r: r["test_wer"])
            out.update(epsilon=top, best_dp_peft=best["method"], best_dp_peft_wer=best["test_wer"])
            if nonpriv is not None and nonpriv["test_wer"] > 0:
                out["wer_ratio_to_nonprivate_full"] = best["test_wer"] / nonpriv["test_wer"]
                out["target_met"] = out["wer_ratio_to_nonprivate_full"] <= target_ratio
            if full is not None and full["step_seconds"]:
                out["step_seconds_dp_full"] = full["step_seconds"]
                out["step_seconds_ratio_to_dp_full"] = {
                    r["method"]: r["step_seconds"] / full["step_seconds"] for r in peft
                    if r["step_seconds"]}
    if nonpriv is not None:
        out["nonprivate_full_wer"] = nonpriv["test_wer"]
    zs = next((r for r in rows if r["method"] == "zero_shot"), None)
    if zs is not None:
        out["zero_shot_wer"] = zs["test_wer"]
    if dp:
        out["by_epsilon"] = by_epsilon(with_gaps(rows), target_ratio, gap_targets or {})
    return out


def run_experiment(cfg: DpPeftConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    from privasr.recipes.dp_peft_report import write_peft_report

    _check(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "experiment.json", json.dumps(to_dict(cfg), indent=1))
    common = [f"device={cfg.device}", f"seed={cfg.seed}"]
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}

    def save() -> None:
        Path(cfg.results).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(cfg.results), json.dumps(with_gaps(rows), indent=1))
        summary = {**summarize(rows, cfg.target_ratio, cfg.gap_targets), **extra}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
        write_peft_report(out, rows, summary)

    if cfg.pretrained:
        ckpt = pre_dir = Path(cfg.pretrained)
        if not ckpt.is_file():
            raise ConfigError(f"pretrained: {ckpt} is not a checkpoint file")
        done = ckpt.parent / "results.json"      # the run that wrote it, if privasr trained it
        if done.exists():
            extra["pretrain_public_test_wer"] = json.loads(done.read_text()).get("test_wer")
    else:
        pre_dir = out / "pretrain"
        pre_over = [f"out_dir={pre_dir}", *common, *cfg.pretrain_overrides] + (
            [f"optim.max_steps={cfg.pretrain_steps}"] if cfg.pretrain_steps else [])
        pre = _run(cfg.pretrain, pre_over, log)
        extra["pretrain_public_test_wer"] = pre["test_wer"]
        ckpt = pre_dir / "last.pt"
    ft_common = [*common, f"init={ckpt}", *cfg.finetune_overrides] + (
        [f"optim.max_steps={cfg.finetune_steps}"] if cfg.finetune_steps else [])

    if cfg.zero_shot:
        t = time.time()
        zs = _zero_shot(ckpt, cfg.finetune, ft_common)
        rows.append({"method": "zero_shot", "epsilon": None, "delta": None,
                     "test_wer": zs["wer"], "test_cer": zs["cer"], "trainable_params": 0,
                     "step_seconds": None, "steps": 0, "run_dir": str(pre_dir),
                     "eval_seconds": time.time() - t})
        log(f"zero-shot on the private test speakers: WER {zs['wer']:.3f} CER {zs['cer']:.3f}")
        save()

    def method_args(method: str, lr: float | None) -> list[str]:
        return [f"peft={method}", *cfg.method_overrides.get(method, [])] + (
            [f"optim.lr={lr}"] if lr else [])

    def tagged(method: str) -> str:
        return f"{method}_{cfg.tag}" if cfg.tag else method

    def labelled(row: dict[str, Any], args: list[str]) -> dict[str, Any]:
        return {**row, "variant": cfg.tag or None, "overrides": args}

    def run_nonprivate() -> None:
        nonprivate = (["full"] if cfg.nonprivate else []) + list(cfg.nonprivate_peft)
        for method in nonprivate:
            lr = (cfg.nonprivate_lr or cfg.lr.get("full")) if method == "full" else \
                cfg.lr.get(method)
            d = out / ("full_nonprivate" if method == "full" else f"{tagged(method)}_nonprivate")
            args = [*method_args(method, lr), "privacy.policy={}", "privacy.target_epsilon=null"]
            res = _run(cfg.finetune, [*ft_common, f"out_dir={d}", *args], log)
            row = labelled(_row(method, res, lr, str(d), cfg.seed), args)
            if method == "full":
                row["variant"] = None   # the shared reference, in full_nonprivate
            rows.append(row)
            log(f"non-private {method}: WER {res['test_wer']:.3f}")
            save()

    def run_dp() -> None:
        for eps in cfg.epsilons:
            for method in cfg.methods:
                for seed in cfg.seeds or [cfg.seed]:
                    d = out / (f"{tagged(method)}_eps{eps:g}" +
                               (f"_s{seed}" if cfg.seeds else ""))
                    args = [f"privacy.target_epsilon={eps}",
                            *method_args(method, cfg.lr.get(method)), *cfg.dp_overrides]
                    res = _run(cfg.finetune, [*ft_common, f"seed={seed}", f"out_dir={d}", *args],
                               log)
                    if not res.get("privacy"):
                        raise ConfigError(f"{cfg.finetune}: the DP runs need a privacy.policy with "
                                          f"noise (the run in {d} had none)")
                    row = labelled(_row(method, res, cfg.lr.get(method), str(d), seed), args)
                    row["epsilon"] = float(eps)
                    rows.append(row)
                    log(f"{method} ε={eps:g} seed {seed}: WER {row['test_wer']:.3f}, "
                        f"{row['trainable_params']:,} trainable, {row['step_seconds']} s/step")
                    save()

    for part in ((run_dp, run_nonprivate) if cfg.nonprivate_last else
                 (run_nonprivate, run_dp)):
        part()
    save()
    return with_gaps(rows)


def run_recipe(recipe: str | Path | None, overrides: list[str] = (),
               log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``privasr dp-peft RECIPE key=value ...``: the experiment of ``recipe`` + overrides."""
    cfg = load_config(recipe, list(overrides), cls=DpPeftConfig)
    rows = run_experiment(cfg, log=log)
    log(json.dumps(rows, indent=1))
    log(f"wrote {cfg.results} and {Path(cfg.out_dir) / 'report.html'}")
    return rows
