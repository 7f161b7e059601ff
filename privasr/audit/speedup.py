"""Speeding canary speech up, and whether a CTC model can still emit the transcript.

Three methods (``SpeedupMethod``), because they differ and the choice must be stated:

- ``resample`` — ``resample_poly(x, den, num)`` with num/den = factor (as Kaldi speed
  perturbation, ``privasr.data.features.speed_perturb``): tempo *and* pitch rise by the factor.
- ``tempo`` — sox ``tempo -s factor`` (WSOLA time stretch tuned for speech): faster, same pitch.
- ``espeak_rate`` — espeak-ng's own speaking rate ``-s round(rate·factor)``: the synthesiser
  speaks faster (prosody and segment durations change non-uniformly; no signal processing).

CTC feasibility: a character CTC with ``subsampling``× frame reduction emits about
100/subsampling frames per second (25/s at 4×) and needs one frame per label plus a blank
between repeated labels; infeasible canaries have infinite CTC loss and measure nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Literal

import numpy as np

from privasr.data.dataset import ctc_min_frames, ctc_output_frames
from privasr.data.features import speed_perturb
from privasr.data.tokenizer import CharTokenizer

SpeedupMethod = Literal["resample", "tempo", "espeak_rate"]
METHODS: tuple[str, ...] = ("resample", "tempo", "espeak_rate")
SAMPLE_RATE = 16000


def _sox_tempo(x: np.ndarray, factor: float, sample_rate: int) -> np.ndarray:
    exe = shutil.which("sox")
    if exe is None:
        raise RuntimeError("speed-up method 'tempo' needs sox: install it with `apt-get install sox`")
    raw = ["-t", "raw", "-r", str(sample_rate), "-e", "floating-point", "-b", "32", "-c", "1"]
    proc = subprocess.run([exe, *raw, "-", *raw, "-", "tempo", "-s", f"{factor:.6g}"],
                          input=np.asarray(x, dtype="<f4").tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sox tempo {factor} failed: {proc.stderr.decode(errors='replace')}")
    return np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)


def speed_up(x: np.ndarray, factor: float, method: str,
             sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return ``x`` played ``factor`` times faster by ``method`` (``espeak_rate`` acts at
    synthesis time, so here it is the identity)."""
    if method not in METHODS:
        raise ValueError(f"unknown speed-up method {method!r}; valid: {', '.join(METHODS)}")
    if not factor > 0:
        raise ValueError(f"speed-up factor must be positive, got {factor}")
    if factor == 1.0 or method == "espeak_rate":
        return np.asarray(x, dtype=np.float32)
    if method == "resample":
        return speed_perturb(np.asarray(x, dtype=np.float32), factor)
    return _sox_tempo(x, factor, sample_rate)


def feature_frames(n_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Kaldi fbank frames (25 ms window, 10 ms shift, snip edges) of ``n_samples`` samples."""
    win, shift = int(0.025 * sample_rate), int(0.01 * sample_rate)
    return 0 if n_samples < win else 1 + (n_samples - win) // shift


def ctc_slack(text: str, n_samples: int, *, subsampling: int = 4,
              tokenizer: CharTokenizer = CharTokenizer()) -> float:
    """Output frames available / frames the transcript needs (≥ 1 means feasible)."""
    need = ctc_min_frames(tokenizer.encode(text))
    have = ctc_output_frames(feature_frames(n_samples), subsampling)
    return have / max(need, 1)


def max_feasible_factor(text: str, n_samples_1x: int, *, subsampling: int = 4,
                        margin: float = 1.0) -> float:
    """The largest speed-up of 1×-speed audio that keeps ``margin``× the frames CTC needs
    (durations scale as 1/factor; exact for ``resample``, approximate for the others)."""
    return ctc_slack(text, n_samples_1x, subsampling=subsampling) / margin
