"""The f-DP one-run audit (privasr.audit.fdp) vs published reference values and properties."""

import math

import numpy as np
import pytest
from scipy import stats

from privasr.audit.fdp import (EpsDeltaTradeOff, GaussianTradeOff, audit_margin,
                               fdp_eps_lower_bound, fdp_mu_lower_bound, gaussian_delta,
                               gaussian_epsilon, gaussian_mu, one_run_fdp_epsilon, rejects)
from privasr.audit.metrics import eps_lower_bound, one_run_epsilon, p_value_dp_audit


# --------------------------------------------------------------------------- published values
def _deterministic_normal(mu, n):
    # jax_privacy tests/auditing_test.py::_deterministic_normal
    return stats.norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + mu


def _pareto(points):
    # jax_privacy jax_privacy/auditing.py::_pareto_frontier (indices of the ROC's upper hull)
    idx = np.arange(points.shape[0])
    while len(idx) > 2:
        d = np.diff(points[idx], axis=0)
        dominated = d[:-1, 1] * d[1:, 0] - d[1:, 1] * d[:-1, 0] <= 0
        if not dominated.any():
            break
        idx = idx[np.r_[True, ~dominated, True]]
    return idx


def _jax_threshold_sweep(ins, outs, significance, delta, use_fdp):
    """jax_privacy CanaryScoreAuditor.epsilon_one_run(_fdp) with the default Bonferroni
    threshold strategy: one-sided guesses "in" above each hull threshold, every threshold at
    significance / #thresholds, searched in order of decreasing precision bound."""
    th = np.concatenate((np.union1d(ins, outs), [np.inf]))
    fn = np.searchsorted(np.sort(ins), th, side="left")
    tn = np.searchsorted(np.sort(outs), th, side="left")
    keep = _pareto(np.stack([fn, tn], axis=1))
    fn, tn = fn[keep], tn[keep]
    sig = significance / len(fn)
    m = fn[-1] + tn[-1]
    tp, fp = fn[-1] - fn, tn[-1] - tn
    total = tp + fp
    with np.errstate(all="ignore"):
        prec = 1 - np.where(fp < total, stats.beta.ppf(1 - sig, fp + 1, total - fp), 1.0)
    best, best_q = 0.0, 0.5
    for i in np.argsort(-prec):
        g, c = int(total[i]), int(tp[i])
        if g == 0 or c / g <= best_q:
            continue
        if use_fdp:
            eps = fdp_eps_lower_bound(m, g, c, delta=delta, p=sig, eps_lo=best)
        elif p_value_dp_audit(m, g, c, best, 0.0) > sig:   # the reference's fail-fast
            continue
        else:
            eps = eps_lower_bound(m, g, c, delta=delta, p=sig)
        if eps > best:
            best, best_q = eps, 1 / (1 + math.exp(-eps))
    return best


# google-deepmind/jax_privacy, tests/auditing_test.py::test_epsilon_one_run_close:
# 10 000 in- and 10 000 out-canary scores N(shift, 1) vs N(0, 1) (deterministic quantiles),
# significance 0.05, δ = 1e-6, asserted there with rtol 1e-5.
JAX_FDP = [(1, 2.164749), (2, 4.7218075), (4, 9.133752)]
JAX_STEINKE = [(1, 1.13346), (2, 2.311945), (4, 4.395568)]


@pytest.mark.parametrize("shift,want", JAX_FDP)
def test_fdp_bound_reproduces_jax_privacy(shift, want):
    n = 10_000
    got = _jax_threshold_sweep(_deterministic_normal(shift, n), _deterministic_normal(0, n),
                               0.05, 1e-6, use_fdp=True)
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("shift,want", JAX_STEINKE)
def test_steinke_bound_reproduces_jax_privacy(shift, want):
    # the same sweep with metrics.eps_lower_bound: the two references agree with each other
    n = 10_000
    got = _jax_threshold_sweep(_deterministic_normal(shift, n), _deterministic_normal(0, n),
                               0.05, 1e-6, use_fdp=False)
    assert got == pytest.approx(want, rel=1e-5)


def test_zero_shift_gives_zero():
    # jax_privacy test_epsilon_one_run_close, 'zero_fdp': shift 0 -> 0
    n = 2000
    x = _deterministic_normal(0, n)
    assert _jax_threshold_sweep(x, x, 0.05, 1e-6, use_fdp=True) == 0.0


def _privacyguard_audit_passes(mu, m, c, c_cap, threshold):
    """facebookresearch/PrivacyGuard privacy_guard/analysis/mia/fdp_analysis_node.py
    ``audit_rh_with_cap`` (k = 2), verbatim logic: True = the claim is NOT rejected."""
    inv = lambda x: stats.norm.cdf(stats.norm.ppf(x) - mu)  # noqa: E731
    t = threshold * c_cap / m
    h = [0.0] * (c + 1)
    r = [0.0] * (c + 1)
    h[c], r[c] = t * (c_cap - c) / c_cap, t * c / c_cap
    for i in range(c - 1, -1, -1):
        h[i] = max(h[i + 1], inv(r[i + 1]))
        r[i] = r[i + 1] + (i / (c_cap - i)) * (h[i] - h[i + 1])
    return r[0] + h[0] <= c_cap / m


@pytest.mark.parametrize("m,r,v", [(100, 40, 35), (1000, 100, 90), (1000, 500, 300),
                                   (5000, 200, 150), (200, 200, 200), (50, 10, 3)])
def test_recursion_matches_the_authors_code(m, r, v):
    for mu in (0.1, 0.5, 1.0, 2.0, 4.0):
        for p in (0.05, 0.01):
            mine = rejects(GaussianTradeOff(mu), m, r, v, p)
            assert mine == (not _privacyguard_audit_passes(mu, m, v, r, p)), (mu, p)


# --------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("eps,delta", [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-6), (8.0, 1e-9),
                                       (0.1, 0.1)])
def test_gaussian_mu_matches_dp_accounting(eps, delta):
    dp_accounting = pytest.importorskip("dp_accounting")
    mu = gaussian_mu(eps, delta)
    assert mu == pytest.approx(1 / dp_accounting.get_sigma_gaussian(eps, delta), rel=1e-9)
    assert gaussian_delta(eps, mu) == pytest.approx(delta, rel=1e-8)
    assert gaussian_epsilon(mu, delta) == pytest.approx(eps, rel=1e-8)


def test_gaussian_delta_closed_form_and_pld():
    dp_accounting = pytest.importorskip("dp_accounting")
    mu, eps = 0.7, 1.3
    want = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    assert gaussian_delta(eps, mu) == pytest.approx(want, rel=1e-12)
    pld = dp_accounting.pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(1 / mu))
    assert gaussian_epsilon(mu, 1e-5) == pytest.approx(pld.get_epsilon(1e-5), rel=1e-3)
    assert gaussian_epsilon(1e-7, 1e-5) == 0.0


def test_trade_off_curves():
    g = GaussianTradeOff(1.0)
    # G_mu(alpha) = Phi(Phi^-1(1 - alpha) - mu); G_0 is 1 - alpha (perfect privacy)
    assert g(0.05) == pytest.approx(stats.norm.cdf(stats.norm.ppf(0.95) - 1.0))
    assert GaussianTradeOff(0.0)(0.3) == pytest.approx(0.7)
    f = EpsDeltaTradeOff(1.0, 0.01)
    assert f(0.1) == pytest.approx(max(0, 0.99 - math.e * 0.1, (0.99 - 0.1) / math.e))
    assert f(1.0) == 0.0
    # blow-up B(x) = 1 - f(x); blow_up_inverse undoes it
    for t in (g, f, GaussianTradeOff(3.0)):
        for y in (0.3, 0.6, 0.9):
            assert 1 - t(t.blow_up_inverse(y)) == pytest.approx(y, abs=1e-9)
    # G_mu(eps,delta) lies above f_(eps,delta): the GDP claim is the stronger one
    mu = gaussian_mu(1.0, 1e-5)
    a = np.linspace(0, 1, 101)
    assert all(GaussianTradeOff(mu)(x) >= EpsDeltaTradeOff(1.0, 1e-5)(x) - 1e-12 for x in a)


# --------------------------------------------------------------------------- properties
def test_edge_cases():
    assert fdp_eps_lower_bound(100, 0, 0, delta=1e-5) == 0.0
    assert fdp_eps_lower_bound(100, 20, 0, delta=1e-5) == 0.0
    assert fdp_eps_lower_bound(100, 20, 10, delta=1e-5) == 0.0      # chance level
    assert fdp_eps_lower_bound(1000, 400, 200, delta=1e-5) == 0.0
    assert fdp_eps_lower_bound(1000, 400, 205, delta=1e-5) == 0.0   # v ≈ r/2
    with pytest.raises(ValueError):
        audit_margin(GaussianTradeOff(1.0), 10, 5, 6, 0.05)
    with pytest.raises(ValueError):
        fdp_eps_lower_bound(10, 5, 5, delta=0.0)        # no finite mu is (eps, 0)-DP
    with pytest.raises(ValueError):
        fdp_eps_lower_bound(10, 5, 5, delta=1e-5, family="laplace")


def test_monotone_in_v_and_bracketing():
    m, r, delta = 1000, 200, 1e-5
    bounds = [fdp_eps_lower_bound(m, r, v, delta=delta) for v in range(100, 201, 10)]
    assert all(b <= c for b, c in zip(bounds, bounds[1:]))
    assert bounds[0] == 0.0 and bounds[-1] > 3
    mu = fdp_mu_lower_bound(m, r, 160)
    assert mu > 0
    assert rejects(GaussianTradeOff(0.99 * mu), m, r, 160)
    assert not rejects(GaussianTradeOff(1.01 * mu), m, r, 160)
    eps = fdp_eps_lower_bound(m, r, 160, delta=delta)
    assert eps == pytest.approx(gaussian_epsilon(mu, delta), rel=1e-6)
    assert rejects(GaussianTradeOff(gaussian_mu(0.99 * eps, delta)), m, r, 160)
    # the f_(eps,delta) family is a weaker claim: its rejected eps is smaller
    e2 = fdp_eps_lower_bound(m, r, 160, delta=delta, family="eps_delta")
    assert 0 < e2 < eps
    assert rejects(EpsDeltaTradeOff(0.99 * e2, delta), m, r, 160)
    assert not rejects(EpsDeltaTradeOff(1.01 * e2, delta), m, r, 160)


@pytest.mark.parametrize("m,r,v", [(1000, 200, 160), (1000, 1000, 900), (100, 100, 100)])
def test_eps_delta_family_is_close_to_steinke(m, r, v):
    # observed consistency, not a theorem: auditing f_(eps,delta) itself lands within a few
    # per cent of the Steinke bound, while the Gaussian family is far above both
    st = eps_lower_bound(m, r, v, delta=1e-5, p=0.05)
    ed = fdp_eps_lower_bound(m, r, v, delta=1e-5, family="eps_delta")
    assert ed == pytest.approx(st, rel=0.03)
    assert fdp_eps_lower_bound(m, r, v, delta=1e-5) > 1.5 * st


def test_all_correct_is_bounded_by_canary_count():
    # even all-correct guessing gives a finite bound that grows with the number of guesses
    b = [fdp_eps_lower_bound(m, m, m, delta=1e-5) for m in (10, 100, 1000)]
    assert all(math.isfinite(x) for x in b) and b[0] < b[1] < b[2]


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0])
def test_fdp_bound_beats_steinke_on_gaussian_scores(shift):
    # the paper's claim: for a Gaussian mechanism the f-DP analysis is tighter
    m = 2000
    inserted = np.r_[np.ones(m // 2, bool), np.zeros(m // 2, bool)]
    scores = np.r_[_deterministic_normal(shift, m // 2), _deterministic_normal(0, m // 2)]
    st = one_run_epsilon(scores, inserted, delta=1e-5)
    fd = one_run_fdp_epsilon(scores, inserted, delta=1e-5)
    assert fd.epsilon > st.epsilon > 0
    assert fd.grid_size == st.grid_size
    # ... and it never exceeds the truth, the eps of shift-GDP
    assert fd.epsilon < gaussian_epsilon(shift, 1e-5)
    assert fd.mu == pytest.approx(gaussian_mu(fd.epsilon, 1e-5)) and fd.mu < shift


def test_bound_is_valid_on_gaussian_mechanism():
    # scores of a true mu-GDP mechanism: the (95 %) lower bound on mu rarely exceeds mu
    mu, m = 1.0, 400
    rng = np.random.default_rng(3)
    over = 0
    for _ in range(40):
        b = rng.random(m) < 0.5
        a = one_run_fdp_epsilon(mu * b + rng.normal(size=m), b, delta=1e-5)
        over += a.mu > mu
    assert over <= 4


def test_one_run_fdp_bookkeeping():
    scores = np.r_[np.full(30, 5.0), np.zeros(30)]
    inserted = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    a = one_run_fdp_epsilon(scores, inserted, delta=1e-5)
    assert a.correct == a.guesses == 60 and a.family == "gaussian"
    assert a.epsilon == pytest.approx(
        fdp_eps_lower_bound(60, 60, 60, delta=1e-5, p=0.05 / a.grid_size), rel=1e-6)
    assert one_run_fdp_epsilon(-scores, inserted, delta=1e-5).epsilon == 0.0
    assert one_run_fdp_epsilon(scores, inserted, delta=0.0).epsilon == 0.0
    pure = one_run_fdp_epsilon(scores, inserted, delta=0.0, family="eps_delta")
    assert pure.epsilon > 0 and pure.mu is None
    with pytest.raises(ValueError):
        one_run_fdp_epsilon(scores[:-1], inserted, delta=1e-5)
