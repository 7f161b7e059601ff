"""Every kind of bad input: with on_error="raise" the error names the file (and the manifest or
transcript line); with on_error="skip" the item is left out and counted in the SkipReport."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from privasr.data.librispeech import import_librispeech
from privasr.data.manifest import (AudioError, ManifestError, SkipReport, Utterance, load_audio,
                                   read_manifest, validate, write_manifest)

SR = 16000


def _tone(seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)


def _flac(path: Path, seconds: float = 0.5, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, _tone(seconds, sr), sr, format="FLAC", subtype="PCM_16")
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def _empty(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _utt(uid: str, audio: Path, duration: float = 0.5, sr: int = SR) -> Utterance:
    return Utterance(id=uid, audio=str(audio), duration=duration, text="hello world",
                     speaker="spk", sampling_rate=sr)


# --------------------------------------------------------------------------- audio (validate)

def _audio_cases(d: Path):
    """name -> (bad utterance, min_duration, text the message must contain)."""
    return {
        "missing": (_utt("b", d / "missing.flac"), 0.1, "not found"),
        "empty": (_utt("b", _empty(d / "empty.flac")), 0.1, "empty"),
        "corrupt": (_utt("b", _corrupt(d / "corrupt.flac")), 0.1, "cannot read"),
        "too_short": (_utt("b", _flac(d / "short.flac", 0.02), duration=0.02), 0.1, "too short"),
        "wrong_rate": (_utt("b", _flac(d / "8k.flac", 0.5, sr=8000)), 0.1, "sample rate 8000"),
        "duration_mismatch": (_utt("b", _flac(d / "long.flac", 1.5)), 0.1, "duration 1.500"),
        "no_samples": (_utt("b", _wav0(d / "nosamples.wav")), 0.1, "too short"),
    }


def _wav0(path: Path) -> Path:
    sf.write(path, np.zeros(0, np.int16), SR, format="WAV", subtype="PCM_16")
    assert path.stat().st_size > 0  # a header, no samples
    return path


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "too_short", "wrong_rate",
                                  "duration_mismatch", "no_samples"])
def test_bad_audio_through_manifest(tmp_path, case):
    good = _utt("a", _flac(tmp_path / "good.flac"))
    bad, min_dur, needle = _audio_cases(tmp_path)[case]
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, [good, bad])
    utts = read_manifest(manifest)
    assert [u.id for u in utts] == ["a", "b"]

    with pytest.raises(AudioError) as ei:
        validate(utts, min_duration=min_dur)
    msg = str(ei.value)
    assert bad.audio in msg and needle in msg and "'b'" in msg

    report = SkipReport()
    assert validate(utts, on_error="skip", report=report, min_duration=min_dur) == [utts[0]]
    assert report.total == 1 and report.reasons["bad audio"] == 1
    assert bad.audio in report.examples[0]
    assert "skipped 1" in report.summary()


def test_validate_skip_without_report_does_not_crash(tmp_path):
    utts = [_utt("a", tmp_path / "missing.flac")]
    assert validate(utts, on_error="skip") == []


@pytest.mark.parametrize("maker", [_corrupt, _empty, lambda p: p],
                         ids=["corrupt", "empty", "missing"])
def test_load_audio_names_the_file(tmp_path, maker):
    p = maker(tmp_path / "x.flac")
    with pytest.raises(AudioError, match="x.flac"):
        load_audio(_utt("x", p))


def test_load_audio_truncated_flac_names_the_file(tmp_path):
    # the header survives, so sf.info (and validate) accept it; decoding fails
    p = _flac(tmp_path / "t.flac", 1.0)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(AudioError, match="t.flac"):
        load_audio(_utt("t", p, duration=1.0))


def test_load_audio_wrong_rate_names_the_file(tmp_path):
    p = _flac(tmp_path / "r.flac", 0.5, sr=8000)
    with pytest.raises(AudioError, match="r.flac.*8000"):
        load_audio(_utt("r", p))


# --------------------------------------------------------------------------- manifest lines

GOOD = {"id": "a", "audio": "a.flac", "duration": 0.5, "text": "hi", "speaker": "s",
        "sampling_rate": SR}

BAD_LINES = {
    "missing_fields": (json.dumps({"id": "b", "audio": "b.flac", "text": "x"}),
                       "missing field(s) duration, speaker, sampling_rate"),
    "null_field": (json.dumps({**GOOD, "id": "b", "speaker": None}), "missing field(s) speaker"),
    "invalid_json": ('{"id": "b", "audio": ', "not valid JSON"),
    "not_object": ('["b", "b.flac"]', "expected a JSON object"),
    "empty_text": (json.dumps({**GOOD, "id": "b", "text": "   "}), "empty transcript"),
    "bad_number": (json.dumps({**GOOD, "id": "b", "duration": "long"}), "must be numbers"),
    "zero_duration": (json.dumps({**GOOD, "id": "b", "duration": 0}), "invalid duration"),
    "nan_duration": ('{"id": "b", "audio": "b.flac", "duration": NaN, "text": "x", '
                     '"speaker": "s", "sampling_rate": 16000}', "invalid duration"),
    "inf_rate": ('{"id": "b", "audio": "b.flac", "duration": 1, "text": "x", '
                 '"speaker": "s", "sampling_rate": Infinity}', "must be numbers"),
    "duplicate_id": (json.dumps(GOOD), "duplicate utterance id 'a'"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_manifest_line(tmp_path, case):
    line, needle = BAD_LINES[case]
    manifest = tmp_path / "m.jsonl"
    # line 1 good, line 2 blank (ignored, still counted), line 3 bad, line 4 good
    manifest.write_text(json.dumps(GOOD) + "\n\n" + line + "\n"
                        + json.dumps({**GOOD, "id": "c"}) + "\n")
    with pytest.raises(ManifestError) as ei:
        read_manifest(manifest)
    assert f"{manifest}:3:" in str(ei.value) and needle in str(ei.value)

    report = SkipReport()
    utts = read_manifest(manifest, on_error="skip", report=report)
    assert [u.id for u in utts] == ["a", "c"]
    assert report.reasons == {"bad manifest line": 1}
    assert f"{manifest}:3:" in report.examples[0]


def test_invalid_utf8_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"id": "\xff\xfe"}\n')
    with pytest.raises(ManifestError, match=rf"{manifest}:2: not valid UTF-8"):
        read_manifest(manifest)
    report = SkipReport()
    assert [u.id for u in read_manifest(manifest, on_error="skip", report=report)] == ["a"]
    assert report.total == 1


def test_missing_manifest(tmp_path):
    for mode in ("raise", "skip"):
        with pytest.raises(ManifestError, match="manifest not found: .*nope.jsonl"):
            read_manifest(tmp_path / "nope.jsonl", on_error=mode)


def test_relative_audio_resolves_against_manifest_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = tmp_path / "sub" / "m.jsonl"
    manifest.write_text(json.dumps({**GOOD, "audio": "../audio/a.flac"}) + "\n")
    (u,) = read_manifest(manifest)
    assert u.audio == str((tmp_path / "audio" / "a.flac").resolve())


# --------------------------------------------------------------------------- import_librispeech

def _tree(root: Path) -> Path:
    """A tiny dev-clean: speaker 19 / chapter 198 with utterances 0000-0002 (all good)."""
    d = root / "19" / "198"
    for n in range(3):
        _flac(d / f"19-198-000{n}.flac", 0.5 + 0.1 * n)
    (d / "19-198.trans.txt").write_text(
        "19-198-0000 NORTHANGER ABBEY\n19-198-0001 CHAPTER ONE\n19-198-0002 NO ONE WHO HAD\n")
    return d


def _set_line(trans: Path, lineno: int, text: str) -> None:
    lines = trans.read_text().splitlines()
    lines[lineno - 1] = text
    trans.write_text("\n".join(lines) + "\n")


def _missing_flac(d):
    (d / "19-198-0001.flac").unlink()
    return d / "19-198-0001.flac", 2, "audio file not found", "missing audio", AudioError


def _empty_flac(d):
    _empty(d / "19-198-0001.flac")
    return d / "19-198-0001.flac", 2, "audio file is empty", "empty audio", AudioError


def _corrupt_flac(d):
    _corrupt(d / "19-198-0001.flac")
    return d / "19-198-0001.flac", 2, "cannot read audio", "unreadable audio", AudioError


def _rate_8k(d):
    _flac(d / "19-198-0001.flac", 0.5, sr=8000)
    return d / "19-198-0001.flac", 2, "sample rate 8000 Hz, expected 16000", "wrong sample rate", \
        AudioError


def _no_samples(d):
    # header-only WAV bytes under a .flac name: libsndfile sniffs the format, 0 frames
    _wav0(d / "tmp.wav").rename(d / "19-198-0001.flac")
    return d / "19-198-0001.flac", 2, "no samples", "empty audio", AudioError


def _empty_transcript(d):
    _set_line(d / "19-198.trans.txt", 2, "19-198-0001   ")
    return d / "19-198.trans.txt", 2, "empty transcript for utterance '19-198-0001'", \
        "empty transcript", ManifestError


def _flac_without_line(d):
    _flac(d / "19-198-0003.flac")
    return d / "19-198-0003.flac", None, "no transcript line for '19-198-0003'", \
        "no transcript", ManifestError


def _flac_without_trans_file(d):
    p = _flac(d.parent.parent / "20" / "205" / "20-205-0000.flac")
    return p, None, "no *.trans.txt transcript file", "no transcript", ManifestError


def _duplicate_id(d):
    d2 = d.parent / "199"
    _flac(d2 / "19-198-0001.flac")
    (d2 / "19-199.trans.txt").write_text("19-198-0001 SAME ID AGAIN\n")
    return d2 / "19-199.trans.txt", 1, "duplicate utterance id '19-198-0001'", "duplicate id", \
        ManifestError


def _bad_utf8(d):
    t = d / "19-198.trans.txt"
    t.write_bytes(t.read_bytes().replace(b"CHAPTER ONE", b"CHAPTER \xff"))
    return t, 2, "not valid UTF-8", "bad transcript line", ManifestError


IMPORT_CASES = [_missing_flac, _empty_flac, _corrupt_flac, _rate_8k, _no_samples,
                _empty_transcript, _flac_without_line, _flac_without_trans_file, _duplicate_id,
                _bad_utf8]


@pytest.mark.parametrize("breaker", IMPORT_CASES, ids=lambda f: f.__name__.strip("_"))
def test_import_bad_input(tmp_path, breaker):
    root = tmp_path / "dev-clean"
    d = _tree(root)
    path, lineno, needle, reason, exc = breaker(d)
    out = tmp_path / "m.jsonl"

    with pytest.raises(exc) as ei:
        import_librispeech(root, out)
    msg = str(ei.value)
    assert str(path) in msg and needle in msg, msg
    if lineno is not None:
        assert f"{path}:{lineno}" in msg if path.suffix == ".txt" else \
            f"{d / '19-198.trans.txt'}:{lineno}" in msg, msg
    assert not out.exists()  # nothing half-written

    report = SkipReport()
    utts = import_librispeech(root, out, on_error="skip", report=report)
    assert report.reasons == {reason: 1}, report.reasons
    assert str(path) in report.examples[0]
    expected = {"19-198-0000", "19-198-0001", "19-198-0002"}
    if breaker not in (_flac_without_line, _flac_without_trans_file, _duplicate_id):
        expected.discard("19-198-0001")
    assert {u.id for u in utts} == expected
    assert read_manifest(out) == utts
    assert validate(utts) == utts


def test_import_good_tree(tmp_path):
    d = _tree(tmp_path / "dev-clean")
    _corrupt(d / "._19-198-0000.flac")  # macOS resource forks are ignored
    _corrupt(d / "._19-198.trans.txt")
    utts = import_librispeech(tmp_path / "dev-clean", tmp_path / "m.jsonl")
    assert [(u.id, u.text, u.speaker) for u in utts] == [
        ("19-198-0000", "northanger abbey", "19"), ("19-198-0001", "chapter one", "19"),
        ("19-198-0002", "no one who had", "19")]
    assert [u.duration for u in utts] == pytest.approx([0.5, 0.6, 0.7])


def test_import_skip_counts_several_problems(tmp_path):
    root = tmp_path / "dev-clean"
    d = _tree(root)
    _missing_flac(d)
    _empty_transcript(d)  # same utterance 0001: counted once, as the transcript problem
    _corrupt(d / "19-198-0002.flac")
    report = SkipReport()
    utts = import_librispeech(root, tmp_path / "m.jsonl", on_error="skip", report=report)
    assert [u.id for u in utts] == ["19-198-0000"]
    assert report.reasons == {"empty transcript": 1, "unreadable audio": 1}


def test_import_missing_or_empty_root(tmp_path):
    for mode in ("raise", "skip"):
        with pytest.raises(ManifestError, match="not found.*nowhere"):
            import_librispeech(tmp_path / "nowhere", tmp_path / "m.jsonl", on_error=mode)
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(ManifestError, match=r"empty: no \*\.trans\.txt"):
            import_librispeech(tmp_path / "empty", tmp_path / "m.jsonl", on_error=mode)


def test_import_rejects_unknown_on_error(tmp_path):
    _tree(tmp_path / "dev-clean")
    with pytest.raises(ValueError, match="on_error"):
        import_librispeech(tmp_path / "dev-clean", tmp_path / "m.jsonl", on_error="ignore")
