"""The privacy accountant of record: (ε, δ) of DP-SGD via Google's dp-accounting.

Mechanism
---------
Every training step is one Poisson-subsampled Gaussian mechanism: each protected entity
(an example, or a speaker in federated training) is included in the step independently with
probability ``sample_rate`` (q); the sampled units' contributions are clipped to L2 norm C,
summed, and Gaussian noise of standard deviation ``noise_multiplier · C`` (σ·C) is added to the
*sum*. Dividing that noisy sum by a fixed number (the expected batch size, the number of cores)
is post-processing; dividing by the realised batch size is not, and is not covered here. The
ε reported is for ``steps`` adaptive compositions of that mechanism, under *add/remove-one*
adjacency of the protected entity (dp-accounting's ``ADD_OR_REMOVE_ONE``).

``method="pld"`` (default, the number of record) composes privacy loss distributions
(dp-accounting ``PLDAccountant``, pessimistic discretisation: the result is an upper bound that is
tight to ~1e-3 relative). ``method="rdp"`` uses Rényi DP (``RdpAccountant``): a valid but looser
upper bound, kept as a cross-check.

Sensitivity: what one protected entity can change
-------------------------------------------------
``sensitivity_factor`` k is the L2 sensitivity of the noised sum in units of C: adding or
removing one protected entity moves the sum by at most k·C. Because noise std σ·C with
sensitivity k·C is the same mechanism as noise std (σ/k)·C with sensitivity C, the accountant
uses the *effective noise multiplier* σ/k. So for the same ε, k = 2 needs exactly twice the σ.

==============  ===============================================  ================  ===  ============
unit            what is clipped to C                             neighbours        k    ε is
==============  ===============================================  ================  ===  ============
``example``     each example's gradient (per-example DP-SGD)     ± 1 example       1    per example
``microbatch``  the mean gradient of each micro-batch of m > 1   ± 1 example       2    per example
                examples; examples go to micro-batches by a
                FIXED function of their id (hash(id) mod G)
``core``        the mean gradient of each core's shard (per-     ± 1 example       2    per example
                core clipping, PCC); shard = fixed fn of the id
``client``      each client's model delta; a client is one       ± 1 speaker       1    per speaker
                speaker holding all of that speaker's data       (all their data)       (user-level)
==============  ===============================================  ================  ===  ============

("± 1" = add/remove-one adjacency.)

Why k = 2 for micro-batches and cores: adding example x changes only the unit x is assigned to
(the assignment is a fixed function of the id, so no other example moves). That unit's
contribution goes from clip(mean(B)) to clip(mean(B ∪ {x})); both have norm ≤ C, so the sum moves
by at most 2C (by at most C when B was empty, i.e. the unit did not exist before). The shift
depends on the other examples in B, but for every fixed sampled batch the pair of output
distributions is dominated by N(0, σ²C²) vs N(2C, σ²C²), and Poisson subsampling preserves that
domination (Zhu, Dong & Wang 2022, "Optimal accounting of differential privacy via characteristic
function", dominating pairs of subsampled mechanisms; Mironov, Talwar & Zhang 2019 for RDP), so
the usual subsampled-Gaussian accounting applies with σ/2. With m = 1 a micro-batch is one
example and k = 1 (``PrivacyUnit.sensitivity_factor``). If instead the micro-batches were cut
by *position* in a shuffled batch, one added example shifts every later boundary and can change
every unit: the sensitivity is then not bounded by 2C and this accounting does not apply.

Per-core noise as in paxml's ``PercoreClippedDpSgdGradient`` fits this model: each of K cores
clips its w-scaled mean gradient (w = 1/K) to w·C and adds N(0, (σ·C·w^1.5)²); after the
cross-core sum the noise std is σ·C/K on the mean of clipped per-core gradients, i.e. σ·C on
their sum, so its noise_multiplier is σ here (and k = 2 for per-example privacy).

``q`` is the probability that the protected entity takes part in a step: the example sampling
rate for ``example``/``microbatch``/``core`` (examples Poisson-sampled, then routed to their fixed
group; if whole fixed groups are Poisson-sampled instead, use the group rate, k stays 2), and the
client sampling rate (expected cohort / population) for ``client``. Replace-one (substitution)
adjacency is not offered here.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import math
import numbers
from typing import Iterable, Sequence

__all__ = [
    "DEFAULT_PLD_DISCRETIZATION",
    "MAX_STEPS_CAP",
    "METHODS",
    "PrivacyUnit",
    "calibrate",
    "default_delta",
    "epsilon",
    "epsilon_for_segments",
    "max_steps",
]

METHODS = ("pld", "rdp")
# dp-accounting's own default; the PLD error in ε is of this order (pessimistic, i.e. upward).
DEFAULT_PLD_DISCRETIZATION = 1e-4
# calibrate() searches the effective σ/k within [MIN, MAX]: beyond MAX it reports the target
# unreachable; a target already met at MIN returns MIN (smaller σ is meaningless in practice and
# makes PLD slow).
MAX_NOISE_MULTIPLIER = 1e4
MIN_NOISE_MULTIPLIER = 1e-2
# max_steps() stops searching here and reports this many (it means "at least this many").
MAX_STEPS_CAP = 10**8


class PrivacyUnit(enum.StrEnum):
    """What is clipped, and so what one ε protects (see the module docstring's table).

    The one definition of each unit's sensitivities (docs/units-and-sensitivity.md): the
    clipping policy, the ledger and the accountant all read them from here.
    """

    EXAMPLE = "example"
    MICROBATCH = "microbatch"
    CORE = "core"
    SPEAKER = "speaker"
    CLIENT = "client"

    @property
    def protects(self) -> str:
        """The entity whose presence the guarantee hides: 'example' or 'speaker'."""
        return "speaker" if self in (PrivacyUnit.CLIENT, PrivacyUnit.SPEAKER) else "example"

    @property
    def description(self) -> str:
        return {
            PrivacyUnit.EXAMPLE: "(ε, δ)-DP per example (per-example clipping)",
            PrivacyUnit.MICROBATCH: "(ε, δ)-DP per example (micro-batch clipping, fixed groups)",
            PrivacyUnit.CORE: "(ε, δ)-DP per example (per-core clipping, fixed shards)",
            PrivacyUnit.SPEAKER: "(ε, δ)-DP per speaker (user-level, speaker-level clipping)",
            PrivacyUnit.CLIENT: "(ε, δ)-DP per speaker (user-level, one client = one speaker)",
        }[self]

    @property
    def sensitivity_factor(self) -> float:
        """k: how far adding or removing one protected entity moves the clipped sum, in units
        of the total bound C. 1 when the entity is one unit (example, speaker, client); 2 when
        it is one example inside a fixed group (micro-batch, core): the group's clipped mean
        moves from one point of the C-ball to another."""
        return 2.0 if self in (PrivacyUnit.MICROBATCH, PrivacyUnit.CORE) else 1.0

    @property
    def count_sensitivity(self) -> float:
        """L2 sensitivity of the quantile bound's released count: ½ when the entity is one
        unit (the count is centred, Σ(b_u − ½), Andrew et al. 2021), 1 for fixed groups (one
        example can flip its group's b or make an empty group appear; the count is Σ b_u)."""
        return 1.0 if self in (PrivacyUnit.MICROBATCH, PrivacyUnit.CORE) else 0.5


def default_delta(population: int) -> float:
    """δ for a population of N protected entities: min(1e-5, N^-1.1).

    δ must be well below 1/N: a mechanism that publishes one random record whole is
    (0, 1/N)-DP. N^-1.1 is the rule of "How to DP-fy ML" (Ponomareva et al. 2023, §5.2);
    1e-5 caps it for the small populations of the embedded corpus.
    """
    n = int(population)
    if n < 1:
        raise ValueError(f"the population must be >= 1, got {population}")
    return min(1e-5, float(n) ** -1.1)


def check_unit(unit: str | PrivacyUnit) -> PrivacyUnit:
    try:
        return PrivacyUnit(unit)
    except ValueError:
        raise ValueError(f"unit must be one of {[u.value for u in PrivacyUnit]}, "
                         f"got {unit!r}") from None


# --------------------------------------------------------------------------- validation


def check_method(method: str) -> str:
    m = str(method).lower()
    if m not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return m


def check_delta(delta: float) -> float:
    delta = float(delta)
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return delta


def check_sigma(noise_multiplier: float) -> float:
    sigma = float(noise_multiplier)
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    return sigma


def check_q(sample_rate: float, *, allow_zero: bool) -> float:
    q = float(sample_rate)
    ok = (0.0 <= q <= 1.0) if allow_zero else (0.0 < q <= 1.0)
    if not ok:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"sample_rate must be in {interval}, got {sample_rate}")
    return q


def check_steps(steps: int, *, minimum: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        if isinstance(steps, float) and steps.is_integer():
            steps = int(steps)
        else:
            raise ValueError(f"steps must be an integer, got {steps!r}")
    steps = int(steps)
    if steps < minimum:
        raise ValueError(f"steps must be >= {minimum}, got {steps}")
    return steps


def check_factor(sensitivity_factor: float) -> float:
    k = float(sensitivity_factor)
    if not (k > 0.0 and math.isfinite(k)):
        raise ValueError(f"sensitivity_factor must be finite and > 0, got {sensitivity_factor}")
    return k


# --------------------------------------------------------------------------- core computation


@functools.lru_cache(maxsize=32)
def _pld_one_step(sigma: float, q: float, grid: float):
    """PLD of one Poisson-subsampled Gaussian step (add/remove), as ``PLDAccountant`` builds it.

    Building it dominates the cost for moderate step counts and does not depend on the number
    of steps, so it is cached: a search over step counts builds it once.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    return pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma, value_discretization_interval=grid, sampling_prob=q)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(segments: tuple[tuple[int, float, float], ...], delta: float, method: str,
                    pld_discretization: float) -> float:
    """ε of composed segments (steps, effective σ, q); segments are already validated/cleaned."""
    import dp_accounting

    segments = tuple(s for s in segments if s[0] > 0 and s[2] > 0.0)
    if not segments:
        return 0.0
    if any(sigma == 0.0 for _, sigma, _ in segments):
        return math.inf
    if method == "pld":
        # Same construction as dp_accounting.pld.PLDAccountant (pessimistic estimate,
        # connect-the-dots, add/remove), with the one-step PLD cached.
        total = None
        for steps, sigma, q in segments:
            part = _pld_one_step(sigma, q, pld_discretization).self_compose(steps)
            total = part if total is None else total.compose(part)
        eps = total.get_epsilon_for_delta(delta)
    else:
        events = [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
                steps)
            for steps, sigma, q in segments
        ]
        acc = dp_accounting.rdp.RdpAccountant()
        with _quiet_absl():   # "failed to converge ... Excluding this order": harmless, noisy
            acc.compose(events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events))
            eps = acc.get_epsilon(delta)
    return max(0.0, float(eps))


@contextlib.contextmanager
def _quiet_absl():
    from absl import logging as absl_logging
    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(before)


def _clean_segments(segments: Iterable[Sequence[float]], sensitivity_factor: float
                    ) -> tuple[tuple[int, float, float], ...]:
    out = []
    for seg in segments:
        if len(seg) != 3:
            raise ValueError(f"a segment is (steps, noise_multiplier, sample_rate), got {seg!r}")
        steps, sigma, q = seg
        out.append((check_steps(steps, minimum=0), check_sigma(sigma) / sensitivity_factor,
                    check_q(q, allow_zero=True)))
    return tuple(out)


def epsilon_for_segments(segments: Iterable[Sequence[float]], delta: float, *,
                         method: str = "pld", sensitivity_factor: float = 1.0,
                         pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> float:
    """ε after composing segments ``(steps, noise_multiplier, sample_rate)`` in order.

    Use this when σ or q changed during training; :func:`epsilon` is the one-segment case.
    Results are cached (same inputs → same float, no recomputation).
    """
    k = check_factor(sensitivity_factor)
    return _epsilon_cached(_clean_segments(segments, k), check_delta(delta),
                           check_method(method), float(pld_discretization))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, *,
            method: str = "pld", sensitivity_factor: float = 1.0,
            pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> float:
    """ε of DP-SGD: ``steps`` Poisson-subsampled Gaussian steps at (σ, q), for a given δ.

    The noise std on the sum of clipped units is ``noise_multiplier · C``; one protected entity
    moves that sum by at most ``sensitivity_factor · C`` (table in the module docstring), so the
    accounting uses σ / sensitivity_factor. σ = 0 → ``inf`` (for steps ≥ 1 and q > 0); steps = 0
    or q = 0 → 0.
    """
    return epsilon_for_segments([(steps, noise_multiplier, sample_rate)], delta, method=method,
                                sensitivity_factor=sensitivity_factor,
                                pld_discretization=pld_discretization)


def _bracket_and_bisect(eps_fn, target: float, guess: float, tol: float, factor: float) -> float:
    """Smallest σ (to relative width ``tol``) with eps_fn(σ) ≤ target, searching near ``guess``.

    Brackets by stepping ×/÷ ``factor`` from the guess (so ε is never evaluated far below the
    answer, where PLD is slow), then bisects. Returns the upper end: always meets the target.
    """
    hi = guess
    if eps_fn(hi) > target:
        lo = hi
        while True:
            hi = lo * factor
            if hi > MAX_NOISE_MULTIPLIER:
                raise _Unreachable()
            if eps_fn(hi) <= target:
                break
            lo = hi
    else:
        while True:
            lo = hi / factor
            if lo < MIN_NOISE_MULTIPLIER:
                return hi  # any smaller σ is meaningless in practice
            if eps_fn(lo) > target:
                break
            hi = lo
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        if eps_fn(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


class _Unreachable(Exception):
    pass


def calibrate(target_epsilon: float, delta: float, steps: int, sample_rate: float, *,
              method: str = "pld", sensitivity_factor: float = 1.0, tol: float = 1e-3,
              pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
              prior_segments: Iterable[Sequence[float]] = ()) -> float:
    """The smallest noise multiplier σ with ``epsilon(σ, q, steps, δ) ≤ target_epsilon``.

    Bisection on σ (ε is decreasing in σ) down to a *relative* bracket width ``tol``; the value
    returned is the upper end of the final bracket, so ``epsilon(calibrate(ε*)) ≤ ε*`` always
    holds and the result is at most a factor (1 + tol) above the exact smallest σ (on the same
    grid). The search runs on the effective multiplier σ/k and the result is multiplied by
    k = ``sensitivity_factor``, so k = 2 gives exactly twice the σ of k = 1.

    Cost: RDP (cheap) brackets σ first; for PLD a pass on a 10× coarser grid (itself an upper
    bound) narrows it, then a few evaluations on the fine grid finish. About 1-4 s on one CPU
    core for typical DP-SGD settings, up to ~10 s when σ < 0.7 (large ε), where PLD is slow. σ below ``MIN_NOISE_MULTIPLIER`` (1e-2, effective) is not
    searched: if it already meets the target, that floor is returned.

    ``prior_segments`` (steps, σ, q) already spent (e.g. before a resume with a new budget)
    come first: σ is then the noise of the remaining ``steps`` so that the whole run spends
    ``target_epsilon``.

    Raises ValueError for target_epsilon ≤ 0, δ ∉ (0, 1), q ∉ (0, 1], steps < 1, tol ∉ (0, 1),
    and when even σ = ``MAX_NOISE_MULTIPLIER``·k does not reach the target.
    """
    target_epsilon = float(target_epsilon)
    if not (target_epsilon > 0.0) or math.isnan(target_epsilon):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    delta = check_delta(delta)
    steps = check_steps(steps, minimum=1)
    q = check_q(sample_rate, allow_zero=False)
    method = check_method(method)
    k = check_factor(sensitivity_factor)
    tol = float(tol)
    if not (0.0 < tol < 1.0):
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    if math.isinf(target_epsilon):
        return 0.0
    fine = float(pld_discretization)
    prior = _clean_segments(prior_segments, k)
    if _epsilon_cached(prior, delta, method, fine) >= target_epsilon:
        raise ValueError(f"the steps already taken spend ε ≥ {target_epsilon:g} at δ = {delta:g}: "
                         "no noise multiplier can keep the remaining steps within the budget")

    def eps_fn(method_: str, grid: float):
        return lambda sigma_eff: _epsilon_cached(prior + ((steps, sigma_eff, q),), delta,
                                                 method_, grid)

    try:
        sigma = _bracket_and_bisect(eps_fn("rdp", fine), target_epsilon, 1.0,
                                    min(tol, 1e-2), 2.0)
        if method == "pld":
            # RDP ε ≥ PLD ε, so the RDP answer is just above the PLD one (typically 3-15 %).
            sigma = _bracket_and_bisect(eps_fn("pld", fine * 10.0), target_epsilon, sigma,
                                        tol, 1.25)
            # The grids agree to ~0.1 % in σ: usually two fine evaluations settle it.
            sigma = _bracket_and_bisect(eps_fn("pld", fine), target_epsilon, sigma, tol,
                                        1.0 + tol)
        elif tol < 1e-2:
            sigma = _bracket_and_bisect(eps_fn("rdp", fine), target_epsilon, sigma, tol,
                                        1.0 + 4.0 * tol)
    except _Unreachable:
        raise ValueError(
            f"no noise multiplier up to {MAX_NOISE_MULTIPLIER * k:g} reaches "
            f"ε ≤ {target_epsilon:g} at δ = {delta:g} with q = {q:g} and {steps} steps "
            f"({method.upper()}); raise the budget or lower q or the number of steps") from None
    return sigma * k


def max_steps(noise_multiplier: float, sample_rate: float, delta: float,
              target_epsilon: float, *, method: str = "pld", sensitivity_factor: float = 1.0,
              prior_segments: Iterable[Sequence[float]] = (),
              pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> int:
    """The largest n ≥ 0 such that ``prior_segments`` followed by n steps at (σ, q) has ε ≤ target.

    Exponential then binary search on n (ε is non-decreasing in n): about 2·log2(n) ε
    evaluations. Returns ``MAX_STEPS_CAP`` when even that many steps fit.
    """
    target_epsilon = float(target_epsilon)
    if not (target_epsilon >= 0.0) or math.isnan(target_epsilon):
        raise ValueError(f"target_epsilon must be >= 0, got {target_epsilon}")
    k = check_factor(sensitivity_factor)
    prior = _clean_segments(prior_segments, k)
    sigma_eff = check_sigma(noise_multiplier) / k
    q = check_q(sample_rate, allow_zero=True)
    delta = check_delta(delta)
    method = check_method(method)
    grid = float(pld_discretization)

    def fits(n: int) -> bool:
        return _epsilon_cached(prior + ((n, sigma_eff, q),), delta, method, grid) <= target_epsilon

    if not fits(0):
        return 0  # the prior segments alone already exceed the budget
    if q == 0.0 or math.isinf(target_epsilon):
        return MAX_STEPS_CAP
    lo, hi = 0, 1  # fits(lo) holds
    while fits(hi):
        lo = hi
        if hi >= MAX_STEPS_CAP:
            return MAX_STEPS_CAP
        hi = min(hi * 2, MAX_STEPS_CAP)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
