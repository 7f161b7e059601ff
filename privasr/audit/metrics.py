"""Memorization metrics from per-canary scores: exposure, one-run ε lower bound, AUC, TPR@FPR.

Conventions: a *membership score* is "higher = more likely inserted" (e.g. −CTC loss); an
*exposure score* is "lower = more likely" (a perplexity-like number, e.g. the CTC loss), as in
the Secret Sharer.

- **Exposure** (Carlini et al. 2019; TF Privacy ``secret_sharer/exposures.py``): the rank of a
  canary's score among the held-out reference canaries' scores, ``log2 |R| − log2 rank`` with
  ``rank = 1 + #{references with a strictly lower score}`` (interpolation), or
  ``−log2 CDF(score)`` under a skew-normal fitted to the references (extrapolation, which can
  exceed log2 |R|).
- **One-run ε lower bound** (Steinke, Nasr & Jagielski 2023, Appendix D; docs/audit.md): guess
  "in" for the k+ highest membership scores, "out" for the k− lowest, abstain elsewhere; count the
  v correct of r guesses; the largest ε at which ``P[Binomial(r, e^ε/(1+e^ε)) ≥ v] (+ δ term)``
  stays below ``1 − confidence`` is a valid lower bound for one *pre-chosen* (k+, k−).
  **Search correction**: reporting the best of a grid of G (k+, k−) choices at level p would
  inflate the bound, so every grid point is tested at level p/G (Bonferroni union bound): the
  probability that *any* reported grid point is a false rejection is ≤ p, so the maximum over the
  grid is a valid lower bound at the stated confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import stats


# ------------------------------------------------------------------------------- exposure
def exposure_interpolation(scores: Sequence[float], references: Sequence[float]) -> np.ndarray:
    """Exposure of each score among the references (lower score = more likely)."""
    ref = np.sort(np.asarray(references, dtype=np.float64))
    if ref.size == 0:
        raise ValueError("exposure needs at least one held-out reference score")
    s = np.asarray(scores, dtype=np.float64)
    lower = np.searchsorted(ref, s, side="left")
    equal = np.searchsorted(ref, s, side="right") - lower
    rank = 1 + lower + 0.5 * equal
    return math.log2(ref.size) - np.log2(rank)


def exposure_extrapolation(scores: Sequence[float], references: Sequence[float]) -> np.ndarray:
    """−log2 CDF of each score under a skew-normal fitted to the references (TF Privacy)."""
    ref = np.asarray(references, dtype=np.float64)
    if ref.size < 3:
        raise ValueError("skew-normal extrapolation needs at least 3 reference scores")
    if np.ptp(ref) == 0:
        raise ValueError("skew-normal extrapolation: all reference scores are equal")
    a, loc, scale = stats.skewnorm.fit(ref)
    logcdf = stats.skewnorm.logcdf(np.asarray(scores, dtype=np.float64), a, loc, scale)
    return -logcdf / math.log(2)


# ------------------------------------------------------------------------------- one-run ε
def p_value_dp_audit(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of v correct out of r guesses (m canaries) under (ε, δ)-DP (SNJ23 Appendix D)."""
    if r == 0 or v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    # alpha = max_i P[v > Binomial(r, q) >= v - i] / i, i = 1..v
    cum = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(cum / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def eps_lower_bound(m: int, r: int, v: int, *, delta: float = 0.0, p: float = 0.05,
                    iters: int = 50) -> float:
    """Largest ε rejected at level ``p`` (SNJ23 ``get_eps_audit``); 0 if none is."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if p_value_dp_audit(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value_dp_audit(m, r, v, hi, delta) < p:
        lo, hi = hi, hi + 1.0
        if hi > 200:  # p-values this small cannot come from finite r; defensive stop
            return lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        if p_value_dp_audit(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


def guesses(scores: Sequence[float], k_pos: int, k_neg: int) -> np.ndarray:
    """+1 for the k_pos highest scores, −1 for the k_neg lowest, 0 elsewhere (ties by index)."""
    s = np.asarray(scores, dtype=np.float64)
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > s.size:
        raise ValueError(f"k+={k_pos}, k-={k_neg} do not fit {s.size} canaries")
    order = np.argsort(-s, kind="stable")
    t = np.zeros(s.size, dtype=np.int64)
    t[order[:k_pos]] = 1
    if k_neg:
        t[order[s.size - k_neg:]] = -1
    return t


@dataclass(frozen=True)
class OneRunAudit:
    epsilon: float  # the lower bound, valid at `confidence` after the search correction
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


def default_grid(m: int) -> list[tuple[int, int]]:
    """A small (k+, k−) grid: each of k+, k− in {0, m/20, m/10, m/5, m/4, m/2} (deduplicated)."""
    ks = sorted({0, *(max(1, round(m * f)) for f in (0.05, 0.1, 0.2, 0.25, 0.5))})
    return [(a, b) for a in ks for b in ks if a + b <= m and a + b > 0]


def grid_guesses(scores: Sequence[float], inserted: Sequence[bool],
                 grid: Iterable[tuple[int, int]] | None = None
                 ) -> tuple[int, list[tuple[int, int, int, int]]]:
    """(m, [(k+, k−, r guesses, v correct)] per grid point) for validated membership scores
    (higher = more likely inserted) of m canaries; the default grid is :func:`default_grid`."""
    s = np.asarray(scores, dtype=np.float64)
    truth = np.where(np.asarray(inserted, dtype=bool), 1, -1)
    m = s.size
    if truth.size != m:
        raise ValueError(f"{m} scores but {truth.size} membership labels")
    if m == 0:
        raise ValueError("one-run audit needs at least one canary")
    if not np.isfinite(s).all():
        raise ValueError("membership scores must be finite")
    pts = list(grid) if grid is not None else default_grid(m)
    if not pts:
        raise ValueError("empty (k+, k-) grid")
    rows = []
    for k_pos, k_neg in pts:
        t = guesses(s, k_pos, k_neg)
        rows.append((k_pos, k_neg, int((t != 0).sum()), int(((t != 0) & (t == truth)).sum())))
    return m, rows


def one_run_epsilon(scores: Sequence[float], inserted: Sequence[bool], *, delta: float = 0.0,
                    confidence: float = 0.95,
                    grid: Iterable[tuple[int, int]] | None = None) -> OneRunAudit:
    """ε lower bound from membership scores (higher = more likely inserted) of m canaries that
    were each inserted by an independent fair coin. The best grid point is reported with the
    Bonferroni correction (each point tested at (1 − confidence)/|grid|)."""
    m, rows = grid_guesses(scores, inserted, grid)
    p = (1.0 - confidence) / len(rows)
    best = None
    for k_pos, k_neg, r, v in rows:
        eps = eps_lower_bound(m, r, v, delta=delta, p=p)
        if best is None or eps > best[0]:
            best = (eps, k_pos, k_neg, r, v)
    eps, k_pos, k_neg, r, v = best
    return OneRunAudit(epsilon=eps, k_pos=k_pos, k_neg=k_neg, guesses=r, correct=v, m=m,
                       grid_size=len(rows), confidence=confidence, delta=delta,
                       correction=f"bonferroni over {len(rows)} (k+, k-) choices")


# ------------------------------------------------------------------------------- ROC
def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P[score(inserted) > score(held-out)] + ½ P[tie] (Mann–Whitney), higher = inserted."""
    a, b = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("AUC needs both inserted and held-out scores")
    gt = (a[:, None] > b[None, :]).sum()
    eq = (a[:, None] == b[None, :]).sum()
    return float((gt + 0.5 * eq) / (a.size * b.size))


def tpr_at_fpr(pos: Sequence[float], neg: Sequence[float], fpr: float = 0.01) -> float:
    """Largest TPR of a threshold rule "score > t" whose FPR on held-out is ≤ ``fpr``.

    With fewer than 1/fpr held-out canaries this means zero false positives: the fraction of
    inserted canaries scoring above every held-out one.
    """
    a, b = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("TPR@FPR needs both inserted and held-out scores")
    allowed = math.floor(fpr * b.size + 1e-12)  # false positives allowed
    t = np.sort(b)[::-1][allowed] if allowed < b.size else -np.inf
    return float((a > t).mean())
