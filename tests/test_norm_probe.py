"""The memorization mechanism probe (privasr.audit.norm_probe): its per-example norms, its share
formulas, that it leaves training untouched, its CSV rows, its settings and the recipe path."""

import json
import math

import pytest
import torch

from privasr.audit.norm_probe import (NormProbe, canary_indices, check_settings,
                                      example_grad_norms, norm_share)
from privasr.config import load_config
from privasr.data.dataset import AsrDataset, compute_features
from privasr.data.manifest import read_manifest
from privasr.data.tokenizer import CharTokenizer
from privasr.errors import ConfigError
from privasr.models.conformer import ConformerCTC, config_for
from privasr.train.trainer import Trainer
from test_trainer import _overrides


@pytest.fixture(scope="module")
def tiny_ds(tiny_corpus):
    corpus, _, _ = tiny_corpus
    utts = read_manifest(corpus / "train.jsonl")[:6]
    return AsrDataset(utts, compute_features(utts, progress=False), CharTokenizer())


def _model(seed=0):
    torch.manual_seed(seed)
    return ConformerCTC(config_for("tiny", vocab_size=CharTokenizer().vocab_size))


def _trainer(tiny_corpus, ds, out, steps, observers=()):
    corpus, _, _ = tiny_corpus
    cfg = load_config("configs/demo.yaml", _overrides(corpus, out, steps=steps))
    return Trainer(cfg, _model(), ds, None, list(CharTokenizer().symbols), observers=observers)


def _probe(ds, every=1, size=2, **kw):
    ids = [u.id for u in ds.utts[:2]]          # two utterances stand in for canaries
    return NormProbe(ds, ids, every=every, size=size, batch_size=kw.pop("batch_size", 4.0), **kw)


def test_probe_norm_equals_a_batch_of_one_backward(tiny_ds, one_thread):
    model = _model().eval()
    got = example_grad_norms(model, tiny_ds, [0, 3], "cpu")
    assert all(p.grad is None for p in model.parameters())   # autograd.grad: .grad untouched
    from privasr.models.loss import per_example_ctc

    for i, norm in zip([0, 3], got):
        model.zero_grad(set_to_none=True)
        per_example_ctc(model, tiny_ds.collate([i])).sum().backward()
        ref = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()
                            if p.grad is not None))
        assert norm == pytest.approx(ref, rel=1e-5) and norm > 0


def test_share_formulas_on_hand_computed_numbers():
    c, o = [4.0, 6.0], [1.0, 1.0]                         # means 5 and 1
    assert norm_share(c, o, 5) == pytest.approx(5 / 9)    # 5 / (5 + 4·1)
    assert norm_share(c, o, 5, clip=2.0) == pytest.approx(2 / 6)  # min(·, 2): 2 / (2 + 4·1)
    assert norm_share(c, o, 5, clip=2.0) <= norm_share(c, o, 5)
    assert norm_share(c, o, 5, clip=0.5) == pytest.approx(1 / 5)  # all clipped: 1/B
    assert norm_share(c, o, 1) == 1.0
    with pytest.raises(ValueError, match="batch_size"):
        norm_share(c, o, 0.5)


def test_probe_set_is_seeded_one_copy_per_canary(tiny_ds):
    ids = {tiny_ds.utts[0].id, tiny_ds.utts[4].id}
    assert canary_indices(tiny_ds, ids) == {tiny_ds.utts[0].id: [0], tiny_ds.utts[4].id: [4]}
    a = NormProbe(tiny_ds, ids, every=1, size=3, batch_size=4, seed=1)
    b = NormProbe(tiny_ds, ids, every=1, size=3, batch_size=4, seed=1)
    assert a.canaries == b.canaries == [0, 4] and a.ordinary == b.ordinary
    assert len(a.ordinary) == 3 and not set(a.ordinary) & {0, 4}
    with pytest.raises(ValueError, match="no inserted canary"):
        NormProbe(tiny_ds, ["nope"], every=1, size=2, batch_size=4)


def test_probe_leaves_the_trajectory_unchanged_and_logs_every_k(tiny_corpus, tiny_ds, tmp_path,
                                                                one_thread):
    steps = 5
    plain = _trainer(tiny_corpus, tiny_ds, tmp_path / "plain", steps)
    torch.manual_seed(1)
    plain.fit()
    probe = _probe(tiny_ds, every=2)
    probed = _trainer(tiny_corpus, tiny_ds, tmp_path / "probed", steps, observers=[probe])
    torch.manual_seed(1)
    probed.fit()
    for (k, a), b in zip(plain.model.state_dict().items(), probed.model.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs when the probe runs"
    assert probed.model.training                         # train mode restored

    lines = (tmp_path / "probed" / "norm_probe.csv").read_text().strip().splitlines()
    assert lines[0] == ("step,canary_norm_median,ordinary_norm_median,canary_norm_mean,"
                        "ordinary_norm_mean,ratio,share_unclipped,share_clipped_at_median")
    assert [int(l.split(",")[0]) for l in lines[1:]] == [1, 2, 4]
    s = probe.summary()
    assert s["rows"] == 3 and s["every"] == 2 and s["size"] == {"canaries": 2, "ordinary": 2}
    assert s["ratio_last"] == pytest.approx(float(lines[-1].split(",")[5]))
    assert 0 < s["share_clipped_at_median_last"] <= 1 and s["covered_by_epsilon"] is False
    row = probe.rows[-1]
    assert row["ratio"] == pytest.approx(row["canary_norm_median"] / row["ordinary_norm_median"])
    assert not (tmp_path / "plain" / "norm_probe.csv").exists()


def test_clipped_share_with_a_known_bound(tiny_ds, one_thread):
    probe = _probe(tiny_ds, clip_norm=1e-3, batch_size=8.0)
    row = probe.measure(_model(), "cpu")
    assert probe.share_key == "share_clipped" and "share_clipped_at_median" not in row
    assert row["share_clipped"] == pytest.approx(1 / 8)   # every norm above C = 1e-3
    assert row["share_unclipped"] > 0


def test_settings_are_validated():
    def cfg(*kv):
        return load_config("configs/demo.yaml", list(kv)).audit

    check_settings(cfg())                                 # off by default
    check_settings(cfg("audit.canaries=c.jsonl", "audit.norm_probe_every=5"))
    with pytest.raises(ConfigError, match="audit.norm_probe_every must be an integer >= 0"):
        check_settings(cfg("audit.canaries=c.jsonl", "audit.norm_probe_every=-1"))
    with pytest.raises(ConfigError, match="audit.norm_probe_size must be an integer >= 1"):
        check_settings(cfg("audit.canaries=c.jsonl", "audit.norm_probe_size=0"))
    with pytest.raises(ConfigError, match="needs audit.canaries"):
        check_settings(cfg("audit.norm_probe_every=5"))
    with pytest.raises(ConfigError, match="norm_probe_every"):
        NormProbe(None, [], every=0, size=2, batch_size=4)


def test_recipe_writes_probe_rows_and_summary(tiny_corpus, tmp_path, one_thread):
    """A hand-made canary manifest (training audio under new ids and texts) is enough here."""
    from privasr.recipes.train import run_training

    corpus, _, _ = tiny_corpus
    lines = []
    for k, line in enumerate((corpus / "train.jsonl").read_text().splitlines()[:3]):
        obj = json.loads(line)
        obj.update(id=f"canary{k}", text="zq xj", audio=str(corpus / obj["audio"]), speaker="canary",
                   canary={"inserted": k < 2, "repetitions": 2})
        lines.append(json.dumps(obj))
    path = tmp_path / "c" / "canaries.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    cfg = load_config("configs/demo.yaml", _overrides(corpus, tmp_path / "run", steps=2) + [
        f"audit.canaries={path}", "audit.norm_probe_every=1", "audit.norm_probe_size=4"])
    logged = []
    res = run_training(cfg, log=logged.append)
    s = res["norm_probe"]
    assert s["rows"] == 2 and s["size"]["canaries"] == 2 and s["size"]["ordinary"] == 4
    assert s["clip_norm"] is None and s["batch_size"] > 1
    assert json.loads((tmp_path / "run" / "results.json").read_text())["norm_probe"] == s
    rows = (tmp_path / "run" / "norm_probe.csv").read_text().strip().splitlines()
    assert len(rows) == 3
    assert any("NOT covered by the run's ε" in str(m) for m in logged)
    # entered again when already finished: no step runs, the summary still has the logged rows
    again = run_training(cfg, log=logged.append)["norm_probe"]
    assert again["rows"] == 2 and again["ratio_first"] == s["ratio_first"] \
        and again["ratio_last"] == s["ratio_last"]
