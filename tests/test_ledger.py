"""The privacy ledger: storage round trips, the budget refusal, σ = 0, segments, summary."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from privasr.privacy import (
    PrivacyBudgetExceeded,
    PrivacyLedger,
    PrivacyUnit,
    epsilon,
    epsilon_for_segments,
)
from privasr.privacy.ledger import _fmt

SIGMA, Q, DELTA = 1.0, 0.01, 1e-5


def _ledger(**kw) -> PrivacyLedger:
    args = dict(noise_multiplier=SIGMA, sample_rate=Q, delta=DELTA)
    args.update(kw)
    return PrivacyLedger(**args)


def test_defaults_and_units():
    led = _ledger()
    assert led.unit is PrivacyUnit.EXAMPLE and led.sensitivity_factor == 1.0
    assert led.method == "pld" and led.target_epsilon is None and led.steps == 0
    assert led.epsilon() == 0.0
    assert _ledger(unit="core").sensitivity_factor == 2.0
    assert _ledger(unit="microbatch").sensitivity_factor == 2.0
    assert _ledger(unit="client").sensitivity_factor == 1.0
    with pytest.warns(UserWarning, match="single example"):
        _ledger(unit="microbatch", sensitivity_factor=1.0)
    assert _ledger(unit="speaker").sensitivity_factor == 1.0
    with pytest.raises(ValueError, match="unit must be one of"):
        _ledger(unit="user")
    with pytest.raises(ValueError, match="sample_rate"):
        _ledger(sample_rate=0.0)
    with pytest.raises(ValueError, match="delta"):
        _ledger(delta=1.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        _ledger(target_epsilon=0.0)


def test_record_and_epsilon_match_the_accountant():
    led = _ledger()
    led.record_step()
    led.record_step(99)
    assert led.steps == 100 and led.segments == [[100, SIGMA, Q]]
    assert led.epsilon() == epsilon(SIGMA, Q, 100, DELTA)
    assert led.epsilon_after(50) == epsilon(SIGMA, Q, 150, DELTA)
    core = _ledger(unit="core")
    core.record_step(100)
    assert core.epsilon() == epsilon(SIGMA, Q, 100, DELTA, sensitivity_factor=2.0)
    assert core.epsilon() > led.epsilon()


def test_segments_when_sigma_or_q_change():
    led = _ledger(method="rdp")
    led.record_step(100)
    led.set_params(noise_multiplier=2.0)
    led.record_step(50)
    led.set_params(sample_rate=0.02)
    led.record_step(10)
    led.set_params(noise_multiplier=2.0)  # unchanged: same segment continues
    led.record_step(5)
    assert led.segments == [[100, 1.0, 0.01], [50, 2.0, 0.01], [15, 2.0, 0.02]]
    assert led.steps == 165
    assert led.epsilon() == epsilon_for_segments(led.segments, DELTA, method="rdp")
    assert "σ = 1–2" in led.summary() and "3 segments" in led.summary()


def test_round_trip_dict_json_and_torch(tmp_path):
    led = _ledger(unit="client", target_epsilon=5.0, method="rdp")
    led.record_step(40)
    led.set_params(noise_multiplier=1.3, sample_rate=0.02)
    led.record_step(7)
    d = led.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    assert d["unit"] == "client" and "per speaker" in d["unit_description"]
    assert d["epsilon"] == pytest.approx(led.epsilon())
    back = PrivacyLedger.from_dict(json.loads(json.dumps(d)))
    assert back == led
    assert back.epsilon() == led.epsilon() and back.summary() == led.summary()

    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "privacy_ledger": led.to_dict()}, path)
    loaded = torch.load(path, weights_only=True)  # plain types load under the safe loader
    resumed = PrivacyLedger.from_dict(loaded["privacy_ledger"])
    assert resumed == led
    resumed.record_step(3)  # resuming continues the ledger
    assert resumed.steps == led.steps + 3
    assert resumed.segments[-1] == [10, 1.3, 0.02]


def test_from_dict_rejects_a_newer_format():
    d = _ledger().to_dict()
    d["format_version"] = 99
    with pytest.raises(ValueError, match="newer"):
        PrivacyLedger.from_dict(d)


def test_budget_refuses_exactly_the_step_that_would_exceed():
    n = 50
    eps_n, eps_n1 = epsilon(SIGMA, Q, n, DELTA), epsilon(SIGMA, Q, n + 1, DELTA)
    assert eps_n < eps_n1
    budget = 0.5 * (eps_n + eps_n1)
    led = _ledger(target_epsilon=budget)
    assert led.max_total_steps() == n
    for _ in range(n):
        led.check_before_step()
        led.record_step()
    assert led.epsilon() <= budget and not led.would_exceed(0)
    assert led.would_exceed(1)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        led.check_before_step()
    msg = str(info.value)
    assert f"ε={_fmt(eps_n1)}" in msg and f"budget ε={_fmt(budget)}" in msg
    assert "50 steps done" in msg and "δ=1e-5" in msg and "unit example" in msg
    assert info.value.steps_done == n and info.value.epsilon_next == eps_n1
    assert info.value.budget == budget
    assert led.steps == n  # refusing records nothing

    # a budget of exactly ε(N) still allows step N (ε ≤ budget)
    exact = _ledger(target_epsilon=eps_n)
    assert exact.max_total_steps() == n
    exact.record_step(n - 1)
    exact.check_before_step()
    assert exact.would_exceed(2)


def test_budget_after_resume_and_after_a_parameter_change():
    n = 50
    budget = 0.5 * (epsilon(SIGMA, Q, n, DELTA) + epsilon(SIGMA, Q, n + 1, DELTA))
    led = _ledger(target_epsilon=budget)
    led.record_step(30)
    resumed = PrivacyLedger.from_dict(led.to_dict())
    assert resumed.max_total_steps() == n
    assert not resumed.would_exceed(20) and resumed.would_exceed(21)
    # more noise from now on: more steps fit, and the budget still holds at the new limit
    resumed.set_params(noise_multiplier=2 * SIGMA)
    limit = resumed.max_total_steps()
    assert limit > n
    resumed.record_step(limit - resumed.steps)
    assert resumed.epsilon() <= budget < resumed.epsilon_after(1)
    with pytest.raises(PrivacyBudgetExceeded):
        resumed.check_before_step()
    # a budget lowered below what was already spent refuses at once
    lowered = PrivacyLedger.from_dict({**led.to_dict(), "target_epsilon": led.epsilon() / 2})
    assert lowered.would_exceed(0)


def test_sigma_zero_is_infinite_and_refused_at_once():
    led = _ledger(noise_multiplier=0.0)
    assert led.epsilon() == 0.0  # nothing spent yet
    assert not led.would_exceed()  # no budget: never refuses
    led.record_step()
    assert led.epsilon() == math.inf
    assert led.to_dict()["epsilon"] == "inf"
    assert PrivacyLedger.from_dict(json.loads(json.dumps(led.to_dict()))) == led
    assert led.summary().startswith("ε = inf")

    budgeted = _ledger(noise_multiplier=0.0, target_epsilon=100.0)
    assert budgeted.max_total_steps() == 0
    with pytest.raises(PrivacyBudgetExceeded, match=r"ε=inf > budget ε=100"):
        budgeted.check_before_step()


def test_summary_format():
    led = _ledger(noise_multiplier=1.1, sample_rate=0.004, delta=3.2e-4)
    led.record_step(1200)
    s = led.summary()
    assert re.match(r"ε = \d+\.\d+ at δ = 3\.2e-4 \(unit: example, σ = 1\.1, q = 0\.004, "
                    r"1200 steps, PLD\)", s), s
    assert "per example" in s
    assert f"ε = {_fmt(led.epsilon())} " in s
    client = _ledger(unit="client", target_epsilon=8)
    assert "per speaker" in client.summary() and "budget ε ≤ 8" in client.summary()
    core = _ledger(unit="core")
    assert "sensitivity 2C" in core.summary()


def test_fmt():
    assert _fmt(3.2e-4) == "3.2e-4"
    assert _fmt(1e-5) == "1e-5"
    assert _fmt(7.9312) == "7.93"
    assert _fmt(0.004) == "0.004"
    assert _fmt(math.inf) == "inf"
