"""Speaker-level (user-level) DP in central training: unit = speaker.

Speakers are Poisson-sampled with all their utterances; each sampled speaker's mean gradient
over its utterances in the step is clipped to C; the ledger's unit is the speaker. Checked
against a hand loop, against the federated path where the two must agree (one local SGD step,
server lr 1, FedAvg), and end to end on the embedded corpus.
"""

from __future__ import annotations

import pytest
import torch

from privasr.clipping import ClipPolicy, ClippedGradient, PolicyError
from privasr.clipping.release import Release
from privasr.config import load_config
from privasr.data.manifest import SkipReport
from privasr.data.poisson import PoissonSampler
from privasr.data.splits import load_split, manifest_paths
from privasr.data.tokenizer import CharTokenizer
from privasr.federated.aggregate import aggregate
from privasr.federated.client import local_update
from privasr.federated.clip import DeltaClipper, client_policy
from privasr.federated.config import load_fl_config, local_train_config
from privasr.federated.optim import apply_update, build_server_optimizer
from privasr.clipping.noise import GaussianNoise
from privasr.models.build import build_model
from privasr.models.loss import checked, per_example_ctc
from privasr.recipes.train import run_training
from test_engines import PooledMLP, ce_loss, make_batches
from test_trainer import _overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def test_speaker_unit_is_each_speakers_clipped_mean_gradient():
    torch.manual_seed(0)
    model = PooledMLP()
    batches = make_batches([4, 3], seed=5)               # 3 speakers, spread over both batches
    policy = ClipPolicy(unit="speaker", clip_norm=0.05, expected_batch_size=2.5)
    for engine in ("reference", "vectorized", "bookkeeping"):
        model.zero_grad(set_to_none=True)
        stats = ClippedGradient(policy, engine).fill_grads(model, batches, ce_loss)
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        rows = [(b, r) for b in batches for r in range(len(b))]
        for spk in sorted({b.speakers[r] for b, r in rows}):        # by hand, one speaker
            model.zero_grad(set_to_none=True)
            mine = [(b, r) for b, r in rows if b.speakers[r] == spk]
            loss = sum(ce_loss(model, b)[r] for b, r in mine) / len(mine)
            loss.backward()
            g = {n: p.grad for n, p in model.named_parameters()}
            norm = torch.sqrt(sum(v.square().sum() for v in g.values()))
            for n in want:
                want[n] += g[n] * min(1.0, 0.05 / float(norm))
        for n in want:
            torch.testing.assert_close(got[n], want[n] / 2.5, rtol=1e-5, atol=1e-8)
        assert stats["units"] == 3 and stats["examples"] == 7


def test_speaker_unit_needs_speakers_and_poisson_sampling(tiny_corpus, tmp_path):
    b = make_batches([3], seed=1)[0]
    b.speakers = None
    with pytest.raises(PolicyError, match="speaker of every example"):
        ClippedGradient(ClipPolicy(unit="speaker"), "reference").fill_grads(
            PooledMLP(), [b], ce_loss)
    corpus, _, _ = tiny_corpus
    cfg = load_config(None, _overrides(corpus, tmp_path / "x", steps=1) +
                      ["privacy.policy={unit: speaker, clip_norm: 1.0}"])
    with pytest.raises(PolicyError, match="privacy.sampling=poisson"):
        run_training(cfg, log=lambda *_: None)


def test_poisson_sampling_of_whole_speakers():
    members = [[0, 1, 2], [3], [4, 5], [6, 7, 8, 9]]
    s = PoissonSampler(4, expected_batch_size=2, max_physical=3, seed=1, members=members,
                       whole_units=True)
    seen = 0
    for t in range(200):
        drawn = s.draw(t)
        picked = [m for m in members if m[0] in drawn]
        assert sorted(drawn) == sorted(i for m in picked for i in m)   # whole speakers only
        seen += len(picked)
        assert all(len(b) <= 3 for b in s.logical_batch(t))
    assert abs(seen / 200 - 2) < 0.3


def test_speaker_level_dp_equals_fedavg_of_one_local_sgd_step(tiny_corpus, tmp_path):
    """Central speaker-level clipping + SGD(lr 1) == FL: one full-batch local SGD step (lr 1)
    per client, per-client clipping, FedAvg with server lr 1 (σ = 0 on both sides)."""
    corpus, _, _ = tiny_corpus
    c, cohort = 0.3, 3.0
    cfg = load_fl_config(None, [f"data.corpus_dir={corpus}", "model.size=tiny",
                                "model.dropout=0.0", "local.lr=1.0", "local.max_steps=1",
                                "local.max_grad_norm=0", "local.max_utts=256",
                                "local.max_seconds=10000", f"dp.policy.clip_norm={c}",
                                f"out_dir={tmp_path / 'fl'}"])
    tok = CharTokenizer()
    data = load_split(manifest_paths(cfg)["train"],
                      local_train_config(cfg, out_dir="", steps=1, seed=0), tok, SkipReport())
    speakers = sorted({u.speaker for u in data.utts})[:3]
    torch.manual_seed(0)
    start = build_model(cfg, tok.vocab_size)
    state = {k: v.clone() for k, v in start.state_dict().items()}

    # federated: one local step per client, clipped deltas, FedAvg (lr 1)
    deltas = [local_update(cfg, state, s, round_=0, client_seed=i).delta
              for i, s in enumerate(speakers)]
    fl_model = build_model(cfg, tok.vocab_size)
    fl_model.load_state_dict(state)
    params = {n: p for n, p in fl_model.named_parameters() if p.requires_grad}
    pol = client_policy(cfg.dp.policy, expected_cohort=cohort)
    agg = aggregate(deltas, DeltaClipper(pol, list(params)), Release(pol, GaussianNoise()),
                    {n: p.shape for n, p in params.items()})
    apply_update(fl_model, build_server_optimizer("fedavg", list(params.values()), lr=1.0,
                                                  betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0),
                 agg.update)

    # central: the same speakers' utterances, mixed across physical batches, unit = speaker
    central = build_model(cfg, tok.vocab_size)
    central.load_state_dict(state)
    central.train()
    idx = [i for i, u in enumerate(data.utts) if u.speaker in speakers]
    idx = idx[::2] + idx[1::2]
    batches = [data.collate(idx[:len(idx) // 2]), data.collate(idx[len(idx) // 2:])]
    policy = ClipPolicy(unit="speaker", clip_norm=c, expected_batch_size=cohort)
    ClippedGradient(policy, "reference").fill_grads(central, batches, checked(per_example_ctc))
    torch.optim.SGD(central.parameters(), lr=1.0).step()

    moved = 0.0
    for (n, p), q in zip(central.named_parameters(), fl_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=2e-6)
        moved = max(moved, float((p.detach() - start.state_dict()[n]).abs().max()))
    assert moved > 1e-4 and agg.clipped >= 1            # the step moved, a client was clipped


def test_speaker_level_dp_trains_with_epsilon_per_speaker(tiny_corpus, tmp_path):
    corpus, _, _ = tiny_corpus
    cfg = load_config("configs/dpsgd_eps8.yaml", _overrides(corpus, tmp_path / "spk", steps=3) +
                      ["privacy.policy={unit: speaker, clip_norm: 1.0}",
                       "privacy.sampling=poisson", "privacy.expected_batch_size=4",
                       "privacy.max_physical=8", "privacy.target_epsilon=8"])
    res = run_training(cfg, log=lambda *_: None)
    p, st = res["privacy"], res["privacy_statement"]
    data = load_split(manifest_paths(cfg)["train"], cfg, CharTokenizer(), SkipReport())
    n_speakers = len({u.speaker for u in data.utts})
    assert p["unit"] == "speaker" and p["steps"] == 3
    assert p["sample_rate"] == pytest.approx(4 / n_speakers)
    assert 6.0 < p["epsilon"] <= 8.0 + 1e-9
    assert p["delta"] == pytest.approx(min(1e-5, n_speakers ** -1.1))
    assert st["guarantee"] and st["unit"] == "speaker" and "speaker" in st["protects"]
    assert st["delta_times_n"] == pytest.approx(p["delta"] * n_speakers)


@pytest.mark.slow
def test_speaker_dp_under_torchrun_matches_one_process(tiny_corpus, tmp_path):
    """`privasr train` with unit=speaker on 2 ranks (speakers sharded) == on one process: the
    same parameters, stats and ledger after 3 steps (seeded randomness, so the two runs can
    draw the same batches and noise; such runs print no ε)."""
    import csv

    from test_percore import torchrun

    corpus, _, _ = tiny_corpus
    common = [o for o in _overrides(corpus, "X", steps=3) if not o.startswith("out_dir")] + [
        "model.dropout=0.0", "privacy.policy={unit: speaker, clip_norm: 1.0, "
        "noise_multiplier: 0.5}", "privacy.sampling=poisson", "privacy.expected_batch_size=4",
        "privacy.max_physical=8", "privacy.randomness=seeded", "privacy.log_private_stats=true"]
    dist_out, one_out = tmp_path / "dist", tmp_path / "one"
    torchrun(2, ["-m", "privasr.cli", "train", "configs/dpsgd_eps8.yaml", *common,
                 f"out_dir={dist_out}"])
    run_training(load_config("configs/dpsgd_eps8.yaml", common + [f"out_dir={one_out}"]),
                 log=lambda *_: None)
    a = torch.load(dist_out / "last.pt", weights_only=False)
    b = torch.load(one_out / "last.pt", weights_only=False)
    for k, v in b["model"].items():
        if not k.endswith("attn.k.bias"):       # exactly-zero gradients: Adam amplifies noise
            torch.testing.assert_close(a["model"][k], v, rtol=1e-4, atol=1e-5)
    assert a["strategy"]["ledger"] == b["strategy"]["ledger"]
    assert a["strategy"]["ledger"]["unit"] == "speaker"
    rows = {o: list(csv.DictReader(open(o / "train.csv"))) for o in (dist_out, one_out)}
    for rd, ro in zip(rows[dist_out], rows[one_out]):
        for k in ("loss", "units", "examples", "frac_clipped", "norm_p50"):
            assert float(rd[k]) == pytest.approx(float(ro[k]), rel=1e-5, nan_ok=True), k
