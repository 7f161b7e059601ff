"""import_commonvoice and `privasr corpus commonvoice` on a tiny Common Voice tree built here:
3 speakers, MP3 clips (48 kHz, one at 32 kHz) of sines in noise, a validated.tsv with the extra
columns of a real release."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from privasr.cli import main
from privasr.data.commonvoice import import_commonvoice, normalize_transcript
from privasr.data.manifest import (AudioError, ManifestError, SkipReport, load_audio,
                                   read_manifest, validate)

SPK = {k: (k * 64)[:64] for k in "abc"}  # client_id: a long hex hash
HEADER = ("client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\t"
          "gender\taccents\tvariant\tlocale\tsegment")
# path -> (speaker, raw sentence, normalised text, seconds, rate, tone Hz)
CLIPS = {
    "common_voice_en_1.mp3": ("a", "Hello, World!", "hello world", 0.8, 48000, 440.0),
    "common_voice_en_2.mp3": ("a", "It\u2019s a \u201ctest\u201d \u2014 isn\u2019t it?",
                              "it's a test isn't it", 1.0, 48000, 660.0),
    "common_voice_en_3.mp3": ("b", "  The well-known 'QUOTE'.  ", "the well known quote", 0.6,
                              48000, 550.0),
    "common_voice_en_4.mp3": ("b", "Caf\u00e9 au lait; na\u00efve \"ideas\"",
                              "cafe au lait naive ideas", 1.2, 32000, 880.0),
    "common_voice_en_5.mp3": ("c", "ok then", "ok then", 0.7, 48000, 330.0),
}


def _signal(seconds: float, rate: int, hz: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (0.4 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


def _line(path: str, speaker: str, sentence: str) -> str:
    return "\t".join([SPK[speaker], path, "f00d", sentence, "", "2", "0", "twenties", "male", "",
                      "", "en", ""])


def _tsv(root: Path, rows: dict[str, tuple[str, str]], name: str = "validated") -> Path:
    lines = [HEADER] + [_line(p, s, t) for p, (s, t) in rows.items()]
    (tsv := root / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv


@pytest.fixture
def cv(tmp_path) -> Path:
    root = tmp_path / "cv-corpus" / "en"
    (root / "clips").mkdir(parents=True)
    for i, (path, (_, _, _, secs, rate, hz)) in enumerate(CLIPS.items()):
        sf.write(root / "clips" / path, _signal(secs, rate, hz, i), rate, format="MP3")
    _tsv(root, {p: (c[0], c[1]) for p, c in CLIPS.items()})
    return root


def _set_line(tsv: Path, lineno: int, text: str) -> None:
    lines = tsv.read_text(encoding="utf-8").splitlines()
    lines[lineno - 1] = text
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_normalize_transcript():
    for _, raw, want, *_ in CLIPS.values():
        assert normalize_transcript(raw) == want
    assert normalize_transcript("?! -- ...") == ""
    assert normalize_transcript("Stra\u00dfe 3") == "strasse 3"  # digits are left to the caller


def test_import_rows(cv, tmp_path):
    out = tmp_path / "m" / "validated.jsonl"
    utts = import_commonvoice(cv, out)
    assert [u.id for u in utts] == sorted(p.removesuffix(".mp3") for p in CLIPS)
    for u in utts:
        spk, _, text, secs, _, _ = CLIPS[u.id + ".mp3"]
        assert (u.speaker, u.text, u.sampling_rate) == (SPK[spk], text, 16000)
        assert u.duration == pytest.approx(secs, abs=0.1)
        assert Path(u.audio) == (tmp_path / "m" / "clips_16000" / f"{u.id}.flac").resolve()
    assert len({u.speaker for u in utts}) == 3
    for line in out.read_text().splitlines():
        assert not Path(json.loads(line)["audio"]).is_absolute()
    assert read_manifest(out) == utts
    assert validate(utts) == utts  # durations and rates match the files


def test_imported_clip_trains(cv, tmp_path):
    """Through load_audio and the features training computes, at 16 kHz, with the tone intact."""
    from privasr.data.dataset import compute_features
    from privasr.data.features import FeatureConfig

    import_commonvoice(cv, tmp_path / "m.jsonl")
    utts = read_manifest(tmp_path / "m.jsonl")
    for u in (utts[0], utts[3]):  # from 48 kHz and from 32 kHz
        x = load_audio(u)
        assert x.dtype == np.float32 and x.shape == (round(u.duration * 16000),)
        spectrum = np.abs(np.fft.rfft(x))
        peak = np.fft.rfftfreq(x.size, 1 / 16000)[spectrum.argmax()]
        assert peak == pytest.approx(CLIPS[u.id + ".mp3"][5], abs=5)  # not shifted by 48/16
    fb, wav = (compute_features(utts[:2], FeatureConfig(kind=k), progress=False)
               for k in ("fbank", "waveform"))
    for u, f, w in zip(utts, fb, wav):
        assert f.shape[1] == 80 and abs(f.shape[0] - u.duration * 100) <= 3
        assert w.shape == (round(u.duration * 16000), 1)


def test_reimport_reuses_conversions(cv, tmp_path):
    out = tmp_path / "m.jsonl"
    utts = import_commonvoice(cv, out)
    stamps = {u.id: Path(u.audio).stat().st_mtime_ns for u in utts}
    first = out.read_bytes()
    _tsv(cv, {"common_voice_en_5.mp3": ("c", "ok then")}, name="test")
    assert [u.id for u in import_commonvoice(cv, tmp_path / "test.jsonl", split="test")] == \
        ["common_voice_en_5"]
    again = import_commonvoice(cv, out)
    assert {u.id: Path(u.audio).stat().st_mtime_ns for u in again} == stamps
    assert out.read_bytes() == first
    assert not list((tmp_path / "clips_16000").glob(".*"))  # no temporary files left


# ---------------------------------------------------------------- problems naming file and line
def _missing_clip(cv):
    (cv / "clips" / "common_voice_en_2.mp3").unlink()
    return cv / "clips" / "common_voice_en_2.mp3", 3, "audio file not found", "missing audio", \
        AudioError


def _empty_clip(cv):
    (cv / "clips" / "common_voice_en_2.mp3").write_bytes(b"")
    return cv / "clips" / "common_voice_en_2.mp3", 3, "audio file is empty", "empty audio", \
        AudioError


def _unreadable_clip(cv):
    (cv / "clips" / "common_voice_en_2.mp3").write_bytes(b"not an mp3 at all " * 50)
    return cv / "clips" / "common_voice_en_2.mp3", 3, "cannot read audio", "unreadable audio", \
        AudioError


def _duplicate_path(cv):
    tsv = cv / "validated.tsv"
    with open(tsv, "a", encoding="utf-8") as f:
        f.write(_line("common_voice_en_2.mp3", "c", "Listed twice") + "\n")
    return tsv, 7, "duplicate clip 'common_voice_en_2.mp3'", "duplicate path", ManifestError


def _empty_sentence(cv):
    _set_line(cv / "validated.tsv", 3, _line("common_voice_en_2.mp3", "a", " ?! \u2014 "))
    return cv / "validated.tsv", 3, "empty sentence", "empty sentence", ManifestError


def _digits(cv):
    _set_line(cv / "validated.tsv", 3, _line("common_voice_en_2.mp3", "a", "I have 3 cats"))
    return cv / "validated.tsv", 3, "'3' outside the alphabet", "unsupported characters", \
        ManifestError


def _short_line(cv):
    _set_line(cv / "validated.tsv", 3, "\t".join([SPK["a"], "common_voice_en_2.mp3", "hi"]))
    return cv / "validated.tsv", 3, "3 tab-separated field(s), the header has 13", \
        "bad TSV line", ManifestError


def _escaping_path(cv):
    _set_line(cv / "validated.tsv", 3, _line("../common_voice_en_2.mp3", "a", "hello"))
    return cv / "validated.tsv", 3, "not a file name inside clips/", "bad TSV line", \
        ManifestError


CASES = [_missing_clip, _empty_clip, _unreadable_clip, _duplicate_path, _empty_sentence, _digits,
         _short_line, _escaping_path]


@pytest.mark.parametrize("breaker", CASES, ids=lambda f: f.__name__.strip("_"))
def test_import_bad_input(cv, tmp_path, breaker):
    path, lineno, needle, reason, exc = breaker(cv)
    out = tmp_path / "m.jsonl"
    with pytest.raises(exc) as ei:
        import_commonvoice(cv, out)
    msg = str(ei.value)
    assert str(path) in msg and needle in msg, msg
    assert f"{cv / 'validated.tsv'}:{lineno}" in msg, msg
    assert not out.exists()  # no manifest on failure

    report = SkipReport()
    utts = import_commonvoice(cv, out, on_error="skip", report=report)
    assert report.reasons == {reason: 1}, report.reasons
    assert str(path) in report.examples[0]
    expected = {p.removesuffix(".mp3") for p in CLIPS}
    if breaker is not _duplicate_path:
        expected.discard("common_voice_en_2")
    assert {u.id for u in utts} == expected
    assert read_manifest(out) == utts


def test_skip_counts_several_problems(cv, tmp_path):
    _missing_clip(cv)
    _set_line(cv / "validated.tsv", 4, _line("common_voice_en_3.mp3", "b", "..."))
    (cv / "clips" / "common_voice_en_5.mp3").write_bytes(b"junk" * 100)
    report = SkipReport()
    utts = import_commonvoice(cv, tmp_path / "m.jsonl", on_error="skip", report=report)
    assert [u.id for u in utts] == ["common_voice_en_1", "common_voice_en_4"]
    assert report.reasons == {"missing audio": 1, "empty sentence": 1, "unreadable audio": 1}
    assert "skipped 3 utterance(s)" in report.summary()


def test_structural_problems_always_raise(cv, tmp_path):
    out = tmp_path / "m.jsonl"
    for mode in ("raise", "skip"):
        with pytest.raises(ManifestError, match=r"train\.tsv: Common Voice split 'train' not "
                                                r"found \(TSV files here: validated\)"):
            import_commonvoice(cv, out, split="train", on_error=mode)
        with pytest.raises(ManifestError, match="not found.*nowhere"):
            import_commonvoice(tmp_path / "nowhere", out, on_error=mode)
    tsv = _tsv(cv, {}, name="dev")
    _set_line(tsv, 1, "client_id\tfilename\tsentence\tage")
    with pytest.raises(ManifestError) as ei:
        import_commonvoice(cv, out, split="dev", on_error="skip")
    assert f"{tsv}:1: header lacks column(s) path" in str(ei.value)
    with pytest.raises(ValueError, match="on_error"):
        import_commonvoice(cv, out, on_error="ignore")
    assert not out.exists()


# ---------------------------------------------------------------------------------------- CLI
def test_cli_writes_manifest(cv, tmp_path, capsys):
    out = tmp_path / "cv" / "validated.jsonl"
    assert main(["corpus", "commonvoice", str(cv), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout and "speakers" in stdout
    assert [u.id for u in read_manifest(out)] == sorted(p.removesuffix(".mp3") for p in CLIPS)

    _missing_clip(cv)
    assert main(["corpus", "commonvoice", str(cv), "--out", str(out)]) == 2
    assert "common_voice_en_2.mp3: audio file not found" in capsys.readouterr().err
    assert main(["corpus", "commonvoice", str(cv), "--out", str(out), "--split", "validated",
                 "--skip-bad"]) == 0
    assert "skipped 1 utterance(s): 1 missing audio" in capsys.readouterr().out
    assert len(read_manifest(out)) == len(CLIPS) - 1
