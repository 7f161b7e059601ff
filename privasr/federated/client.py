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

from privasr.data.dataset import AsrDataset, DurationBucketSampler
from privasr.data.manifest import SkipReport, read_manifest
from privasr.data.tokenizer import CharTokenizer
from privasr.federated.config import FLConfig, local_train_config
from privasr.models.build import build_model
from privasr.data.splits import load_split, manifest_paths
from privasr.train.trainer import BucketPlan, Trainer

__all__ = ["speakers_of", "speaker_dataset", "local_update", "LocalResult", "warm_feature_cache"]

_CACHE: dict[tuple, dict[str, AsrDataset]] = {}


def speakers_of(manifest: str | Path) -> list[str]:
    """The client population: the sorted speakers of the training manifest."""
    return sorted({u.speaker for u in read_manifest(manifest, on_error="skip")})


def speaker_dataset(cfg: FLConfig, speaker: str) -> AsrDataset:
    """The speaker's utterances with cached features (all speakers loaded once per process)."""
    path = manifest_paths(cfg)["train"]
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _CACHE:
        tok = CharTokenizer()
        full = load_split(path, local_train_config(cfg, out_dir="", steps=1, seed=0), tok,
                          SkipReport())
        by: dict[str, list[int]] = {}
        for i, u in enumerate(full.utts):
            by.setdefault(u.speaker, []).append(i)
        _CACHE.clear()
        _CACHE[key] = {s: AsrDataset([full.utts[i] for i in ix], [full.feats[i] for i in ix], tok)
                       for s, ix in by.items()}
    ds = _CACHE[key].get(speaker)
    if ds is None or len(ds) == 0:
        raise ValueError(f"speaker {speaker!r} has no usable utterances in {path}")
    return ds


def warm_feature_cache(cfg: FLConfig) -> int:
    """Compute (or check) the training features once, before clients start in parallel."""
    speaker_dataset(cfg, speakers_of(manifest_paths(cfg)["train"])[0])
    n = sum(len(ds) for ds in next(iter(_CACHE.values())).values())
    _CACHE.clear()  # the clients load their own copy; the server does not need it
    return n


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
