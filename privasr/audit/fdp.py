"""f-DP one-run audit (Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential Privacy in One
Run", arXiv 2410.22235, ICLR 2025), beside the Steinke-Nasr-Jagielski bound of ``metrics``.

Game: m canaries, each inserted by an independent fair coin; the auditor guesses in/out for r
of them (abstaining on the rest) and v guesses are right. A mechanism is f-DP for a symmetric
trade-off function f when no test tells D from D' with type-I error α and type-II error below
f(α). Its *blow-up* B(x) = 1 − f(x) bounds P_{D'}[E] by B(P_D[E]) for every event E; for a
symmetric f the inverse is B⁻¹(y) = f(1 − y).

Rejection (the paper's recursion ``audit_rh_with_cap``, k = 2 classes): at level τ start from

    r_v = τ·v/m,    h_v = τ·(r − v)/m,
    h_i = max(h_{i+1}, B⁻¹(r_{i+1})),  r_i = min(r_{i+1} + i/(r − i)·(h_i − h_{i+1}), 1),
    i = v−1, …, 0.

If r_0 + h_0 > r/m, then P[≥ v of r guesses correct] < τ under every f-DP mechanism: the
observation rejects f at confidence 1 − τ (``audit_margin`` returns r_0 + h_0 − r/m).

Families (a larger parameter is a weaker claim, so the rejected set is an interval):
- Gaussian DP, f = G_μ:  G_μ(α) = Φ(Φ⁻¹(1−α) − μ),  B⁻¹(y) = Φ(Φ⁻¹(y) − μ).
  The ε lower bound is the ε at δ of the largest rejected μ, by the analytic Gaussian formula
  δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Dong, Roth & Su 2019, Cor. 2.13; Balle & Wang 2018).
  This is what the reference does: it searches ε and tests μ(ε, δ) (identical, since
  ε ↦ μ(ε, δ) is increasing).
- (ε, δ)-DP itself, f = f_{ε,δ}(α) = max(0, 1 − δ − e^ε α, e^{−ε}(1 − δ − α)).
  A weaker conclusion than the Gaussian family (every (ε,δ)-DP mechanism is f_{ε,δ}-DP, while
  μ(ε,δ)-GDP is an assumption on the mechanism's shape, right for Gaussian noise).

Follows the reference implementation google-deepmind/jax_privacy, ``jax_privacy/auditing.py``
(``_epsilon_one_run_fdp``, ``_gaussian_dp_blow_up_inverse``) and the authors'
facebookresearch/PrivacyGuard, ``privacy_guard/analysis/mia/fdp_analysis_node.py``
(``audit_rh_with_cap``). Unlike the reference's one-sided thresholds (k− = 0), guesses here may
be "in" or "out" (the paper's theorem counts correct guesses of any kind); ``one_run_fdp_epsilon``
searches the same (k+, k−) grid as ``metrics.one_run_epsilon`` with the same Bonferroni rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import numpy as np
from scipy import optimize, special

from privasr.audit.metrics import grid_guesses

__all__ = ["TradeOff", "GaussianTradeOff", "EpsDeltaTradeOff", "gaussian_delta", "gaussian_mu",
           "gaussian_epsilon", "audit_margin", "rejects", "fdp_mu_lower_bound",
           "fdp_eps_lower_bound", "FdpAudit", "one_run_fdp_epsilon"]

_ndtr, _ndtri = special.ndtr, special.ndtri


class TradeOff(Protocol):
    def blow_up_inverse(self, y: float) -> float: ...


@dataclass(frozen=True)
class GaussianTradeOff:
    """G_μ, the trade-off curve of μ-Gaussian DP (μ = sensitivity / noise std)."""

    mu: float

    def __call__(self, alpha: float) -> float:
        return float(_ndtr(_ndtri(1.0 - alpha) - self.mu))

    def blow_up_inverse(self, y: float) -> float:
        if math.isinf(self.mu):
            return float(y >= 1.0)
        return float(_ndtr(_ndtri(y) - self.mu))


@dataclass(frozen=True)
class EpsDeltaTradeOff:
    """f_{ε,δ}, the trade-off curve every (ε, δ)-DP mechanism satisfies."""

    eps: float
    delta: float

    def __call__(self, alpha: float) -> float:
        e = math.exp(min(self.eps, 700.0))
        return max(0.0, 1.0 - self.delta - e * alpha, (1.0 - self.delta - alpha) / e)

    def blow_up_inverse(self, y: float) -> float:
        return self(1.0 - y)


# ------------------------------------------------------------------------- Gaussian conversions
def _log_delta(eps: float, mu: float) -> float:
    """log δ(ε) of μ-GDP, in the log domain (δ underflows for small μ / large ε)."""
    a = special.log_ndtr(-eps / mu + mu / 2)
    b = eps + special.log_ndtr(-eps / mu - mu / 2)
    return float(a + np.log1p(-np.exp(min(b - a, 0.0)))) if b < a else -math.inf


def gaussian_delta(eps: float, mu: float) -> float:
    """δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) of μ-GDP."""
    if mu <= 0:
        return 0.0
    return math.exp(_log_delta(eps, mu))


def gaussian_mu(eps: float, delta: float) -> float:
    """The μ whose GDP curve has δ(ε) = δ: μ-GDP is (ε, δ)-DP exactly (inf if δ ≥ 1)."""
    if not 0 < delta <= 1 or eps < 0:
        raise ValueError(f"need eps >= 0 and delta in (0, 1], got {eps}, {delta}")
    if delta == 1 or math.isinf(eps):
        return math.inf
    target = math.log(delta)
    lo, hi = 1e-3, 1.0
    while _log_delta(eps, lo) > target:
        lo /= 10
    while _log_delta(eps, hi) < target:
        lo, hi = hi, hi * 2
    return optimize.brentq(lambda m: _log_delta(eps, m) - target, lo, hi, xtol=1e-14,
                           rtol=1e-14)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest ε ≥ 0 with δ_μ(ε) ≤ δ (ε of μ-GDP at δ)."""
    if mu <= 0 or _log_delta(0.0, mu) <= math.log(delta):
        return 0.0
    if math.isinf(mu):
        return math.inf
    target = math.log(delta)
    hi = 1.0
    while _log_delta(hi, mu) > target:
        hi *= 2
    return optimize.brentq(lambda e: _log_delta(e, mu) - target, 0.0, hi, xtol=1e-12)


# ------------------------------------------------------------------------- the test
def audit_margin(f: TradeOff, m: int, r: int, v: int, p: float) -> float:
    """r_0 + h_0 − r/m of the recursion at level p; > 0 ⇔ (m, r, v) rejects f at 1 − p."""
    if not 0 <= v <= r <= m or m <= 0:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    rr, h = p * v / m, p * (r - v) / m
    for i in range(v - 1, -1, -1):
        h_new = max(h, f.blow_up_inverse(rr))
        if h_new == h:          # h (and so r) can never move again
            break
        rr = min(rr + i / (r - i) * (h_new - h), 1.0)
        h = h_new
    return rr + h - r / m


def rejects(f: TradeOff, m: int, r: int, v: int, p: float = 0.05) -> bool:
    """Does "v of r guesses correct, m canaries" reject the f-DP claim at confidence 1 − p?"""
    return audit_margin(f, m, r, v, p) > 0


def fdp_mu_lower_bound(m: int, r: int, v: int, *, p: float = 0.05, mu_lo: float = 0.0) -> float:
    """The largest μ whose μ-GDP claim (m, r, v) rejects at level p (``mu_lo`` if none above
    it is): with confidence 1 − p the mechanism is not μ-GDP for any μ below it."""
    margin = lambda mu: audit_margin(GaussianTradeOff(mu), m, r, v, p)  # noqa: E731
    start = max(mu_lo, 1e-9)
    if margin(start) <= 0:
        return mu_lo
    lo, hi = start, max(2 * start, 0.5)
    while margin(hi) > 0:
        lo, hi = hi, 2 * hi
    return optimize.brentq(margin, lo, hi, xtol=1e-9, rtol=1e-9)


def fdp_eps_lower_bound(m: int, r: int, v: int, *, delta: float, p: float = 0.05,
                        family: str = "gaussian", eps_lo: float = 0.0) -> float:
    """Largest ε whose claim is rejected at level p: of μ(ε, δ)-GDP (``family="gaussian"``) or
    of f_{ε,δ} (``family="eps_delta"``); ``eps_lo`` (default 0) if none above it is."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if family == "gaussian":
        if not 0 < delta < 1:
            raise ValueError(f"the Gaussian family needs delta in (0, 1), got {delta}")
        mu_lo = gaussian_mu(eps_lo, delta) if eps_lo > 0 else 0.0
        mu = fdp_mu_lower_bound(m, r, v, p=p, mu_lo=mu_lo)
        return eps_lo if mu <= mu_lo else max(eps_lo, gaussian_epsilon(mu, delta))
    if family != "eps_delta":
        raise ValueError(f"family must be 'gaussian' or 'eps_delta', got {family!r}")
    margin = lambda e: audit_margin(EpsDeltaTradeOff(e, delta), m, r, v, p)  # noqa: E731
    if margin(eps_lo) <= 0:
        return eps_lo
    lo, hi = eps_lo, max(1.0, 2 * eps_lo)
    while margin(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > 400:
            return lo
    return optimize.brentq(margin, lo, hi, xtol=1e-9)


# ------------------------------------------------------------------------- from scores
@dataclass(frozen=True)
class FdpAudit:
    epsilon: float  # the ε lower bound at `delta`, valid at `confidence` after the correction
    mu: float | None  # the largest rejected GDP μ (family "gaussian"), else None
    family: str
    k_pos: int
    k_neg: int
    guesses: int  # r
    correct: int  # v
    m: int
    grid_size: int
    confidence: float
    delta: float
    correction: str

    def to_dict(self) -> dict:
        return dict(vars(self))


def one_run_fdp_epsilon(scores: Sequence[float], inserted: Sequence[bool], *, delta: float,
                        confidence: float = 0.95, family: str = "gaussian",
                        grid: Iterable[tuple[int, int]] | None = None) -> FdpAudit:
    """f-DP ε lower bound from membership scores (higher = more likely inserted), with the
    (k+, k−) grid and Bonferroni rule of ``metrics.one_run_epsilon`` (each of the G grid
    points tested at (1 − confidence)/G). δ = 0 gives 0 for the Gaussian family (no finite μ
    is (ε, 0)-DP, so no ε claim can be tested through it)."""
    if family not in ("gaussian", "eps_delta"):
        raise ValueError(f"family must be 'gaussian' or 'eps_delta', got {family!r}")
    m, rows = grid_guesses(scores, inserted, grid)
    p = (1.0 - confidence) / len(rows)
    best = (0.0, *rows[0])
    if family == "gaussian" and delta <= 0:
        rows = []
    # most accurate first, each search starting at the best bound so far (as the reference)
    for k_pos, k_neg, r, v in sorted(rows, key=lambda x: -x[3] / max(x[2], 1)):
        if r == 0:
            continue
        eps = fdp_eps_lower_bound(m, r, v, delta=delta, p=p, family=family, eps_lo=best[0])
        if eps > best[0]:
            best = (eps, k_pos, k_neg, r, v)
    eps, k_pos, k_neg, r, v = best
    mu = (gaussian_mu(eps, delta) if eps > 0 else 0.0) if family == "gaussian" else None
    return FdpAudit(epsilon=eps, mu=mu, family=family, k_pos=k_pos, k_neg=k_neg, guesses=r,
                    correct=v, m=m, grid_size=len(rows), confidence=confidence, delta=delta,
                    correction=f"bonferroni over {len(rows)} (k+, k-) choices")
