"""benchmarks/peft_step.py: a PEFT variant trained on its cached frozen prefix takes the step the
whole model takes, keeps its frozen parameters frozen, and the smoke run writes both baselines'
ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import peft_step  # noqa: E402
from train_throughput import make_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _build(name: str, cache: bool):
    batch = make_batch(2, 1.0, CPU)
    return peft_step.build_variant(name, "tiny", batch, CPU, "auto", top_blocks=1, cache=cache,
                                   noise_multiplier=0.0)


@pytest.mark.parametrize("name", ["dp_lora", "dp_adapters"])
def test_cached_step_equals_the_whole_model_step_without_noise(name):
    cached_model, cached_step, ci = _build(name, cache=True)
    whole_model, whole_step, wi = _build(name, cache=False)
    assert ci["cached"] and ci["start_block"] == 1 and ci["lowest_trainable_block"] == 1
    assert not wi["cached"] and wi["start_block"] == 0
    assert ci["step_input_shape"][-1] == cached_model.cfg.d_model      # block outputs, not fbank
    before = {n: p.detach().clone() for n, p in whole_model.named_parameters()}
    for n, p in cached_model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)     # same initial weights
    cached_step()
    whole_step()
    trained = [n for n, p in whole_model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith(("encoder.blocks.1.", "ctc_head.")) for n in trained)
    cp, wp = dict(cached_model.named_parameters()), dict(whole_model.named_parameters())
    for n in trained:
        torch.testing.assert_close(cp[n].grad, wp[n].grad, rtol=1e-4, atol=1e-7, msg=n)
        torch.testing.assert_close(cp[n], wp[n], rtol=1e-4, atol=1e-7, msg=n)
    assert any(not torch.equal(wp[n], before[n]) for n in trained)     # the step moved them


def test_frozen_check_passes_on_a_cached_variant():
    model, step, info = _build("dp_lora", cache=True)
    assert info["cached"]
    got = peft_step.check_frozen(model, step)
    assert got["ok"] and got["frozen_tensors"] > 0


def test_smoke_run_writes_top_blocks_and_ratios_to_both_baselines(tmp_path):
    out = tmp_path / "x.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(BENCH / "peft_step.py"), "--size", "tiny",
                        "--batch", "2", "--seconds", "1", "--rounds", "1", "--warmup", "0",
                        "--no-memory", "--threads", "1", "--top-blocks", "1",
                        "--variants", "nonprivate_full", "dp_full", "dp_lora", "dp_head",
                        "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["settings"]["top_blocks"] == 1 and d["settings"]["cache"] is True
    rows = {row["variant"]: row for row in d["summary"]}
    assert set(rows) == {"nonprivate_full", "dp_full", "dp_lora", "dp_head"}
    for row in rows.values():
        assert row["wall_ratio_to_nonprivate_full"] > 0 and row["wall_ratio_to_dp_full"] > 0
    assert rows["nonprivate_full"]["wall_ratio_to_nonprivate_full"] == 1.0
    assert "median_round_ratio_wall_s_to_nonprivate_full" in d["results"]["dp_lora"]
    for v in ("dp_lora", "dp_head"):
        assert d["variants"][v]["cached"] and d["variants"][v]["prefix_seconds_per_batch"] > 0
    assert not d["variants"]["dp_full"]["cached"]
    assert d["goal"]["best_peft_variant"] == "dp_lora"
