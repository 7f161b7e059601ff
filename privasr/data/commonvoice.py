"""Import a Common Voice-layout corpus into a manifest.

Layout: ``root/<split>.tsv`` (``validated``, ``train``, ``dev``, ``test``, ...), tab-separated
with a header naming at least ``client_id``, ``path`` and ``sentence`` (other columns such as
``up_votes``, ``age``, ``locale`` are ignored), and the clips in ``root/clips/<path>`` (MP3,
typically 48 or 32 kHz mono). The speaker is ``client_id``, so a federated client is one
contributor; the utterance id is ``path`` without its extension; the text is
:func:`normalize_transcript` of ``sentence``. Lines are split on tabs only, never unquoted (Common
Voice sentences hold unbalanced ``"``), so every problem names the exact TSV line.

Sampling rate: every clip is decoded and resampled at import to ``sampling_rate`` (16 kHz),
written as 16-bit mono FLAC under ``audio_dir`` (default ``clips_16000/`` next to the manifest),
and the manifest lists those FLACs. privasr is 16 kHz throughout:
:func:`~privasr.data.manifest.load_audio` returns the file's samples as they are (it checks the
rate against the manifest, it does not resample), the fbank features then take them to be at
``FeatureConfig.sample_rate`` whatever the manifest says (a 48 kHz manifest would silently train
on features of audio slowed 3x), and ``privasr transcribe`` refuses other rates. Converting once
here keeps every consumer right without changing them, and later reads are cheap FLAC reads.
Resampling is ``scipy.signal.resample_poly`` with the exact rational ratio, as in
:mod:`privasr.data.features`. A converted FLAC newer than its MP3 (and at the right rate) is
reused, so importing again, or another split into the same folder (``train`` is a part of
``validated``), converts nothing twice; each FLAC is written atomically, so an interrupted import
leaves no torn file. Duration and rate are those of the converted FLAC (what training reads).

Text: not :func:`privasr.data.text_sources.normalize_text`, which rejects whole sentences that
espeak-ng would read differently from their spelling (abbreviations, single letters, acronyms):
a synthesis concern, and it would drop much of a human-read corpus. :func:`normalize_transcript`
maps into the tokenizer's alphabet ``[a-z' ]`` the same way (lowercase, typographic apostrophes to
``'``, punctuation and dashes to word breaks, quote marks at word edges dropped, whitespace
collapsed), and also folds accents (``café`` -> ``cafe``). A sentence that is empty afterwards,
or still holds characters outside the alphabet (digits, other scripts), is a problem.

Every problem names the file and TSV line: a bad line (not UTF-8, wrong number of fields, empty
``client_id``, a ``path`` that is absolute or climbs out with ``..``), a duplicate ``path``, an
empty or unsupported sentence, a listed clip that is missing, empty or unreadable.
``on_error="raise"`` raises on the first one (:class:`ManifestError` for TSV lines,
:class:`AudioError` for clips); ``on_error="skip"`` leaves the clip out and counts it in
``report``. A missing root, ``clips/`` folder or TSV, or a header without the three columns,
always raises. Clips that no line lists are not problems: ``clips/`` holds every split's clips.
"""

from __future__ import annotations

import os
import re
import unicodedata
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import soundfile as sf

from privasr.atomic import atomic_path
from privasr.data.manifest import (AudioError, ManifestError, OnError, SkipReport, Utterance,
                                   ProblemSink, write_manifest)

__all__ = ["REQUIRED_COLUMNS", "default_audio_dir", "import_commonvoice", "normalize_transcript"]

REQUIRED_COLUMNS = ("client_id", "path", "sentence")

_APOSTROPHES = str.maketrans({c: "'" for c in "\u2019\u2018\u02bc\u0060\u00b4\u2032"})
_OUTSIDE_ALPHABET = re.compile(r"[^a-z' ]")


def normalize_transcript(sentence: str) -> str:
    """``sentence`` in ``[a-z' ]`` as far as it maps there; may be empty, may keep digits etc.

    Typographic apostrophes become ``'``, case is folded, accents are dropped (NFKD), every
    punctuation mark, symbol, control or separator character except ``'`` becomes a space,
    apostrophes at word edges (quote marks) are dropped, and whitespace is collapsed.
    """
    s = unicodedata.normalize("NFKD", sentence.translate(_APOSTROPHES).casefold())
    chars = []
    for c in s:
        if unicodedata.combining(c):
            continue
        chars.append(" " if c != "'" and unicodedata.category(c)[0] in "PSCZ" else c)
    words = (w.strip("'") for w in "".join(chars).split())
    return " ".join(w for w in words if w)


def default_audio_dir(out_manifest: str | os.PathLike, sampling_rate: int = 16000) -> Path:
    """Where the converted clips go by default: ``clips_<rate>/`` next to the manifest."""
    return Path(out_manifest).parent / f"clips_{sampling_rate}"


def _error(cls: type[ValueError], reason: str, message: str) -> ValueError:
    """``cls(message)`` carrying its SkipReport category as ``.reason``."""
    err = cls(message)
    err.reason = reason
    return err


def _split_tsv(root: Path, split: str) -> Path:
    """``root/<split>.tsv``, or :class:`ManifestError` saying what is there instead."""
    if not root.is_dir():
        raise ManifestError(f"Common Voice root not found or not a directory: {root}")
    name = split.removesuffix(".tsv")
    if not name or "/" in name or "\\" in name:
        raise ManifestError(f"split must be a TSV name such as 'validated', not {split!r}")
    tsv = root / f"{name}.tsv"
    if not tsv.is_file():
        there = sorted(p.stem for p in root.glob("*.tsv") if not p.name.startswith("."))
        hint = (f"TSV files here: {', '.join(there)}" if there else
                "no *.tsv files here: is this a Common Voice language folder such as "
                "cv-corpus-17.0/en?")
        raise ManifestError(f"{tsv}: Common Voice split {name!r} not found ({hint})")
    if not (root / "clips").is_dir():
        raise ManifestError(f"{root / 'clips'}: clips folder not found (Common Voice audio is "
                            "root/clips/<path>)")
    return tsv


def _header(tsv: Path, line: bytes) -> dict[str, int]:
    """Column name -> index from the header line; raises unless the required columns are there."""
    try:
        names = line.decode("utf-8-sig").rstrip("\r\n").split("\t")
    except UnicodeDecodeError:
        raise ManifestError(f"{tsv}:1: header is not valid UTF-8") from None
    columns = {n.strip(): i for i, n in reversed(list(enumerate(names)))}
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"{tsv}:1: header lacks column(s) {', '.join(missing)} (it has: "
                            f"{', '.join(n for n in names if n) or 'nothing'}; a Common Voice "
                            f"TSV needs {', '.join(REQUIRED_COLUMNS)})")
    return columns


def _rows(tsv: Path, problem: ProblemSink) -> Iterator[tuple[str, dict[str, str]]]:
    """``(file:line, {required column: value})`` for each usable non-blank data line."""
    with open(tsv, "rb") as f:
        first = f.readline()
        if not first.strip():
            raise ManifestError(f"{tsv}: empty file, expected a header line naming "
                                f"{', '.join(REQUIRED_COLUMNS)}")
        columns = _header(tsv, first)
        width = first.rstrip(b"\r\n").count(b"\t") + 1
        for lineno, bline in enumerate(f, 2):
            bline = bline.rstrip(b"\r\n")
            if not bline.strip():
                continue
            where = f"{tsv}:{lineno}"
            try:
                fields = bline.decode("utf-8").split("\t")
            except UnicodeDecodeError:
                problem(ManifestError(f"{where}: not valid UTF-8"), "bad TSV line")
                continue
            if len(fields) != width:
                problem(ManifestError(f"{where}: {len(fields)} tab-separated field(s), the header "
                                      f"has {width}"), "bad TSV line")
                continue
            yield where, {c: fields[columns[c]] for c in REQUIRED_COLUMNS}


def _clip_name(path: str, where: str) -> PurePosixPath:
    """The ``path`` column as a safe path inside ``clips/``."""
    rel = PurePosixPath(path.strip())
    if not rel.name or rel.is_absolute() or ".." in rel.parts or "\\" in path:
        raise _error(ManifestError, "bad TSV line",
                     f"{where}: path {path!r} is not a file name inside clips/")
    return rel


def _sentence(raw: str, where: str, clip: PurePosixPath) -> str:
    """The normalised sentence, or :class:`ManifestError` if it is empty or outside the alphabet."""
    text = normalize_transcript(raw)
    if not text:
        raise _error(ManifestError, "empty sentence",
                     f"{where}: empty sentence after normalisation for clip {str(clip)!r} "
                     f"(sentence {raw!r})")
    bad = sorted(set(_OUTSIDE_ALPHABET.findall(text)))
    if bad:
        raise _error(ManifestError, "unsupported characters",
                     f"{where}: sentence for clip {str(clip)!r} has character(s) "
                     f"{' '.join(map(repr, bad))} outside the alphabet (a-z, apostrophe, space) "
                     f"after normalisation: {raw!r}")
    return text


def _check_clip(mp3: Path, ctx: str) -> None:
    """Raise :class:`AudioError` unless the clip is a non-empty, readable audio file."""
    if not mp3.is_file():
        raise _error(AudioError, "missing audio", f"{mp3}: audio file not found {ctx}")
    if mp3.stat().st_size == 0:
        raise _error(AudioError, "empty audio", f"{mp3}: audio file is empty {ctx}")
    try:
        info = sf.info(str(mp3))
    except Exception as e:  # LibsndfileError / RuntimeError on corrupt files
        raise _error(AudioError, "unreadable audio",
                     f"{mp3}: cannot read audio ({e}) {ctx}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise _error(AudioError, "empty audio", f"{mp3}: audio file has no samples {ctx}")


def _up_to_date(flac: Path, mp3: Path, sampling_rate: int) -> int | None:
    """Frames of an earlier conversion that can be reused, else ``None``."""
    try:
        if flac.stat().st_mtime_ns < mp3.stat().st_mtime_ns:
            return None
        info = sf.info(str(flac))
    except Exception:  # absent, or unreadable: convert (again)
        return None
    ok = info.samplerate == sampling_rate and info.channels == 1 and info.frames > 0
    return info.frames if ok else None


def _resample(x: np.ndarray, source_rate: int, rate: int) -> np.ndarray:
    """``x`` from ``source_rate`` to ``rate`` (polyphase, exact ratio as in features.py)."""
    if source_rate == rate:
        return x
    from scipy.signal import resample_poly

    fr = Fraction(rate, source_rate)
    return resample_poly(x, fr.numerator, fr.denominator).astype(np.float32)


def _convert(mp3: Path, flac: Path, sampling_rate: int, ctx: str) -> int:
    """Write ``mp3`` as 16-bit mono FLAC at ``sampling_rate`` (reusing an up-to-date one);
    returns its frame count."""
    frames = _up_to_date(flac, mp3, sampling_rate)
    if frames is not None:
        return frames
    try:
        x, sr = sf.read(str(mp3), dtype="float32", always_2d=True)
    except Exception as e:
        raise _error(AudioError, "unreadable audio",
                     f"{mp3}: cannot decode audio ({e}) {ctx}") from None
    y = _resample(x.mean(axis=1), sr, sampling_rate)
    if y.size == 0:
        raise _error(AudioError, "empty audio", f"{mp3}: audio file has no samples {ctx}")
    with atomic_path(flac, suffix=".flac") as tmp:
        sf.write(str(tmp), np.clip(y, -1.0, 1.0), sampling_rate, format="FLAC",
                 subtype="PCM_16")
    return int(y.size)


def _utterance(row: dict[str, str], where: str, root: Path, audio_dir: Path,
               sampling_rate: int, first_seen: dict[str, str]) -> Utterance:
    """One TSV row as an utterance (converting its clip), or an error carrying ``.reason``."""
    rel = _clip_name(row["path"], where)
    utt_id = rel.with_suffix("").as_posix()
    if utt_id in first_seen:
        raise _error(ManifestError, "duplicate path",
                     f"{where}: duplicate clip {row['path']!r} (utterance {utt_id!r} first "
                     f"listed at {first_seen[utt_id]})")
    first_seen[utt_id] = where
    speaker = row["client_id"].strip()
    if not speaker:
        raise _error(ManifestError, "bad TSV line",
                     f"{where}: empty client_id for clip {row['path']!r}")
    text = _sentence(row["sentence"], where, rel)
    mp3 = root / "clips" / rel
    ctx = f"(clip listed at {where})"
    _check_clip(mp3, ctx)
    flac = audio_dir / rel.with_suffix(".flac")
    frames = _convert(mp3, flac, sampling_rate, ctx)
    return Utterance(id=utt_id, audio=str(flac.resolve()), duration=frames / sampling_rate,
                     text=text, speaker=speaker, sampling_rate=sampling_rate)


def import_commonvoice(root: str | os.PathLike, out_manifest: str | os.PathLike, *,
                       split: str = "validated", on_error: OnError = "raise",
                       report: SkipReport | None = None, relative_to_manifest: bool = True,
                       sampling_rate: int = 16000, audio_dir: str | os.PathLike | None = None,
                       progress: bool = False) -> list[Utterance]:
    """Convert ``root/<split>.tsv`` of a Common Voice-layout tree into the manifest
    ``out_manifest``, converting its clips to FLAC at ``sampling_rate`` under ``audio_dir``
    (default :func:`default_audio_dir`).

    Returns the utterances written, sorted by id, with absolute audio paths (the manifest holds
    paths relative to itself unless ``relative_to_manifest=False``). Bad lines and clips raise
    or, with ``on_error="skip"``, are left out and counted in ``report``. ``progress`` shows a
    progress bar on stderr.
    """
    problem = ProblemSink(on_error, report)
    root = Path(root)
    tsv = _split_tsv(root, split)
    audio_dir = Path(audio_dir) if audio_dir is not None else default_audio_dir(
        out_manifest, sampling_rate)
    rows = _rows(tsv, problem)
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc=tsv.name, unit=" clips")
    first_seen: dict[str, str] = {}
    utts: list[Utterance] = []
    for where, row in rows:
        try:
            utts.append(_utterance(row, where, root, audio_dir, sampling_rate, first_seen))
        except (ManifestError, AudioError) as e:
            problem(e, e.reason)
    utts.sort(key=lambda u: u.id)
    write_manifest(out_manifest, utts, relative_to_manifest=relative_to_manifest)
    return utts
