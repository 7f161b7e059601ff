"""The accountant of record (dp-accounting PLD/RDP), cross-checked against Opacus.

Tolerances of the Opacus cross-checks, and why:

* RDP vs Opacus ``RDPAccountant``: both compute the RDP of the Poisson-subsampled Gaussian with
  the Mironov-Talwar-Zhang formulas and convert with the same bound (Balle et al. 2020 /
  Canonne-Kamath-Steinke). Integer orders agree to float precision; at fractional orders the two
  implementations differ by < 0.1 % (dp-accounting is slightly higher). The default order grids
  differ: dp-accounting's is Opacus' plus order 11 and 128..1024, so ours can only be lower, and
  is noticeably lower only when Opacus' optimum sits at its largest order (it warns then).
  Tolerance: 0.2 % with the same grid, 1 % with each library's default grid when Opacus'
  optimum is interior; ours ≤ Opacus' (+0.2 %) always.
* PLD vs Opacus ``PRVAccountant``: both are numerically tight; PRV returns the upper end of its
  error band (``eps_error``), PLD is pessimistic by about its grid step (1e-4 per unit of ε
  scale). Tolerance: |ε_PLD − ε_PRV| ≤ eps_error + 0.2 % of ε.
"""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privasr.privacy import (
    PrivacyUnit,
    calibrate,
    epsilon,
    epsilon_for_segments,
    max_steps,
)

# (σ, q, steps, δ): small, typical DP-SGD settings; each PLD evaluation is well under a second.
GRID = [
    (1.1, 0.004, 1200, 1e-5),
    (1.0, 0.01, 1000, 1e-5),
    (0.8, 0.02, 500, 1e-5),
    (2.0, 0.05, 2000, 1e-6),
    (1.5, 0.1, 300, 3.2e-4),
    (0.9, 1.0, 10, 1e-5),
]


# --------------------------------------------------------------------------- basics


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate(0.0, 1e-5, 100, 0.01)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate(-1.0, 1e-5, 100, 0.01)
    for bad_delta in (0.0, 1.0, -1e-5, 2.0):
        with pytest.raises(ValueError, match="delta"):
            calibrate(1.0, bad_delta, 100, 0.01)
        with pytest.raises(ValueError, match="delta"):
            epsilon(1.0, 0.01, 100, bad_delta)
    for bad_q in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sample_rate"):
            calibrate(1.0, 1e-5, 100, bad_q)
    with pytest.raises(ValueError, match="steps"):
        calibrate(1.0, 1e-5, 0, 0.01)
    with pytest.raises(ValueError, match="steps"):
        calibrate(1.0, 1e-5, 10.5, 0.01)
    with pytest.raises(ValueError, match="noise_multiplier"):
        epsilon(-1.0, 0.01, 100, 1e-5)
    with pytest.raises(ValueError, match="method"):
        epsilon(1.0, 0.01, 100, 1e-5, method="gdp")
    with pytest.raises(ValueError, match="sensitivity_factor"):
        epsilon(1.0, 0.01, 100, 1e-5, sensitivity_factor=0)


def test_degenerate_cases():
    for method in ("pld", "rdp"):
        assert epsilon(0.0, 0.01, 10, 1e-5, method=method) == math.inf
        assert epsilon(0.0, 0.01, 0, 1e-5, method=method) == 0.0
        assert epsilon(1.0, 0.01, 0, 1e-5, method=method) == 0.0
        assert epsilon(1.0, 0.0, 100, 1e-5, method=method) == 0.0


def test_unreachable_target_raises():
    with pytest.raises(ValueError, match="reaches"):
        calibrate(1e-9, 1e-12, 10**6, 1.0, method="rdp")


def test_units_and_default_factors():
    assert {u.value for u in PrivacyUnit} == {"example", "microbatch", "core", "speaker", "client"}
    assert PrivacyUnit("client").protects == "speaker"
    assert "per speaker" in PrivacyUnit.CLIENT.description
    assert "per example" in PrivacyUnit.EXAMPLE.description
    assert "per example" in PrivacyUnit.CORE.description
    k = {u.value: u.sensitivity_factor for u in PrivacyUnit}
    assert k == {"example": 1.0, "microbatch": 2.0, "core": 2.0, "speaker": 1.0, "client": 1.0}
    assert PrivacyUnit.SPEAKER.protects == "speaker" and PrivacyUnit.CORE.count_sensitivity == 1
    assert PrivacyUnit.EXAMPLE.count_sensitivity == PrivacyUnit.SPEAKER.count_sensitivity == 0.5


def test_pld_matches_dp_accounting_pld_accountant():
    """Our cached construction is dp-accounting's PLDAccountant, step for step."""
    import dp_accounting

    for sigma, q, steps, delta in GRID[1:2]:
        acc = dp_accounting.pld.PLDAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                    steps)
        assert epsilon(sigma, q, steps, delta) == pytest.approx(acc.get_epsilon(delta),
                                                                rel=1e-6)
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                    steps)
        assert epsilon(sigma, q, steps, delta, method="rdp") == pytest.approx(
            acc.get_epsilon(delta), rel=1e-12)


def test_segments_compose():
    sigma, q, delta = 1.0, 0.01, 1e-5
    one = epsilon(sigma, q, 600, delta)
    two = epsilon_for_segments([(200, sigma, q), (400, sigma, q)], delta)
    assert two == pytest.approx(one, rel=2e-3)
    assert epsilon_for_segments([(200, sigma, q), (400, sigma, q)], delta, method="rdp") == \
        pytest.approx(epsilon(sigma, q, 600, delta, method="rdp"), rel=1e-9)
    # more noise in the second segment spends less than keeping σ
    assert epsilon_for_segments([(200, sigma, q), (400, 2 * sigma, q)], delta) < one
    # a σ = 0 segment anywhere is non-private
    assert epsilon_for_segments([(200, sigma, q), (1, 0.0, q)], delta) == math.inf


def test_max_steps_is_the_last_step_within_budget():
    sigma, q, delta = 1.5, 0.01, 1e-5
    n = max_steps(sigma, q, delta, 1.0)
    assert n > 0
    assert epsilon(sigma, q, n, delta) <= 1.0 < epsilon(sigma, q, n + 1, delta)
    assert max_steps(0.0, q, delta, 1.5) == 0


# --------------------------------------------------------------------------- PLD vs RDP


@pytest.mark.parametrize("sigma,q,steps,delta", GRID)
def test_pld_is_tighter_than_rdp_within_a_sensible_factor(sigma, q, steps, delta):
    pld = epsilon(sigma, q, steps, delta, method="pld")
    rdp = epsilon(sigma, q, steps, delta, method="rdp")
    assert 0 < pld <= rdp
    assert rdp / pld < 2.0  # observed 1.06-1.65 on this grid


# --------------------------------------------------------------------------- Opacus


def _opacus_rdp(sigma, q, steps, delta, alphas=None):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eps = acc.get_epsilon(delta=delta, alphas=alphas)
    edge = any("Optimal order" in str(w.message) for w in caught)
    return eps, edge


@pytest.mark.parametrize("sigma,q,steps,delta", GRID + [(5.0, 0.01, 100, 1e-5)])
def test_rdp_matches_opacus_rdp(sigma, q, steps, delta):
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    ours = epsilon(sigma, q, steps, delta, method="rdp")
    same_grid, _ = _opacus_rdp(sigma, q, steps, delta, alphas=list(DEFAULT_RDP_ORDERS))
    assert ours == pytest.approx(same_grid, rel=2e-3)
    theirs, at_edge = _opacus_rdp(sigma, q, steps, delta)
    assert ours <= theirs * (1 + 2e-3)  # our order grid is a superset of Opacus'
    if not at_edge:
        assert ours == pytest.approx(theirs, rel=1e-2)


@pytest.mark.parametrize("sigma,q,steps,delta", GRID)
def test_pld_matches_opacus_prv(sigma, q, steps, delta):
    from opacus.accountants import PRVAccountant

    eps_error = 0.01
    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' PRV warns on log(0) inside its domain grid
        theirs = acc.get_epsilon(delta=delta, eps_error=eps_error)
    ours = epsilon(sigma, q, steps, delta, method="pld")
    assert abs(ours - theirs) <= eps_error + 2e-3 * ours


def test_rdp_calibration_agrees_with_opacus_get_noise_multiplier():
    from opacus.accountants.utils import get_noise_multiplier

    eps_t, delta, steps, q = 3.0, 1e-5, 1000, 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its search visits σ whose optimal order is the largest
        theirs = get_noise_multiplier(target_epsilon=eps_t, target_delta=delta, sample_rate=q,
                                      steps=steps, accountant="rdp", epsilon_tolerance=0.01)
    ours = calibrate(eps_t, delta, steps, q, method="rdp")
    # Opacus stops within 0.01 of the target in ε, so its σ may be slightly larger.
    assert ours <= theirs * (1 + 2e-3)
    assert ours == pytest.approx(theirs, rel=2e-2)


# --------------------------------------------------------------------------- calibrate


@pytest.mark.parametrize("method", ["pld", "rdp"])
@pytest.mark.parametrize("target,delta,steps,q", [
    (3.0, 1e-5, 1000, 0.01),
    (1.0, 1e-6, 2000, 0.004),
    # PLD gets slow at σ < 0.7 (≈ 10 s for this calibration on a busy CPU)
    pytest.param(8.0, 1e-5, 500, 0.01, marks=pytest.mark.slow),
])
def test_calibrate_round_trip(method, target, delta, steps, q):
    tol = 1e-3
    sigma = calibrate(target, delta, steps, q, method=method, tol=tol)
    eps = epsilon(sigma, q, steps, delta, method=method)
    assert eps <= target
    assert eps >= 0.98 * target  # the smallest σ: ε sits right at the target
    # minimal: a σ smaller by more than the tolerance overspends
    assert epsilon(sigma * (1 - 2 * tol), q, steps, delta, method=method) > target


def test_calibrate_is_monotone_in_target_and_exact_in_sensitivity():
    delta, steps, q = 1e-5, 1000, 0.01
    for method in ("pld", "rdp"):
        targets = (2.0, 3.0) if method == "pld" else (1.0, 3.0, 8.0)  # PLD is slow at small σ
        sigmas = [calibrate(t, delta, steps, q, method=method) for t in targets]
        assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    s1 = calibrate(3.0, delta, steps, q, sensitivity_factor=1.0)
    s2 = calibrate(3.0, delta, steps, q, sensitivity_factor=2.0)
    assert s2 == pytest.approx(2 * s1, rel=1e-12)
    # epsilon depends on σ/k only
    assert epsilon(s2, q, steps, delta, sensitivity_factor=2.0) == epsilon(s1, q, steps, delta)
    assert epsilon(s1, q, steps, delta, sensitivity_factor=2.0) > 3.0


# --------------------------------------------------------------------------- properties

_cfg = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


# The DP-SGD regime (q ≤ 0.25, σ ≥ 0.6). Outside it dp-accounting's RDP is not exactly monotone:
# at q = 0.875, σ = 0.5 its fractional-order series does not converge, those orders are dropped,
# and ε(q=0.875) = 359.67 > ε(q=1) = 359.66 (127 steps, δ = 1e-5) - found by this test.
@settings(_cfg, max_examples=20)
@given(sigma=st.floats(0.6, 8.0), q=st.floats(1e-3, 0.25), steps=st.integers(1, 5000),
       delta=st.sampled_from([1e-5, 1e-6, 3.2e-4]), r=st.floats(0.001, 1.0),
       extra=st.integers(1, 1000))
def test_rdp_epsilon_is_monotone(sigma, q, steps, delta, r, extra):
    e = epsilon(sigma, q, steps, delta, method="rdp")
    assert epsilon(sigma * (1 + r), q, steps, delta, method="rdp") <= e
    assert epsilon(sigma, q, steps + extra, delta, method="rdp") >= e
    assert epsilon(sigma, min(1.0, q * (1 + r)), steps, delta, method="rdp") >= e


@settings(_cfg, max_examples=6)
@given(sigma=st.floats(1.0, 5.0), q=st.floats(1e-3, 0.05), steps=st.integers(1, 500),
       r=st.floats(0.001, 0.5), extra=st.integers(1, 200))
def test_pld_epsilon_is_monotone(sigma, q, steps, r, extra):
    delta = 1e-5
    e = epsilon(sigma, q, steps, delta)
    assert epsilon(sigma * (1 + r), q, steps, delta) <= e
    assert epsilon(sigma, q, steps + extra, delta) >= e
    assert epsilon(sigma, q * (1 + r), steps, delta) >= e
