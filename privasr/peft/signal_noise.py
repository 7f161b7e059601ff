"""How large the clipped mean gradient is next to the noise DP-SGD adds to it.

DP-SGD's update direction is ``(Σ clip(g_i) + N(0, σ²C²I)) / E[B]``: the signal is the clipped
mean gradient ``E[clip(g)]``, the noise on it has norm about ``σ·C·√d / E[B]``. When the first
is much smaller than the second, more steps at the same σ walk at random (issue 16: why DP
fine-tuning stops short of non-private fine-tuning).

The per-example gradients come from one backward pass per example (exact, no engine). They are
statistics of private training examples: a diagnostic, NOT covered by any run's ε.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import torch
from torch import nn

from privasr.data.dataset import AsrDataset
from privasr.models.loss import per_example_ctc

__all__ = ["clipped_signal", "noise_on_mean"]


def noise_on_mean(noise_multiplier: float, clip_norm: float, dim: int,
                  expected_batch_size: float) -> float:
    """Expected-norm scale of the Gaussian noise on the mean gradient: σ·C·√d / E[B]."""
    return noise_multiplier * clip_norm * math.sqrt(dim) / expected_batch_size


def clipped_signal(model: nn.Module, ds: AsrDataset, indices: Sequence[int], clip_norm: float,
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """Per-example gradients (trainable parameters) of ``indices``, clipped to ``clip_norm``.

    ``signal`` is an unbiased estimate of ||E[clip(g)]||² (square-rooted, floored at 0): the
    n-sample mean's squared norm exceeds it by the spread over n, E||ḡ||² = ||μ||² +
    (E||g||² − ||μ||²)/n. ``clipped_mean_norm_sample`` is the plain ||ḡ||. Needs n ≥ 2."""
    if len(indices) < 2:
        raise ValueError("clipped_signal needs at least 2 examples")
    params = [p for p in model.parameters() if p.requires_grad]
    d = sum(p.numel() for p in params)
    clipped = torch.zeros(d, dtype=torch.float64)
    raw = torch.zeros(d, dtype=torch.float64)
    norms: list[float] = []
    sq_clipped = 0.0
    with torch.enable_grad():
        for i in indices:
            loss = per_example_ctc(model, ds.collate([i]).to(device)).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            g = torch.cat([(x if x is not None else torch.zeros_like(p)).detach().flatten()
                           for x, p in zip(grads, params)]).double().cpu()
            norm = float(g.norm())
            scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
            norms.append(norm)
            clipped += g * scale
            raw += g
            sq_clipped += (norm * scale) ** 2
    n = len(indices)
    mean_sq = float(clipped.norm()) ** 2 / n ** 2
    unbiased = (n * mean_sq - sq_clipped / n) / (n - 1)
    deciles = statistics.quantiles(norms, n=10)
    return {"d": d, "n": n, "norm_median": statistics.median(norms), "norm_p10": deciles[0],
            "norm_p90": deciles[-1], "clipped_share": sum(x > clip_norm for x in norms) / n,
            "clipped_mean_norm_sample": math.sqrt(mean_sq),
            "signal": math.sqrt(max(unbiased, 0.0)),
            "unclipped_mean_norm_sample": float(raw.norm()) / n}
