"""Audit metrics vs independently computed values (closed forms, the paper's reference code)."""

import math

import numpy as np
import pytest
from scipy import stats

from privasr.audit.metrics import (auc, default_grid, eps_lower_bound, exposure_extrapolation,
                                   exposure_interpolation, guesses, one_run_epsilon,
                                   p_value_dp_audit, tpr_at_fpr)


def _ref_p_value(m, r, v, eps, delta):  # Steinke, Nasr & Jagielski 2023, Appendix D, verbatim
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, s = 0, 0
    for i in range(1, v + 1):
        s += stats.binom.pmf(v - i, r, q)
        if s / i > alpha:
            alpha = s / i
    return min(beta + alpha * delta * 2 * m, 1)


def _ref_get_eps(m, r, v, delta, p):
    eps_min, eps_max = 0, 1
    while _ref_p_value(m, r, v, eps_max, delta) < p:
        eps_max = eps_max + 1
    for _ in range(30):
        eps = (eps_min + eps_max) / 2
        if _ref_p_value(m, r, v, eps, delta) < p:
            eps_min = eps
        else:
            eps_max = eps
    return eps_min


def test_exposure_interpolation_by_hand():
    refs = [4.0, 1.0, 3.0, 2.0]
    got = exposure_interpolation([0.5, 2.5, 9.0, 1.0], refs)
    # ranks 1, 3, 5, 1.5 (a tie counts half); exposure = log2 4 - log2 rank
    assert got == pytest.approx([2.0, 2 - math.log2(3), 2 - math.log2(5), 2 - math.log2(1.5)])
    assert exposure_interpolation([7.0], [7.0] * 8)[0] == pytest.approx(3 - math.log2(5))
    with pytest.raises(ValueError, match="reference"):
        exposure_interpolation([1.0], [])


def test_exposure_extrapolation_matches_normal_tail():
    rng = np.random.default_rng(0)
    refs = rng.normal(10.0, 2.0, 4000)  # skew ≈ 0: the fit is ≈ N(10, 2)
    got = exposure_extrapolation([4.0, 10.0], refs)
    want = -np.log2(stats.norm.cdf([(4 - 10) / 2, 0.0]))
    assert got == pytest.approx(want, rel=0.08)
    # extrapolation goes beyond log2 |R|, unlike interpolation
    assert exposure_extrapolation([0.0], refs)[0] > math.log2(refs.size)
    with pytest.raises(ValueError, match="equal"):
        exposure_extrapolation([1.0], [2.0, 2.0, 2.0])


@pytest.mark.parametrize("m,r,v,delta", [(100, 40, 30, 0.0), (100, 40, 30, 1e-5),
                                         (1000, 200, 120, 1e-6), (50, 10, 10, 0.0),
                                         (20, 20, 11, 0.0), (30, 5, 1, 0.0)])
def test_eps_bound_matches_reference_code(m, r, v, delta):
    for eps in (0.0, 0.3, 1.7):
        assert p_value_dp_audit(m, r, v, eps, delta) == pytest.approx(
            _ref_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)
    assert eps_lower_bound(m, r, v, delta=delta, p=0.05) == pytest.approx(
        _ref_get_eps(m, r, v, delta, 0.05), abs=2e-8)


def test_eps_bound_all_correct_closed_form():
    # δ = 0, v = r: P[Bin(r, q) >= r] = q^r = p  =>  q = p^(1/r), ε = log(q / (1 - q))
    for r in (5, 10, 40):
        q = 0.05 ** (1 / r)
        assert eps_lower_bound(100, r, r, p=0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-9)


def test_eps_bound_edge_cases():
    assert eps_lower_bound(10, 0, 0) == 0.0  # no guesses
    assert eps_lower_bound(10, 10, 0) == 0.0  # no correct guesses
    assert eps_lower_bound(10, 10, 5) == 0.0  # chance level
    with pytest.raises(ValueError):
        eps_lower_bound(10, 5, 6)
    with pytest.raises(ValueError):
        eps_lower_bound(10, 5, 5, p=1.5)


def test_guesses_and_k_pos_zero():
    s = [0.1, 0.9, 0.5, 0.3]
    assert guesses(s, 1, 2).tolist() == [-1, 1, 0, -1]
    assert guesses(s, 0, 1).tolist() == [-1, 0, 0, 0]
    # k+ = 0: only "out" guesses; perfectly separated held-out -> all correct
    scores = np.r_[np.full(20, 5.0), np.zeros(20)]
    inserted = np.r_[np.ones(20, bool), np.zeros(20, bool)]
    a = one_run_epsilon(scores, inserted, grid=[(0, 20)])
    assert (a.k_pos, a.guesses, a.correct) == (0, 20, 20)
    assert a.epsilon == pytest.approx(eps_lower_bound(40, 20, 20, p=0.05))


def test_one_run_all_correct_none_correct_and_correction():
    scores = np.r_[np.full(30, 5.0), np.zeros(30)]
    inserted = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    grid = default_grid(60)
    a = one_run_epsilon(scores, inserted)
    # the best grid point guesses all 60 correctly, tested at 0.05/|grid|
    assert a.correct == a.guesses == 60 and a.grid_size == len(grid)
    assert a.epsilon == pytest.approx(eps_lower_bound(60, 60, 60, p=0.05 / len(grid)))
    assert a.epsilon < eps_lower_bound(60, 60, 60, p=0.05)  # the correction costs something
    b = one_run_epsilon(-scores, inserted)  # every guess wrong
    assert b.epsilon == 0.0


def test_analyze_fdp_bound_exceeds_steinke_on_separated_scores():
    from privasr.audit.analysis import analyze, format_tables
    from privasr.audit.scoring import CanaryScore

    rng = np.random.default_rng(0)
    ins = rng.random(200) < 0.5
    loss = np.where(ins, 0.0, 2.0) + rng.normal(size=200)
    scores = [CanaryScore(f"c{i}", "a", bool(b), 1, "a", False, 1.0, float(x))
              for i, (b, x) in enumerate(zip(ins, loss))]
    res = analyze(scores, delta=1e-5)
    assert res["one_run_fdp"]["epsilon"] > res["one_run"]["epsilon"] > 0
    assert "Gaussian-DP family" in format_tables(res)


def test_one_run_bound_on_pure_noise_is_rarely_positive():
    rng = np.random.default_rng(1)
    pos = sum(one_run_epsilon(rng.normal(size=60), rng.random(60) < 0.5).epsilon > 0
              for _ in range(60))
    assert pos <= 6  # ≤ 5 % expected; without the correction it is far more often positive


def test_auc_and_tpr_by_hand():
    assert auc([3, 4], [1, 2]) == 1.0
    assert auc([1, 2], [3, 4]) == 0.0
    assert auc([1, 3], [2, 2]) == 0.5
    assert auc([2], [2]) == 0.5
    neg = list(range(100))  # 1 % FPR allows one false positive: threshold 98
    assert tpr_at_fpr([99, 98.5, 50, 200], neg) == 0.75
    assert tpr_at_fpr([5.0, 10.0], [1.0, 7.0]) == 0.5  # < 100 negatives: none allowed
    with pytest.raises(ValueError):
        auc([], [1.0])


def test_analyze_tables_by_hand():
    from privasr.audit.analysis import analyze, format_tables
    from privasr.audit.scoring import CanaryScore

    def sc(i, ins, r, loss, em):
        return CanaryScore(f"c{i}", "a b", ins, r, "a b" if em else "x", em, 0.0 if em else 1.0,
                           loss)

    scores = [sc(0, True, 1, 0.5, False), sc(1, True, 16, 0.1, True), sc(2, True, 16, 0.2, True),
              sc(3, False, 1, 1.0, False), sc(4, False, 16, 2.0, False),
              sc(5, False, 16, 3.0, False), sc(6, False, 1, 0.4, False)]
    res = analyze(scores)
    r1, r16 = res["by_repetitions"]
    assert (r1["repetitions"], r1["inserted"], r1["heldout_matched"]) == (1, 1, 2)
    assert r16["inserted_exact_match"] == 1.0 and r1["inserted_exact_match"] == 0.0
    assert res["heldout_exact_match"] == 0.0 and res["inserted_exact_match"] == pytest.approx(2 / 3)
    # exposure vs 4 held-out losses {0.4, 1, 2, 3}: loss 0.5 has rank 2, losses 0.1/0.2 rank 1
    assert r1["exposure"] == pytest.approx(2 - 1)
    assert r16["exposure"] == pytest.approx(2.0)
    # by CER: inserted r=16 (CER 0) beat all 4 held-out (CER 1); r=1 ties all 4: rank 3
    assert r16["exposure_cer"] == pytest.approx(2.0)
    assert r1["exposure_cer"] == pytest.approx(2 - math.log2(3))
    assert res["auc"] == pytest.approx(11 / 12)  # 0.5 loses only to 0.4
    assert res["one_run"]["epsilon"] == one_run_epsilon(
        [-s.loss for s in scores], [s.inserted for s in scores]).epsilon
    assert "one-run ε lower bound" in format_tables(res)
    # the f-DP bound: same grid and Bonferroni rule; δ = 0 audits f_(ε,0) (pure DP)
    from privasr.audit.fdp import one_run_fdp_epsilon

    f = res["one_run_fdp"]
    assert f["family"] == "eps_delta" and f["grid_size"] == res["one_run"]["grid_size"]
    assert f["epsilon"] == one_run_fdp_epsilon([-s.loss for s in scores],
                                               [s.inserted for s in scores], delta=0.0,
                                               family="eps_delta").epsilon
    g = analyze(scores, delta=1e-5)["one_run_fdp"]
    assert g["family"] == "gaussian" and g["delta"] == 1e-5
    assert "f-DP one-run ε lower bound" in format_tables(analyze(scores, delta=1e-5))
    with pytest.raises(ValueError, match="held out"):
        analyze([s for s in scores if s.inserted])
