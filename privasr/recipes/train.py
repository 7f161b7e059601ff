"""`privasr train`: corpus → features → model → trainer → test evaluation → results.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

from privasr.atomic import atomic_write_text
from privasr.audit.norm_probe import OUTSIDE_EPSILON as NORM_PROBE_OUTSIDE, check_settings
from privasr.config import TrainConfig, to_dict
from privasr.data.dataset import AsrDataset
from privasr.data.manifest import SkipReport
from privasr.data.splits import (ensure_corpus, feature_config, hf_ctc_output_frames,
                                 load_split, manifest_paths)
from privasr.data.tokenizer import CharTokenizer
from privasr.decoding.evaluate import evaluate
from privasr.errors import PolicyError
from privasr.models.build import build_model
from privasr.models.conformer import count_parameters
from privasr.peft.apply import finish_peft, prepare_model
from privasr.peft.frozen_prefix import cache_prefix, cacheable_start, start_at
from privasr.privacy.statement import privacy_statement, statement_text
from privasr.train.strategies import build_setup
from privasr.train.timing import TimedGradient
from privasr.train.trainer import Trainer, pick_device, set_threads
from privasr.train.host_memory import keep_freed_memory

__all__ = ["run_training", "evaluate_checkpoint", "write_run_report", "WITHHELD_METRICS"]


def evaluate_checkpoint(ckpt: str | Path, cfg: TrainConfig, split: str = "test") -> dict:
    """A saved model (with its own CTC head) on the recipe's ``split``: {wer, cer, loss, ...}."""
    from privasr.inference import load_model

    ensure_corpus(cfg, log=lambda *_: None)
    data = load_split(manifest_paths(cfg)[split], cfg, CharTokenizer(), SkipReport())
    device = pick_device(cfg.device)
    model, vocab = load_model(ckpt, device=str(device))
    return evaluate(model, data, vocab, device=device)


def run_training(cfg: TrainConfig, log=print) -> dict:
    """Train per the recipe (resuming from ``out_dir/last.pt`` if present); return results."""
    import torch

    from privasr.train import distributed as D   # torchrun: see privasr/train/distributed.py

    t0 = time.time()
    ctx = D.init_distributed(pick_device(cfg.device))
    if ctx is not None:
        log = log if ctx.is_main else (lambda *a, **k: None)
    threads = set_threads(cfg.threads or (0 if ctx is None else D.threads_per_rank(ctx)))
    keep_freed_memory()
    torch.manual_seed(cfg.seed)
    cfg = model_family_setup(cfg, log)
    check_settings(cfg.audit)   # audit.norm_probe_*, before any data work
    paths = manifest_paths(cfg)
    tok = CharTokenizer()
    report = SkipReport()
    with D.main_first(ctx):  # rank 0 builds the corpus and feature caches, then the others
        ensure_corpus(cfg, log)
        train_ds = load_split(paths["train"], cfg, tok, report, speeds=cfg.augment.speed_perturb)
        dev_ds = load_split(paths["dev"], cfg, tok, report, limit=cfg.data.max_dev_utts)
        test_ds = load_split(paths["test"], cfg, tok, report)
        canary_info = None
        if cfg.audit.canaries:  # memorization audit: inserted canaries (×r) join training only
            from privasr.audit.insertion import add_canaries
            hf = cfg.model.family == "hf_ctc"
            train_ds, canary_info = add_canaries(
                train_ds, cfg.audit.canaries, tok, others={"dev": dev_ds, "test": test_ds},
                features=feature_config(cfg),
                output_frames=hf_ctc_output_frames(cfg.model.path) if hf else None, log=log)
    if report.total:
        log(f"data: {report.summary()}")
    if len(train_ds) == 0:
        raise ValueError(f"no usable training utterances in {paths['train']}")
    model = build_model(cfg, tok.vocab_size)
    peft = prepare_model(cfg, model, log)       # init=CKPT (pre-trained encoder) and peft=...
    vocab = list(tok.symbols)
    start = cacheable_start(cfg, model, log) if peft is not None else 0
    if start:   # frozen front end + blocks < start: run once per utterance, train above them
        device = pick_device(cfg.device)
        train_ds, dev_ds = (cache_prefix(model.to(device), ds, start, device,
                                         progress=cfg.progress, cache_dir=paths[s].parent /
                                         "feats") for ds, s in ((train_ds, "train"),
                                                                (dev_ds, "dev")))
        start_at(model, start)
        log(f"frozen prefix cached: training runs blocks {start}.. and the head only")
    setup = build_setup(cfg, train_ds, ctx)
    if canary_info and setup.policy is not None and setup.policy.unit == "speaker":
        raise PolicyError("audit.canaries with privacy.policy.unit=speaker: every inserted "
                          "canary has the speaker 'canary', so all canaries would be ONE privacy "
                          "unit, sampled together; the audit's per-canary test needs them "
                          "independent. Audit an example-level run instead")
    strategy = setup.strategy
    private = setup.ledger is not None and not cfg.privacy.log_private_stats
    probe = norm_probe(cfg, train_ds, setup, log) if cfg.audit.norm_probe_every > 0 else None
    trainer = Trainer(cfg, model, train_ds, dev_ds, vocab, strategy=TimedGradient(strategy),
                      plan=setup.plan, dist=ctx, shard=setup.shard,
                      withhold=WITHHELD_METRICS if private else frozenset(),
                      observers=[probe] if probe is not None else [])
    if setup.ledger is not None:
        probe_independence(trainer, train_ds, strategy)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    if ctx is None or ctx.is_main:
        atomic_write_text(Path(cfg.out_dir) / "config.json", json.dumps(to_dict(cfg), indent=1))
    if trainer.resume():
        log(f"resumed from {trainer.ckpt_path} at step {trainer.pos.step}")
        for note in getattr(strategy, "notices", ()):
            log(note)
    log(f"model {cfg.model.size}: {count_parameters(model):,} parameters; device "
        f"{trainer.device}, {threads} threads; train {len(train_ds)} utts "
        f"({sum(train_ds.durations) / 3600:.2f} h), dev {len(dev_ds)}, test {len(test_ds)}")
    if setup.policy is not None:
        log(f"clipping: {setup.policy.to_dict()}")
    res = trainer.fit()
    if ctx is not None and not ctx.is_main:  # rank 0 evaluates and writes the results
        D.finish(ctx)
        return {"rank": ctx.rank, "steps": res.steps, "stopped": res.stopped}
    if start:
        start_at(trainer.model, 0)   # the final test: the whole model on the audio features
    test = evaluate(trainer.model, test_ds, vocab, device=trainer.device)
    privacy = None
    ledger = getattr(trainer.strategy, "ledger", None)
    if ledger is not None:
        privacy = {"epsilon": ledger.to_dict()["epsilon"], "delta": ledger.delta,
                   "delta_times_n": ledger.delta_times_n(), "unit": str(ledger.unit),
                   "noise_multiplier": ledger.noise_multiplier, "sample_rate": ledger.sample_rate,
                   "steps": ledger.steps, "method": ledger.method,
                   "secret_randomness": ledger.secret_randomness, "summary": ledger.summary()}
        log(f"privacy: {ledger.summary()}")
    statement = privacy_statement(
        ledger, clipped=setup.policy is not None,
        private_stats=ledger is not None and cfg.privacy.log_private_stats,
        protects=_protects(cfg, setup),
        extra_outside=(["inserted audit canaries are repeated r times: r copies are protected "
                        "only at group-privacy level r"] if canary_info else [])
        + ([NORM_PROBE_OUTSIDE] if probe is not None else []))
    if ledger is None:
        log(statement_text(statement))
    results = {
        "test_wer": test["wer"], "test_cer": test["cer"], "test_loss": test["loss"],
        "dev": res.dev, "steps": res.steps, "train_wall_seconds": res.wall_seconds,
        "train_wall_seconds_total": res.total_wall_seconds,
        "wall_seconds": time.time() - t0, "audio_hours_seen": res.audio_seconds / 3600,
        "final_train_loss": res.final_train_loss, "skipped_nonfinite_steps": res.skipped_nonfinite,
        "data_skipped": dict(report.reasons), "parameters": count_parameters(model),
        "threads": threads, "device": str(trainer.device),
        "train_utts": len(train_ds), "test_utts": len(test_ds),
        "test_speakers": len({u.speaker for u in test_ds.utts}),
        "stopped": res.stopped, "privacy": privacy,
        "clip_policy": setup.policy.to_dict() if setup.policy is not None else None,
        "canaries": canary_info,
        "norm_probe": probe.summary(trainer.log) if probe is not None else None,
        "trainable_params": count_parameters(model), "step_seconds":
        trainer.strategy.median_seconds(), "peft": finish_peft(cfg, trainer, peft),
        "world_size": 1 if ctx is None else ctx.world_size,
        "privacy_statement": statement,
    }
    if private:  # statistics of the private batches that ε does not cover
        for key in ("final_train_loss", "audio_hours_seen"):
            results[key] = None
    atomic_write_text(Path(cfg.out_dir) / "results.json", json.dumps(results, indent=1))
    write_run_report(cfg.out_dir, results)
    D.finish(ctx)
    return results


def norm_probe(cfg: TrainConfig, train_ds: AsrDataset, setup, log=print):
    """The memorization mechanism probe (privasr.audit.norm_probe) for ``audit.canaries``."""
    from privasr.audit.canaries import read_canaries
    from privasr.audit.norm_probe import NormProbe, per_example_bound, run_batch_size

    ids = [c.id for c in read_canaries(cfg.audit.canaries) if c.inserted]
    probe = NormProbe(train_ds, ids, every=cfg.audit.norm_probe_every,
                      size=cfg.audit.norm_probe_size, batch_size=run_batch_size(setup.plan,
                                                                                len(train_ds)),
                      clip_norm=per_example_bound(setup.policy), seed=cfg.seed)
    log(f"audit: norm probe every {probe.every} steps on {len(probe.canaries)} canaries and "
        f"{len(probe.ordinary)} ordinary utterances (B = {probe.batch_size:.3g}, C = "
        f"{probe.clip_norm}) -> norm_probe.csv; these per-example gradient norms of training "
        "examples are NOT covered by the run's ε")
    return probe


def model_family_setup(cfg: TrainConfig, log=print) -> TrainConfig:
    """``model.family=hf_ctc``: check ``model.path`` before any data work, and turn SpecAugment
    off (it masks fbank bins and frames; the waveform features have one "bin", so a frequency
    mask would silence a whole utterance). The data splits then load waveforms."""
    if cfg.model.family != "hf_ctc":
        return cfg
    import dataclasses

    from privasr.models.hf_ctc import check_model_dir, require_transformers

    require_transformers()
    check_model_dir(cfg.model.path)
    if cfg.augment.specaugment:
        log("model.family=hf_ctc: augment.specaugment off (waveform features)")
        cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment,
                                                                   specaugment=False))
    return cfg


def _protects(cfg: TrainConfig, setup) -> str:
    """What one ε of this run covers, in words."""
    if setup.policy is not None and setup.policy.unit == "speaker":
        return "speaker (all of their utterances)"
    return ("utterance (with its speed-perturbed copies)" if cfg.augment.speed_perturb
            else "example")


# train.csv columns a DP run does not release (the strategy drops the others it computes)
WITHHELD_METRICS = frozenset({"loss", "audio_s_per_s"})


def probe_independence(trainer: Trainer, train_ds: AsrDataset, strategy) -> None:
    """Before a DP run: refuse a model whose per-example gradients depend on the rest of the
    batch or on padding (BatchNorm, unmasked pooling), which would void the sensitivity bound."""
    from privasr.clipping.probe import check_per_example_independence
    from privasr.models.loss import checked

    engine = getattr(getattr(strategy, "clipped", None), "engine", None)
    if engine is None:   # torchrun per-core: one local mean per rank, no per-example engine
        return
    durations = train_ds.durations          # a property that builds the list: read it once
    order = sorted(range(len(durations)), key=durations.__getitem__)[:4]
    batch = train_ds.collate(order).to(trainer.device)
    check_per_example_independence(trainer.model, batch, checked(trainer._loss), engine)


def write_run_report(out_dir: str, results: dict) -> Path:
    """``out_dir/report.html``: test results, loss / dev WER curves and, for clipped runs, the
    unit-norm quantiles against the bound and the fraction of units clipped."""
    from privasr.report.html import write_report

    p = results.get("privacy") or {}
    row = {"test_wer": results["test_wer"], "test_cer": results["test_cer"],
           "steps": results["steps"], "epsilon": p.get("epsilon"), "delta": p.get("delta"),
           "privacy unit": p.get("unit", "none")}
    st = results.get("privacy_statement")
    return write_report(out_dir, f"privasr train: {Path(out_dir).name}", {"results": [row]},
                        notes=statement_text(st) if st else p.get("summary", ""))
