"""White-box one-run self-audit of the real DP-SGD step (privasr.audit.whitebox): a correct run
passes its claim, noise at half the claim (a partial noise bug) and noise off are caught.

Settings (power analysis in the module docstring): m = 20 000 Dirac canaries, q = 1, T = 4
steps, claim ε = 1 at δ = 1e-5, 95 % confidence; about 3-4 s per audit on one CPU core."""

import numpy as np
import pytest

from privasr.audit.whitebox import (format_power_table, simulated_audit, whitebox_grid,
                                    whitebox_power_table, whitebox_self_audit)

CLAIM, DELTA = 1.0, 1e-5


def _check(res: dict, noise_scale: float) -> None:
    assert res["claimed_epsilon"] == pytest.approx(CLAIM, rel=1e-3)
    assert res["claimed_epsilon"] <= CLAIM
    if noise_scale == 1.0:
        assert res["eps_lb_fdp"] <= res["claimed_epsilon"]
        assert res["eps_lb_steinke"] <= res["claimed_epsilon"]
    elif noise_scale == 0.0:
        assert res["eps_lb_fdp"] > 5 * CLAIM and res["eps_lb_steinke"] > 3 * CLAIM


@pytest.mark.parametrize("engine", ["reference", "vectorized", "bookkeeping"])
def test_noise_off_scores_are_exactly_the_clipped_canaries(engine, one_thread):
    # canary gradients have norm 2C, clipped to exactly C; ordinary examples live elsewhere:
    # without noise canary i's score (units of C) is T·[inserted]
    res = whitebox_self_audit(noise_scale=0.0, canaries=150, steps=2, ordinary=8, seed=1,
                              engine=engine)
    want = 2.0 * res["inserted_mask"]
    np.testing.assert_allclose(res["scores"], want, atol=1e-5)
    assert res["engine"] == engine and res["true_epsilon"] == float("inf")
    assert res["fdp"]["correct"] == res["fdp"]["guesses"]


def test_whitebox_grid():
    g = whitebox_grid(20000)
    assert g == [(100, 100), (200, 200), (400, 400), (1000, 1000), (2000, 2000),
                 (4000, 4000), (6000, 6000), (10000, 10000)]
    assert all(2 * k <= 7 for k, _ in whitebox_grid(7))


def test_power_model_catches_half_noise():
    # the numpy model of the same scores (the power analysis), 5 seeds
    t = whitebox_power_table(range(5), (1.0, 0.5), simulate=True)
    assert t["caught"][1.0]["fdp"] == 0 and t["caught"][1.0]["steinke"] == 0
    assert t["caught"][0.5]["fdp"] == 5
    assert "caught by f-DP in 5/5" in format_power_table(t)
    r = simulated_audit(noise_scale=0.5, seed=0)
    assert r["true_epsilon"] == pytest.approx(2.15, abs=0.01)


def test_whitebox_self_audit_one_seed(one_thread):
    rows = {s: whitebox_self_audit(noise_scale=s, seed=0) for s in (1.0, 0.5, 0.0)}
    for s, r in rows.items():
        _check(r, s)
        print(f"noise x{s}: steinke {r['eps_lb_steinke']:.3f} f-DP {r['eps_lb_fdp']:.3f} "
              f"({r['seconds']:.1f} s)")
    assert rows[0.5]["eps_lb_fdp"] > rows[0.5]["claimed_epsilon"]
    # the measured mean separation matches the GDP mu of the applied noise, sqrt(T)/sigma
    for s in (1.0, 0.5):
        assert rows[s]["mu_hat"] == pytest.approx(rows[s]["mu_expected"], abs=0.06)
    assert rows[1.0]["mu_expected"] == pytest.approx(0.268, abs=1e-3)


@pytest.mark.slow
def test_whitebox_self_audit_five_seeds(one_thread):
    t = whitebox_power_table(range(1, 6), (1.0, 0.5, 0.0))
    print("\n" + format_power_table(t))
    for r in t["rows"]:
        if r["noise_scale"] == 1.0:
            assert r["eps_lb_fdp"] <= r["claimed_epsilon"]
            assert r["eps_lb_steinke"] <= r["claimed_epsilon"]
    assert t["caught"][1.0] == {"fdp": 0, "steinke": 0, "of": 5}
    assert t["caught"][0.5]["fdp"] >= 4          # power analysis: 100/100 simulated seeds
    assert t["caught"][0.0] == {"fdp": 5, "steinke": 5, "of": 5}
