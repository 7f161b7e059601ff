"""espeak-ng as a speech synthesiser: text + speaker → 16 kHz float32 samples.

espeak-ng writes 22.05 kHz 16-bit mono WAV to stdout (with a bogus streaming length in the
header, so the data chunk is parsed by hand). It is resampled to 16 kHz with
``resample_poly(x, 320, 441)`` (22050 · 320/441 = 16000; 160/441 would silently double the
speed) and scaled down if needed to keep -1 dBFS of headroom.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

ESPEAK_RATE = 22050
TARGET_RATE = 16000
PEAK = 0.89  # -1 dBFS

# English voices that work without MBROLA, and variants that sound like a person speaking.
VOICES = ("en-us", "en-gb", "en-us-nyc", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan",
          "en-gb-x-gbcwmd", "en-029")
NOVELTY_VARIANTS = frozenset({
    "whisper", "whisperf", "Demonic", "UniRobot", "anikaRobot", "announcer", "croak", "zac",
    "Mr serious", "fast", "Tweaky", "AnxiousAndy", "kaukovalta",
})


class SynthesisError(RuntimeError):
    """espeak-ng is missing or failed on an input."""


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker: one fixed (voice, variant, pitch, rate) tuple."""

    id: str
    voice: str
    variant: str
    pitch: int  # espeak-ng -p, 0..99
    rate: int  # espeak-ng -s, words per minute

    def espeak_args(self) -> list[str]:
        return ["-v", f"{self.voice}+{self.variant}", "-p", str(self.pitch), "-s", str(self.rate)]


def espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthesisError("espeak-ng not found: install it with `apt-get install espeak-ng`")
    return exe


def list_variants() -> list[str]:
    """The installed espeak-ng voice variants, minus novelty ones, sorted."""
    out = subprocess.run([espeak_binary(), "--voices=variant"], capture_output=True, text=True,
                         check=True).stdout
    names = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "variant":
            file = line.split("!v/")[-1].strip() if "!v/" in line else parts[-1]
            names.append(file)
    return sorted(n for n in set(names) if n not in NOVELTY_VARIANTS and " " not in n)


def _wav_data(raw: bytes) -> np.ndarray:
    """int16 samples of espeak-ng's streamed WAV (whose header length fields are bogus)."""
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise SynthesisError("espeak-ng did not return a WAV stream")
    pos = 12
    while pos + 8 <= len(raw):
        chunk, size = raw[pos:pos + 4], int.from_bytes(raw[pos + 4:pos + 8], "little")
        if chunk == b"data":
            data = raw[pos + 8:]
            return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")
        pos += 8 + size
    raise SynthesisError("espeak-ng WAV stream has no data chunk")


def synthesize(text: str, speaker: Speaker, *, extra_args: tuple[str, ...] = ()) -> np.ndarray:
    """Speak ``text`` with ``speaker``; return 16 kHz float32 samples in [-PEAK, PEAK]."""
    cmd = [espeak_binary(), *speaker.espeak_args(), *extra_args, "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise SynthesisError(f"espeak-ng failed ({proc.returncode}) for speaker {speaker.id}: "
                             f"{proc.stderr.decode(errors='replace').strip()}")
    x = _wav_data(proc.stdout).astype(np.float32) / 32768.0
    if x.size == 0:
        raise SynthesisError(f"espeak-ng produced no audio for {text!r} ({speaker.id})")
    y = resample_poly(x, 320, 441).astype(np.float32)
    peak = float(np.abs(y).max())
    if peak > PEAK:
        y *= PEAK / peak
    return y
