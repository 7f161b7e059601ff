"""Federated learning with user-level DP (privasr.federated): aggregation, accounting, failures."""

import json
import math
import re

import pytest
import torch

from privasr.clipping.noise import GaussianNoise
from privasr.federated.aggregate import aggregate
from privasr.clipping.release import Release
from privasr.federated.clip import DeltaClipper, client_policy
from privasr.federated.config import load_fl_config
from privasr.federated.optim import Lamb
from conftest import FL_SPEAKERS

SPEAKERS = FL_SPEAKERS


def _cfg(corpus, out, *extra):
    return load_fl_config(None, [f"out_dir={out}", f"data.corpus_dir={corpus}",
                                 "model.size=tiny", "server.cohort_size=4", *extra])


def _deltas(shapes, n, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) * scale for k, s in shapes.items()} for _ in range(n)]


SHAPES = {"a.weight": torch.Size([3, 2]), "a.bias": torch.Size([3]), "b.weight": torch.Size([4])}


def _norm(d):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in d.values()))


POLICIES = {
    "global": lambda bounds: {"clip_norm": 1.0},
    "per_layer_uniform": lambda bounds: {"scope": "per_layer", "per_layer_rule": "uniform",
                                         "clip_norm": 1.0},
    "per_layer": lambda bounds: {"scope": "per_layer", "clip_norm": None,
                                 "layer_bounds": bounds},
}


@pytest.mark.parametrize("clipping", ["global", "per_layer_uniform", "per_layer"])
def test_aggregate_matches_hand_computation(clipping):
    deltas = _deltas(SHAPES, 3, scale=1.0) + _deltas(SHAPES, 1, scale=1e-3, seed=1)
    bounds = {"a.*": 0.5, "*": 0.25}
    pol = client_policy(POLICIES[clipping](bounds), expected_cohort=5.0)
    clipper = DeltaClipper(pol, list(SHAPES))
    agg = aggregate(deltas, clipper, Release(pol, GaussianNoise()), SHAPES)
    want = {k: torch.zeros(s) for k, s in SHAPES.items()}
    for d in deltas:
        total = _norm(d)
        for k, t in d.items():
            if clipping == "global":
                c = t * min(1.0, 1.0 / total)
            elif clipping == "per_layer_uniform":   # every tensor to C/√L once ‖Δ‖ ≥ C
                c = t if total < 1.0 else t / t.norm() * (1.0 / math.sqrt(len(SHAPES)))
            else:
                cl = 0.5 if k.startswith("a.") else 0.25
                c = t * min(1.0, cl / float(t.norm()))
            want[k] += c
    for k in SHAPES:
        torch.testing.assert_close(agg.update[k], want[k] / 5.0, rtol=1e-5, atol=1e-7)
    assert agg.clients == 4 and agg.clipped == 3
    if clipping == "per_layer":
        assert clipper.bound == pytest.approx(math.sqrt(2 * 0.5 ** 2 + 0.25 ** 2))


def test_aggregate_noise_is_sigma_times_total_bound_over_expected_cohort():
    big = {"w": torch.Size([200_000])}
    pol = client_policy({"clip_norm": 2.0}, noise_multiplier=0.5, expected_cohort=4.0)
    clipper = DeltaClipper(pol, ["w"])
    agg = aggregate([], clipper, Release(pol, GaussianNoise(
        generator=torch.Generator().manual_seed(0))), big)
    assert float(agg.update["w"].std()) == pytest.approx(0.5 * 2.0 / 4.0, rel=0.01)
    again = aggregate([], clipper, Release(pol, GaussianNoise(
        generator=torch.Generator().manual_seed(0))), big)
    assert torch.equal(agg.update["w"], again.update["w"])


def test_server_round_is_hand_fedavg_and_skips_bad_clients(fl_manifest, tmp_path, one_thread):
    from privasr.federated.server import FLServer

    cfg = _cfg(fl_manifest, tmp_path / "run", "server.optimizer=fedavg", "server.lr=1.0",
               "dp.policy.clip_norm=0.1")
    server = FLServer(cfg, log=lambda *_: None)
    before = {n: p.detach().clone() for n, p in server.model.named_parameters()}
    good = _deltas(server.shapes, 2, scale=0.01)
    nan = {k: v.clone() for k, v in good[0].items()}
    next(iter(nan.values()))[0] = float("nan")
    wrong = dict(good[0])
    wrong.pop(next(iter(wrong)))
    row = server.step(good + [nan, wrong], sampled=5, failed=1)
    want = {k: torch.zeros(s) for k, s in server.shapes.items()}
    for d in good:
        f = min(1.0, 0.1 / _norm(d))
        for k in want:
            want[k] += d[k] * f
    for n, p in server.model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] + want[n] / 4.0, rtol=1e-5, atol=1e-6)
    assert row["aggregated"] == 2 and row["failed"] == 3 and row["clipped"] == 2
    assert server.ledger is None and server.round == 1 and math.isinf(row["epsilon"])


def test_no_clipping_is_the_plain_mean_of_the_replies(fl_manifest, tmp_path, one_thread):
    """dp.policy={}: the non-private FedAvg reference averages the raw deltas over the replies."""
    from privasr.federated.server import FLServer

    cfg = _cfg(fl_manifest, tmp_path / "run", "server.optimizer=fedavg", "server.lr=1.0",
               "dp.policy={}")
    server = FLServer(cfg, log=lambda *_: None)
    before = {n: p.detach().clone() for n, p in server.model.named_parameters()}
    deltas = _deltas(server.shapes, 3, scale=5.0)     # far above any bound a policy would set
    row = server.step(deltas, sampled=3, failed=0)
    for n, p in server.model.named_parameters():
        want = before[n] + sum(d[n] for d in deltas) / 3.0
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-5)
    assert row["clipped"] == 0 and row["delta_norm_median"] == pytest.approx(
        sorted(_norm(d) for d in deltas)[1], rel=1e-6)
    res = server.results({"wer": 1.0, "cer": 1.0, "loss": 1.0}, 0.0)
    assert res["clipping"] == "none" and res["clip_bound"] is None and res["epsilon"] == "inf"


@pytest.mark.parametrize("extra", [["dp.target_epsilon=8"], ["dp.noise_multiplier=1.0"]])
def test_no_clipping_cannot_be_noised(tmp_path, extra):
    from privasr.errors import ConfigError

    with pytest.raises(ConfigError, match="no clipping"):
        load_fl_config(None, [f"out_dir={tmp_path}", "dp.policy={}", *extra])


def test_user_level_epsilon_matches_dp_accounting(fl_manifest, tmp_path, one_thread):
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    from privasr.federated.server import FLServer

    sigma, rounds = 1.5, 3
    cfg = _cfg(fl_manifest, tmp_path / "run", f"dp.noise_multiplier={sigma}", "dp.delta=1e-3",
               f"server.rounds={rounds}")
    server = FLServer(cfg, log=lambda *_: None)
    for _ in range(rounds):
        server.step([], sampled=4, failed=4)  # every client failed: noise is still released
    q = 4 / SPEAKERS
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                rounds)
    assert server.ledger.steps == rounds and server.ledger.unit.value == "client"
    assert server.epsilon() == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)
    # the checkpoint holds what was released: resuming continues the same ledger
    server.save()
    again = FLServer(cfg, log=lambda *_: None)
    assert again.resume() and again.round == rounds
    assert again.epsilon() == pytest.approx(server.epsilon(), rel=1e-12)
    for (n, p), q2 in zip(server.model.named_parameters(), again.model.parameters()):
        assert torch.equal(p, q2), n


def test_target_epsilon_calibrates_sigma_and_budget_stops(fl_manifest, tmp_path, one_thread):
    from privasr.federated.server import FLServer
    from privasr.privacy.ledger import PrivacyBudgetExceeded

    cfg = _cfg(fl_manifest, tmp_path / "run", "dp.target_epsilon=4.0", "server.rounds=2",
               "dp.accounting=rdp")
    server = FLServer(cfg, log=lambda *_: None)
    assert server.noise_multiplier > 0 and server.delta == 1e-5   # min(1e-5, N^-1.1)
    assert server.secret and server.ledger.secret_randomness
    # DP cohorts are secret: two servers of one recipe (same seed) draw different cohorts
    other = FLServer(cfg, log=lambda *_: None)
    assert (server.source.uniforms("cohort", 0, 64).tolist()
            != other.source.uniforms("cohort", 0, 64).tolist())
    server.step([], sampled=0, failed=0)
    server.step([], sampled=0, failed=0)
    assert 3.8 < server.epsilon() <= 4.0
    with pytest.raises(PrivacyBudgetExceeded):
        server.step([], sampled=0, failed=0)
    assert server.ledger.steps == 2 and server.round == 2
    st = server.results({"wer": 1.0, "cer": 1.0, "loss": 1.0}, 0.0)["privacy_statement"]
    assert st["guarantee"] and st["protects"] == "speaker"
    assert st["delta_times_n"] == pytest.approx(SPEAKERS * 1e-5)
    assert math.isnan(server.history[0]["sampled"])   # realised cohort: not released


def test_lamb_moves_each_layer_by_lr_times_its_norm():
    big = torch.nn.Parameter(torch.full((10,), 10.0))
    small = torch.nn.Parameter(torch.full((10,), 0.01))
    opt = Lamb([big, small], lr=0.1, betas=(0.9, 0.99), eps=1e-12)
    big.grad = torch.full((10,), 1e-6)
    small.grad = torch.full((10,), 5.0)
    b0, s0 = big.detach().clone(), small.detach().clone()
    opt.step()
    assert float((big.detach() - b0).norm()) == pytest.approx(0.1 * float(b0.norm()), rel=1e-4)
    assert float((small.detach() - s0).norm()) == pytest.approx(0.1 * float(s0.norm()), rel=1e-4)


def test_bad_recipes_name_the_problem(tmp_path):
    from privasr.errors import ConfigError

    with pytest.raises(ConfigError, match="dp.policy.*scope"):
        load_fl_config(None, ["dp.policy.scope=layerwise"])
    with pytest.raises(ConfigError, match="dp.policy.*layer_bounds"):
        load_fl_config(None, ["dp.policy.scope=per_layer"])
    with pytest.raises(ConfigError, match="unit is the client"):
        load_fl_config(None, ["dp.policy.unit=example"])
    with pytest.raises(ConfigError, match="set by the server"):
        load_fl_config(None, ["dp.policy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="bound='fixed'"):
        load_fl_config(None, ["dp.policy.bound=quantile"])
    with pytest.raises(ConfigError, match="poisson"):
        load_fl_config(None, ["dp.noise_multiplier=1.0", "server.sampling=fixed"])


def _fl_corpus(tiny_corpus, dest):
    """The tiny corpus's train/test manifests, with one speaker's utterances made unusable
    (transcripts far too long for the audio: CTC-infeasible), so that client fails for real."""
    from privasr.data.manifest import read_manifest, write_manifest

    corpus, _, _ = tiny_corpus
    dest.mkdir()
    train = read_manifest(corpus / "train.jsonl")
    bad = sorted({u.speaker for u in train})[3]
    train = [u if u.speaker != bad else type(u)(**{**u.__dict__, "text": "x y z " * 200})
             for u in train]
    write_manifest(dest / "train.jsonl", train)
    write_manifest(dest / "test.jsonl", read_manifest(corpus / "test.jsonl"))
    return bad, len({u.speaker for u in train})


@pytest.mark.slow
def test_two_round_simulation_with_failing_and_timed_out_clients(tiny_corpus, tmp_path):
    """Flower's Simulation Runtime, speakers as clients, tiny model: a client that raises and a
    round whose clients all time out leave the server running, the model finite, and the
    ledger equal to the rounds actually released."""
    from privasr.federated.app import run_simulation_fl
    from privasr.models.conformer import ConformerCTC, config_for
    from privasr.privacy.accountant import epsilon
    from privasr.checkpoint import load_checkpoint, save_checkpoint

    bad, n = _fl_corpus(tiny_corpus, tmp_path / "corpus")
    torch.manual_seed(0)
    init = ConformerCTC(config_for("tiny", vocab_size=len(__import__(
        "privasr.data.tokenizer", fromlist=["x"]).CharTokenizer().symbols)))
    save_checkpoint(tmp_path / "seed.pt", {"model": init.state_dict()})
    common = [f"data.corpus_dir={tmp_path / 'corpus'}", "model.size=tiny", "server.rounds=2",
              f"init_checkpoint={tmp_path / 'seed.pt'}", "eval_every=1",
              "data.feature_workers=1", "local.max_steps=2"]
    logs: list[str] = []
    # 1. every speaker sampled (q = 1), σ > 0, per-layer uniform clipping, LAMB
    cfg = load_fl_config(None, [f"out_dir={tmp_path / 'a'}", f"server.cohort_size={n}",
                                "dp.noise_multiplier=0.7", "dp.delta=1e-3",
                                "dp.policy.scope=per_layer", "dp.policy.per_layer_rule=uniform",
                                "server.optimizer=lamb",
                                "server.lr=0.01", *common])
    res = run_simulation_fl(cfg, log=logs.append)
    # realised cohort / failure counts and client times are not covered by ε: withheld from
    # the results (NaN / None), the failures only in the operator's log
    assert res["rounds"] == 2 and res["failed_clients"] is None, logs
    assert all(math.isnan(r[k]) for r in res["history"]
               for k in ("aggregated", "failed", "round_time_ratio"))
    assert len([ln for ln in logs if re.match(r"round \d: client \d+ failed", ln)]) == 2, logs
    assert res["epsilon"] == pytest.approx(epsilon(0.7, 1.0, 2, 1e-3), rel=1e-9)
    assert 0.0 <= res["test_cer"] and math.isfinite(res["test_loss"])
    ck = load_checkpoint(tmp_path / "a" / "server.pt")
    assert ck["round"] == 2 and ck["privacy_ledger"]["steps"] == 2
    assert all(torch.isfinite(t).all() for t in ck["model"].values())
    assert any(not torch.equal(ck["model"][k], v) for k, v in init.state_dict().items())
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["test_wer"] == res["test_wer"] and len(saved["extrapolation"]) > 0
    # 2. replies never arrive in time (1 ms): rounds proceed on nothing; σ = 0 and FedAvg
    #    leave the seed model bit-for-bit unchanged
    cfg = load_fl_config(None, [f"out_dir={tmp_path / 'b'}", "server.cohort_size=4",
                                "server.round_timeout=0.001", *common])
    res = run_simulation_fl(cfg, log=logs.append)
    assert res["rounds"] == 2 and res["privacy"] is None
    assert all(r["aggregated"] == 0 and r["failed"] == r["sampled"] for r in res["history"])
    ck = load_checkpoint(tmp_path / "b" / "server.pt")
    for k, v in init.state_dict().items():
        assert torch.equal(ck["model"][k], v), k


def test_cli_fl_rejects_a_bad_recipe_with_a_message(capsys):
    from privasr.cli import main

    assert main(["fl", "configs/fl_dp.yaml", "server.optimizer=sgd"]) == 2
    err = capsys.readouterr().err
    assert "server.optimizer='sgd'" in err and "lamb" in err


def test_round_parallelism_ratio():
    from privasr.federated.server import round_parallelism

    r = round_parallelism(12.0, [4.0, 4.0, 4.0, 8.0], workers=2)      # ideal 20/2 = 10 s
    assert r["round_time_ratio"] == pytest.approx(1.2) and r["workers"] == 2
    assert r["round_time_ratio_to_bound"] == pytest.approx(1.2)
    r = round_parallelism(9.0, [1.0, 8.0], workers=4)                # 2 clients, 2 workers used
    assert r["workers"] == 2 and r["round_time_ratio"] == pytest.approx(9.0 / 4.5)
    assert r["round_time_ratio_to_bound"] == pytest.approx(9.0 / 8.0)   # slowest client binds
    assert math.isnan(round_parallelism(3.0, [], workers=2)["round_time_ratio"])


def test_exchange_collects_replies_over_pulls_and_stops_at_the_timeout():
    """``exchange`` (send_and_receive with a progress bar) against a grid whose replies trickle
    in: all replies when they arrive in time, only the early ones when the timeout passes."""
    from types import SimpleNamespace as NS

    from privasr.federated.app import exchange

    class Trickle:
        def __init__(self, never: int = 0):
            self.pulls, self.never = 0, never

        def push_messages(self, msgs):
            self.ids = [str(i) for i in range(len(msgs))]
            return list(self.ids)

        def pull_messages(self, ids):
            self.pulls += 1
            due = [i for i in sorted(ids) if int(i) < min(self.pulls, len(self.ids) - self.never)]
            return [NS(metadata=NS(reply_to_message_id=i)) for i in due]

    grid = Trickle()
    reps = exchange(grid, [None] * 4, timeout=None, progress=False, desc="t", pull_interval=0)
    assert sorted(r.metadata.reply_to_message_id for r in reps) == ["0", "1", "2", "3"]
    assert grid.pulls == 4
    grid = Trickle(never=2)
    reps = exchange(grid, [None] * 4, timeout=0.05, progress=False, desc="t", pull_interval=0.01)
    assert sorted(r.metadata.reply_to_message_id for r in reps) == ["0", "1"]


def test_client_reads_only_its_speaker_and_caches_features_per_speaker(tiny_corpus, tmp_path):
    """A client's dataset holds exactly its speaker's utterances, with the features the whole-
    manifest path gives; the one-pool warm-up writes the caches the clients then read."""
    import shutil

    from privasr.data.dataset import compute_features, feature_cache_path
    from privasr.data.features import FeatureConfig
    from privasr.data.manifest import read_manifest
    from privasr.federated import client

    corpus, _, _ = tiny_corpus
    dest = tmp_path / "c"
    dest.mkdir()
    shutil.copy(corpus / "train.jsonl", dest / "train.jsonl")
    (dest / "audio").symlink_to(corpus / "audio")
    cfg = _cfg(dest, tmp_path / "run", "data.feature_workers=1", "progress=false")
    utts = read_manifest(dest / "train.jsonl")
    speakers = client.speakers_of(dest / "train.jsonl")
    assert speakers == sorted({u.speaker for u in utts})
    assert client.warm_feature_cache(cfg) == len(speakers)
    assert client.warm_feature_cache(cfg) == 0                  # all cached now
    full = dict(zip([u.id for u in utts], compute_features(utts, FeatureConfig(),
                                                           progress=False)))
    for spk in speakers[:3]:
        mine = [u for u in utts if u.speaker == spk]
        assert feature_cache_path(mine, FeatureConfig(), dest / "feats").exists()
        ds = client.speaker_dataset(cfg, spk)
        assert [u.id for u in ds.utts] == [u.id for u in mine]
        for u, f in zip(ds.utts, ds.feats):
            torch.testing.assert_close(f, full[u.id])
    with pytest.raises(ValueError, match="no utterances"):
        client.speaker_dataset(cfg, "nobody")
