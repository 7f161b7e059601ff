"""Per-canary scores of a trained model: greedy transcript, exact match, CER, CTC loss."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from privasr.audit.canaries import Canary
from privasr.data.dataset import AsrDataset, compute_features
from privasr.data.manifest import SkipReport
from privasr.data.tokenizer import CharTokenizer
from privasr.decoding.metrics import cer
from privasr.decoding.evaluate import predict
from privasr.inference import feature_config_of


@dataclass(frozen=True)
class CanaryScore:
    id: str
    text: str
    inserted: bool
    repetitions: int
    hypothesis: str
    exact_match: bool
    cer: float
    loss: float  # CTC negative log-likelihood per label

    def to_dict(self) -> dict:
        return asdict(self)


def score_canaries(model: nn.Module, vocab: Sequence[str], canaries: Sequence[Canary], *,
                   device: str | torch.device = "cpu", subsampling: int = 4,
                   cache_dir: str | Path | None = None) -> list[CanaryScore]:
    """Score every CTC-feasible canary (infeasible ones are left out with a warning: their loss
    is infinite and they measure nothing)."""
    tok = CharTokenizer(tuple(vocab))
    utts = [c.utt for c in canaries]
    # the model's own input: fbank for the Conformer-CTC, 16 kHz waveforms for a transformers
    # CTC model (whose encoder also says how many output frames an input has)
    feats = compute_features(utts, feature_config_of(model), cache_dir=cache_dir,
                             progress=False)
    report = SkipReport()
    ds = AsrDataset(utts, feats, tok, subsampling=subsampling, report=report,
                    output_frames=getattr(model, "output_frames", None))
    if report.total:
        warnings.warn(f"{report.total} canaries are CTC-infeasible and are not scored "
                      f"({report.summary()})", stacklevel=2)
    if len(ds) == 0:
        raise ValueError("no CTC-feasible canaries to score")
    p = predict(model, ds, list(vocab), device=device)
    by_id = {c.id: c for c in canaries}
    out = []
    for cid, ref, hyp, loss in zip(p.ids, p.refs, p.hyps, p.losses):
        c = by_id[cid]
        out.append(CanaryScore(cid, ref, c.inserted, c.repetitions, hyp, hyp == ref,
                               cer([ref], [hyp]), float(loss)))
    return out
