"""Canaries: plan, speed-up methods, CTC feasibility, manifest round trip, insertion into
training only, scoring and `privasr audit run` end to end on a tiny model."""

import json
import warnings

import numpy as np
import pytest

from privasr.audit.canaries import (AUTO_FACTORS, CanaryConfig, CanaryError, choose_factor,
                                    make_canaries, plan_canaries, read_canaries,
                                    training_copies)
from privasr.audit.speedup import ctc_slack, feature_frames, speed_up
from privasr.config import load_config
from privasr.data.manifest import read_manifest
from test_trainer import _overrides

VOCAB = ["apple", "river", "stone", "green", "music", "paper", "light", "table", "cloud", "horse",
         "seven", "train", "glass", "sugar", "night", "bread"]


def _peak_hz(x, sr=16000):
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return np.fft.rfftfreq(x.size, 1 / sr)[spec.argmax()]


def test_plan_is_seeded_balanced_and_coins_independent():
    cfg = CanaryConfig(n=400, words=3)
    a, b = plan_canaries(cfg, VOCAB), plan_canaries(cfg, VOCAB)
    assert a == b and plan_canaries(CanaryConfig(n=400, words=3, seed=1), VOCAB) != a
    reps = [r for *_, r in a]
    assert all(reps.count(r) == 80 for r in (1, 2, 4, 8, 16))  # dealt evenly
    coins = np.array([c for _, _, c, _ in a])
    assert 0.42 < coins.mean() < 0.58
    for r in (1, 16):  # the coin does not depend on r
        assert 0.3 < coins[np.array(reps) == r].mean() < 0.7
    assert all(len(t.split()) == 3 and set(t.split()) <= set(VOCAB) for _, t, _, _ in a)


def test_speedup_methods_length_and_pitch():
    sr = 16000
    x = (0.5 * np.sin(2 * np.pi * 200 * np.arange(2 * sr) / sr)).astype(np.float32)
    fast = speed_up(x, 1.25, "resample")
    assert len(fast) == pytest.approx(len(x) / 1.25, abs=2)
    assert _peak_hz(fast) == pytest.approx(250, abs=3)  # resampling raises the pitch
    kept = speed_up(x, 1.25, "tempo")
    assert len(kept) == pytest.approx(len(x) / 1.25, rel=0.03)
    assert _peak_hz(kept) == pytest.approx(200, abs=3)  # sox tempo keeps it
    assert speed_up(x, 1.25, "espeak_rate") is not None  # done at synthesis time
    with pytest.raises(ValueError, match="method"):
        speed_up(x, 1.25, "warp")


def test_feasibility_and_auto_factor():
    assert feature_frames(400) == 1 and feature_frames(399) == 0
    text = "ab ab"  # 5 labels, no repeats: needs 5 frames -> (5 + 1) * 4 feature frames
    n = 400 + 160 * 23  # 24 feature frames -> 5 output frames
    assert ctc_slack(text, n) == pytest.approx(1.0)
    assert ctc_slack("aa", n) == pytest.approx(5 / 3)  # a repeat needs a blank between
    # 1x audio with 2.2x the frames needed: auto picks the largest factor with 1.1x slack left
    n1 = 400 + 160 * (4 * (2.2 * 20 + 1) - 1)
    f = choose_factor(["abcdefghij" * 2], [n1], margin=1.1)
    assert f == 2.0
    with pytest.raises(CanaryError, match="fewer words"):
        choose_factor(["abcdefghij" * 2], [400 + 160 * 60], margin=1.1)


def test_make_canaries_manifest_and_refusal(tmp_path):
    cfg = CanaryConfig(n=6, words=3, rate=140)
    cs = make_canaries(tmp_path / "c", cfg, vocab=VOCAB, log=lambda *_: None)
    assert len(cs) == 6 and cs[0].factor in AUTO_FACTORS and cs[0].factor > 1.2
    assert all(ctc_slack(c.text, round(c.utt.duration * 16000)) >= 1 for c in cs)
    back = read_canaries(tmp_path / "c" / "canaries.jsonl")
    assert [(c.id, c.inserted, c.repetitions) for c in back] == \
           [(c.id, c.inserted, c.repetitions) for c in cs]
    assert len(read_manifest(tmp_path / "c" / "canaries.jsonl")) == 6  # an ordinary manifest
    summary = json.loads((tmp_path / "c" / "canaries.json").read_text())
    assert summary["config"]["factor"] == cs[0].factor and summary["infeasible"] == []
    # auto = the largest grid factor that keeps the margin: the next one up would not
    bigger = [f for f in AUTO_FACTORS if f > cs[0].factor]
    if bigger:
        from privasr.audit.canaries import _speaker
        from privasr.data.espeak import synthesize

        n1 = [len(synthesize(c.text, _speaker(cfg, 1.0))) for c in cs]
        assert choose_factor([c.text for c in cs], n1, margin=cfg.margin) == cs[0].factor
        assert min(ctc_slack(c.text, n) / min(bigger) for c, n in zip(cs, n1)) < cfg.margin
    with pytest.raises(CanaryError, match="CTC-infeasible"):
        make_canaries(tmp_path / "x", CanaryConfig(n=4, words=3, factor=4.0), vocab=VOCAB)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        make_canaries(tmp_path / "y", CanaryConfig(n=4, words=3, factor=4.0,
                                                   on_infeasible="warn"), vocab=VOCAB)
    assert any("CTC-infeasible" in str(x.message) for x in w)
    with pytest.raises(CanaryError, match="not a canary"):
        read_canaries(_plain_manifest(tmp_path))
    copies = training_copies(cs)
    assert len(copies) == sum(c.repetitions for c in cs if c.inserted)
    assert {u.id.split("_rep")[0] for u in copies} == {c.id for c in cs if c.inserted}


def _plain_manifest(tmp_path):
    p = tmp_path / "plain.jsonl"
    p.write_text(json.dumps({"id": "a", "audio": "a.flac", "duration": 1.0, "text": "a",
                             "speaker": "s", "sampling_rate": 16000}) + "\n")
    return p


@pytest.fixture(scope="module")
def canaries(tmp_path_factory):
    out = tmp_path_factory.mktemp("canaries")
    cs = make_canaries(out, CanaryConfig(n=10, words=3, rate=140, seed=3), vocab=VOCAB,
                       log=lambda *_: None)
    assert 0 < sum(c.inserted for c in cs) < 10
    return out / "canaries.jsonl", cs


def test_train_mixes_inserted_canaries_into_training_only(tiny_corpus, canaries, tmp_path,
                                                          one_thread):
    from privasr.recipes.train import run_training
    import privasr.recipes.train as recipe

    corpus, _, _ = tiny_corpus
    path, cs = canaries
    seen = {}
    real = recipe.Trainer

    class Spy(real):  # record the datasets the trainer really gets
        def __init__(self, cfg, model, train_ds, dev_ds, *a, **kw):
            seen["train"], seen["dev"] = [u.id for u in train_ds.utts], [u.id for u in dev_ds.utts]
            super().__init__(cfg, model, train_ds, dev_ds, *a, **kw)

    recipe.Trainer = Spy
    try:
        cfg = load_config("configs/demo.yaml", _overrides(corpus, tmp_path / "run", steps=2) +
                          [f"audit.canaries={path}"])
        res = run_training(cfg, log=lambda *_: None)
    finally:
        recipe.Trainer = real
    ins = {c.id: c.repetitions for c in cs if c.inserted}
    held = {c.id for c in cs if not c.inserted}
    train_canaries = [i for i in seen["train"] if i.startswith("canary")]
    for cid, r in ins.items():
        assert sum(i.split("_rep")[0] == cid for i in train_canaries) == r
    assert not held & {i.split("_rep")[0] for i in seen["train"]}
    assert not any(i.startswith("canary") for i in seen["dev"])
    assert res["canaries"]["training_copies"] == sum(ins.values())
    assert res["test_utts"] == len(read_manifest(corpus / "test.jsonl"))  # test untouched

    # privasr audit run on the checkpoint: every canary scored, JSON + HTML written
    from privasr.cli import main

    out = tmp_path / "audit.json"
    assert main(["audit", "run", str(tmp_path / "run" / "last.pt"), str(path),
                 "--out", str(out)]) == 0
    a = json.loads(out.read_text())
    assert a["n"] == 10 and a["inserted"] == len(ins)
    assert {s["id"] for s in a["scores"]} == {c.id for c in cs}
    assert all(np.isfinite(s["loss"]) and 0 <= s["cer"] for s in a["scores"])
    assert 0 <= a["auc"] <= 1 and a["one_run"]["epsilon"] >= 0
    assert sum(r["inserted"] for r in a["by_repetitions"]) == len(ins)
    assert "data:image/png;base64" in out.with_suffix(".html").read_text()
    assert a["claimed_privacy"] is None


def test_canaries_already_in_dev_are_refused(tiny_corpus, tmp_path, one_thread):
    from privasr.audit.canaries import Canary, write_canaries
    from privasr.recipes.train import run_training

    corpus, _, _ = tiny_corpus
    dev = read_manifest(corpus / "dev.jsonl")
    leak = [Canary(dev[0], True, 1, 1.0, "resample"), Canary(dev[1], False, 1, 1.0, "resample")]
    write_canaries(tmp_path / "leak.jsonl", leak)
    cfg = load_config("configs/demo.yaml", _overrides(corpus, tmp_path / "run", steps=1) +
                      [f"audit.canaries={tmp_path / 'leak.jsonl'}"])
    with pytest.raises(CanaryError, match="dev set"):
        run_training(cfg, log=lambda *_: None)


def test_infeasible_inserted_canaries_are_left_out_with_a_warning(tiny_corpus, tmp_path):
    from privasr.audit.insertion import add_canaries
    from privasr.data.dataset import AsrDataset
    from privasr.data.tokenizer import CharTokenizer

    with pytest.warns(UserWarning, match="CTC-infeasible"):
        cs = make_canaries(tmp_path / "c", CanaryConfig(n=8, words=3, factor=2.8, seed=2,
                                                        on_infeasible="warn"),
                           vocab=VOCAB, log=lambda *_: None)
    tok = CharTokenizer()
    empty = AsrDataset([], [], tok)
    with pytest.warns(UserWarning, match="not inserted"):
        ds, info = add_canaries(empty, tmp_path / "c" / "canaries.jsonl", tok, log=lambda *_: None)
    feasible = {c.id for c in cs if ctc_slack(c.text, round(c.utt.duration * 16000)) >= 1}
    assert {c.id in feasible for c in cs if c.inserted} == {True, False}  # a mix at 2.8x
    assert info["infeasible_not_inserted"] == sum(c.inserted and c.id not in feasible for c in cs)
    assert {u.id.split("_rep")[0] for u in ds.utts} == {c.id for c in cs
                                                         if c.inserted and c.id in feasible}
    assert len(ds) == info["training_copies"]


def test_vocabulary_is_clean_wordfreq_and_wamerican():
    import re

    from privasr.audit.blocklist import blocked
    from privasr.audit.canaries import WAMERICAN, load_vocabulary

    v = load_vocabulary()
    assert 15000 < len(v) < 17000 and v[0] == "the" and len(set(v)) == len(v)
    known = set(WAMERICAN.read_text(encoding="utf-8", errors="ignore").split())
    assert all(re.fullmatch(r"[a-z]{2,}", w) and w in known and not blocked(w) for w in v)
    assert len(load_vocabulary(1000)) < 1000
