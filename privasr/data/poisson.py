"""Poisson sampling of examples, as DP-SGD's accounting assumes, split into physical batches.

Each step includes every example independently with probability q = expected_batch_size / N.
The draw of step t is a pure function of (seed, t), so a resumed run draws the same batches.
A logical batch is split into physical batches of at most ``max_physical`` examples, so memory
stays bounded however large the draw (Opacus' BatchMemoryManager idea); the gradient strategy
sees all physical batches of a step and adds noise once. A draw may be empty.
"""

from __future__ import annotations

import numpy as np


class PoissonSampler:
    def __init__(self, n: int, *, expected_batch_size: float, max_physical: int,
                 seed: int = 0) -> None:
        if n < 1:
            raise ValueError("Poisson sampling needs at least one example")
        if not 0 < expected_batch_size <= n:
            raise ValueError(f"expected_batch_size must be in (0, {n}], got {expected_batch_size}")
        if max_physical < 1:
            raise ValueError("max_physical must be >= 1")
        self.n, self.expected_batch_size = n, float(expected_batch_size)
        self.max_physical, self.seed = max_physical, seed

    @property
    def sample_rate(self) -> float:
        return self.expected_batch_size / self.n

    def draw(self, step: int) -> list[int]:
        rng = np.random.default_rng([self.seed, step, 0x9E37])
        return np.flatnonzero(rng.random(self.n) < self.sample_rate).tolist()

    def logical_batch(self, step: int) -> list[list[int]]:
        """The physical batches (index lists) of step ``step``; [] when the draw is empty."""
        idx = self.draw(step)
        return [idx[i:i + self.max_physical] for i in range(0, len(idx), self.max_physical)]
