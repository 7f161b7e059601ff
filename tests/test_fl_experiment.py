"""The FL factorial driver (benchmarks/fl_dp.py): criteria computed from the rows, both ε in every
row, finished rows reused only on an exact key match; end to end on the tiny corpus (slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import fl_dp  # noqa: E402


def _row(clipping, opt, seed, wer, ratio=None):
    return {"clipping": clipping, "server_optimizer": opt, "server_lr": 1.0, "seed": seed,
            "test_wer": wer, "round_time_ratio_median": ratio}


def test_summary_criteria_follow_the_rows():
    rows = [_row("none", "fedavg", 0, 0.60, 1.1), _row("none", "fedavg", 1, 0.62, 1.3),
            _row("global", "fedavg", 0, 0.75), _row("global", "fedavg", 1, 0.77),
            _row("global", "lamb", 0, 0.70), _row("global", "lamb", 1, 0.70),
            _row("per_layer_uniform", "lamb", 0, 0.63), _row("per_layer_uniform", "lamb", 1, 0.61),
            _row("per_layer_uniform", "fedavg", 0, 0.74), _row("per_layer_uniform", "fedavg", 1,
                                                               0.74)]
    s = fl_dp.summarize(rows, seed_wer=0.80)
    assert s["nodp_gain_points"] == pytest.approx(19.0) and s["nodp_gain_target_met"]
    assert s["lowest_dp_variant"] == "per_layer_uniform+lamb" and s["per_layer_lamb_is_lowest"]
    assert s["per_layer_lamb_gap_to_nodp_points"] == pytest.approx(1.0)
    assert s["per_layer_lamb_within_2_points"]
    assert s["lowest_margin_points"] == pytest.approx(8.0) and s["lowest_margin_exceeds_seed_sd"]
    assert s["variants"]["none+fedavg"]["sd"] == pytest.approx(0.01414, rel=1e-3)
    assert s["round_time_ratio_median"] == pytest.approx(1.2)
    assert s["nodp_reference"] == "none+fedavg"
    # a better non-private server optimizer becomes the reference the gaps are measured to
    s2 = fl_dp.summarize(rows + [_row("none", "lamb", 0, 0.50), _row("none", "lamb", 1, 0.52)],
                         seed_wer=0.80)
    assert s2["nodp_reference"] == "none+lamb" and s2["nodp_gain_points"] == pytest.approx(29.0)
    assert s2["per_layer_lamb_gap_to_nodp_points"] == pytest.approx(11.0)
    assert not s2["per_layer_lamb_within_2_points"]
    # the same numbers with the claim's order reversed: the criteria flip
    rows[6]["test_wer"], rows[7]["test_wer"] = 0.80, 0.80
    s = fl_dp.summarize(rows, seed_wer=0.80)
    assert s["lowest_dp_variant"] == "global+lamb" and not s["per_layer_lamb_is_lowest"]
    assert not s["per_layer_lamb_within_2_points"]
    # a lowest variant inside the seed spread is not called a result
    rows[4]["test_wer"], rows[5]["test_wer"] = 0.70, 0.78
    s = fl_dp.summarize(rows, seed_wer=0.80)
    assert s["lowest_margin_exceeds_seed_sd"] is False


def test_every_row_carries_both_epsilons_labelled():
    dp = {"noise_multiplier": 0.004, "epsilon": 1e5,
          "epsilon_simulated": {"epsilon": 1e5, "label": "this run's speakers"},
          "epsilon_extrapolated": {"epsilon": 7.2, "label": "P = 1e6"}}
    f = fl_dp.epsilon_fields(dp)
    assert f["epsilon_extrapolated"]["epsilon"] == 7.2 and f["epsilon_simulated"]["epsilon"] == 1e5
    f = fl_dp.epsilon_fields({"noise_multiplier": 0.0, "epsilon": "inf"})
    assert f["epsilon_extrapolated"]["epsilon"] is None and "without DP" in f[
        "epsilon_simulated"]["label"]


def test_variants_and_policies():
    assert fl_dp.parse_variants("none:fedavg,per_layer_uniform:lamb:0.01") == [
        ("none", "fedavg", None), ("per_layer_uniform", "lamb", 0.01)]
    with pytest.raises(SystemExit, match="clipping"):
        fl_dp.parse_variants("layerwise:lamb")
    from privasr.federated.config import load_fl_config

    for c in ("none", "global", "per_layer_uniform"):
        cfg = load_fl_config(None, [f"dp.policy={fl_dp.policy_yaml(c, 0.3)}",
                              *fl_dp.privacy_overrides(c)])
        assert (cfg.dp.policy == {}) == (c == "none")


@pytest.mark.slow
def test_driver_end_to_end_reuses_finished_rows(tiny_corpus, tmp_path, monkeypatch):
    """Two variants × one seed on the tiny corpus, 1 round; a second call runs nothing."""
    import torch

    from privasr.checkpoint import save_checkpoint
    from privasr.data.tokenizer import CharTokenizer
    from privasr.models.conformer import ConformerCTC, config_for

    corpus, _, _ = tiny_corpus
    torch.manual_seed(0)
    model = ConformerCTC(config_for("tiny", vocab_size=len(CharTokenizer().symbols)))
    save_checkpoint(tmp_path / "seed.pt", {"model": model.state_dict(),
                                           "model_config": vars(model.cfg).copy(),
                                           "vocab": list(CharTokenizer().symbols)})
    out = tmp_path / "fl.json"
    args = ["--config", str(ROOT / "configs/fl_dp_assistant.yaml"), "--work",
            str(tmp_path / "work"), "--out", str(out), "--seeds", "0",
            "--seed-checkpoint", str(tmp_path / "seed.pt"),
            "--variants", "none:fedavg,per_layer_uniform:lamb:0.01",
            "--seed-override", "model.size=tiny",
            f"data.corpus_dir={corpus}", "model.size=tiny",
            "server.rounds=1", "server.cohort_size=4", "simulation.num_cpus=1",
            "local.max_steps=1", "progress=false"]
    assert fl_dp.main(args) == 0
    res = json.loads(out.read_text())
    assert res["complete"] and len(res["rows"]) == 2
    nodp, dp = res["rows"]
    assert nodp["clipping"] == "none" and nodp["epsilon_extrapolated"]["epsilon"] is None
    assert dp["epsilon_extrapolated"]["epsilon"] <= 7.2 + 1e-6
    assert dp["epsilon_simulated"]["epsilon"] is None or dp["epsilon_simulated"]["epsilon"] > 7.2
    assert res["summary"]["variants"].keys() == {"none+fedavg", "per_layer_uniform+lamb"}

    def boom(cfg):
        raise AssertionError("a finished row was run again")

    monkeypatch.setattr(fl_dp, "run_one", boom)
    assert fl_dp.main(args) == 0
    assert json.loads(out.read_text())["rows"] == res["rows"]
    # a later call for one variant keeps the other variants' finished rows
    one = [a if a != "none:fedavg,per_layer_uniform:lamb:0.01" else "none:fedavg" for a in args]
    assert fl_dp.main(one) == 0
    again = json.loads(out.read_text())
    assert len(again["rows"]) == 2 and again["summary"]["variants"].keys() == res["summary"][
        "variants"].keys()
