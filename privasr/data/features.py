"""Features: 80-dim log-mel filterbank (kaldi-native-fbank) or the raw 16 kHz waveform (for
pre-trained wav2vec2-style models), normalisation and augmentation.

``FeatureConfig(kind="fbank")`` (the default, the Conformer-CTC's input) gives (T, n_mels) frames
at 100 frames/s; ``FeatureConfig(kind="waveform")`` gives the samples themselves as a (N, 1)
tensor, one "frame" per sample at ``sample_rate`` (the model normalises them: see
``privasr.models.hf_ctc``). ``frame_seconds(feature_dim)`` is the duration of one frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import kaldi_native_fbank as knf
import numpy as np
import torch
from scipy.signal import resample_poly

FRAME_SHIFT_S = 0.01
WAVEFORM_RATE = 16000  # samples/s of waveform features (what wav2vec2-style models expect)
KINDS = ("fbank", "waveform")


@dataclass(frozen=True)
class FeatureConfig:
    n_mels: int = 80
    sample_rate: int = 16000
    dither: float = 0.0
    cmvn: str = "utterance"  # "utterance" (mean/var per utterance and bin) or "none"
    speed: float = 1.0  # speed perturbation factor applied to the audio first
    kind: str = "fbank"  # "fbank" (T, n_mels) @ 100 frames/s | "waveform" (N, 1) @ sample_rate

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"feature kind {self.kind!r}; valid kinds: {', '.join(KINDS)}")
        if self.kind == "waveform" and self.sample_rate != WAVEFORM_RATE:
            raise ValueError(f"waveform features are {WAVEFORM_RATE} Hz samples "
                             f"(got sample_rate={self.sample_rate})")


def frame_seconds(feature_dim: int) -> float:
    """Seconds per feature frame: a (T, 1) feature is a waveform (one frame per 16 kHz sample),
    anything wider is fbank (10 ms frames)."""
    return 1.0 / WAVEFORM_RATE if feature_dim == 1 else FRAME_SHIFT_S


def waveform(samples: np.ndarray, cfg: FeatureConfig, source_rate: int | None = None
             ) -> np.ndarray:
    """(N, 1) float32 samples at ``cfg.sample_rate`` (resampled from ``source_rate`` if it
    differs). Not normalised: the model does its own per-utterance normalisation."""
    x = np.asarray(samples, dtype=np.float32)
    if source_rate is not None and source_rate != cfg.sample_rate:
        from fractions import Fraction

        fr = Fraction(cfg.sample_rate, source_rate)
        x = resample_poly(x, fr.numerator, fr.denominator).astype(np.float32)
    return x[:, None]


def fbank(samples: np.ndarray, cfg: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """(T, n_mels) float32 Kaldi-compatible log-mel fbank of mono float samples in [-1, 1]."""
    opts = knf.FbankOptions()
    opts.frame_opts.dither = cfg.dither
    opts.frame_opts.samp_freq = cfg.sample_rate
    opts.mel_opts.num_bins = cfg.n_mels
    f = knf.OnlineFbank(opts)
    # Kaldi's fbank expects 16-bit-scaled samples; scaling only shifts the log by a constant.
    f.accept_waveform(cfg.sample_rate, np.asarray(samples, dtype=np.float32) * 32768.0)
    f.input_finished()
    n = f.num_frames_ready
    if n == 0:
        return np.zeros((0, cfg.n_mels), dtype=np.float32)
    feats = np.stack([f.get_frame(i) for i in range(n)]).astype(np.float32)
    if cfg.cmvn == "utterance":
        feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-5)
    return feats


def speed_perturb(samples: np.ndarray, factor: float) -> np.ndarray:
    """Resample so that playback is ``factor`` times faster (tempo and pitch change, as Kaldi)."""
    if factor == 1.0:
        return samples
    from fractions import Fraction

    fr = Fraction(factor).limit_denominator(100)
    return resample_poly(samples, fr.denominator, fr.numerator).astype(np.float32)


@dataclass(frozen=True)
class SpecAugment:
    """Frequency and time masking (Park et al. 2019), applied per example on a padded batch."""

    freq_masks: int = 2
    freq_width: int = 15
    time_masks: int = 2
    time_width_frac: float = 0.05

    def __call__(self, feats: torch.Tensor, lens: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        feats = feats.clone()
        B, T, F = feats.shape
        for b in range(B):
            L = int(lens[b])
            for _ in range(self.freq_masks):
                w = int(torch.randint(0, self.freq_width + 1, (1,), generator=generator))
                f0 = int(torch.randint(0, max(1, F - w), (1,), generator=generator))
                feats[b, :L, f0:f0 + w] = 0.0
            tw = max(1, int(self.time_width_frac * L))
            for _ in range(self.time_masks):
                w = int(torch.randint(0, tw + 1, (1,), generator=generator))
                t0 = int(torch.randint(0, max(1, L - w), (1,), generator=generator))
                feats[b, t0:t0 + w, :] = 0.0
        return feats
