"""A client's local update: one speaker's utterances, the ordinary Trainer, the model delta.

The Trainer (``privasr.train.trainer``) runs ``local.epochs`` passes over the speaker's data
(duration-bucketed batches, per-step global-norm clipping at ``local.max_grad_norm``) starting
from the server model; the client returns Δ = θ_local − θ_server of the trainable tensors.
The local optimizer is the recipe's ``local.optimizer`` (SGD, the paper's client optimizer, or
AdamW) at a constant ``local.lr``, built by the Trainer from the local TrainConfig.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from privasr.data.dataset import (AsrDataset, DurationBucketSampler, cache_feature_groups,
                                  feature_cache_path)
from privasr.data.manifest import SkipReport, Utterance, read_manifest, validate
from privasr.data.tokenizer import CharTokenizer
from privasr.federated.config import FLConfig, local_train_config
from privasr.models.build import build_model
from privasr.data.splits import feature_config, load_split, manifest_paths
from privasr.train.trainer import BucketPlan, Trainer

__all__ = ["speakers_of", "speaker_dataset", "local_update", "LocalResult", "warm_feature_cache"]

# per process (a Ray worker serves many speakers): the manifest grouped by speaker, read once,
# and each speaker's dataset once it has been asked for
_MANIFEST: dict[tuple, dict[str, list[Utterance]]] = {}
_DATASETS: dict[tuple, AsrDataset] = {}


def _by_speaker(manifest: str | Path) -> tuple[tuple, dict[str, list[Utterance]]]:
    path = Path(manifest)
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _MANIFEST:
        _MANIFEST.clear()
        _DATASETS.clear()
        by: dict[str, list[Utterance]] = {}
        for u in read_manifest(path, on_error="skip"):
            by.setdefault(u.speaker, []).append(u)
        _MANIFEST[key] = by
    return key, _MANIFEST[key]


def speakers_of(manifest: str | Path) -> list[str]:
    """The client population: the sorted speakers of the training manifest."""
    return sorted(_by_speaker(manifest)[1])


def speaker_dataset(cfg: FLConfig, speaker: str, *, progress: bool = False) -> AsrDataset:
    """The speaker's utterances with features cached per speaker (only that speaker's audio is
    read: a client never loads the others' data)."""
    path = manifest_paths(cfg)["train"]
    key, by = _by_speaker(path)
    if (key, speaker) not in _DATASETS:
        utts = by.get(speaker)
        if not utts:
            raise ValueError(f"speaker {speaker!r} has no utterances in {path}")
        tcfg = local_train_config(cfg, out_dir="", steps=1, seed=0)
        tcfg.progress = progress
        _DATASETS[(key, speaker)] = load_split(path, tcfg, CharTokenizer(), SkipReport(),
                                               utts=utts)
    ds = _DATASETS[(key, speaker)]
    if len(ds) == 0:
        raise ValueError(f"speaker {speaker!r} has no usable utterances in {path}")
    return ds


def warm_feature_cache(cfg: FLConfig) -> int:
    """Compute every speaker's features once (one worker pool), before clients start in
    parallel; returns the number of speakers whose cache was missing. A speaker with an
    unusable file is computed by its client (``speaker_dataset`` names the file)."""
    path = manifest_paths(cfg)["train"]
    _, by = _by_speaker(path)
    tcfg = local_train_config(cfg, out_dir="", steps=1, seed=0)
    fcfg = feature_config(tcfg)
    groups = []
    for spk in sorted(by):
        if not feature_cache_path(by[spk], fcfg, path.parent / "feats").exists():
            groups.append(validate(by[spk], on_error="skip", report=SkipReport()))
    return cache_feature_groups([g for g in groups if g], fcfg, cache_dir=path.parent / "feats",
                                workers=cfg.data.feature_workers, progress=cfg.progress,
                                desc="client features")


@dataclass
class LocalResult:
    delta: dict[str, Tensor]
    steps: int
    utterances: int
    loss: float


def local_update(cfg: FLConfig, server_state: Mapping[str, Tensor], speaker: str, *,
                 round_: int, client_seed: int) -> LocalResult:
    """Train the server model on ``speaker``'s data; return the delta of trainable tensors."""
    ds = speaker_dataset(cfg, speaker)
    vocab = list(CharTokenizer().symbols)
    model = build_model(cfg, len(vocab))
    model.load_state_dict(dict(server_state))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seed = cfg.seed * 1_000_003 + round_ * 7919 + client_seed
    sampler = DurationBucketSampler(ds.durations, max_seconds=max(cfg.local.max_seconds,
                                                                  max(ds.durations)),
                                    max_utts=cfg.local.max_utts, seed=seed)
    steps = cfg.local.epochs * len(sampler.batches(0))
    if cfg.local.max_steps:
        steps = min(steps, cfg.local.max_steps)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="privasr-client-") as tmp:
        tcfg = local_train_config(cfg, out_dir=tmp, steps=steps, seed=seed)
        res = Trainer(tcfg, model, ds, None, vocab, plan=BucketPlan(sampler)).fit()
    delta = {n: (p.detach().cpu() - start[n].cpu()) for n, p in model.named_parameters()
             if n in start}
    return LocalResult(delta, res.steps, len(ds), res.final_train_loss)
