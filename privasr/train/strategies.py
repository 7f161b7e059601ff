"""From a recipe's ``privacy`` section to the trainer's pluggable pieces: the gradient
strategy (ordinary, clipped per unit, DP-SGD) and the batch plan (buckets or Poisson)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from privasr.clipping.percore import PerCoreGradient
from privasr.clipping.policy import ClipPolicy
from privasr.clipping.sharded import SHARDED_UNITS, ShardedClippedGradient
from privasr.clipping.strategy import ClippedGradient
from privasr.config import TrainConfig
from privasr.data.dataset import AsrDataset, Batch, DurationBucketSampler
from privasr.data.poisson import PoissonSampler
from privasr.errors import PolicyError
from privasr.privacy.accountant import calibrate, default_delta
from privasr.privacy.ledger import LedgerMismatch, PrivacyLedger, resume_ledger
from privasr.privacy.randomness import RandomSource, SecretRandomness, SeededRandomness
from privasr.train.distributed import (DistContext, DistributedMeanGradient, contiguous_shard,
                                       share_randomness)
from privasr.train.gradient import BatchClipGradient, GradientStrategy, LossFn
from privasr.train.trainer import BucketPlan, PoissonPlan


# stats a DP strategy may release: functions of public settings or of already-noised values
PUBLIC_STATS = ("noise_std", "bound")


class PrivateGradient:
    """A clipped-gradient strategy whose steps are charged to a privacy ledger.

    The ledger records what this strategy applies: before each step it is set to the σ of the
    policy the noise is drawn with and the q of the sampler, then the budget check refuses
    (``PrivacyBudgetExceeded``, which stops training cleanly) a step that would exceed the
    budget. ``state_dict`` holds the ledger and the bound state -- never noise or sampling
    state, except for the seeded generator of a debugging run (which has no guarantee). On resume (:meth:`load_state_dict`) the checkpoint's ledger is continued with the
    recipe's settings (:func:`privasr.privacy.ledger.resume_ledger`); when σ was calibrated to
    a budget and the settings changed, σ is recalibrated so that the remaining steps fit the
    (new) budget after the spent ones. ``notices`` says what changed.

    ``private_stats`` False (the default for DP runs) drops the per-step statistics of the
    private batch (loss, norm quantiles, fraction clipped, realised units and examples) from
    what ``fill_grads`` returns: ε does not cover them.
    """

    def __init__(self, clipped: ClippedGradient | PerCoreGradient | ShardedClippedGradient,
                 ledger: PrivacyLedger | None, *,
                 sample_rate: float | None = None, calibration: "Calibration | None" = None,
                 private_stats: bool = True) -> None:
        self.clipped, self.ledger = clipped, ledger
        self.sample_rate, self.calibration = sample_rate, calibration
        self.private_stats = private_stats
        self.notices: list[str] = []
        if ledger is not None and sample_rate is None:
            raise ValueError("a ledger needs the sampler's rate q")

    def mechanism(self) -> tuple[float, float]:
        """(σ as the ledger counts it, q) of the next step, from the policy the noise uses."""
        return self.clipped.policy.ledger_noise_multiplier(), self.sample_rate

    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        if self.ledger is not None:
            sigma, q = self.mechanism()
            self.ledger.set_params(noise_multiplier=sigma, sample_rate=q)
            self.ledger.check_before_step()
        stats = self.clipped.fill_grads(model, batches, loss_fn)
        if self.ledger is not None:
            self.ledger.record_step()
        if not self.private_stats:
            stats = {"loss": math.nan, **{k: v for k, v in stats.items() if k in PUBLIC_STATS}}
        return stats

    def state_dict(self) -> dict[str, Any]:
        state = {"clip": self.clipped.state_dict(),
                 "ledger": self.ledger.to_dict() if self.ledger is not None else None}
        gen = self._seeded_generator()
        if gen is not None:   # seeded (debugging, no guarantee): exact resume of the noise
            state["noise_rng"] = gen.get_state()
        return state

    def _seeded_generator(self) -> torch.Generator | None:
        noise = getattr(self.clipped, "noise", None)
        return None if noise is None or noise.secure else noise.generator

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("ledger")
        trained = int((state.get("clip") or {}).get("step", 0)) > 0
        if saved is None and self.ledger is not None and trained:
            raise LedgerMismatch("cannot resume: the checkpoint's steps were taken without DP "
                                 "noise (no privacy ledger), so no ε can cover this run; start a "
                                 "new run in another out_dir")
        if saved is not None and self.ledger is None:
            raise LedgerMismatch("cannot resume: the checkpoint is of a DP run (it has a privacy "
                                 "ledger) but the recipe has no noise: continuing would void its "
                                 "guarantee; keep the privacy settings or start a new run")
        self.clipped.load_state_dict(state["clip"])
        gen = self._seeded_generator()
        if gen is not None and state.get("noise_rng") is not None:
            gen.set_state(state["noise_rng"])
        if saved is None:
            return
        old = PrivacyLedger.from_dict(saved)
        self.ledger, self.notices = resume_ledger(old, self.ledger)
        if self.calibration is not None and self.notices:
            self._recalibrate()

    def _recalibrate(self) -> None:
        led, cal = self.ledger, self.calibration
        left = cal.max_steps - led.steps
        if left < 1 or led.target_epsilon is None:
            return
        if led.would_exceed(0) or led.epsilon() >= led.target_epsilon:
            return  # the budget check stops the run with its own message
        sigma = calibrate(led.target_epsilon, led.delta, left, self.sample_rate,
                          method=led.method, sensitivity_factor=led.sensitivity_factor,
                          prior_segments=led.segments)
        policy = self.clipped.policy.with_ledger_noise(sigma)
        self.clipped.policy = policy
        self.notices.append(f"privacy: σ recalibrated to {policy.noise_multiplier:.4g} for the "
                            f"remaining {left} steps, so that the whole run spends the budget "
                            f"ε = {led.target_epsilon:g} at δ = {led.delta:.3g}")


@dataclass(frozen=True)
class Calibration:
    """σ was calibrated so that ``max_steps`` steps spend the budget: on resume with other
    settings it is calibrated again (``ClipPolicy.with_ledger_noise``)."""

    max_steps: int


@dataclass
class TrainingSetup:
    """What the trainer is given: the gradient strategy, the batch plan, the policy (None: no
    clipping) and, under torchrun, the function that keeps this rank's share of a batch."""

    strategy: GradientStrategy
    plan: Any
    policy: ClipPolicy | None
    shard: Callable[[Sequence[Batch]], list[Batch]] | None = None

    @property
    def ledger(self) -> PrivacyLedger | None:
        """The strategy's ledger as it is now (resume replaces it)."""
        return getattr(self.strategy, "ledger", None)


def build_setup(cfg: TrainConfig, train_ds: AsrDataset, ctx: DistContext | None = None
                ) -> TrainingSetup:
    """The one builder: (policy, engine, sampling, distribution) → strategy, plan, shard.

    Distribution: one process (``ctx`` None; unit=core is the K-core simulation) or torchrun
    ranks (``ctx``: unit=core → one core per rank, ``PerCoreGradient``; example / speaker →
    ``ShardedClippedGradient``; no policy → the data-parallel mean). Nothing is edited after
    it is built.
    """
    pc = cfg.privacy
    if pc.sampling not in ("bucket", "poisson"):
        raise PolicyError(f"privacy.sampling={pc.sampling!r}; valid: bucket, poisson")
    if pc.randomness not in ("secret", "seeded"):
        raise PolicyError(f"privacy.randomness={pc.randomness!r}; valid: secret, seeded")
    if not pc.policy:
        if pc.target_epsilon is not None:
            raise PolicyError("privacy.target_epsilon needs a privacy.policy (unit, clip_norm)")
        if ctx is None:
            return TrainingSetup(BatchClipGradient(max_norm=cfg.optim.max_grad_norm),
                                 _plan(cfg, train_ds, None, None), None)
        return TrainingSetup(DistributedMeanGradient(max_norm=cfg.optim.max_grad_norm),
                             _plan(cfg, train_ds, None, None), None,
                             contiguous_shard(ctx.rank, ctx.world_size))

    fields = dict(pc.policy)
    unit = fields.setdefault("unit", "example")
    if ctx is not None:
        if unit not in ("core", *SHARDED_UNITS):
            raise PolicyError(f"privacy.policy.unit={unit!r} under torchrun: unit=core (one core "
                              "per rank), example or speaker (units sharded across ranks), or no "
                              "policy (plain data parallel) run across processes; run other "
                              "units on one process")
        if unit == "core":
            fields.setdefault("num_cores", ctx.world_size)
    if unit == "speaker" and pc.sampling != "poisson":
        raise PolicyError("privacy.policy.unit=speaker needs privacy.sampling=poisson: speakers "
                          "are the units sampled (each with all of its utterances)")
    if unit == "client":
        raise PolicyError("unit=client is the federated server's (privasr fl); for user-level "
                          "DP in central training use unit=speaker")
    units = _units(train_ds, unit) if pc.sampling == "poisson" else None
    n = len(units) if units is not None else len(train_ds)
    if pc.sampling == "poisson":
        fields.setdefault("expected_batch_size", pc.expected_batch_size)
    dp = pc.target_epsilon is not None or fields.get("noise_multiplier", 0) > 0
    if not dp:
        policy = ClipPolicy.from_dict(fields)
        return TrainingSetup(PrivateGradient(_clipped(policy, pc, ctx, None), None),
                             _plan(cfg, train_ds, None, units), policy, _shard(ctx))

    if pc.sampling != "poisson":
        raise PolicyError("noise with an (ε, δ) claim needs privacy.sampling=poisson: the "
                          "accountant assumes Poisson sampling; duration buckets would "
                          "make the claimed ε wrong")
    if unit == "batch":
        raise PolicyError("unit=batch cannot give DP: one example's influence on the batch "
                          "mean is not bounded per example; use unit=example or microbatch")
    delta = pc.delta if pc.delta is not None else default_delta(n)
    q = pc.expected_batch_size / n
    policy = ClipPolicy.from_dict({"noise_multiplier": 0.0, **fields})
    calibration = None
    if pc.target_epsilon is not None and "noise_multiplier" not in fields:
        calibration = Calibration(cfg.optim.max_steps)
        policy = policy.with_ledger_noise(calibrate(
            pc.target_epsilon, delta, cfg.optim.max_steps, q, method=pc.accounting,
            sensitivity_factor=policy.sensitivity_factor))
    secret = pc.randomness == "secret"
    ledger = PrivacyLedger(noise_multiplier=policy.ledger_noise_multiplier(), sample_rate=q,
                           delta=delta, unit=policy.privacy_unit,
                           sensitivity_factor=policy.sensitivity_factor,
                           target_epsilon=pc.target_epsilon, method=pc.accounting,
                           population=n, secret_randomness=secret)
    gen = None if secret else torch.Generator().manual_seed(cfg.seed + 7919)
    source = SecretRandomness() if secret else SeededRandomness(cfg.seed)
    plan = _plan(cfg, train_ds, source, units)
    if ctx is not None:
        share_randomness(plan)          # every rank draws rank 0's secret Poisson batches
    strategy = PrivateGradient(_clipped(policy, pc, ctx, gen, secure=secret), ledger,
                               sample_rate=q, calibration=calibration,
                               private_stats=pc.log_private_stats)
    return TrainingSetup(strategy, plan, policy, _shard(ctx, strategy))


def _units(train_ds: AsrDataset, unit: str) -> list[list[int]] | None:
    """The dataset indices of each Poisson-sampled unit: a speaker's utterances (unit=speaker),
    an utterance with its derived copies, or None (every example is a unit)."""
    return train_ds.speaker_units() if unit == "speaker" else train_ds.privacy_units()


def _clipped(policy: ClipPolicy, pc, ctx: DistContext | None, gen: torch.Generator | None,
             secure: bool = False) -> ClippedGradient | PerCoreGradient | ShardedClippedGradient:
    """One process: ``ClippedGradient`` (unit=core simulates the cores). torchrun: one core per
    rank (``PerCoreGradient``), or example / speaker units sharded across the ranks."""
    if ctx is not None and policy.unit == "core":
        return PerCoreGradient(policy, generator=gen, secure_noise=secure)
    chunk = {} if pc.engine == "reference" else {"chunk_size": pc.engine_chunk}
    cls = ClippedGradient if ctx is None else ShardedClippedGradient
    return cls(policy, pc.engine, generator=gen, secure_noise=secure, **chunk)


def _shard(ctx: DistContext | None, strategy: Any = None):
    """Under torchrun: this rank's share of a logical batch (its core's or its units' rows)."""
    if ctx is None:
        return None
    return strategy.clipped.local_batches


def _plan(cfg: TrainConfig, train_ds: AsrDataset, source: RandomSource | None,
          units: list[list[int]] | None) -> Any:
    """Duration buckets, or Poisson sampling of privacy units (from ``source``: secret for DP
    runs; None: the public seed). A speaker unit contributes all of its utterances. For
    per-example and per-speaker units (whose clipped sum does not depend on the order of the
    draw) each draw is sorted by duration before it is split into physical batches."""
    pc = cfg.privacy
    if pc.sampling == "poisson":
        n = len(units) if units is not None else len(train_ds)
        unit = pc.policy.get("unit", "example")
        whole = unit == "speaker"
        return PoissonPlan(PoissonSampler(n, expected_batch_size=pc.expected_batch_size,
                                          max_physical=pc.max_physical, seed=cfg.seed,
                                          source=source, members=units,
                                          whole_units=whole,
                                          lengths=(train_ds.durations
                                                   if unit in ("example", "speaker") else None)))
    return BucketPlan(DurationBucketSampler(
        train_ds.durations, max_seconds=cfg.batch.max_seconds, max_utts=cfg.batch.max_utts,
        seed=cfg.seed), cfg.optim.grad_accum)
