"""A recipe's data: its manifests, the embedded corpus built on demand, and the cached-feature
datasets (with speed-perturbed copies grouped with their source utterance)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Sequence

from privasr.config import TrainConfig
from privasr.data.dataset import AsrDataset, compute_features
from privasr.data.domains import domain_config
from privasr.data.features import FeatureConfig
from privasr.data.manifest import SkipReport, Utterance, read_manifest, validate
from privasr.data.synth import SynthConfig, synthesize_corpus
from privasr.data.tokenizer import CharTokenizer

__all__ = ["manifest_paths", "ensure_corpus", "load_split", "feature_config",
           "hf_ctc_output_frames"]


def manifest_paths(cfg: TrainConfig) -> dict[str, Path]:
    d = cfg.data
    corpus = Path(d.corpus_dir)
    return {s: Path(getattr(d, s) or corpus / f"{s}.jsonl") for s in ("train", "dev", "test")}


def ensure_corpus(cfg: TrainConfig, log=print) -> None:
    """Synthesise the embedded corpus when the recipe points at it and it is absent."""
    paths = manifest_paths(cfg)
    if cfg.data.train or all(p.exists() for p in paths.values()):
        return
    log(f"building the embedded corpus in {cfg.data.corpus_dir} "
        f"({cfg.data.synth_hours} h, {cfg.data.synth_speakers} speakers"
        f"{', ' + cfg.data.synth_domain + ' domain' if cfg.data.synth_domain else ''})")
    synth_cfg = SynthConfig(hours=cfg.data.synth_hours, speakers=cfg.data.synth_speakers,
                            seed=cfg.seed)
    if cfg.data.synth_domain:
        synth_cfg = domain_config(cfg.data.synth_domain, hours=cfg.data.synth_hours,
                                  speakers=cfg.data.synth_speakers, seed=cfg.seed)
    summary = synthesize_corpus(cfg.data.corpus_dir, synth_cfg,
                                workers=cfg.data.feature_workers, progress=cfg.progress)
    log(f"corpus: {json.dumps(summary)}")


def feature_config(cfg: TrainConfig, speed: float = 1.0) -> FeatureConfig:
    """The features the recipe's model takes: fbank (Conformer-CTC) or the 16 kHz waveform
    (``model.family=hf_ctc``)."""
    if cfg.model.family == "hf_ctc":
        return FeatureConfig(kind="waveform", speed=speed)
    return FeatureConfig(speed=speed)


def hf_ctc_output_frames(model_dir: str | Path) -> Callable[[int], int]:
    """n input samples -> output frames of the transformers CTC model in ``model_dir`` (its
    convolutional feature encoder's lengths, read from config.json)."""
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"model.path={model_dir}: no config.json (model.family=hf_ctc "
                                f"needs a local transformers model directory)")
    conf = json.loads(p.read_text())
    layers = list(zip(conf["conv_kernel"], conf["conv_stride"]))

    def frames(n: int) -> int:
        for k, s in layers:
            n = (n - k) // s + 1
        return max(n, 0)
    return frames


def load_split(path: Path, cfg: TrainConfig, tok: CharTokenizer, report: SkipReport,
               limit: int | None = None, speeds: Sequence[float] = (),
               utts: Sequence[Utterance] | None = None) -> AsrDataset:
    """A manifest's utterances with cached features (``feature_config``), plus speed-perturbed
    copies if asked. ``utts``: a subset already read from ``path`` (e.g. one speaker's), whose
    features are cached on their own beside the manifest."""
    if utts is None:
        utts = read_manifest(path, on_error=cfg.data.on_error, report=report)
    utts = list(utts)
    if limit is not None:
        utts = utts[:limit]
    utts = validate(utts, on_error=cfg.data.on_error, report=report)
    all_utts, all_feats, source_of = [], [], {}
    for speed in (1.0, *speeds):
        feats = compute_features(utts, feature_config(cfg, speed), cache_dir=path.parent / "feats",
                                 workers=cfg.data.feature_workers, progress=cfg.progress,
                                 desc=f"features {path.name}" + (f" x{speed}" if speed != 1 else ""))
        all_feats += feats
        if speed == 1.0:
            all_utts += utts
            continue
        for u in utts:
            all_utts.append(dataclasses.replace(u, id=f"{u.id}_sp{speed}",
                                                duration=u.duration / speed))
            source_of[all_utts[-1].id] = u.id
    frames = hf_ctc_output_frames(cfg.model.path) if cfg.model.family == "hf_ctc" else None
    return AsrDataset(all_utts, all_feats, tok, report=report, source_of=source_of,
                      output_frames=frames)
