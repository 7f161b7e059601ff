"""User-level accounting of federated DP: one round = one Poisson-subsampled Gaussian step.

Unit ``client`` of :mod:`privasr.privacy.accountant`: a client is one speaker holding all of that
speaker's data, so adding or removing a speaker moves the clipped sum by at most C (k = 1), and
the sampling rate is q = E[cohort] / N. The ε printed each round is per speaker.

Extrapolation (docs/federated.md): real populations are millions of users, and what fixes the model
quality is the noise on the *average* update, σ·C / E[cohort]. Keeping that fixed while the
cohort grows from K to K' means σ' = σ·K'/K; with population P the rate is q' = K'/P. The table
gives ε(σ', q', rounds, δ) for each (P, K'), the ε "the same noise on the average would give".

Extrapolated runs (the recipe's ``extrapolate``, the paper's methodology) go the other way: the
recipe names the population P and cohort K it stands for and a target ε at δ; σ_big is
calibrated so that q = K/P over the run's rounds spends that ε, and the simulation runs at
σ_sim = σ_big·K_sim/K, so its noise std on the average, σ_sim·C/K_sim, is σ_big·C/K. Two ε
result: the *extrapolated* one (holds for P users sampled at K, not for the simulation) and the
*simulated* one (the true guarantee of the run's own speakers at σ_sim; usually enormous).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from privasr.privacy.accountant import calibrate, epsilon, epsilon_for_segments
from privasr.privacy.ledger import NO_GUARANTEE, PrivacyLedger

__all__ = ["build_ledger", "extrapolation_table", "DEFAULT_EXTRAPOLATION_COHORTS",
           "Extrapolation", "extrapolated_noise", "simulated_accountant",
           "simulated_epsilon_report", "PLD_MIN_NOISE_MULTIPLIER"]

# below this σ a PLD evaluation takes minutes (σ = 0.05, 100 rounds: ~80 s) and more: the
# simulated population of an extrapolated run is then accounted with RDP (a valid upper bound)
PLD_MIN_NOISE_MULTIPLIER = 0.3

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
            how = simulated_accountant(sigma, method)   # K' < K: σ' may be tiny (PLD: slow)
            rows.append({"population": int(pop), "cohort": int(k), "sample_rate": q,
                         "noise_multiplier": sigma, "rounds": int(rounds), "delta": delta,
                         "noise_std_on_average_over_C": noise_multiplier / cohort,
                         "epsilon": epsilon(sigma, q, rounds, delta, method=how),
                         "accountant": how})
    return rows


def _merge(segments: Sequence[Sequence[float]]) -> list[list]:
    out: list[list] = []
    for n, sigma, q in segments:
        if out and out[-1][1:] == [sigma, q]:
            out[-1][0] += int(n)
        elif n:
            out.append([int(n), float(sigma), float(q)])
    return out


@dataclass(frozen=True)
class Extrapolation:
    """The population P and cohort K a simulated run stands for, and σ_big calibrated to them.

    ``noise_multiplier`` is σ_big: ``rounds`` rounds at q = K/P spend ``target_epsilon`` at
    ``delta`` (per user, add/remove). The simulation applies :meth:`simulated_noise_multiplier`.
    """

    population: float
    cohort: float
    target_epsilon: float
    delta: float
    rounds: int
    method: str
    noise_multiplier: float

    @property
    def sample_rate(self) -> float:
        return self.cohort / self.population

    @property
    def label(self) -> str:
        return (f"extrapolated: holds for a population of {self.population:g} users sampled "
                f"at E[cohort] = {self.cohort:g} per round (same noise on the average update) "
                "— not for this simulation")

    def simulated_noise_multiplier(self, simulated_cohort: float) -> float:
        """σ_sim = σ_big·K_sim/K: the same noise std on the average, σ_big·C/K."""
        return self.noise_multiplier * float(simulated_cohort) / self.cohort

    def segments(self, simulated: Sequence[Sequence[float]], simulated_cohort: float
                 ) -> list[list]:
        """The simulation's ledger segments (steps, σ_sim, q_sim) at the extrapolated scale:
        (steps, σ_sim·K/K_sim, K/P)."""
        scale = self.cohort / float(simulated_cohort)
        return _merge([(n, s * scale, self.sample_rate) for n, s, _ in simulated])

    def epsilon(self, simulated: Sequence[Sequence[float]], simulated_cohort: float,
                more_rounds: int = 0) -> float:
        """Extrapolated ε of the rounds in ``simulated`` (plus ``more_rounds`` at σ_big)."""
        segs = self.segments(simulated, simulated_cohort)
        segs = _merge(segs + [[more_rounds, self.noise_multiplier, self.sample_rate]])
        return epsilon_for_segments(segs, self.delta, method=self.method)

    def report(self, simulated: Sequence[Sequence[float]], simulated_cohort: float) -> dict:
        """The results' ``epsilon_extrapolated``."""
        return {"label": self.label, "epsilon": self.epsilon(simulated, simulated_cohort),
                "delta": self.delta, "population": self.population, "cohort": self.cohort,
                "sample_rate": self.sample_rate,
                "rounds": sum(int(s[0]) for s in simulated),
                "calibrated_for_rounds": self.rounds, "target_epsilon": self.target_epsilon,
                "sigma_big": self.noise_multiplier,
                "noise_std_on_average_over_C": self.noise_multiplier / self.cohort,
                "accountant": f"dp-accounting {self.method.upper()}, add/remove, per user"}


def extrapolated_noise(*, population: float, cohort: float, target_epsilon: float,
                       delta: float, rounds: int, method: str = "pld",
                       tol: float = 1e-4) -> Extrapolation:
    """σ_big with ε(σ_big, q = cohort/population, rounds, δ) ≤ ``target_epsilon`` (the
    accountant's :func:`~privasr.privacy.accountant.calibrate`, to ``tol`` relative in σ: at
    small σ, ε moves ~20× faster than σ, so 1e-4 keeps ε within ~2e-3 of the target)."""
    if not (1 <= cohort <= population) or not math.isfinite(population):
        raise ValueError(f"extrapolation needs 1 <= cohort ({cohort:g}) <= population "
                         f"({population:g}), both finite")
    sigma = calibrate(target_epsilon, delta, rounds, cohort / population, method=method,
                      tol=tol)
    return Extrapolation(float(population), float(cohort), float(target_epsilon), float(delta),
                         int(rounds), method, sigma)


def simulated_accountant(noise_multiplier: float, method: str) -> str:
    """The accountant of an extrapolated run's own population: ``method``, except RDP where
    PLD is impractically slow (σ < ``PLD_MIN_NOISE_MULTIPLIER``)."""
    return "rdp" if method == "pld" and noise_multiplier < PLD_MIN_NOISE_MULTIPLIER else method


def simulated_epsilon_report(ledger: PrivacyLedger, *, expected_cohort: float) -> dict:
    """The results' ``epsilon_simulated``: the true user-level ε of the run's own speakers.
    ``epsilon`` is None, with a ``reason``, when it is infinite or there is no guarantee."""
    eps = ledger.claimed_epsilon()
    reason = None
    if eps is None:
        reason = NO_GUARANTEE
    elif not math.isfinite(eps):
        reason = "infinite: the accountant finds no finite ε at this δ for σ_sim and q_sim"
        eps = None
    return {"label": (f"simulated: the true user-level guarantee of this run, for its "
                      f"{ledger.population} speakers at E[cohort] = {expected_cohort:g}"),
            "epsilon": eps, "reason": reason, "delta": ledger.delta,
            "population": ledger.population, "cohort": expected_cohort,
            "sample_rate": ledger.sample_rate, "rounds": ledger.steps,
            "sigma_sim": ledger.noise_multiplier,
            "accountant": f"dp-accounting {ledger.method.upper()}, add/remove, per speaker"}
