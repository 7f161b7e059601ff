"""Self-audit of privasr's DP claim (issue 7 §6): on a tiny model, the one-run ε lower bound of
a DP-SGD run must not exceed its claimed ε, and the same run with the noise switched off must
audit clearly higher — so a DP implementation that forgot its noise would be caught."""

import pytest

from privasr.audit.canaries import CanaryConfig, load_vocabulary, make_canaries
from privasr.audit.run import run_audit
from privasr.config import load_config
from privasr.recipes.train import run_training

CLAIM = 1.0
DELTA = 1e-5


def _train_and_audit(corpus, canaries, out, noise: bool) -> dict:
    policy = ("{unit: example, clip_norm: 1.0}" if noise
              else "{unit: example, clip_norm: 1.0, noise_multiplier: 0.0}")
    ov = [f"out_dir={out}", f"data.corpus_dir={corpus}", "model.size=tiny", "model.dropout=0.0",
          "threads=1", "optim.max_steps=300", "optim.warmup_steps=5", "optim.lr=0.003",
          "eval_every=100000", "ckpt_every=100000", "progress=false", "data.feature_workers=1",
          "data.max_dev_utts=5", "augment.specaugment=false", f"audit.canaries={canaries}",
          "privacy.sampling=poisson", "privacy.expected_batch_size=8", "privacy.max_physical=16",
          f"privacy.delta={DELTA}", f"privacy.policy={policy}"]
    if noise:
        ov.append(f"privacy.target_epsilon={CLAIM}")
    res = run_training(load_config("configs/demo.yaml", ov), log=lambda *_: None)
    audit = run_audit(out / "last.pt", canaries, delta=DELTA, log=lambda *_: None)
    return {"train": res, "audit": audit}


@pytest.mark.slow
def test_dp_claim_survives_audit_and_noise_off_control_is_caught(tiny_corpus, tmp_path,
                                                                 one_thread):
    corpus, _, _ = tiny_corpus
    # r = 1 only: repeated copies would need group privacy
    make_canaries(tmp_path / "can", CanaryConfig(n=40, words=3, repetitions=(1,), rate=140,
                                                 seed=5),
                  vocab=load_vocabulary(3000)[100:], log=lambda *_: None)
    canaries = tmp_path / "can" / "canaries.jsonl"
    dp = _train_and_audit(corpus, canaries, tmp_path / "dp", noise=True)
    claimed = dp["train"]["privacy"]["epsilon"]
    assert claimed == pytest.approx(CLAIM, rel=1e-3)
    assert dp["audit"]["claimed_privacy"]["epsilon"] == pytest.approx(claimed)
    assert dp["audit"]["one_run"]["epsilon"] <= claimed
    control = _train_and_audit(corpus, canaries, tmp_path / "off", noise=False)
    assert control["train"]["privacy"] is None  # σ = 0 makes no claim
    eps_off = control["audit"]["one_run"]["epsilon"]
    # noise off memorizes: the audit refutes the claim the DP run makes
    assert eps_off > claimed and eps_off >= dp["audit"]["one_run"]["epsilon"] + 0.5
    assert control["audit"]["auc"] > 0.9
