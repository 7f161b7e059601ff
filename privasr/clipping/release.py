"""The tail of the one equation, written once: what is done to Σ_u clip(g_u) before release.

    g = ( Σ_u clip(g_u ; C_t, scope)  +  σ·C_total·ξ ) / E[#units]         ξ ~ N(0, I)
    quantile bound:  C_{t+1} = C_t · exp(−η·(b̃_t − γ)),  b̃_t = (count + N(0, σ_b²)) / E[#units]

:class:`Release` holds the per-run state of that tail (the bound C_t and the step that salts
the hash grouping) and does each part: the noise scale σ·C_total, the draws (one per logical
batch, per tensor in name order, then the count's), the fixed denominator, the bound update
and the per-step statistics. Its users differ only in where the clipped sum comes from:
``ClippedGradient`` (an engine, one process), ``PerCoreGradient`` (one unit per torchrun rank,
summed by one all-reduce) and the federated server (client deltas). See docs/one-equation.md.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from privasr.clipping.noise import GaussianNoise
from privasr.clipping.policy import ClipPolicy

__all__ = ["Release", "ReleaseOwner"]

QUANTILES = (0.1, 0.5, 0.9)


class Release:
    """Noise, denominator, quantile bound and stats of the one equation, for one ``policy``."""

    def __init__(self, policy: ClipPolicy, noise: GaussianNoise) -> None:
        self.policy, self.noise = policy, noise
        self.clip_norm = policy.clip_norm      # C_t: moves only with bound="quantile"
        self.step = 0

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.clip_norm = state["clip_norm"]

    # -- the parts ----------------------------------------------------------------------------
    def noise_std(self, bound: float) -> float:
        """σ·C_total: the std of the one draw on the clipped sum (0 without noise)."""
        sigma = self.policy.noise_multiplier
        return sigma * bound if sigma > 0 else 0.0

    def denominator(self, realised_units: int) -> float:
        """E[#units], a constant; the realised count only when σ = 0 and none is known."""
        if self.policy.expected_units is not None:
            return float(self.policy.expected_units)
        return float(max(realised_units, 1))

    def add_noise(self, tensors: Sequence[Tensor], std: float, *, scale: float = 1.0
                  ) -> list[Tensor]:
        """``tensors`` + std·ξ·scale, one draw per tensor in order (new tensors)."""
        if std <= 0:
            return list(tensors)
        if not tensors:
            return []
        draws = self.noise.sample_many([t.shape for t in tensors], std,
                                       device=tensors[0].device, dtype=tensors[0].dtype)
        return [z.add_(t) if scale == 1.0 else z.mul_(scale).add_(t)       # the draws are ours
                for t, z in zip(tensors, draws)]

    def count_noise(self) -> float:
        """The quantile count's draw N(0, σ_b²), after the gradient's (0 when not noised)."""
        pol = self.policy
        if pol.bound == "quantile" and pol.quantile_noise_multiplier > 0:
            return float(self.noise.sample((), pol.quantile_noise_multiplier))
        return 0.0

    def update_bound(self, unclipped: int, units: int, count_noise: float,
                     denominator: float) -> None:
        """Andrew et al. 2021's geometric update of C_t from the noised (centred) count."""
        pol = self.policy
        if pol.bound != "quantile":
            return
        count = pol.quantile_count(unclipped, units) + count_noise
        frac = pol.quantile_fraction(count, denominator)
        self.clip_norm = float(self.clip_norm * math.exp(-pol.quantile_lr
                                                         * (frac - pol.target_quantile)))

    def stats(self, norms: Tensor, clipped: Tensor, *, bound: float, loss_sum: float,
              examples: int, denominator: float, std: float) -> dict[str, float]:
        """The step's statistics: loss, fraction clipped, unit-norm quantiles, bound, counts,
        and the noise std on the released mean."""
        units = int(norms.numel())
        q = (torch.quantile(norms.double(), torch.tensor(QUANTILES, dtype=torch.float64))
             .tolist() if units else [math.nan] * len(QUANTILES))
        return {
            "loss": loss_sum / examples if examples else math.nan,
            "frac_clipped": float(clipped.float().mean()) if units else 0.0,
            "norm_p10": q[0], "norm_p50": q[1], "norm_p90": q[2],
            "bound": float(bound),
            "units": float(units),
            "examples": float(examples),
            "noise_std": std / denominator,
        }


class ReleaseOwner:
    """A gradient strategy whose policy, noise, bound and checkpoint state are its
    ``release``'s (``ClippedGradient``, ``PerCoreGradient``: interchangeable checkpoints)."""

    release: Release

    @property
    def policy(self) -> ClipPolicy:
        return self.release.policy

    @policy.setter
    def policy(self, value: ClipPolicy) -> None:   # σ recalibrated on resume
        self.release.policy = value

    @property
    def noise(self) -> GaussianNoise:
        return self.release.noise

    @property
    def clip_norm(self) -> float | None:
        return self.release.clip_norm

    @clip_norm.setter
    def clip_norm(self, value: float) -> None:
        self.release.clip_norm = value

    def state_dict(self) -> dict[str, Any]:
        return self.release.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.release.load_state_dict(state)
