"""The per-example CTC loss every gradient strategy differentiates, and exact per-example
gradients from it (one backward per example: the reference that diagnostics read)."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from privasr.data.dataset import AsrDataset, Batch
from privasr.errors import NonFiniteLossError


def per_example_ctc(model: nn.Module, batch: Batch) -> torch.Tensor:
    """CTC negative log-likelihood of each utterance divided by its target length, shape (B,)."""
    log_probs, out_lens = model(batch.feats, batch.feat_lens)
    losses = F.ctc_loss(log_probs.float().transpose(0, 1), batch.targets, out_lens,
                        batch.target_lens, blank=0, reduction="none", zero_infinity=False)
    return losses / batch.target_lens.clamp(min=1).to(losses.dtype)


def example_gradients(model: nn.Module, ds: AsrDataset, indices: Sequence[int],
                      device: torch.device | str) -> Iterator[torch.Tensor]:
    """Each example's loss gradient over the trainable parameters (in ``named_parameters``
    order), flattened to one float64 CPU vector, one example at a time (``torch.autograd.grad``:
    ``.grad`` is left as it is)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for i in indices:
        loss = per_example_ctc(model, ds.collate([i]).to(device)).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        yield torch.cat([(g if g is not None else torch.zeros_like(p)).detach().flatten()
                         for g, p in zip(grads, params)]).double().cpu()


def checked(loss_fn):
    """Wrap a per-example loss so that a NaN/inf raises :class:`NonFiniteLossError` pre-backward."""

    def wrapped(model: nn.Module, batch: Batch) -> torch.Tensor:
        losses = loss_fn(model, batch)
        bad = ~torch.isfinite(losses.detach())
        if bad.any():
            idx = bad.nonzero().flatten().tolist()
            raise NonFiniteLossError([batch.ids[i] for i in idx],
                                     [float(losses.detach()[i]) for i in idx])
        return losses

    return wrapped
