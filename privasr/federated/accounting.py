"""User-level accounting of federated DP: one round = one Poisson-subsampled Gaussian step.

Unit ``client`` of :mod:`privasr.privacy.accountant`: a client is one speaker holding all of that
speaker's data, so adding or removing a speaker moves the clipped sum by at most C (k = 1), and
the sampling rate is q = E[cohort] / N. The ε printed each round is per speaker.

Extrapolation (docs/federated.md): real populations are millions of users, and what fixes the model
quality is the noise on the *average* update, σ·C / E[cohort]. Keeping that fixed while the
cohort grows from K to K' means σ' = σ·K'/K; with population P the rate is q' = K'/P. The table
gives ε(σ', q', rounds, δ) for each (P, K'), the ε "the same noise on the average would give".
"""

from __future__ import annotations

from typing import Sequence

from privasr.privacy.accountant import calibrate, epsilon
from privasr.privacy.ledger import PrivacyLedger

__all__ = ["build_ledger", "extrapolation_table", "DEFAULT_EXTRAPOLATION_COHORTS"]

DEFAULT_EXTRAPOLATION_COHORTS = (1_000, 10_000, 100_000)


def build_ledger(*, noise_multiplier: float | None, target_epsilon: float | None,
                 delta: float, rounds: int, sample_rate: float, method: str
                 ) -> PrivacyLedger | None:
    """The run's ledger (None when σ = 0: clipping only, no DP claim).

    With ``target_epsilon`` and no σ, σ is calibrated so that ``rounds`` rounds spend it; the
    budget then refuses any further round.
    """
    if noise_multiplier is None and target_epsilon is None:
        return None
    if noise_multiplier is None:
        noise_multiplier = calibrate(target_epsilon, delta, rounds, sample_rate, method=method)
    if noise_multiplier == 0:
        return None
    return PrivacyLedger(noise_multiplier=noise_multiplier, sample_rate=sample_rate, delta=delta,
                         unit="client", target_epsilon=target_epsilon, method=method)


def extrapolation_table(*, noise_multiplier: float, cohort: float, rounds: int,
                        populations: Sequence[float], delta: float,
                        cohorts: Sequence[float] = DEFAULT_EXTRAPOLATION_COHORTS,
                        method: str = "pld") -> list[dict]:
    """Rows {population, cohort, sample_rate, noise_multiplier, epsilon, delta} (K' < P)."""
    if noise_multiplier <= 0:
        raise ValueError("extrapolation needs σ > 0: with σ = 0 there is no DP guarantee to scale")
    rows = []
    for pop in populations:
        for k in cohorts:
            if k >= pop:
                continue
            sigma = noise_multiplier * k / cohort
            q = k / pop
            rows.append({"population": int(pop), "cohort": int(k), "sample_rate": q,
                         "noise_multiplier": sigma, "rounds": int(rounds), "delta": delta,
                         "noise_std_on_average_over_C": noise_multiplier / cohort,
                         "epsilon": epsilon(sigma, q, rounds, delta, method=method)})
    return rows
