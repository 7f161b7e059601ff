import json
import os
import subprocess

import numpy as np
import soundfile as sf

from privasr.data.espeak import Speaker, _wav_data, espeak_binary, list_variants, synthesize
from privasr.data.manifest import read_manifest, validate
from privasr.data.synth import SPLITS, SynthConfig, ctc_feasible, plan_corpus, synthesize_corpus


def _splits(out):
    return {s: read_manifest(out / f"{s}.jsonl") for s in SPLITS}


def test_manifests_validate_and_splits_are_disjoint(tiny_corpus):
    out, _, summary = tiny_corpus
    splits = _splits(out)
    for s, utts in splits.items():
        assert utts, f"{s} split is empty"
        assert validate(utts) == utts
        for u in utts:
            assert u.sampling_rate == 16000 and sf.info(u.audio).samplerate == 16000
    spk = {s: {u.speaker for u in utts} for s, utts in splits.items()}
    txt = {s: {u.text for u in utts} for s, utts in splits.items()}
    for a, b in [("train", "dev"), ("train", "test"), ("dev", "test")]:
        assert not spk[a] & spk[b], f"speakers shared by {a} and {b}"
        assert not txt[a] & txt[b], f"sentences shared by {a} and {b}"
    assert summary["utterances"]["train"] == len(splits["train"])
    assert 0.03 < sum(summary["hours"].values()) < 0.08


def test_second_run_does_no_work(tiny_corpus):
    out, cfg, _ = tiny_corpus
    files = sorted(out.rglob("*"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = synthesize_corpus(out, cfg, workers=2, progress=False)
    assert again["cached"] is True
    assert sorted(out.rglob("*")) == files
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_interrupted_run_resumes_and_only_redoes_missing(tmp_path):
    cfg = SynthConfig(hours=0.01, speakers=10, seed=3)
    first = synthesize_corpus(tmp_path, cfg, progress=False)
    flacs = sorted(tmp_path.rglob("*.flac"))
    # simulate a kill: manifests/config not yet written, some audio missing, a stray temp file
    for f in [tmp_path / "config.json", *(tmp_path / f"{s}.jsonl" for s in SPLITS), *flacs[:3]]:
        f.unlink()
    (flacs[5].parent / ".stray.flac.tmp").write_bytes(b"partial")
    kept = {f: f.stat().st_mtime_ns for f in flacs[3:]}
    second = synthesize_corpus(tmp_path, cfg, progress=False)
    assert second["utterances"] == first["utterances"]
    assert all(f.exists() for f in flacs)
    assert all(f.stat().st_mtime_ns == t for f, t in kept.items())


def test_other_settings_refused_without_force(tiny_corpus):
    import pytest

    from privasr.data.synth import CorpusExistsError

    out, cfg, _ = tiny_corpus
    with pytest.raises(CorpusExistsError, match="--force"):
        synthesize_corpus(out, SynthConfig(hours=0.05, speakers=20, seed=1), progress=False)


def test_plan_is_deterministic_and_has_many_distinct_speakers():
    cfg = SynthConfig(hours=0.5, speakers=150, seed=7)
    a, b = plan_corpus(cfg), plan_corpus(cfg)
    assert a == b
    speakers = {u.speaker for u in a}
    assert len(speakers) == 150
    assert len({(s.voice, s.variant) for s in speakers}) == 150
    assert plan_corpus(SynthConfig(hours=0.5, speakers=150, seed=8)) != a


def test_default_corpus_has_at_least_100_speakers():
    assert SynthConfig().speakers >= 100
    assert "whisper" not in list_variants() and "Demonic" not in list_variants()


def test_resampling_keeps_duration():
    """22.05 kHz -> 16 kHz must keep the duration (160/441 would halve it)."""
    spk = Speaker("s", "en-us", "m3", 50, 160)
    text = "the quick brown fox jumps over the lazy dog"
    raw = subprocess.run([espeak_binary(), *spk.espeak_args(), "--stdout", text],
                         capture_output=True, check=True).stdout
    n22 = len(_wav_data(raw))
    y = synthesize(text, spk)
    assert abs(len(y) / 16000 - n22 / 22050) < 0.01
    assert np.abs(y).max() <= 0.891


def test_ctc_feasibility():
    assert ctc_feasible("hello world", 16000 * 2)  # 50 output frames for 11 labels (+1 repeat)
    assert not ctc_feasible("a" * 30, 16000 * 1)  # 24 frames cannot hold 30 + 29 repeats
