"""Import a LibriSpeech-layout corpus into a manifest.

Layout: ``root/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`` next to
``<speaker>-<chapter>.trans.txt``, whose lines are ``<utt-id> TRANSCRIPT IN CAPS``. ``root`` may be
one split (``LibriSpeech/dev-clean``) or a folder above several: it is scanned recursively for
``*.trans.txt``. The speaker is the folder two levels above the audio (``<speaker>``), the text is
lowercased with whitespace collapsed, and duration / sampling rate come from the FLAC header.

Every problem names the file (and the transcript line): a listed utterance whose FLAC is missing,
empty, unreadable or not at the expected rate, a FLAC that no transcript line lists, an empty
transcript, a duplicate utterance id. ``on_error="raise"`` raises on the first one
(:class:`ManifestError` for transcripts, :class:`AudioError` for audio); ``on_error="skip"`` leaves
the utterance out and counts it in ``report``. Hidden files (``.*``, e.g. macOS ``._*``) are
ignored. Only FLAC headers are read (fast); a FLAC truncated after its header passes here and
fails in :func:`load_audio`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import soundfile as sf

from privasr.data.manifest import (AudioError, ManifestError, OnError, SkipReport, Utterance,
                                   ProblemSink, write_manifest)

__all__ = ["import_librispeech"]


def _read_transcripts(trans: Path, problem: ProblemSink) -> list[tuple[int, str, str | None]]:
    """``(line number, utterance id, lowercased text)`` for each non-blank line of a trans.txt.

    The text is ``None`` on a line that is not valid UTF-8 (its id is still returned, so that
    its FLAC is not reported a second time as having no transcript line).
    """
    try:
        raw = trans.read_bytes()
    except OSError as e:
        problem(ManifestError(f"{trans}: cannot read transcript file ({e.strerror or e})"),
                "unreadable transcript file")
        return []
    rows: list[tuple[int, str, str | None]] = []
    for lineno, bline in enumerate(raw.splitlines(), 1):
        try:
            line, ok = bline.decode("utf-8"), True
        except UnicodeDecodeError:
            line, ok = bline.decode("utf-8", errors="replace"), False
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        text = " ".join(parts[1].split()).lower() if len(parts) > 1 else ""
        rows.append((lineno, parts[0], text if ok else None))
    return rows


def _audio_error(reason: str, message: str) -> AudioError:
    err = AudioError(message)
    err.reason = reason  # the SkipReport category
    return err


def _audio_info(flac: Path, utt_id: str, where: str, expected_sr: int) -> tuple[float, int]:
    """Duration and rate of one listed FLAC, or :class:`AudioError` naming it and the line."""
    ctx = f"(utterance {utt_id!r}, listed at {where})"
    if not flac.is_file():
        raise _audio_error("missing audio", f"{flac}: audio file not found {ctx}")
    if flac.stat().st_size == 0:
        raise _audio_error("empty audio", f"{flac}: audio file is empty {ctx}")
    try:
        info = sf.info(str(flac))
    except Exception as e:  # LibsndfileError / RuntimeError on corrupt files
        raise _audio_error("unreadable audio", f"{flac}: cannot read audio ({e}) {ctx}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise _audio_error("empty audio", f"{flac}: audio file has no samples {ctx}")
    if info.samplerate != expected_sr:
        raise _audio_error("wrong sample rate", f"{flac}: sample rate {info.samplerate} Hz, "
                           f"expected {expected_sr} Hz {ctx}")
    return info.frames / info.samplerate, info.samplerate


def _visible(paths) -> list[Path]:
    """Sorted, without hidden files (macOS ``._x.flac`` resource forks from unpacking on a Mac)."""
    return sorted(p for p in paths if not p.name.startswith("."))


def import_librispeech(root: str | os.PathLike, out_manifest: str | os.PathLike, *,
                       on_error: OnError = "raise", report: SkipReport | None = None,
                       relative_to_manifest: bool = True,
                       sampling_rate: int = 16000) -> list[Utterance]:
    """Convert a LibriSpeech-layout tree under ``root`` into the manifest ``out_manifest``.

    Returns the utterances written, sorted by id, with absolute audio paths (the manifest holds
    paths relative to itself unless ``relative_to_manifest=False``). Bad items raise or, with
    ``on_error="skip"``, are left out and counted in ``report``. A root that is missing or holds
    no ``*.trans.txt`` always raises :class:`ManifestError`.
    """
    problem = ProblemSink(on_error, report)
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"LibriSpeech root not found or not a directory: {root}")
    trans_files = _visible(root.rglob("*.trans.txt"))
    if not trans_files:
        raise ManifestError(f"{root}: no *.trans.txt transcript files found (is this a "
                            "LibriSpeech split such as LibriSpeech/dev-clean?)")

    # Every .flac under root must be listed by a transcript file in its own folder.
    listed: dict[Path, set[str]] = defaultdict(set)
    first_seen: dict[str, str] = {}
    utts: list[Utterance] = []
    for trans in trans_files:
        chapter_dir = trans.parent
        speaker = chapter_dir.parent.name if chapter_dir.parent != chapter_dir else ""
        for lineno, utt_id, text in _read_transcripts(trans, problem):
            where = f"{trans}:{lineno}"
            listed[chapter_dir].add(utt_id)
            if text is None:
                problem(ManifestError(f"{where}: not valid UTF-8"), "bad transcript line")
                continue
            if not text:
                problem(ManifestError(f"{where}: empty transcript for utterance {utt_id!r}"),
                        "empty transcript")
                continue
            if utt_id in first_seen:
                problem(ManifestError(f"{where}: duplicate utterance id {utt_id!r} "
                                      f"(first at {first_seen[utt_id]})"), "duplicate id")
                continue
            first_seen[utt_id] = where
            flac = chapter_dir / f"{utt_id}.flac"
            try:
                duration, sr = _audio_info(flac, utt_id, where, sampling_rate)
            except AudioError as e:
                problem(e, e.reason)
                continue
            utts.append(Utterance(id=utt_id, audio=str(flac.resolve()), duration=duration,
                                  text=text, speaker=speaker, sampling_rate=sr))

    for flac in _visible(root.rglob("*.flac")):
        if flac.stem in listed.get(flac.parent, ()):
            continue
        here = _visible(flac.parent.glob("*.trans.txt"))
        if here:
            msg = f"{flac}: no transcript line for {flac.stem!r} in {', '.join(map(str, here))}"
        else:
            msg = f"{flac}: no *.trans.txt transcript file in {flac.parent}"
        problem(ManifestError(msg), "no transcript")

    utts.sort(key=lambda u: u.id)
    write_manifest(out_manifest, utts, relative_to_manifest=relative_to_manifest)
    return utts
