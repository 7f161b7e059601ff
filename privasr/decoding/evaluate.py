"""Run a model over a dataset: CTC log-probs, greedy transcripts, WER/CER, loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from privasr.data.dataset import AsrDataset, DurationBucketSampler
from privasr.decoding.ctc import greedy_decode
from privasr.decoding.metrics import error_report


@dataclass
class Predictions:
    ids: list[str]
    refs: list[str]
    hyps: list[str]
    losses: list[float]  # per-utterance CTC loss / target length
    log_probs: list[torch.Tensor]  # (T', V) per utterance, float32 on CPU


@torch.no_grad()
def predict(model: nn.Module, ds: AsrDataset, vocab: list[str], *, device: torch.device | str = "cpu",
            max_seconds: float = 200.0, keep_log_probs: bool = False) -> Predictions:
    was_training = model.training
    model.eval()
    sampler = DurationBucketSampler(ds.durations, max_seconds=max(max_seconds, max(ds.durations)),
                                    shuffle=False)
    out: dict[int, tuple] = {}
    for idx in sampler.batches(0):
        b = ds.collate(idx).to(device)
        lp, lens = model(b.feats, b.feat_lens)
        lp = lp.float()
        losses = F.ctc_loss(lp.transpose(0, 1), b.targets, lens, b.target_lens, blank=0,
                            reduction="none", zero_infinity=True) / b.target_lens
        hyps = greedy_decode(lp.cpu(), lens.cpu(), vocab)
        for j, i in enumerate(idx):
            out[i] = (hyps[j], float(losses[j]), lp[j, : lens[j]].cpu() if keep_log_probs else None)
    model.train(was_training)
    order = range(len(ds))
    return Predictions(ids=[ds.utts[i].id for i in order], refs=[ds.utts[i].text for i in order],
                       hyps=[out[i][0] for i in order], losses=[out[i][1] for i in order],
                       log_probs=[out[i][2] for i in order] if keep_log_probs else [])


def evaluate(model: nn.Module, ds: AsrDataset, vocab: list[str], **kw) -> dict[str, float]:
    p = predict(model, ds, vocab, **kw)
    rep = error_report(p.refs, p.hyps)
    return {"wer": rep["wer"], "cer": rep["cer"], "loss": sum(p.losses) / len(p.losses)}
