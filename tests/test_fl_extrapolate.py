"""The FL paper's extrapolation methodology (recipe ``extrapolate``): σ from the stated population
and cohort, the simulated cohort's noise on the average equal to the big cohort's, and the two ε
(extrapolated, simulated) reported apart. No Flower run."""

import json
import math
import pathlib

import pytest
import torch

from privasr.clipping.noise import GaussianNoise
from privasr.clipping.release import Release
from privasr.config import from_dict, to_dict
from privasr.errors import ConfigError
from privasr.federated.accounting import (PLD_MIN_NOISE_MULTIPLIER, extrapolated_noise,
                                          simulated_accountant, simulated_epsilon_report)
from privasr.federated.aggregate import aggregate
from privasr.federated.clip import DeltaClipper
from privasr.federated.config import ExtrapolateConfig, FLConfig, load_fl_config
from privasr.privacy.accountant import epsilon
from privasr.privacy.ledger import PrivacyBudgetExceeded, PrivacyLedger
from conftest import FL_SPEAKERS

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEAKERS, COHORT = FL_SPEAKERS, 4
EXTRA = ["extrapolate.population=1.0e+6", "extrapolate.cohort=1024",
         "extrapolate.target_epsilon=7.2"]


def _server(corpus, out, *extra):
    from privasr.federated.server import FLServer

    cfg = load_fl_config(None, [f"out_dir={out}", f"data.corpus_dir={corpus}", "model.size=tiny",
                                f"server.cohort_size={COHORT}", "dp.accounting=rdp", *EXTRA,
                                *extra])
    return FLServer(cfg, log=lambda *_: None)


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_calibrated_sigma_big_reproduces_the_target_epsilon(method):
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    ex = extrapolated_noise(population=1e6, cohort=1024, target_epsilon=7.2, delta=1e-9,
                            rounds=100, method=method)
    event = dp_accounting.PoissonSampledDpEvent(1024 / 1e6,
                                                dp_accounting.GaussianDpEvent(ex.noise_multiplier))
    acc = (pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
           if method == "pld" else dp_accounting.rdp.RdpAccountant())
    acc.compose(event, 100)
    assert acc.get_epsilon(1e-9) == pytest.approx(7.2, abs=1e-2)
    assert ex.epsilon([[100, ex.simulated_noise_multiplier(20), 20 / 540]], 20) <= 7.2
    assert ex.simulated_noise_multiplier(20) == pytest.approx(ex.noise_multiplier * 20 / 1024)


def test_simulated_noise_on_the_average_is_the_big_cohorts(fl_manifest, tmp_path, one_thread):
    server = _server(fl_manifest, tmp_path / "run", "dp.policy.clip_norm=2.0")
    ex = server.extrapolation
    want = ex.noise_multiplier * 2.0 / 1024          # σ_big·C / K_big
    assert server.noise_multiplier == pytest.approx(ex.noise_multiplier * COHORT / 1024)
    assert server.policy.expected_units == COHORT   # the server divides by E[cohort]
    # the server's own noise and denominator (policy, clipper bound, Release), many draws
    big = {"w": torch.Size([400_000])}
    agg = aggregate([], DeltaClipper(server.policy, ["w"]), Release(server.policy, GaussianNoise(
        generator=torch.Generator().manual_seed(0))), big)
    assert float(agg.update["w"].double().std()) == pytest.approx(want, rel=0.01)
    # and a real round (FedAvg, lr 1, no replies): the model moves by exactly that noise
    before = torch.cat([p.detach().flatten().clone() for p in server.model.parameters()])
    server.step([], sampled=0, failed=0)
    after = torch.cat([p.detach().flatten() for p in server.model.parameters()])
    assert float((after - before).double().std()) == pytest.approx(want, rel=0.02)


def test_both_epsilons_reported_apart_and_the_simulated_one_is_larger(fl_manifest, tmp_path,
                                                                       one_thread):
    logs = []
    server = _server(fl_manifest, tmp_path / "run", "server.rounds=3")
    server.log = logs.append
    for _ in range(3):
        row = server.step([], sampled=0, failed=0)
    ex = server.extrapolation
    sim = epsilon(server.noise_multiplier, COHORT / SPEAKERS, 3, server.delta, method="rdp")
    assert row["epsilon"] == pytest.approx(sim)
    assert row["epsilon_extrapolated"] == pytest.approx(
        epsilon(ex.noise_multiplier, 1024 / 1e6, 3, 1e-9, method="rdp"))
    res = server.results({"wer": 1.0, "cer": 1.0, "loss": 1.0}, 0.0)
    s, e = res["epsilon_simulated"], res["epsilon_extrapolated"]
    assert s["epsilon"] == pytest.approx(sim) and res["epsilon"] == pytest.approx(sim)
    assert s["epsilon"] > e["epsilon"] and e["epsilon"] <= 7.2
    assert s["delta"] == server.delta == 1e-5 and e["delta"] == 1e-9
    assert (e["population"], e["cohort"], e["rounds"]) == (1e6, 1024, 3)
    assert e["sigma_big"] == ex.noise_multiplier and s["sigma_sim"] == server.noise_multiplier
    assert "not for this simulation" in e["label"] and "true" in s["label"]
    assert s["population"] == SPEAKERS and s["reason"] is None
    json.dumps(res)
    text = server.epsilon_text(row["epsilon"], row["epsilon_extrapolated"])
    assert "ε_simulated" in text and "ε_extrapolated" in text and "not this run's" in text
    assert "extrapolated (P = 1e+06" in server.describe()
    assert "simulated (this run's guarantee" in server.describe()


def test_the_extrapolated_budget_refuses_rounds_past_calibration(fl_manifest, tmp_path,
                                                                  one_thread):
    server = _server(fl_manifest, tmp_path / "run", "server.rounds=2")
    server.step([], sampled=0, failed=0)
    server.step([], sampled=0, failed=0)
    with pytest.raises(PrivacyBudgetExceeded, match="extrapolated"):
        server.step([], sampled=0, failed=0)
    assert server.round == 2


def test_no_guarantee_or_infinite_simulated_epsilon_is_null_with_a_reason():
    seeded = PrivacyLedger(noise_multiplier=0.5, sample_rate=0.1, delta=1e-5, unit="client",
                           population=10, secret_randomness=False)
    seeded.record_step()
    rep = simulated_epsilon_report(seeded, expected_cohort=1.0)
    assert rep["epsilon"] is None and "NO DP GUARANTEE" in rep["reason"]
    inf = PrivacyLedger(noise_multiplier=0.0, sample_rate=0.1, delta=1e-5, unit="client",
                        population=10)
    inf.record_step()
    rep = simulated_epsilon_report(inf, expected_cohort=1.0)
    assert rep["epsilon"] is None and rep["reason"].startswith("infinite")


def test_pld_gives_way_to_rdp_only_where_it_is_impractical():
    assert simulated_accountant(PLD_MIN_NOISE_MULTIPLIER / 2, "pld") == "rdp"
    assert simulated_accountant(PLD_MIN_NOISE_MULTIPLIER, "pld") == "pld"
    assert simulated_accountant(0.01, "rdp") == "rdp"


@pytest.mark.parametrize("extra, match", [
    (["extrapolate.cohort=0"], "extrapolate.cohort"),
    (["extrapolate.cohort=2000000"], "extrapolate.cohort"),
    (["extrapolate.population=0"], "extrapolate.population"),
    (["extrapolate.target_epsilon=0"], "extrapolate.target_epsilon"),
    (["extrapolate.target_epsilon=.inf"], "extrapolate.target_epsilon"),
    (["extrapolate.delta=1e-6"], "1/population"),
    (["extrapolate.delta=0"], "1/population"),
    (["dp.target_epsilon=8.0"], "remove dp.noise_multiplier and dp.target_epsilon"),
    (["dp.noise_multiplier=1.0"], "remove dp.noise_multiplier and dp.target_epsilon"),
    (["server.sampling=fixed"], "poisson"),
    (["extrapolate.cohort=1.5"], "extrapolate.cohort"),
    (["extrapolate.size=3"], "unknown key"),
])
def test_bad_extrapolate_recipes_name_the_problem(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_fl_config(None, EXTRA + extra)


def test_extrapolate_config_round_trips_and_defaults_off(tmp_path):
    assert load_fl_config(None).extrapolate is None
    # the recipe's example is commented out: behaviour unchanged
    assert load_fl_config(ROOT / "configs/fl_dp.yaml").extrapolate is None
    cfg = load_fl_config(None, EXTRA + ["extrapolate.delta=1.0e-10"])
    assert cfg.extrapolate == ExtrapolateConfig(population=1e6, cohort=1024,
                                                target_epsilon=7.2, delta=1e-10)
    assert from_dict(FLConfig, to_dict(cfg)) == cfg
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(to_dict(cfg)))   # JSON is YAML
    assert load_fl_config(path) == cfg
    assert math.isclose(load_fl_config(None, EXTRA).extrapolate.delta, 1e-9)
