import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from privasr.errors import ConfigError
from privasr.config import load_config
from privasr.data.dataset import AsrDataset, DurationBucketSampler, compute_features
from privasr.data.manifest import read_manifest
from privasr.data.tokenizer import CharTokenizer
from privasr.models.conformer import ConformerCTC, config_for
from privasr.errors import NonFiniteLossError
from privasr.train.trainer import Trainer


def _overrides(corpus, out, steps=6, extra=()):
    return [f"out_dir={out}", f"data.corpus_dir={corpus}", "model.size=tiny", "threads=1",
            f"optim.max_steps={steps}", "optim.warmup_steps=2", "eval_every=1000",
            "ckpt_every=1", "log_every=1", "progress=false", "data.feature_workers=1",
            "batch.max_seconds=30", *extra]


def _cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "privasr.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _params(path):
    return torch.load(path, weights_only=False)["model"]


def kill_when_checkpointed(p, run, min_step, timeout=300):
    """SIGKILL process ``p`` once ``run/last.pt`` holds step >= min_step; the step, or None."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if (run / "last.pt").exists():
            step = torch.load(run / "last.pt", weights_only=False)["position"]["step"]
            if step >= min_step:
                p.send_signal(signal.SIGKILL)
                p.wait()
                return step
        time.sleep(0.05)
    p.wait()
    return None


def test_tiny_end_to_end_train_and_eval(tiny_corpus, tmp_path):
    from privasr.recipes.train import run_training

    corpus, _, _ = tiny_corpus
    cfg = load_config("configs/demo.yaml", _overrides(corpus, tmp_path / "run", steps=4,
                                                      extra=["eval_every=2"]))
    res = run_training(cfg, log=lambda *_: None)
    assert res["steps"] == 4
    assert 0.0 <= res["test_cer"] and math.isfinite(res["test_loss"])
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test_wer"] == res["test_wer"]
    rows = (tmp_path / "run" / "train.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,loss,lr") and len(rows) == 5
    assert len((tmp_path / "run" / "dev.csv").read_text().strip().splitlines()) == 3
    from privasr.report.html import write_report

    html = write_report(tmp_path / "run", "t", {"x": [{"a": 1.0}]}).read_text()
    assert html.count("data:image/png;base64") == 2

    # privasr eval (greedy + beam with a word LM from the training text) and transcribe
    from privasr.cli import main

    ckpt, test = tmp_path / "run" / "last.pt", corpus / "test.jsonl"
    assert main(["eval", str(ckpt), str(test), "--beam", "4", "--lm",
                 str(corpus / "train.jsonl"), "--out", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert set(ev["results"]) == {"greedy", "beam4+lm"}
    assert ev["results"]["greedy"]["wer"] == pytest.approx(res["test_wer"])
    audio = read_manifest(test)[0].audio
    assert main(["transcribe", str(ckpt), audio]) == 0


def test_kill_and_resume_gives_identical_parameters(tiny_corpus, tmp_path):
    corpus, _, _ = tiny_corpus
    steps = 8
    ref = _cli(["train", "configs/demo.yaml", *_overrides(corpus, tmp_path / "ref", steps)])
    out = ref.communicate(timeout=600)[0].decode()
    assert ref.returncode == 0, out

    run = tmp_path / "killed"
    p = _cli(["train", "configs/demo.yaml", *_overrides(corpus, run, steps)])
    killed_at = kill_when_checkpointed(p, run, 3)
    assert killed_at is not None and killed_at < steps, "run ended before it could be killed"
    r = _cli(["train", "configs/demo.yaml", *_overrides(corpus, run, steps)])
    out = r.communicate(timeout=600)[0].decode()
    assert r.returncode == 0, out
    assert "resumed from" in out
    a, b = _params(tmp_path / "ref" / "last.pt"), _params(run / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs after kill + resume"
    # the CSV log has no duplicated steps after the resume
    steps_logged = [int(l.split(",")[0]) for l in (run / "train.csv").read_text().split()[1:]]
    assert steps_logged == list(range(1, steps + 1))


def _tiny_trainer(tiny_corpus, tmp_path, **cfg_over):
    corpus, _, _ = tiny_corpus
    cfg = load_config("configs/demo.yaml", _overrides(corpus, tmp_path, steps=3) +
                      [f"{k}={v}" for k, v in cfg_over.items()])
    utts = read_manifest(corpus / "train.jsonl")[:6]
    tok = CharTokenizer()
    feats = compute_features(utts, progress=False)
    ds = AsrDataset(utts, feats, tok)
    model = ConformerCTC(config_for("tiny", vocab_size=tok.vocab_size))
    return Trainer(cfg, model, ds, None, list(tok.symbols)), ds


def test_nonfinite_loss_is_reported_not_trained_on(tiny_corpus, tmp_path):
    trainer, ds = _tiny_trainer(tiny_corpus, tmp_path / "a")
    for i in range(len(ds)):
        ds.feats[i] = ds.feats[i].clone()
        ds.feats[i][0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite CTC loss for \d+ utterance\(s\): spk"):
        trainer.fit()


def test_nonfinite_loss_skipped_and_counted_when_asked(tiny_corpus, tmp_path):
    trainer, ds = _tiny_trainer(tiny_corpus, tmp_path / "b", on_nonfinite="skip")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ds.feats[:] = [f.clone().fill_(float("nan")) for f in ds.feats]
    res = trainer.fit()
    assert res.skipped_nonfinite == 3
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_training_time_adds_up_over_resumed_invocations(tiny_corpus, tmp_path):
    first = _tiny_trainer(tiny_corpus, tmp_path)[0].fit()
    assert first.total_wall_seconds == pytest.approx(first.wall_seconds, abs=0.05)
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["train_seconds"]
    assert 0 < saved <= first.total_wall_seconds
    again, _ = _tiny_trainer(tiny_corpus, tmp_path, **{"optim.max_steps": 5})
    assert again.resume() and again.train_seconds == saved
    second = again.fit()
    assert second.steps == 5
    assert second.total_wall_seconds == pytest.approx(saved + second.wall_seconds, abs=0.05)
    # a finished run entered again reports the stored total, not this call's ~0 s
    done, _ = _tiny_trainer(tiny_corpus, tmp_path, **{"optim.max_steps": 5})
    assert done.resume() and done.fit().total_wall_seconds == pytest.approx(
        torch.load(tmp_path / "last.pt", weights_only=False)["train_seconds"], abs=0.05)
    # a checkpoint from before the total was recorded: unknown, not a wrong number
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    del ck["train_seconds"]
    torch.save(ck, tmp_path / "last.pt")
    old, _ = _tiny_trainer(tiny_corpus, tmp_path, **{"optim.max_steps": 5})
    assert old.resume() and old.fit().total_wall_seconds is None


def test_bucket_sampler_covers_every_utterance_once_and_is_deterministic():
    durs = [1.0 + (i % 7) for i in range(50)]
    s = DurationBucketSampler(durs, max_seconds=20, seed=1)
    b0 = s.batches(0)
    assert sorted(i for b in b0 for i in b) == list(range(50))
    assert all(max(durs[i] for i in b) * len(b) <= 20 for b in b0)
    assert s.batches(0) == b0 and s.batches(1) != b0


def test_config_rejects_unknown_keys_and_bad_types():
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config("configs/demo.yaml", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="optim.max_steps"):
        load_config("configs/demo.yaml", ["optim.max_steps=abc"])
    cfg = load_config("configs/demo.yaml", ["optim.lr=0.01", "model.size=tiny"])
    assert cfg.optim.lr == 0.01 and cfg.model.size == "tiny"


def test_speed_perturbed_copies_are_added_with_scaled_length(tiny_corpus, tmp_path):
    from privasr.data.manifest import SkipReport
    from privasr.data.splits import load_split

    corpus, _, _ = tiny_corpus
    cfg = load_config("configs/demo.yaml", _overrides(corpus, tmp_path, extra=[
        "augment.speed_perturb=[0.9, 1.1]"]))
    assert cfg.augment.speed_perturb == [0.9, 1.1]
    rep = SkipReport()
    ds = load_split(corpus / "dev.jsonl", cfg, CharTokenizer(), rep, speeds=[0.9, 1.1])
    n = len(read_manifest(corpus / "dev.jsonl"))
    assert len(ds) + rep.total == 3 * n
    base = {u.id: f.shape[0] for u, f in zip(ds.utts, ds.feats) if "_sp" not in u.id}
    for u, f in zip(ds.utts, ds.feats):
        if "_sp" in u.id:
            orig, speed = u.id.split("_sp")
            assert abs(f.shape[0] - base[orig] / float(speed)) <= 3
