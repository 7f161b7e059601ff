"""The server's DP aggregate of one round: the one equation with unit = client
(docs/one-equation.md, docs/federated.md):

    Δ̄ = ( Σ_{c in replies} clip(Δ_c ; C, scope)  +  σ·C·ξ ) / E[cohort]        ξ ~ N(0, I)

The denominator is the *expected* cohort size (q·N), not the number of replies: a client that
was sampled but failed or timed out simply contributes nothing, which is what the accountant's
Poisson-subsampled Gaussian mechanism already covers (a missing client is a zero delta).
Noise scale, draws and denominator are the shared ``Release``'s. Without clipping (``release``
None, the non-private reference) Δ̄ is the plain mean of the replies (FedAvg, equal weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor

from privasr.clipping.release import Release
from privasr.federated.clip import DeltaClipper, NoClip

__all__ = ["RoundAggregate", "aggregate"]


@dataclass
class RoundAggregate:
    update: dict[str, Tensor]        # Δ̄, what the server optimizer applies
    clients: int                     # deltas summed
    clipped: int                     # of which changed by clipping
    norms: list[float] = field(default_factory=list)  # pre-clipping norms (not private)


def aggregate(deltas: Sequence[Mapping[str, Tensor]], clipper: DeltaClipper | NoClip,
              release: Release | None, shapes: Mapping[str, torch.Size]) -> RoundAggregate:
    """Clip every delta, sum, add N(0, (σ·C)²) per coordinate, divide by E[cohort]; with
    ``release`` None, the mean of the (unclipped) replies."""
    total = {n: torch.zeros(shapes[n], dtype=torch.float64) for n in clipper.names}
    clipped, norms = 0, []
    for d in deltas:
        c = clipper(d)
        clipped += int(c.clipped)
        norms.append(c.norm)
        for n in clipper.names:
            total[n] += c.delta[n].double()
    if release is None:
        denom = float(max(len(deltas), 1))
        noised = [total[n].float() for n in clipper.names]
    else:
        denom = release.denominator(len(deltas))
        noised = release.add_noise([total[n].float() for n in clipper.names],
                                   release.noise_std(clipper.bound))
    update = {n: s / denom for n, s in zip(clipper.names, noised)}
    return RoundAggregate(update, len(deltas), clipped, norms)
