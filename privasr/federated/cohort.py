"""Which speakers take part in a round: secret for DP runs, else a pure function of (seed, round).

``poisson``  each of the N speakers joins independently with q = cohort_size / N: the sampling
             the user-level accountant assumes (E[cohort] = cohort_size).
``fixed``    exactly cohort_size speakers uniformly without replacement (σ = 0 only).
"""

from __future__ import annotations

import numpy as np

from privasr.privacy.randomness import RandomSource

__all__ = ["sample_cohort", "sample_rate"]


def sample_rate(cohort_size: float, population: int) -> float:
    if population < 1:
        raise ValueError("no client speakers: the training manifest has no speakers")
    if not 0 < cohort_size <= population:
        raise ValueError(f"server.cohort_size={cohort_size} must be in (0, N={population}] "
                         "(N = speakers in the training manifest)")
    return cohort_size / population


def sample_cohort(round_: int, population: int, cohort_size: float, *, sampling: str,
                  seed: int, source: RandomSource | None = None) -> list[int]:
    """Indices (sorted) of the speakers sampled for round ``round_``; Poisson draws come from
    ``source`` (secret for DP runs), else from the public seed."""
    rng = np.random.default_rng([seed, 7919, round_])
    if sampling == "poisson":
        q = sample_rate(cohort_size, population)
        u = source.uniforms("cohort", round_, population) if source is not None \
            else rng.random(population)
        return [int(i) for i in np.flatnonzero(u < q)]
    if sampling == "fixed":
        k = int(round(cohort_size))
        sample_rate(k, population)
        return sorted(int(i) for i in rng.choice(population, size=k, replace=False))
    raise ValueError(f"sampling={sampling!r}; valid: poisson, fixed")
