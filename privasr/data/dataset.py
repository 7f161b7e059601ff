"""Features in memory, padded batches, and duration-bucketed batching for non-private runs."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from privasr.atomic import atomic_path
from privasr.data.features import FeatureConfig, fbank, frame_seconds, speed_perturb, waveform
from privasr.data.manifest import SkipReport, Utterance, load_audio
from privasr.data.tokenizer import CharTokenizer


def _features_of(item: tuple[Utterance, FeatureConfig]) -> np.ndarray:
    """fp16 features as a numpy array: worker processes return arrays, which are pickled by
    value (torch tensors would each hold a shared-memory file descriptor in the parent, and
    tens of thousands of them exhaust the descriptor limit: "received 0 items of ancdata")."""
    utt, cfg = item
    if cfg.kind == "waveform":
        x = waveform(speed_perturb(load_audio(utt), cfg.speed), cfg, utt.sampling_rate)
    else:
        x = fbank(speed_perturb(load_audio(utt), cfg.speed), cfg)
    return np.asarray(x).astype(np.float16)


def _cache_key(utts: Sequence[Utterance], cfg: FeatureConfig) -> str:
    d = asdict(cfg)
    if d["kind"] == "fbank":     # fbank caches keep the key they had before feature kinds
        del d["kind"]
    h = hashlib.sha1(json.dumps(d, sort_keys=True).encode())
    for u in utts:
        h.update(f"{u.id}\t{u.audio}\t{u.duration:.4f}\n".encode())
    return h.hexdigest()[:16]


def feature_cache_path(utts: Sequence[Utterance], cfg: FeatureConfig, cache_dir: str | Path
                       ) -> Path:
    """Where ``compute_features(utts, cfg, cache_dir=cache_dir)`` keeps its result."""
    return Path(cache_dir) / f"feats-{_cache_key(utts, cfg)}.pt"


def cache_feature_groups(groups: Sequence[Sequence[Utterance]], cfg: FeatureConfig, *,
                         cache_dir: str | Path, workers: int = 1, progress: bool = True,
                         desc: str = "features") -> int:
    """Fill the cache of each group (as ``compute_features(group, ...)`` would) in one pass
    over the groups whose cache is missing: one worker pool, not one per group. Returns the
    number of groups computed."""
    missing = [g for g in groups if not feature_cache_path(g, cfg, cache_dir).exists()]
    if not missing:
        return 0
    flat = compute_features([u for g in missing for u in g], cfg, workers=workers,
                            progress=progress, desc=desc)
    i = 0
    for g in missing:
        with atomic_path(feature_cache_path(g, cfg, cache_dir)) as tmp:
            torch.save(flat[i:i + len(g)], tmp)
        i += len(g)
    return len(missing)


def compute_features(utts: Sequence[Utterance], cfg: FeatureConfig = FeatureConfig(), *,
                     cache_dir: str | Path | None = None, workers: int = 1,
                     progress: bool = True, desc: str = "features") -> list[torch.Tensor]:
    """fp16 features of every utterance (fbank, or the waveform with ``cfg.kind="waveform"``),
    cached on disk under ``cache_dir`` when given."""
    path = None
    if cache_dir is not None:
        path = feature_cache_path(utts, cfg, cache_dir)
        if path.exists():
            return torch.load(path)
    items = [(u, cfg) for u in utts]
    if workers > 1:
        # spawn, not fork: forking after torch has started its thread pools can deadlock
        with mp.get_context("spawn").Pool(workers) as pool:
            feats = [torch.from_numpy(x) for x in tqdm(
                pool.imap(_features_of, items, chunksize=16), total=len(items), desc=desc,
                disable=not progress)]
    else:
        feats = [torch.from_numpy(_features_of(i))
                 for i in tqdm(items, desc=desc, disable=not progress)]
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(feats, tmp)
    return feats


@dataclass
class Batch:
    """A padded batch. ``feats`` (B, T, F), ``targets`` (B, S) padded with 0."""

    ids: list[str]
    feats: torch.Tensor
    feat_lens: torch.Tensor
    targets: torch.Tensor
    target_lens: torch.Tensor
    speakers: list[str] | None = None   # one per row (what unit=speaker groups by)
    # seconds per frame when ``feats`` are not audio features (e.g. a frozen encoder prefix's
    # outputs, privasr.peft.frozen_prefix); None: from the features' width
    seconds_per_frame: float | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.ids, self.feats.to(device), self.feat_lens.to(device),
                     self.targets.to(device), self.target_lens.to(device), self.speakers,
                     self.seconds_per_frame)

    def speakers_of(self, rows: Sequence[int]) -> list[str] | None:
        """The speakers of ``rows`` (None when the batch carries none)."""
        return None if self.speakers is None else [self.speakers[i] for i in rows]

    @property
    def frame_seconds(self) -> float:
        """Seconds per feature frame: 0.01 for fbank, 1/16000 for waveform (width-1) features."""
        if self.seconds_per_frame is not None:
            return self.seconds_per_frame
        return frame_seconds(self.feats.shape[-1])

    @property
    def audio_seconds(self) -> float:
        return float(self.feat_lens.sum()) * self.frame_seconds


def ctc_output_frames(n_feat_frames: int, subsampling: int = 4) -> int:
    """A conservative count of the frames a ``subsampling``× CTC model emits."""
    return n_feat_frames // subsampling - 1


def ctc_min_frames(target: Sequence[int]) -> int:
    """Frames CTC needs: one per label plus a blank between repeated labels."""
    return len(target) + sum(1 for a, b in zip(target, target[1:]) if a == b)


class AsrDataset:
    """Utterances with their features and token ids; drops CTC-infeasible ones (counted).

    Feasibility: ``output_frames(n)`` (the model's output frames for n input frames) when
    given, else the conservative ``ctc_output_frames(n, subsampling)``. ``frame_seconds``
    (the duration of one feature frame) follows from the features' width (``features.
    frame_seconds``): 0.01 for fbank, 1/16000 for waveform features.
    """

    def __init__(self, utts: Sequence[Utterance], feats: Sequence[torch.Tensor],
                 tokenizer: CharTokenizer, *, subsampling: int = 4,
                 report: SkipReport | None = None,
                 source_of: dict[str, str] | None = None,
                 output_frames: Callable[[int], int] | None = None,
                 seconds_per_frame: float | None = None) -> None:
        self.seconds_per_frame = seconds_per_frame
        if output_frames is None:
            def output_frames(n: int) -> int:
                return ctc_output_frames(n, subsampling)
        self.report = report if report is not None else SkipReport()
        # derived copies (e.g. speed perturbation): copy id -> the id of its source utterance
        self.source_of: dict[str, str] = dict(source_of or {})
        self.utts, self.feats, self.targets = [], [], []
        for u, f in zip(utts, feats, strict=True):
            ids = tokenizer.encode(u.text, where=f"utterance {u.id!r}")
            if output_frames(f.shape[0]) < ctc_min_frames(ids):
                self.report.add("CTC-infeasible (too fast for the model's frame rate)",
                                f"{u.id}: {len(ids)} labels in {f.shape[0]} frames")
                continue
            self.utts.append(u)
            self.feats.append(f)
            self.targets.append(torch.tensor(ids, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.utts)

    def privacy_units(self) -> list[list[int]] | None:
        """Indices grouped by source utterance (a derived copy joins its source), in order of
        first appearance; None when there are no derived copies (every example is a unit)."""
        if not self.source_of:
            return None
        groups: dict[str, list[int]] = {}
        for i, u in enumerate(self.utts):
            groups.setdefault(self.source_of.get(u.id, u.id), []).append(i)
        return list(groups.values())

    def speaker_units(self) -> list[list[int]]:
        """Indices grouped by speaker (the units of speaker-level DP), in order of first
        appearance; a speaker's derived copies are among its utterances."""
        groups: dict[str, list[int]] = {}
        for i, u in enumerate(self.utts):
            groups.setdefault(u.speaker, []).append(i)
        return list(groups.values())

    @property
    def frame_seconds(self) -> float:
        """Seconds per feature frame (0.01 for fbank; see the class docstring)."""
        if self.seconds_per_frame is not None:
            return self.seconds_per_frame
        return frame_seconds(self.feats[0].shape[-1]) if self.feats else 0.01

    def with_features(self, feats: Sequence[torch.Tensor], seconds_per_frame: float
                      ) -> "AsrDataset":
        """The same utterances, targets and units with other per-utterance inputs (e.g. a
        frozen encoder prefix's outputs), ``seconds_per_frame`` seconds of audio per row."""
        if len(feats) != len(self.feats):
            raise ValueError(f"{len(feats)} feature tensors for {len(self.feats)} utterances")
        new = object.__new__(AsrDataset)
        new.__dict__.update(self.__dict__)
        new.feats, new.seconds_per_frame = list(feats), seconds_per_frame
        return new

    @property
    def durations(self) -> list[float]:
        s = self.frame_seconds
        return [f.shape[0] * s for f in self.feats]

    def collate(self, indices: Sequence[int]) -> Batch:
        feats = [self.feats[i] for i in indices]
        tg = [self.targets[i] for i in indices]
        B, T, F = len(indices), max(f.shape[0] for f in feats), feats[0].shape[1]
        x = torch.zeros(B, T, F)
        y = torch.zeros(B, max(len(t) for t in tg), dtype=torch.long)
        for b, (f, t) in enumerate(zip(feats, tg)):
            x[b, : f.shape[0]] = f.float()
            y[b, : len(t)] = t
        return Batch([self.utts[i].id for i in indices], x,
                     torch.tensor([f.shape[0] for f in feats]), y,
                     torch.tensor([len(t) for t in tg]),
                     [self.utts[i].speaker for i in indices], self.seconds_per_frame)


class DurationBucketSampler:
    """Batches of similar duration, at most ``max_seconds`` of padded audio and ``max_utts`` each.

    The batch order of epoch e is a pure function of (seed, e), so a run resumes exactly from
    (epoch, batch index). For non-private training only: DP needs Poisson sampling.
    """

    def __init__(self, durations: Sequence[float], *, max_seconds: float, max_utts: int = 10**9,
                 seed: int = 0, shuffle: bool = True) -> None:
        if max_seconds < max(durations, default=0):
            raise ValueError(f"max_seconds={max_seconds} is shorter than the longest utterance "
                             f"({max(durations):.1f} s)")
        self.durations = list(durations)
        self.max_seconds, self.max_utts, self.seed, self.shuffle = max_seconds, max_utts, seed, shuffle

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 100003 + epoch)
        order = sorted(range(len(self.durations)),
                       key=lambda i: (self.durations[i], rng.random() if self.shuffle else i))
        batches, cur, longest = [], [], 0.0
        for i in order:
            d = max(longest, self.durations[i])
            if cur and (d * (len(cur) + 1) > self.max_seconds or len(cur) >= self.max_utts):
                batches.append(cur)
                cur, d = [], self.durations[i]
            cur.append(i)
            longest = d
        if cur:
            batches.append(cur)
        if self.shuffle:
            rng.shuffle(batches)
        return batches
