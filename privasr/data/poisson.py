"""Poisson sampling of privacy units, as DP-SGD's accounting assumes, split into physical batches.

Each step includes every privacy unit independently with probability q = expected_batch_size / N
(N = units). The uniforms come from a :class:`~privasr.privacy.randomness.RandomSource`: secret
(a key held in memory) for DP runs, seeded (a pure function of (seed, step), so a resumed run
draws the same batches) otherwise.

A unit is usually one utterance. When the training set holds derived copies of an utterance
(speed-perturbed ``{id}_sp{s}``), the copies and their source form ONE unit (``members``): a
sampled unit contributes one of its versions, chosen uniformly at random, so one utterance still
moves one clipped gradient -- sensitivity C -- and N counts utterances, not copies.

With ``whole_units`` a sampled unit contributes ALL of its members: speaker-level DP samples
speakers, and each sampled speaker brings every one of its utterances (one clipped unit).

A logical batch is split into physical batches of at most ``max_physical`` examples, so memory
stays bounded however large the draw (Opacus' BatchMemoryManager idea); the gradient strategy
sees all physical batches of a step and adds noise once. A draw may be empty. With ``lengths``
(the examples' durations) a draw is sorted by length before it is split, so each physical batch
pads to similar lengths: on the embedded corpus a draw of 64 split into 16s in index order pads
to 1.84x the real audio, sorted to 1.20x. Which examples a step holds is unchanged; only their
order is, so a per-example (or per-speaker) clipped sum is the same, and the order is a
function of the draw alone (nothing to account for).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from privasr.privacy.randomness import RandomSource, SeededRandomness


class PoissonSampler:
    def __init__(self, n: int, *, expected_batch_size: float, max_physical: int,
                 seed: int = 0, source: RandomSource | None = None,
                 members: Sequence[Sequence[int]] | None = None,
                 whole_units: bool = False, lengths: Sequence[float] | None = None) -> None:
        if members is not None:
            members = [list(m) for m in members]
            if len(members) != n or any(not m for m in members):
                raise ValueError(f"members must list the dataset indices of each of the {n} "
                                 "units (none empty)")
        if n < 1:
            raise ValueError("Poisson sampling needs at least one example")
        if not 0 < expected_batch_size <= n:
            raise ValueError(f"expected_batch_size must be in (0, {n}], got {expected_batch_size}")
        if max_physical < 1:
            raise ValueError("max_physical must be >= 1")
        self.n, self.expected_batch_size = n, float(expected_batch_size)
        self.max_physical = max_physical
        self.source: RandomSource = source if source is not None else SeededRandomness(seed)
        if whole_units and members is None:
            raise ValueError("whole_units needs members (the indices of each unit)")
        self.members, self.whole_units = members, whole_units
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.float64)

    @property
    def sample_rate(self) -> float:
        return self.expected_batch_size / self.n

    def draw(self, step: int) -> list[int]:
        """Dataset indices of step ``step``: one per sampled unit (all its members with
        ``whole_units``)."""
        units = np.flatnonzero(self.source.uniforms("poisson", step, self.n) < self.sample_rate)
        if self.members is None:
            return units.tolist()
        if self.whole_units:
            return [i for u in units for i in self.members[u]]
        pick = self.source.uniforms("version", step, len(units))
        return [self.members[u][int(p * len(self.members[u]))] for u, p in zip(units, pick)]

    def logical_batch(self, step: int) -> list[list[int]]:
        """The physical batches (index lists) of step ``step``; [] when the draw is empty."""
        idx = self.draw(step)
        if self.lengths is not None and idx:
            idx = [idx[k] for k in np.argsort(self.lengths[idx], kind="stable")]
        return [idx[i:i + self.max_physical] for i in range(0, len(idx), self.max_physical)]
