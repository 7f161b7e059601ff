"""``TimedGradient``: wraps any gradient strategy and times its ``fill_grads`` per step.

The per-step cost of a strategy (forward, per-example backward, clipping, noise) is what a
PEFT method saves; the wrapper measures it inside real training runs, synchronising CUDA
before reading the clock, and reports it as the ``step_seconds`` stat (also in train.csv).
Everything else (``ledger``, ``state_dict``, ...) is the wrapped strategy's.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch
from torch import nn

from privasr.data.dataset import Batch
from privasr.train.gradient import GradientStrategy, LossFn

__all__ = ["TimedGradient"]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class TimedGradient:
    def __init__(self, inner: GradientStrategy, *, warmup: int = 2) -> None:
        self.inner, self.warmup = inner, warmup
        self.seconds: list[float] = []

    def __getattr__(self, name: str) -> Any:
        if name == "inner":          # not yet set (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        _sync()
        t = time.perf_counter()
        stats = self.inner.fill_grads(model, batches, loss_fn)
        _sync()
        dt = time.perf_counter() - t
        self.seconds.append(dt)
        return {**stats, "step_seconds": dt}

    def median_seconds(self) -> float | None:
        """Median step time after the first ``warmup`` steps of this process (None if none)."""
        s = self.seconds[self.warmup:] or self.seconds
        return statistics.median(s) if s else None
