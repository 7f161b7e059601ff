"""How large the clipped mean gradient is next to the noise DP-SGD adds to it.

DP-SGD's update direction is ``(Σ clip(g_i) + N(0, σ²C²I)) / E[B]``: the signal is the clipped
mean gradient ``E[clip(g)]``, the noise on it has norm about ``σ·C·√d / E[B]``. When the first
is much smaller than the second, more steps at the same σ walk at random (issue 16: why DP
fine-tuning stops short of non-private fine-tuning).

The per-example gradients come from one backward pass per example (exact, no engine;
``privasr.models.loss.example_gradients``, as the memorization probe). They are
statistics of private training examples: a diagnostic, NOT covered by any run's ε.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import torch
from torch import nn

from privasr.data.dataset import AsrDataset
from privasr.models.loss import example_gradients

__all__ = ["clipped_signal", "noise_on_mean", "group_of"]


def group_of(name: str) -> str:
    """The module a parameter belongs to, at most 3 levels deep ("encoder.blocks.3", "head")."""
    return ".".join(name.split(".")[:-1][:3]) or name


def _unbiased(sum_vec: torch.Tensor, sum_sq: float, n: int) -> float:
    """sqrt of the unbiased estimate of ||μ||² from n vectors: their sum and summed squared norms."""
    mean_sq = float(sum_vec.norm()) ** 2 / n ** 2
    return math.sqrt(max((n * mean_sq - sum_sq / n) / (n - 1), 0.0))


def noise_on_mean(noise_multiplier: float, clip_norm: float, dim: int,
                  expected_batch_size: float) -> float:
    """Expected-norm scale of the Gaussian noise on the mean gradient: σ·C·√d / E[B]."""
    return noise_multiplier * clip_norm * math.sqrt(dim) / expected_batch_size


def clipped_signal(model: nn.Module, ds: AsrDataset, indices: Sequence[int], clip_norm: float,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """Per-example gradients (trainable parameters) of ``indices``, clipped to ``clip_norm``.

    ``signal`` is an unbiased estimate of ||E[clip(g)]||² (square-rooted, floored at 0): the
    n-sample mean's squared norm exceeds it by the spread over n, E||ḡ||² = ||μ||² +
    (E||g||² − ||μ||²)/n. ``clipped_mean_norm_sample`` is the plain ||ḡ||. ``by_group``: the
    same estimate and d for each module group (:func:`group_of`) of the globally clipped
    gradient: where the signal is. Needs n ≥ 2."""
    if len(indices) < 2:
        raise ValueError("clipped_signal needs at least 2 examples")
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    d = sum(p.numel() for _, p in named)
    slices: dict[str, list[slice]] = {}
    at = 0
    for k, p in named:
        slices.setdefault(group_of(k), []).append(slice(at, at + p.numel()))
        at += p.numel()
    sq_group = dict.fromkeys(slices, 0.0)
    clipped = torch.zeros(d, dtype=torch.float64)
    raw = torch.zeros(d, dtype=torch.float64)
    norms: list[float] = []
    sq_clipped = 0.0
    with torch.enable_grad():
        for g in example_gradients(model, ds, indices, device):
            norm = float(g.norm())
            scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
            norms.append(norm)
            clipped += g * scale
            raw += g
            sq_clipped += (norm * scale) ** 2
            for k, parts in slices.items():
                sq_group[k] += sum(float(g[sl].norm()) ** 2 for sl in parts) * scale ** 2
    n = len(indices)
    by_group = {k: {"d": sum(sl.stop - sl.start for sl in parts),
                    "signal": _unbiased(torch.cat([clipped[sl] for sl in parts]), sq_group[k], n)}
                for k, parts in slices.items()}
    deciles = statistics.quantiles(norms, n=10)
    return {"d": d, "n": n, "norm_median": statistics.median(norms), "norm_p10": deciles[0],
            "norm_p90": deciles[-1], "clipped_share": sum(x > clip_norm for x in norms) / n,
            "clipped_mean_norm_sample": float(clipped.norm()) / n,
            "signal": _unbiased(clipped, sq_clipped, n),
            "unclipped_mean_norm_sample": float(raw.norm()) / n, "by_group": by_group}
