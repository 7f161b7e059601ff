"""The randomness a DP analysis assumes secret: which examples (or speakers) a step samples.

Poisson subsampling only amplifies privacy if nobody can tell which records were sampled; a
draw that is a function of the recipe's seed can be recomputed by anyone holding the recipe or
a checkpoint, and then the guarantee is that of the unsampled mechanism (much larger ε). The
Gaussian noise itself comes from the OS CSPRNG (:mod:`privasr.clipping.noise`, ``secure=True``).

``SecretRandomness``  a 256-bit key from ``os.urandom``, held in memory only (it refuses to be
                      pickled, so it cannot end up in a checkpoint). The uniforms of stream
                      (purpose, index) are SHAKE-256(key ‖ purpose ‖ index) read as 53-bit
                      fractions: a cryptographic XOF, so outputs reveal nothing about the key
                      or other streams. A resumed run draws a new key: its later steps are
                      sampled afresh, which the accounting allows (each step's draw is
                      independent of the others either way).
``SeededRandomness``  the same interface from a public seed (numpy PCG64): reproducible, for
                      clipping-only runs (σ = 0, no claim) and for debugging. A DP run that
                      uses it has **no** guarantee, and privasr then prints no ε.

Under torchrun every rank must draw the same batch: rank 0's key is broadcast in memory
(:func:`privasr.train.distributed.share_randomness`), never written.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

import numpy as np

__all__ = ["RandomSource", "SecretRandomness", "SeededRandomness", "KEY_BYTES"]

KEY_BYTES = 32


class RandomSource(Protocol):
    secret: bool

    def uniforms(self, purpose: str, index: int, n: int) -> np.ndarray:
        """``n`` iid U[0, 1) float64 draws of stream (purpose, index)."""
        ...


class SecretRandomness:
    """Uniforms from a keyed cryptographic XOF; the key never leaves memory."""

    secret = True

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(KEY_BYTES) if key is None else bytes(key)
        if len(key) != KEY_BYTES:
            raise ValueError(f"a secret key has {KEY_BYTES} bytes, got {len(key)}")
        self._key = key

    @property
    def key(self) -> bytes:
        """The key, to share with the other ranks of the same run (in memory only)."""
        return self._key

    def uniforms(self, purpose: str, index: int, n: int) -> np.ndarray:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        xof = hashlib.shake_256(self._key + f"\x00{purpose}\x00{int(index)}".encode())
        raw = np.frombuffer(xof.digest(8 * n), dtype="<u8") if n else np.zeros(0, np.uint64)
        return (raw >> np.uint64(11)).astype(np.float64) * 2.0 ** -53

    def __reduce__(self):
        raise TypeError("SecretRandomness cannot be pickled: its key must never be written to "
                        "disk (anyone holding it could recompute which examples were sampled)")

    def __repr__(self) -> str:
        return "SecretRandomness(<key hidden>)"


class SeededRandomness:
    """Uniforms that are a public function of ``seed``: reproducible, no secrecy."""

    secret = False

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def uniforms(self, purpose: str, index: int, n: int) -> np.ndarray:
        salt = int.from_bytes(hashlib.blake2b(purpose.encode(), digest_size=4).digest(), "little")
        return np.random.default_rng([self.seed, int(index), salt]).random(n)

    def __repr__(self) -> str:
        return f"SeededRandomness(seed={self.seed})"
