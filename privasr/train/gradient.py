"""Gradient strategies: the one pluggable piece of the trainer that fills ``.grad``.

A strategy receives the physical batches of one logical step and a per-example loss function,
and must leave in ``p.grad`` the gradient the optimizer should apply. Ordinary training,
per-example DP-SGD, micro-batch, per-core and per-layer clipping all enter here, never as a
second training loop.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from privasr.data.dataset import Batch

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


class GradientStrategy(Protocol):
    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        """Set ``.grad`` of the trainable parameters; return stats (at least ``loss``)."""
        ...


class BatchClipGradient:
    """Mean loss over the logical batch, then ordinary global-norm clipping (unit = batch)."""

    def __init__(self, *, max_norm: float | None = 5.0) -> None:
        self.max_norm = max_norm

    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        n = sum(len(b) for b in batches)
        total = 0.0
        for b in batches:
            losses = loss_fn(model, b)
            (losses.sum() / n).backward()
            total += float(losses.detach().sum())
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if self.max_norm:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        return {"loss": total / n, "grad_norm": float(norm)}
