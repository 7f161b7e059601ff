"""Utterance manifests: lhotse-style JSONL, one utterance per line.

Each line holds ``id, audio, duration, text, speaker, sampling_rate``. A relative ``audio`` path
is resolved against the manifest's own directory, so a corpus folder can be moved as a whole.
Bad input raises :class:`ManifestError` / :class:`AudioError` naming the file (and line); with
``on_error="skip"`` the bad entries are skipped and counted in a :class:`SkipReport` instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import soundfile as sf

from privasr.atomic import atomic_path

REQUIRED_FIELDS = ("id", "audio", "duration", "text", "speaker", "sampling_rate")
OnError = Literal["raise", "skip"]


class ManifestError(ValueError):
    """A manifest line that cannot be used (names the manifest file and line number)."""


class AudioError(ValueError):
    """An audio file that cannot be used (names the audio file)."""


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: str
    duration: float
    text: str
    speaker: str
    sampling_rate: int = 16000

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


@dataclass
class SkipReport:
    """What was skipped and why, for ``on_error="skip"``."""

    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, message: str) -> None:
        self.reasons[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(message)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        if not self.total:
            return "nothing skipped"
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
        return f"skipped {self.total} utterance(s): {parts}"


class ProblemSink:
    """Raise at once, or count into a SkipReport (the importers' ``on_error`` handling)."""

    def __init__(self, on_error: OnError, report: SkipReport | None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.on_error = on_error
        self.report = report if report is not None else SkipReport()

    def __call__(self, exc: ValueError, reason: str) -> None:
        if self.on_error == "raise":
            raise exc
        self.report.add(reason, str(exc))


def _parse_line(line: str, where: str, base: Path) -> Utterance:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    missing = [k for k in REQUIRED_FIELDS if k not in obj or obj[k] is None]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    text = str(obj["text"]).strip()
    if not text:
        raise ManifestError(f"{where}: empty transcript for utterance {obj['id']!r}")
    try:
        duration = float(obj["duration"])
        sr = int(obj["sampling_rate"])
    except (TypeError, ValueError, OverflowError):
        raise ManifestError(f"{where}: duration/sampling_rate must be numbers") from None
    if not math.isfinite(duration) or duration <= 0:
        raise ManifestError(f"{where}: invalid duration {duration} for {obj['id']!r}")
    if sr <= 0:
        raise ManifestError(f"{where}: non-positive sampling_rate {sr} for {obj['id']!r}")
    audio = Path(str(obj["audio"]))
    if not audio.is_absolute():
        # normpath: write_manifest's "../x.flac" reads back as the same absolute path
        audio = Path(os.path.normpath(base / audio))
    return Utterance(id=str(obj["id"]), audio=str(audio), duration=duration, text=text,
                     speaker=str(obj["speaker"]), sampling_rate=sr)


def read_manifest(path: str | os.PathLike, *, on_error: OnError = "raise",
                  report: SkipReport | None = None) -> list[Utterance]:
    """Read a JSONL manifest. Bad lines raise, or are skipped into ``report``."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    base = path.resolve().parent
    utts: list[Utterance] = []
    seen: set[str] = set()
    with open(path, "rb") as f:
        for lineno, bline in enumerate(f, 1):
            if not bline.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                try:
                    line = bline.decode("utf-8")
                except UnicodeDecodeError:
                    raise ManifestError(f"{where}: not valid UTF-8") from None
                utt = _parse_line(line, where, base)
                if utt.id in seen:
                    raise ManifestError(f"{where}: duplicate utterance id {utt.id!r}")
            except ManifestError as e:
                if on_error == "raise":
                    raise
                (report if report is not None else SkipReport()).add("bad manifest line", str(e))
                continue
            seen.add(utt.id)
            utts.append(utt)
    return utts


def write_manifest(path: str | os.PathLike, utts: Iterable[Utterance], *,
                   relative_to_manifest: bool = True) -> None:
    """Write utterances as JSONL atomically; audio paths relative to the manifest if possible."""
    path = Path(path)
    base = path.resolve().parent
    lines = []
    for u in utts:
        if relative_to_manifest:
            try:
                u = dataclasses.replace(u, audio=os.path.relpath(Path(u.audio).resolve(), base))
            except ValueError:  # different drive (Windows); keep absolute
                pass
        lines.append(u.to_json())
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")


def check_audio(utt: Utterance, *, min_duration: float = 0.1,
                duration_tolerance: float = 0.05) -> None:
    """Raise :class:`AudioError` unless the utterance's audio is present, readable and matches."""
    p = Path(utt.audio)
    if not p.is_file():
        raise AudioError(f"{p}: audio file not found (utterance {utt.id!r})")
    if p.stat().st_size == 0:
        raise AudioError(f"{p}: audio file is empty (utterance {utt.id!r})")
    try:
        info = sf.info(str(p))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError
        raise AudioError(f"{p}: cannot read audio ({e}) (utterance {utt.id!r})") from None
    if info.samplerate != utt.sampling_rate:
        raise AudioError(f"{p}: sample rate {info.samplerate} Hz, manifest says "
                         f"{utt.sampling_rate} Hz (utterance {utt.id!r})")
    actual = info.frames / info.samplerate
    if actual < min_duration:
        raise AudioError(f"{p}: too short ({actual:.3f} s < {min_duration} s) "
                         f"(utterance {utt.id!r})")
    if abs(actual - utt.duration) > duration_tolerance + 0.01 * utt.duration:
        raise AudioError(f"{p}: duration {actual:.3f} s, manifest says {utt.duration:.3f} s "
                         f"(utterance {utt.id!r})")


def validate(utts: Iterable[Utterance], *, on_error: OnError = "raise",
             report: SkipReport | None = None, min_duration: float = 0.1) -> list[Utterance]:
    """Check every utterance's audio; raise on the first bad one, or skip and count."""
    good = []
    for u in utts:
        try:
            check_audio(u, min_duration=min_duration)
        except AudioError as e:
            if on_error == "raise":
                raise
            (report if report is not None else SkipReport()).add("bad audio", str(e))
            continue
        good.append(u)
    return good


def load_audio(utt: Utterance) -> "np.ndarray":  # noqa: F821
    """Read mono float32 samples; errors name the file."""
    import numpy as np

    try:
        x, sr = sf.read(utt.audio, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{utt.audio}: cannot read audio ({e}) (utterance {utt.id!r})") from None
    if sr != utt.sampling_rate:
        raise AudioError(f"{utt.audio}: sample rate {sr} Hz, manifest says {utt.sampling_rate} Hz")
    if x.shape[0] == 0:
        raise AudioError(f"{utt.audio}: audio file has no samples (utterance {utt.id!r})")
    return np.ascontiguousarray(x.mean(axis=1), dtype=np.float32)
