"""The privacy ledger of a run: what was spent so far, and a budget that refuses the next step.

Usage in a training loop::

    ledger = PrivacyLedger(noise_multiplier=sigma, sample_rate=q, delta=1e-5,
                           unit="example", target_epsilon=8.0)
    for batch in batches:
        ledger.check_before_step()      # raises PrivacyBudgetExceeded when the budget is spent
        ...                             # noisy update
        ledger.record_step()
    ckpt["privacy_ledger"] = ledger.to_dict()          # plain JSON-able types
    ...
    ledger = PrivacyLedger.from_dict(ckpt["privacy_ledger"])   # resume continues the ledger

The ledger records segments ``[steps, σ, q]`` of what was actually applied: the strategy that
adds the noise sets the current (σ, q) before every step (:meth:`set_params`), so a change of σ
or q starts a new segment, and ε composes all of them (dp-accounting composes heterogeneous
steps). A resumed run continues the checkpoint's ledger (:func:`resume_ledger`): σ, q, δ and
the budget may change, each change is reported; a change of unit, sensitivity or accountant is
refused.

A ledger also records whether the run's randomness was secret (``secret_randomness``): with
seeded noise or sampling anyone holding the recipe can recompute them, so there is no
guarantee; the ledger then still counts (the budget still stops training) but prints and
writes no ε. ε is computed only when asked (and cached); the budget
check precomputes once, by binary search, how many steps at the current (σ, q) fit in the
budget, so the per-step check is an integer comparison.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from privasr.errors import StopTraining
from privasr.privacy.accountant import (MAX_STEPS_CAP, PrivacyUnit, check_delta, check_factor,
                                        check_method, check_q, check_sigma, check_steps,
                                        check_unit,
                                        epsilon_for_segments, max_steps)

__all__ = ["PrivacyBudgetExceeded", "PrivacyLedger", "LedgerMismatch", "resume_ledger"]

# 2: secret_randomness and population (format 1 ledgers had seeded Poisson sampling)
LEDGER_FORMAT_VERSION = 2


class PrivacyBudgetExceeded(StopTraining):
    """The next step would spend more ε than the budget allows."""

    def __init__(self, message: str, *, epsilon_next: float, budget: float, steps_done: int):
        super().__init__(message)
        self.epsilon_next = epsilon_next
        self.budget = budget
        self.steps_done = steps_done


class LedgerMismatch(ValueError):
    """A resumed run whose privacy settings cannot continue the checkpoint's ledger."""


def _fmt(x: float) -> str:
    """3 significant digits; small numbers as 3.2e-4 rather than 0.00032 or 3.20e-04."""
    if x is None:
        return "none"
    x = float(x)
    if math.isinf(x) or math.isnan(x):
        return str(x)
    if x != 0.0 and abs(x) < 1e-3:
        mant, exp = f"{x:.2e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return f"{x:.3g}"


@dataclass
class PrivacyLedger:
    """The privacy state of one run (see the module docstring).

    ``noise_multiplier`` and ``sample_rate`` are the *current* σ and q (those of the next step);
    ``segments`` holds what was already spent, as ``[steps, σ, q]`` lists. ``sensitivity_factor``
    defaults to the unit's (1 for example/client, 2 for microbatch/core; see
    :mod:`privasr.privacy.accountant`). ``target_epsilon`` None means no budget.
    ``population`` N (examples or speakers) is shown as δ·N; ``secret_randomness`` False
    (seeded noise or sampling) means no guarantee: no ε is printed or written.
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    unit: str = PrivacyUnit.EXAMPLE
    sensitivity_factor: float | None = None
    target_epsilon: float | None = None
    method: str = "pld"
    segments: list[list] = field(default_factory=list)
    population: int | None = None
    secret_randomness: bool = True
    _budget_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.unit = check_unit(self.unit)
        self.noise_multiplier = check_sigma(self.noise_multiplier)
        self.sample_rate = check_q(self.sample_rate, allow_zero=False)
        self.delta = check_delta(self.delta)
        self.method = check_method(self.method)
        default_k = self.unit.sensitivity_factor
        if self.sensitivity_factor is None:
            self.sensitivity_factor = default_k
        self.sensitivity_factor = check_factor(self.sensitivity_factor)
        if self.sensitivity_factor < default_k:
            warnings.warn(
                f"sensitivity_factor {self.sensitivity_factor:g} is below the default "
                f"{default_k:g} for unit {self.unit.value!r}; that is only valid when each "
                "micro-batch/core holds a single example", stacklevel=2)
        if self.target_epsilon is not None:
            self.target_epsilon = float(self.target_epsilon)
            if not (self.target_epsilon > 0.0):
                raise ValueError(f"target_epsilon must be > 0 or None, got {self.target_epsilon}")
        if self.population is not None:
            self.population = int(self.population)
            if self.population < 1:
                raise ValueError(f"population must be >= 1, got {self.population}")
        cleaned = []
        for seg in self.segments:
            steps, sigma, q = seg
            cleaned.append([check_steps(steps, minimum=0), check_sigma(sigma),
                            check_q(q, allow_zero=True)])
        self.segments = cleaned

    # ------------------------------------------------------------------ recording

    @property
    def steps(self) -> int:
        """Steps recorded so far, over all segments."""
        return sum(s[0] for s in self.segments)

    def set_params(self, *, noise_multiplier: float | None = None,
                   sample_rate: float | None = None) -> None:
        """Change σ and/or q for the following steps (a new segment starts at the next step)."""
        if noise_multiplier is not None:
            self.noise_multiplier = check_sigma(noise_multiplier)
        if sample_rate is not None:
            self.sample_rate = check_q(sample_rate, allow_zero=False)

    def record_step(self, n: int = 1) -> None:
        """Record ``n`` steps taken at the current (σ, q)."""
        n = check_steps(n, minimum=0)
        if n == 0:
            return
        if self.segments and self.segments[-1][1:] == [self.noise_multiplier, self.sample_rate]:
            self.segments[-1][0] += n
        else:
            self.segments.append([n, self.noise_multiplier, self.sample_rate])

    # ------------------------------------------------------------------ accounting

    def _segments_after(self, n_more: int) -> list[list]:
        segs = [list(s) for s in self.segments]
        if n_more:
            if segs and segs[-1][1:] == [self.noise_multiplier, self.sample_rate]:
                segs[-1][0] += n_more
            else:
                segs.append([n_more, self.noise_multiplier, self.sample_rate])
        return segs

    def _epsilon_of(self, segments: list[list]) -> float:
        return epsilon_for_segments(segments, self.delta, method=self.method,
                                    sensitivity_factor=self.sensitivity_factor)

    def epsilon(self) -> float:
        """ε spent so far at this ledger's δ (``inf`` once a σ = 0 step was taken)."""
        return self._epsilon_of(self.segments)

    def epsilon_after(self, n_more_steps: int = 1) -> float:
        """ε after ``n_more_steps`` further steps at the current (σ, q)."""
        return self._epsilon_of(self._segments_after(check_steps(n_more_steps, minimum=0)))

    def max_total_steps(self) -> int | None:
        """The largest total step count that fits the budget if σ and q stay as they are now.

        None without a budget. Computed once per (prior segments, σ, q, budget) by binary
        search and cached, so calling it every step is cheap.
        """
        if self.target_epsilon is None:
            return None
        segs = self.segments
        current = [self.noise_multiplier, self.sample_rate]
        tail = segs[-1][0] if segs and segs[-1][1:] == current else 0
        prior = segs[:-1] if tail else segs
        key = (tuple(map(tuple, prior)), *current, self.delta, self.sensitivity_factor,
               self.method, self.target_epsilon)
        if key not in self._budget_cache:
            self._budget_cache.clear()
            n = max_steps(self.noise_multiplier, self.sample_rate, self.delta,
                          self.target_epsilon, method=self.method,
                          sensitivity_factor=self.sensitivity_factor, prior_segments=prior)
            self._budget_cache[key] = sum(s[0] for s in prior) + n
        return self._budget_cache[key]

    def would_exceed(self, n_more_steps: int = 1) -> bool:
        """Whether ``n_more_steps`` more steps would take ε above the budget (False: no budget).

        An integer comparison against :meth:`max_total_steps` (no ε computation per step). Also
        True when the steps already taken exceed the budget (e.g. a budget lowered on resume).
        """
        n = check_steps(n_more_steps, minimum=0)
        if self.target_epsilon is None:
            return False
        limit = self.max_total_steps()
        if self.steps + n > limit and limit >= MAX_STEPS_CAP:  # the search stopped at its cap
            return self.epsilon_after(n) > self.target_epsilon
        return self.steps + n > limit

    def check_before_step(self, n_more_steps: int = 1) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if the next step(s) would exceed the budget."""
        if not self.would_exceed(n_more_steps):
            return
        eps_next = self.epsilon_after(n_more_steps)
        what = "the next step" if n_more_steps == 1 else f"the next {n_more_steps} steps"
        if not self.secret_randomness:
            raise PrivacyBudgetExceeded(
                f"{what} would exceed the budget ε={_fmt(self.target_epsilon)} by the "
                f"accountant's count; stopping ({self.steps} steps done). {NO_GUARANTEE}",
                epsilon_next=eps_next, budget=self.target_epsilon, steps_done=self.steps)
        raise PrivacyBudgetExceeded(
            f"{what} would spend ε={_fmt(eps_next)} > budget ε={_fmt(self.target_epsilon)}; "
            f"stopping ({self.steps} steps done, ε spent = {_fmt(self.epsilon())}, "
            f"δ={_fmt(self.delta)}, unit {self.unit.value}: {self.unit.description}, "
            f"σ={_fmt(self.noise_multiplier)}, q={_fmt(self.sample_rate)}, "
            f"{self.method.upper()})",
            epsilon_next=eps_next, budget=self.target_epsilon, steps_done=self.steps)

    # ------------------------------------------------------------------ reporting / storage

    def delta_times_n(self) -> float | None:
        """δ·N: should be far below 1 (δ = 1/N allows publishing one record whole)."""
        return None if self.population is None else self.delta * self.population

    def claimed_epsilon(self) -> float | None:
        """ε spent so far, or None when the run has no guarantee (seeded randomness)."""
        return self.epsilon() if self.secret_randomness else None

    def summary(self) -> str:
        """E.g. 'ε = 7.93 at δ = 1e-5, δ·N = 0.034 (unit: example, σ = 1.1, q = 0.004, ...)'."""
        parts = [f"unit: {self.unit.value}"]
        sigmas = sorted({s[1] for s in self.segments if s[0]} | {self.noise_multiplier})
        qs = sorted({s[2] for s in self.segments if s[0]} | {self.sample_rate})
        parts.append("σ = " + ("–".join(_fmt(x) for x in (sigmas[0], sigmas[-1]))
                               if len(sigmas) > 1 else _fmt(sigmas[0])))
        parts.append("q = " + ("–".join(_fmt(x) for x in (qs[0], qs[-1]))
                               if len(qs) > 1 else _fmt(qs[0])))
        if self.sensitivity_factor != 1.0:
            parts.append(f"sensitivity {_fmt(self.sensitivity_factor)}C")
        parts.append(f"{self.steps} steps")
        if len(self.segments) > 1:
            parts.append(f"{len(self.segments)} segments")
        parts.append(self.method.upper())
        if self.target_epsilon is not None:
            parts.append(f"budget ε ≤ {_fmt(self.target_epsilon)}")
        if not self.secret_randomness:
            return f"{NO_GUARANTEE} ({', '.join(parts)})"
        dn = self.delta_times_n()
        dn_txt = "" if dn is None else f", δ·N = {_fmt(dn)}"
        return (f"ε = {_fmt(self.epsilon())} at δ = {_fmt(self.delta)}{dn_txt} "
                f"({', '.join(parts)}) — {self.unit.description}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able types (also loadable by ``torch.load(weights_only=True)``).

        ``epsilon`` (spent; the string "inf" when infinite) and ``unit_description`` are
        informational for results.json and ignored by :meth:`from_dict`.
        """
        eps = self.claimed_epsilon()
        try:
            dp_version = importlib.metadata.version("dp-accounting")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            dp_version = None
        return {
            "format_version": LEDGER_FORMAT_VERSION,
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "delta": float(self.delta),
            "unit": self.unit.value,
            "sensitivity_factor": float(self.sensitivity_factor),
            "target_epsilon": None if self.target_epsilon is None else float(self.target_epsilon),
            "method": self.method,
            "segments": [[int(s[0]), float(s[1]), float(s[2])] for s in self.segments],
            "steps": int(self.steps),
            "epsilon": None if eps is None else (eps if math.isfinite(eps) else "inf"),
            "population": self.population,
            "delta_times_n": self.delta_times_n(),
            "secret_randomness": bool(self.secret_randomness),
            "unit_description": self.unit.description,
            "dp_accounting_version": dp_version,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyLedger:
        version = int(d.get("format_version", LEDGER_FORMAT_VERSION))
        if version > LEDGER_FORMAT_VERSION:
            raise ValueError(f"privacy ledger format {version} is newer than this privasr "
                             f"understands ({LEDGER_FORMAT_VERSION})")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["segments"] = [list(s) for s in d.get("segments", [])]
        if version < 2:  # format 1: Poisson batches were always drawn from the public seed
            kwargs["secret_randomness"] = False
        return cls(**kwargs)


NO_GUARANTEE = ("NO DP GUARANTEE: seeded randomness (privacy.randomness=seeded, for debugging): "
                "anyone with the recipe can recompute the noise and the sampled batches, so no "
                "ε is printed or written")


def resume_ledger(saved: PrivacyLedger, current: PrivacyLedger) -> tuple[PrivacyLedger, list[str]]:
    """The ledger of a resumed run: ``saved`` (the checkpoint's spending) continued with the
    ``current`` recipe's settings, and one message per change.

    σ and q (also through the expected batch size or N) start a new segment; δ, N and the
    budget are replaced (ε is recomputed at the new δ). Unit, sensitivity factor and accountant
    cannot change within one run (the segments' meaning would change): LedgerMismatch. Seeded
    randomness anywhere in the run voids the guarantee of all of it.
    """
    for name in ("unit", "sensitivity_factor", "method"):
        a, b = getattr(saved, name), getattr(current, name)
        if a != b:
            raise LedgerMismatch(
                f"cannot resume: the checkpoint's privacy ledger has {name} = {a}, the recipe "
                f"{b}; a run's {name} is fixed (its spent steps mean something else under "
                "another one): start a new run in another out_dir")
    notes = []

    def changed(label: str, a: Any, b: Any, what: str) -> None:
        if a != b:
            notes.append(f"privacy: {label} changed on resume, {_fmt(a) if isinstance(a, float) else a}"
                         f" → {_fmt(b) if isinstance(b, float) else b}: {what}")

    seg = "the remaining steps form a new segment; ε composes all segments"
    changed("σ", saved.noise_multiplier, current.noise_multiplier, seg)
    changed("q", saved.sample_rate, current.sample_rate, seg)
    changed("N", saved.population, current.population, "q and δ·N follow the new N")
    changed("δ", saved.delta, current.delta, "ε of the whole run is now reported at the new δ")
    changed("budget ε", saved.target_epsilon, current.target_epsilon,
            "the budget check uses the new one")
    secret = saved.secret_randomness and current.secret_randomness
    if saved.secret_randomness and not current.secret_randomness:
        notes.append("privacy: seeded randomness from now on: the whole run loses its guarantee")
    elif current.secret_randomness and not saved.secret_randomness:
        notes.append("privacy: the checkpoint's steps used seeded randomness (or an older "
                     "privasr whose Poisson batches came from the public seed): the run has "
                     "no guarantee, whatever follows")
    led = dataclasses.replace(current, segments=[list(x) for x in saved.segments],
                              secret_randomness=secret)
    return led, notes
