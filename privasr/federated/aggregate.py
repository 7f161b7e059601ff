"""The server's DP aggregate of one round (DESIGN.md "One equation", unit = client):

    Δ̄ = ( Σ_{c in replies} clip(Δ_c ; C, scope)  +  σ·C·ξ ) / E[cohort]        ξ ~ N(0, I)

The denominator is the *expected* cohort size (q·N), not the number of replies: a client that
was sampled but failed or timed out simply contributes nothing, which is what the accountant's
Poisson-subsampled Gaussian mechanism already covers (a missing client is a zero delta).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from privasr.clipping.noise import GaussianNoise
from privasr.federated.clip import DeltaClipper

__all__ = ["RoundAggregate", "aggregate"]


@dataclass
class RoundAggregate:
    update: dict[str, Tensor]        # Δ̄, what the server optimizer applies
    clients: int                     # deltas summed
    clipped: int                     # of which changed by clipping
    norms: list[float] = field(default_factory=list)  # pre-clipping norms (not private)


def aggregate(deltas: Sequence[Mapping[str, Tensor]], clipper: DeltaClipper, *,
              noise_multiplier: float, expected_cohort: float, noise: GaussianNoise,
              shapes: Mapping[str, torch.Size]) -> RoundAggregate:
    """Clip every delta, sum, add N(0, (σ·C)²) per coordinate, divide by ``expected_cohort``."""
    if expected_cohort <= 0:
        raise ValueError(f"expected_cohort must be > 0, got {expected_cohort}")
    total = {n: torch.zeros(shapes[n], dtype=torch.float64) for n in clipper.names}
    clipped, norms = 0, []
    for d in deltas:
        c = clipper(d)
        clipped += int(c.clipped)
        norms.append(c.norm)
        for n in clipper.names:
            total[n] += c.delta[n].double()
    std = noise_multiplier * clipper.bound
    update = {}
    for n in clipper.names:
        s = total[n].float()
        if std > 0:
            s = s + noise.sample(s.shape, std)
        update[n] = s / expected_cohort
    return RoundAggregate(update, len(deltas), clipped, norms)
