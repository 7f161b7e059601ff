"""import_librispeech + corpus_stats on a tiny LibriSpeech-layout tree of real human speech.

The speech is the 5 public-domain LibriVox clips (Sense and Sensibility, 16 kHz) shipped by the
Debian package ``pocketsphinx-testdata``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from privasr.data.librispeech import import_librispeech
from privasr.data.manifest import SkipReport, load_audio, read_manifest, validate
from privasr.data.stats import corpus_stats, format_stats

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")

# clip -> (speaker, chapter, utterance number); two fake speakers, one chapter each
LAYOUT = {
    "sense_and_sensibility_01_austen_64kb-0870": ("1089", "134686", "0000"),
    "sense_and_sensibility_01_austen_64kb-0880": ("1089", "134686", "0001"),
    "sense_and_sensibility_01_austen_64kb-0890": ("1089", "134686", "0002"),
    "sense_and_sensibility_01_austen_64kb-0920": ("237", "126133", "0000"),
    "sense_and_sensibility_01_austen_64kb-0930": ("237", "126133", "0001"),
}


def _librivox_transcripts() -> dict[str, str]:
    out = {}
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        m = re.fullmatch(r"\s*<s>(.*)</s>\s*\((\S+)\)\s*", line)
        if m:
            out[m.group(2)] = " ".join(m.group(1).split())
    return out


if not all((LIBRIVOX / f"{clip}.wav").is_file() for clip in LAYOUT):
    if os.environ.get("CI"):
        raise RuntimeError(f"{LIBRIVOX}: LibriVox clips missing; install pocketsphinx-testdata")
    pytest.skip("needs Debian package pocketsphinx-testdata", allow_module_level=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A LibriSpeech/dev-clean-like tree; returns (split dir, {utt id: expected record})."""
    split = tmp_path_factory.mktemp("ls") / "LibriSpeech" / "dev-clean"
    texts = _librivox_transcripts()
    expected = {}
    lines: dict[Path, list[str]] = {}
    for clip, (spk, chap, n) in LAYOUT.items():
        x, sr = sf.read(LIBRIVOX / f"{clip}.wav", dtype="int16")
        assert sr == 16000
        d = split / spk / chap
        d.mkdir(parents=True, exist_ok=True)
        utt_id = f"{spk}-{chap}-{n}"
        sf.write(d / f"{utt_id}.flac", x, sr, format="FLAC", subtype="PCM_16")
        lines.setdefault(d / f"{spk}-{chap}.trans.txt", []).append(
            f"{utt_id} {texts[clip].upper()}")
        expected[utt_id] = dict(text=texts[clip], speaker=spk, duration=len(x) / sr,
                                samples=x, path=(d / f"{utt_id}.flac").resolve())
    for trans, ls in lines.items():
        trans.write_text("\n".join(ls) + "\n")
    return split, expected


def test_transcripts_parsed():
    texts = _librivox_transcripts()
    assert set(texts) == set(LAYOUT)
    assert texts["sense_and_sensibility_01_austen_64kb-0880"] == \
        "he was not an ill disposed young man"


def test_import_roundtrip(corpus, tmp_path):
    split, expected = corpus
    out = tmp_path / "manifests" / "dev.jsonl"
    utts = import_librispeech(split, out)

    assert [u.id for u in utts] == sorted(expected)
    for u in utts:
        e = expected[u.id]
        assert u.text == e["text"]  # lowercased back to the original
        assert u.speaker == e["speaker"]
        assert u.sampling_rate == 16000
        assert u.duration == pytest.approx(e["duration"], abs=1e-9)
        assert Path(u.audio) == e["path"]

    # manifest paths are relative to the manifest and read back to the same utterances
    for line in out.read_text().splitlines():
        assert not Path(json.loads(line)["audio"]).is_absolute()
    back = read_manifest(out)
    assert back == utts
    report = SkipReport()
    assert validate(back, on_error="skip", report=report) == back
    assert report.total == 0

    # the FLAC holds exactly the original speech samples
    u = back[0]
    x = load_audio(u)
    assert x.dtype == np.float32 and x.shape == (len(expected[u.id]["samples"]),)
    np.testing.assert_allclose(x, expected[u.id]["samples"] / 32768.0, atol=1e-6)


def test_import_absolute_paths_and_parent_root(corpus, tmp_path):
    split, expected = corpus
    out = tmp_path / "all.jsonl"
    # the LibriSpeech/ folder above the split is scanned recursively as well
    utts = import_librispeech(split.parent, out, relative_to_manifest=False)
    assert [u.id for u in utts] == sorted(expected)
    for line in out.read_text().splitlines():
        assert Path(json.loads(line)["audio"]).is_absolute()
    assert read_manifest(out) == utts


def test_import_is_deterministic(corpus, tmp_path):
    split, _ = corpus
    a, b = tmp_path / "a" / "m.jsonl", tmp_path / "b" / "m.jsonl"
    import_librispeech(split, a)
    import_librispeech(split, b)
    assert a.read_bytes() == b.read_bytes()


def test_corpus_stats(corpus, tmp_path):
    split, expected = corpus
    utts = import_librispeech(split, tmp_path / "m.jsonl")
    s = corpus_stats(utts)
    seconds = sum(e["duration"] for e in expected.values())
    assert seconds == pytest.approx(24.73)  # 395680 samples at 16 kHz
    assert s["hours"] == pytest.approx(seconds / 3600)
    assert s["utterances"] == 5
    assert s["speakers"] == 2
    words = [w for e in expected.values() for w in e["text"].split()]
    assert s["words"] == len(words) == 71
    assert s["vocabulary"] == len(set(words)) == 48
    assert s["characters"] == sum(len(e["text"]) for e in expected.values())
    assert s["mean_duration"] == pytest.approx(seconds / 5)
    assert s["min_duration"] == pytest.approx(2.99)
    assert s["max_duration"] == pytest.approx(7.1)
    assert (s["min_utts_per_speaker"], s["max_utts_per_speaker"]) == (2, 3)

    table = format_stats(s)
    rows = table.splitlines()
    assert len(rows) == len(s)
    assert len({len(r) for r in rows}) == 1  # aligned
    assert any(r.startswith("speakers") and r.endswith(" 2") for r in rows)
    assert "0.007" in table  # hours


def test_corpus_stats_empty():
    s = corpus_stats([])
    assert s["utterances"] == 0 and s["hours"] == 0 and s["speakers"] == 0
    assert s["min_utts_per_speaker"] == 0
    assert format_stats(s)
