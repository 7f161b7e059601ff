"""``ClipPolicy``: *what* is clipped, to which bound, with how much noise (docs/one-equation.md).

    g = ( Σ_{u in units} clip(g_u ; C, scope)  +  σ·C·ξ ) / E[#units]        ξ ~ N(0, I)

A policy is a frozen, validated value; engines (``privasr.clipping.engines``) say *how* the sum
of clipped unit gradients is computed, and ``ClippedGradient`` adds the noise and divides.

Units
    ``batch``       the mean gradient of the whole logical batch (ordinary clipping), 1 unit.
    ``example``     each example's gradient (DP-SGD); E[#units] = q·N under Poisson sampling.
    ``microbatch``  the mean gradient of a group of ≈ m examples (micro-batch clipping, §5).
    ``core``        a data-parallel worker's local mean gradient (PCC). On one process this
                    *is* micro-batch clipping with ``num_cores`` = K groups (m ≈ B/K).
    ``speaker``     the mean gradient of one speaker's utterances in the step (user-level DP in
                    central training): speakers are Poisson-sampled with all their
                    utterances, E[#units] = q·N_speakers, sensitivity C.
    ``client``      one federated client's model delta (one speaker); the server's unit.

Grouping (microbatch / core). The logical batch is split into G groups, G fixed per step:
    core:        G = num_cores.
    microbatch:  G = expected_units, which defaults to ceil(expected_batch_size / m); only when
                 neither is known (σ = 0) is G = ceil(realised batch size / m) per step.
``grouping="hash"`` (default) puts example ``id`` into group ``blake2b(seed, step, id) mod G``:
an example's group depends only on its own id and the (public) step, never on which other
examples were sampled, so adding or removing one example changes exactly one group's mean, by
at most 2C after clipping -- the sensitivity the accountant must charge (``sensitivity_factor``).
Under Poisson sampling with E[B] = G·m the group sizes are Binomial-like with mean ≈ m (a few
groups may be empty; they contribute nothing, and the denominator stays G).
``grouping="contiguous"`` cuts the batch in order into G runs whose sizes differ by at most one
(what a data-parallel shard or paper §5's micro-batches look like); one extra example shifts
every later group, so it is refused with σ > 0.

Bounds
    ``fixed``        C = clip_norm.
    ``adaptive_min`` APCC (§2): C_t = min over this step's units of ‖g_u‖, so every unit is
                     rescaled to the smallest norm. Data-dependent, hence σ = 0 only.
    ``quantile``     Andrew et al. 2021: clip to C_t, count the units with ‖g_u‖ ≤ C_t, noise
                     the count, C_{t+1} = C_t·exp(−η·(b̃_t − γ)) with
                     b̃_t = (count + N(0, σ_b²)) / E[#units] (+ ½ for example units, whose
                     count is centred: Σ(b_i − ½), sensitivity ½). The count's noise
                     multiplier σ_b is ``quantile_noise_multiplier``; see
                     ``accounting_noise_multiplier`` and ``count_sensitivity``.

Scopes
    ``global``       one L2 norm over all trainable parameters: g · min(1, C/‖g‖).
    ``per_layer``    a "layer" is one trainable parameter tensor. Either
        ``layer_bounds={pattern: C_l}`` (fnmatch on the dotted name, first match wins, every
        trainable tensor must be matched and every pattern must match one): each tensor is
        clipped to its own C_l; the total bound (and noise scale) is sqrt(Σ_l C_l²);
        or ``per_layer_rule="uniform"`` (ml-pfl4asr ``clip_layer_grads``, §4): if the total
        norm ‖g‖ < C the unit is unchanged, otherwise every tensor is rescaled to norm C/√L
        (g_l / (‖g_l‖ + 1e-10) · C/√L, L = number of trainable tensors), so the total is C.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from privasr.errors import PolicyError
from privasr.privacy.accountant import PrivacyUnit

__all__ = ["ClipPolicy", "PolicyError", "UNITS", "BOUNDS", "SCOPES", "GROUPINGS",
           "assign_groups", "batch_units", "split_noise_multiplier"]

UNITS = ("batch", "example", "microbatch", "core", "speaker", "client")
# units whose sensitivity and count come from the privacy floor (batch has no DP meaning)
DP_UNITS = {u.value: u for u in PrivacyUnit}
BOUNDS = ("fixed", "adaptive_min", "quantile")
SCOPES = ("global", "per_layer")
GROUPINGS = ("hash", "contiguous")
PER_LAYER_RULES = ("uniform",)


def _finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True, kw_only=True)
class ClipPolicy:
    """What to clip and how much noise to add; see the module docstring for the semantics."""

    unit: str = "example"
    bound: str = "fixed"
    clip_norm: float | None = 1.0
    scope: str = "global"
    layer_bounds: Mapping[str, float] | None = None
    per_layer_rule: str | None = None
    noise_multiplier: float = 0.0
    microbatch_size: int | None = None
    num_cores: int | None = None
    grouping: str = "hash"
    group_seed: int = 0
    expected_batch_size: float | None = None
    expected_units: float | None = None
    # quantile-adaptive bound (Andrew et al. 2021)
    target_quantile: float = 0.5
    quantile_lr: float = 0.2
    quantile_noise_multiplier: float = 0.0

    # -- validation -----------------------------------------------------------------------
    def __post_init__(self) -> None:
        def bad(msg: str) -> PolicyError:
            return PolicyError(f"invalid ClipPolicy: {msg}")

        for name, valid in (("unit", UNITS), ("bound", BOUNDS), ("scope", SCOPES),
                            ("grouping", GROUPINGS)):
            if getattr(self, name) not in valid:
                raise bad(f"{name}={getattr(self, name)!r}; valid: {', '.join(valid)}")
        sigma = self.noise_multiplier
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise bad(f"noise_multiplier must be a finite number >= 0 (got {sigma!r}); "
                      "0 means clipping only (memorization mitigation, no formal DP)")

        # bound & clip_norm
        if self.layer_bounds is not None:
            if self.clip_norm is not None:
                raise bad("give either clip_norm or layer_bounds, not both: with layer_bounds "
                          "the total bound is sqrt(sum of C_l^2) over the parameter tensors, so "
                          "clip_norm would be ignored (set clip_norm=None)")
        elif self.bound == "adaptive_min":
            pass  # clip_norm is ignored (and may be left at its default)
        elif not _finite_positive(self.clip_norm):
            raise bad(f"clip_norm must be a finite number > 0 (got {self.clip_norm!r}): it is "
                      "the L2 bound every unit's gradient is clipped to"
                      + (" (the initial bound for bound='quantile')"
                         if self.bound == "quantile" else ""))
        if self.bound == "adaptive_min" and sigma > 0:
            raise bad("bound='adaptive_min' with noise_multiplier > 0: a data-dependent bound "
                      "leaks (C_t = min unit norm is itself a function of the private data); "
                      "adaptive_min is for memorization mitigation with σ=0; use "
                      "bound='quantile' for DP")
        if self.bound == "quantile":
            if not 0.0 < self.target_quantile < 1.0:
                raise bad(f"target_quantile must be in (0, 1) (got {self.target_quantile})")
            if not _finite_positive(self.quantile_lr):
                raise bad(f"quantile_lr must be > 0 (got {self.quantile_lr})")
            qs = self.quantile_noise_multiplier
            if not (isinstance(qs, (int, float)) and math.isfinite(qs) and qs >= 0):
                raise bad(f"quantile_noise_multiplier must be >= 0 (got {qs!r})")
            if sigma > 0 and qs <= 0:
                raise bad("bound='quantile' with noise_multiplier > 0 needs "
                          "quantile_noise_multiplier > 0: the count of unclipped units that "
                          "moves the bound is data-dependent and must be noised too (Andrew et "
                          "al. suggest about E[#units]/20)")
        elif self.quantile_noise_multiplier:
            raise bad("quantile_noise_multiplier is only used with bound='quantile'")

        # scope
        if self.scope == "global":
            if self.layer_bounds is not None or self.per_layer_rule is not None:
                raise bad("layer_bounds / per_layer_rule need scope='per_layer'")
        else:
            if (self.layer_bounds is None) == (self.per_layer_rule is None):
                raise bad("scope='per_layer' needs exactly one of layer_bounds "
                          "({param-name pattern: bound}) or per_layer_rule='uniform'")
            if self.per_layer_rule is not None and self.per_layer_rule not in PER_LAYER_RULES:
                raise bad(f"per_layer_rule={self.per_layer_rule!r}; valid: "
                          f"{', '.join(PER_LAYER_RULES)}")
            if self.layer_bounds is not None:
                if not isinstance(self.layer_bounds, Mapping) or not self.layer_bounds:
                    raise bad("layer_bounds must be a non-empty mapping {pattern: bound}")
                for pat, c in self.layer_bounds.items():
                    if not isinstance(pat, str) or not _finite_positive(c):
                        raise bad(f"layer_bounds[{pat!r}] = {c!r}: every bound must be a "
                                  "finite number > 0 keyed by a parameter-name pattern")
                if self.bound != "fixed":
                    raise bad(f"bound={self.bound!r} with layer_bounds: the user-given per-layer "
                              "bounds would be overridden by the adaptive one; use "
                              "per_layer_rule='uniform' (one adaptive total bound) or "
                              "bound='fixed'")
                object.__setattr__(self, "layer_bounds", dict(self.layer_bounds))

        if self.unit == "client" and self.bound != "fixed":
            raise bad(f"unit='client' with bound={self.bound!r}: the federated server keeps no "
                      "bound state across rounds; use bound='fixed'")

        # unit-specific sizes
        if self.unit == "microbatch":
            m = self.microbatch_size
            if m is None:
                raise bad("unit='microbatch' needs microbatch_size (m examples per micro-batch)")
            if not isinstance(m, int) or isinstance(m, bool) or m < 1:
                raise bad(f"microbatch_size must be an integer >= 1 (got {m!r})")
        elif self.microbatch_size is not None:
            raise bad(f"microbatch_size is only used with unit='microbatch' (unit={self.unit!r}); "
                      "for per-core clipping give num_cores")
        if self.unit == "core":
            k = self.num_cores
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise bad(f"unit='core' needs num_cores, an integer >= 1 (got {k!r}): the number "
                          "of (virtual) data-parallel workers, each clipping its local mean")
        elif self.num_cores is not None:
            raise bad(f"num_cores is only used with unit='core' (unit={self.unit!r})")
        if self.grouping == "contiguous" and sigma > 0 and self.unit in ("microbatch", "core"):
            raise bad("grouping='contiguous' with noise_multiplier > 0: adding or removing one "
                      "example shifts every later group, so the 2C sensitivity argument fails; "
                      "use grouping='hash' (fixed groups by example id)")

        # the denominator E[#units]
        ebs = self.expected_batch_size
        if ebs is not None and not _finite_positive(ebs):
            raise bad(f"expected_batch_size must be > 0 (got {ebs!r})")
        if self.unit == "batch":
            derived: float | None = 1.0
        elif self.unit == "core":
            derived = float(self.num_cores)
        elif ebs is None:
            derived = None
        elif self.unit in ("example", "speaker", "client"):
            derived = float(ebs)
        else:
            derived = float(math.ceil(ebs / self.microbatch_size - 1e-9))
        eu = self.expected_units
        if eu is not None:
            if not _finite_positive(eu):
                raise bad(f"expected_units must be > 0 (got {eu!r}): it is the fixed "
                          "denominator E[#units]")
            if self.unit == "microbatch" and float(eu) != int(eu):
                raise bad(f"expected_units={eu} for unit='microbatch' is the number of groups G "
                          "per logical batch and must be an integer")
            if derived is not None and not math.isclose(float(eu), float(derived), rel_tol=1e-9):
                why = {"batch": "unit='batch' has exactly 1 unit",
                       "core": f"unit='core' has num_cores={self.num_cores} units",
                       "example": f"expected_batch_size={ebs} examples are the units",
                       "speaker": f"expected_batch_size={ebs} speakers are the units",
                       "client": f"expected_batch_size={ebs} clients are the units",
                       "microbatch": f"ceil(expected_batch_size/microbatch_size) = {derived}"}
                raise bad(f"expected_units={eu} contradicts {why[self.unit]}")
        elif derived is not None:
            object.__setattr__(self, "expected_units", float(derived))
        if self.expected_units is None and (sigma > 0 or self.quantile_noise_multiplier > 0):
            raise bad("noise_multiplier > 0 needs a fixed denominator: give expected_units "
                      "(E[#units], e.g. q·N for unit='example') or expected_batch_size; the "
                      "realised number of units is data-dependent and would leak")

    # -- derived quantities -----------------------------------------------------------------
    @property
    def privacy_unit(self) -> PrivacyUnit | None:
        """What one ε of this policy protects (None for ``batch``, which gives no DP)."""
        return DP_UNITS.get(self.unit)

    @property
    def sensitivity_factor(self) -> float:
        """How far one protected entity can move the clipped sum, in units of the total bound:
        ``PrivacyUnit.sensitivity_factor`` (1 for example / speaker / client, 2 for groups;
        2 for ``batch`` too: one example changes the one batch mean)."""
        unit = self.privacy_unit
        return 2.0 if unit is None else unit.sensitivity_factor

    def accounting_noise_multiplier(self) -> float:
        """The noise multiplier one step costs, for a Gaussian-mechanism accountant.

        z_grad = σ / sensitivity_factor. With ``bound='quantile'`` the noised count is a second
        Gaussian query released in the same step: its sensitivity is 1/2 for example units
        (Andrew et al. count Σ(b_i − ½)) and 1 for group units, so z_count = σ_b / sensitivity
        and the two compose to z = (z_grad⁻² + z_count⁻²)^(−1/2). Returns 0 (no DP) when σ = 0.
        """
        if self.noise_multiplier == 0:
            return 0.0
        z = self.noise_multiplier / self.sensitivity_factor
        if self.bound == "quantile":
            z_count = self.quantile_noise_multiplier / self.count_sensitivity
            z = (z ** -2 + z_count ** -2) ** -0.5
        return z

    def ledger_noise_multiplier(self) -> float:
        """The σ the privacy ledger records for this policy: a single Gaussian query on the
        clipped sum with sensitivity ``sensitivity_factor``·C whose cost is that of this
        policy's step (gradient and, for the quantile bound, the count) -- i.e.
        :meth:`accounting_noise_multiplier` × k. The ledger divides by k again."""
        return self.accounting_noise_multiplier() * self.sensitivity_factor

    def with_ledger_noise(self, sigma: float) -> "ClipPolicy":
        """This policy with the noise multiplier whose :meth:`ledger_noise_multiplier` is
        ``sigma`` (e.g. calibrated to a budget); for the quantile bound the count keeps its
        σ_b and the gradient gets the rest (:func:`split_noise_multiplier`)."""
        z = sigma / self.sensitivity_factor
        if self.bound == "quantile":
            z = split_noise_multiplier(z, self.quantile_noise_multiplier,
                                       count_sensitivity=self.count_sensitivity)
        return dataclasses.replace(self, noise_multiplier=z * self.sensitivity_factor)

    @property
    def count_sensitivity(self) -> float:
        """L2 sensitivity of the quantile bound's released count (:meth:`quantile_count`):
        ``PrivacyUnit.count_sensitivity`` -- ½ for a centred count Σ(b_u − ½) of units that
        are protected entities (example, speaker), 1 for groups (Σ b_u)."""
        unit = self.privacy_unit
        return 1.0 if unit is None else unit.count_sensitivity

    @property
    def _centred(self) -> bool:
        return self.count_sensitivity == 0.5

    def quantile_count(self, unclipped: int, units: int) -> float:
        """The count released (before its noise) for a step with ``units`` realised units of
        which ``unclipped`` had norm ≤ C_t; its sensitivity is :attr:`count_sensitivity`."""
        return unclipped - 0.5 * units if self._centred else float(unclipped)

    def quantile_fraction(self, noised_count: float, denominator: float) -> float:
        """b̃_t, the estimate of the unclipped fraction, from the noised released count and the
        step's denominator (E[#units])."""
        frac = noised_count / float(denominator)
        return frac + 0.5 if self._centred else frac

    def num_groups(self, realised_batch_size: int) -> int:
        """G, the number of groups a logical batch is split into (1 unit per group)."""
        if self.unit == "batch":
            return 1
        if self.unit == "core":
            return int(self.num_cores)
        if self.unit == "microbatch":
            if self.expected_units is not None:
                return int(self.expected_units)
            return max(1, math.ceil(realised_batch_size / self.microbatch_size))
        return realised_batch_size

    # -- (de)serialisation ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClipPolicy":
        """From a YAML mapping; unknown keys raise a PolicyError naming them."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise PolicyError(f"unknown ClipPolicy key(s) {unknown}; valid keys: {', '.join(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["layer_bounds"] is not None:
            d["layer_bounds"] = dict(d["layer_bounds"])
        return d


def split_noise_multiplier(total: float, quantile_noise_multiplier: float, *,
                           count_sensitivity: float = 0.5) -> float:
    """The gradient noise multiplier σ that, with the quantile count's noise, costs ``total``.

    Andrew et al. 2021, Thm. 1 form: σ = (total⁻² − (σ_b / s)⁻²)^(−1/2) with s the count's
    sensitivity. Raises when the count alone already costs more than ``total``.
    """
    z_count = quantile_noise_multiplier / count_sensitivity
    rest = total ** -2 - z_count ** -2
    if rest <= 0:
        raise PolicyError(f"quantile_noise_multiplier={quantile_noise_multiplier} is too small: "
                          f"the count alone costs more than noise multiplier {total}")
    return rest ** -0.5


def _hash_group(seed: int, step: int, uid: str, groups: int) -> int:
    h = hashlib.blake2b(f"{seed}:{step}:{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % groups


def assign_groups(policy: ClipPolicy, ids: Sequence[str], step: int = 0,
                  speakers: Sequence[str] | None = None) -> tuple[list[int], int]:
    """(unit index of each example of the logical batch, in order; number of unit slots G).

    ``example``: every example is its own unit. ``batch``: one unit. ``speaker``: one unit per
    distinct speaker (``speakers``, one per example), in order of first appearance.
    ``microbatch``/``core``: see the module docstring (hash of (group_seed, step, id) mod G, or
    contiguous runs).
    """
    n = len(ids)
    if policy.unit in ("example", "client"):
        return list(range(n)), n
    if policy.unit == "speaker":
        if speakers is None or len(speakers) != n:
            raise PolicyError("unit='speaker' needs the speaker of every example (Batch.speakers "
                              "is unset: build batches with AsrDataset.collate)")
        index: dict[str, int] = {}
        return [index.setdefault(s, len(index)) for s in speakers], len(set(speakers))
    g = policy.num_groups(n)
    if policy.unit == "batch":
        return [0] * n, 1
    if policy.grouping == "contiguous":
        # G nearly equal runs in order: the first n % G runs get one extra example
        base, extra = divmod(n, g)
        out: list[int] = []
        for k in range(g):
            out += [k] * (base + (k < extra))
        return out, g
    return [_hash_group(policy.group_seed, step, str(u), g) for u in ids], g


def batch_units(policy: ClipPolicy, batches: Sequence[Any], step: int = 0
                ) -> tuple[list[int], int]:
    """:func:`assign_groups` over the examples of the physical ``batches`` (``.ids``,
    ``.speakers``) of one logical batch, in order."""
    ids = [i for b in batches for i in b.ids]
    speakers = None
    if policy.unit == "speaker":
        speakers = [s for b in batches for s in (b.speakers or [None] * len(b))]
        if any(s is None for s in speakers):
            speakers = None
    return assign_groups(policy, ids, step, speakers)
