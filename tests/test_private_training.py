"""DP-SGD and per-unit clipping through the one trainer: recipes, ledger, budget, resume."""

import json
import math
import signal
import time

import pytest
import torch

from privasr.errors import PolicyError
from privasr.config import load_config
from privasr.data.poisson import PoissonSampler
from privasr.privacy.accountant import epsilon
from privasr.recipes.train import run_training
from test_trainer import _cli, _overrides

DP = ["privacy.policy={unit: example, clip_norm: 1.0}", "privacy.sampling=poisson",
      "privacy.expected_batch_size=4", "privacy.max_physical=3"]


def test_poisson_sampler_rate_determinism_and_physical_split():
    s = PoissonSampler(1000, expected_batch_size=50, max_physical=16, seed=3)
    sizes = [len(s.draw(t)) for t in range(200)]
    assert abs(sum(sizes) / 200 - 50) < 3
    assert s.draw(17) == s.draw(17) and s.draw(17) != s.draw(18)
    lb = s.logical_batch(5)
    assert all(len(b) <= 16 for b in lb) and sum(lb, []) == s.draw(5)
    tiny = PoissonSampler(10, expected_batch_size=0.01, max_physical=4)
    assert any(tiny.logical_batch(t) == [] for t in range(50))  # empty draws happen


def test_poisson_draw_sorted_by_length_before_the_physical_split():
    lengths = [float((7 * i) % 13) for i in range(400)]
    plain = PoissonSampler(400, expected_batch_size=40, max_physical=8, seed=1)
    s = PoissonSampler(400, expected_batch_size=40, max_physical=8, seed=1, lengths=lengths)
    for t in range(5):
        flat = sum(s.logical_batch(t), [])
        assert sorted(flat) == sorted(plain.draw(t))          # the same examples ...
        assert [lengths[i] for i in flat] == sorted(lengths[i] for i in flat)   # ... by length
        assert all(len(b) <= 8 for b in s.logical_batch(t))


def test_dpsgd_recipe_reaches_target_epsilon_and_records_it(tiny_corpus, tmp_path):
    corpus, _, _ = tiny_corpus
    cfg = load_config("configs/dpsgd_eps8.yaml",
                      _overrides(corpus, tmp_path / "dp", steps=5) + DP[1:] +
                      ["privacy.target_epsilon=8", "privacy.delta=1e-3"])
    res = run_training(cfg, log=lambda *_: None)
    p = res["privacy"]
    assert p["unit"] == "example" and p["steps"] == 5 and p["delta"] == 1e-3
    assert p["epsilon"] <= 8.0 + 1e-9 and p["epsilon"] > 6.0  # calibrated to spend ~ the budget
    n = res["train_utts"]
    assert p["sample_rate"] == pytest.approx(4 / n)
    # cross-check the recorded ε against dp-accounting directly
    assert p["epsilon"] == pytest.approx(epsilon(p["noise_multiplier"], 4 / n, 5, 1e-3), rel=1e-6)
    ck = torch.load(tmp_path / "dp" / "last.pt", weights_only=False)
    assert ck["strategy"]["ledger"]["segments"][0][0] == 5
    saved = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert saved["privacy"]["epsilon"] == p["epsilon"]
    # the private batches' statistics are not released by default (ε does not cover them)
    header = (tmp_path / "dp" / "train.csv").read_text().splitlines()[0].split(",")
    assert not {"loss", "frac_clipped", "norm_p50", "units", "examples",
                "audio_s_per_s"} & set(header)
    assert "noise_std" in header and saved["final_train_loss"] is None
    st = saved["privacy_statement"]
    assert st["guarantee"] and st["secret_randomness"] and st["unit"] == "example"
    assert st["epsilon"] == p["epsilon"] and st["delta_times_n"] == pytest.approx(1e-3 * n)
    assert not any("per-step statistics" in x for x in st["outside_guarantee"])
    report = (tmp_path / "dp" / "report.html").read_text()
    assert 'alt="clipping"' not in report and "-DP per example" in report
    assert "Outside the guarantee" in report


def test_compare_puts_dp_next_to_baseline(tmp_path, capsys):
    from privasr.cli import main
    for name, wer, priv in (("base", 0.3, None), ("dp", 0.6, {"epsilon": 8.0, "delta": 1e-4,
                                                             "unit": "example"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"test_wer": wer, "test_cer": wer / 3, "steps": 10, "privacy": priv}))
    assert main(["compare", str(tmp_path / "base"), str(tmp_path / "dp"),
                 "--out", str(tmp_path / "cmp.json")]) == 0
    rows = json.loads((tmp_path / "cmp.json").read_text())
    assert [r["run"] for r in rows] == ["base", "dp"]
    assert rows[1]["wer_vs_baseline"] == pytest.approx(2.0) and rows[1]["epsilon"] == 8.0
    assert "dp" in capsys.readouterr().out
    assert main(["compare", str(tmp_path)]) != 0
    assert "no results.json" in capsys.readouterr().err


def test_budget_exceeded_stops_training_with_a_message(tiny_corpus, tmp_path):
    corpus, _, _ = tiny_corpus
    n = 3  # pick a budget that fits exactly 3 steps at σ = 1
    cfg = load_config("configs/demo.yaml", _overrides(corpus, tmp_path / "b", steps=8) + [
        "privacy.policy={unit: example, clip_norm: 1.0, noise_multiplier: 1.0}",
        *DP[1:], "privacy.delta=1e-3"])
    from privasr.data.manifest import read_manifest

    N = len(read_manifest(corpus / "train.jsonl"))
    eps3 = epsilon(1.0, 4 / N, n, 1e-3)
    eps4 = epsilon(1.0, 4 / N, n + 1, 1e-3)
    budget = (eps3 + eps4) / 2
    # an explicit σ with a budget: σ is kept, the ledger enforces the budget
    cfg.privacy.target_epsilon = budget
    cfg.privacy.log_private_stats = True
    res = run_training(cfg, log=lambda *_: None)
    assert res["steps"] == n
    assert res["stopped"] and "budget" in res["stopped"] and "ε" in res["stopped"]
    assert res["privacy"]["epsilon"] <= budget
    # asked for, the private statistics are logged -- and listed as outside the guarantee
    header = (tmp_path / "b" / "train.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "frac_clipped", "norm_p50"} <= set(header)
    outside = res["privacy_statement"]["outside_guarantee"]
    assert any("per-step statistics" in x for x in outside)
    assert 'alt="clipping"' in (tmp_path / "b" / "report.html").read_text()


def test_noise_without_poisson_sampling_is_refused(tiny_corpus, tmp_path):
    corpus, _, _ = tiny_corpus
    cfg = load_config("configs/demo.yaml", _overrides(corpus, tmp_path / "r", steps=2) + [
        "privacy.policy={unit: example, clip_norm: 1.0, noise_multiplier: 1.0}"])
    with pytest.raises(PolicyError, match="Poisson"):
        run_training(cfg, log=lambda *_: None)


def test_clip_only_microbatch_recipe_trains(tiny_corpus, tmp_path):
    corpus, _, _ = tiny_corpus
    cfg = load_config("configs/microbatch.yaml", _overrides(corpus, tmp_path / "m", steps=3))
    res = run_training(cfg, log=lambda *_: None)
    assert res["privacy"] is None and res["clip_policy"]["unit"] == "microbatch"
    assert math.isfinite(res["final_train_loss"])


def test_kill_and_resume_continues_the_ledger(tiny_corpus, tmp_path):
    """Exact resume: the ledger always; the parameters bit for bit only with seeded randomness
    (debugging), which then prints no ε. A DP run's secret draws differ on every run."""
    corpus, _, _ = tiny_corpus
    steps = 6
    args = lambda out: ["train", "configs/dpsgd_eps8.yaml",  # noqa: E731
                        *_overrides(corpus, out, steps), *DP[1:], "privacy.delta=1e-3",
                        "privacy.randomness=seeded"]
    ref = _cli(args(tmp_path / "ref"))
    out = ref.communicate(timeout=600)[0].decode()
    assert ref.returncode == 0, out
    run = tmp_path / "killed"
    p = _cli(args(run))
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and p.poll() is None:
        if (run / "last.pt").exists():
            if torch.load(run / "last.pt", weights_only=False)["position"]["step"] >= 2:
                p.send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    p.wait()
    assert killed, "run ended before it could be killed"
    r = _cli(args(run))
    out = r.communicate(timeout=600)[0].decode()
    assert r.returncode == 0, out
    a = json.loads((tmp_path / "ref" / "results.json").read_text())["privacy"]
    b = json.loads((run / "results.json").read_text())["privacy"]
    assert a["epsilon"] is None and b["epsilon"] is None  # seeded: no ε printed or written
    assert a["steps"] == b["steps"] == steps and not b["secret_randomness"]
    assert "NO DP GUARANTEE" in b["summary"]
    ca = torch.load(tmp_path / "ref" / "last.pt", weights_only=False)
    cb = torch.load(run / "last.pt", weights_only=False)
    assert ca["strategy"]["ledger"]["segments"] == cb["strategy"]["ledger"]["segments"]
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
