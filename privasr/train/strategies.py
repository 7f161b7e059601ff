"""From a recipe's ``privacy`` section to the trainer's pluggable pieces: the gradient
strategy (ordinary, clipped per unit, DP-SGD) and the batch plan (buckets or Poisson)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from privasr.clipping.policy import ClipPolicy, PolicyError, split_noise_multiplier
from privasr.clipping.strategy import ClippedGradient
from privasr.config import TrainConfig
from privasr.data.dataset import AsrDataset, Batch, DurationBucketSampler
from privasr.data.poisson import PoissonSampler
from privasr.privacy.accountant import PrivacyUnit, calibrate
from privasr.privacy.ledger import PrivacyLedger
from privasr.train.gradient import BatchClipGradient, GradientStrategy, LossFn
from privasr.train.trainer import BucketPlan, PoissonPlan


class PrivateGradient:
    """A clipped-gradient strategy whose steps are charged to a privacy ledger.

    Before each step the ledger refuses (``PrivacyBudgetExceeded``, which stops training
    cleanly) a step that would exceed the budget; the ledger, the bound state and the noise
    generator are saved in every checkpoint and continued on resume.
    """

    def __init__(self, clipped: ClippedGradient, ledger: PrivacyLedger | None,
                 generator: torch.Generator | None) -> None:
        self.clipped, self.ledger, self.generator = clipped, ledger, generator

    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        if self.ledger is not None:
            self.ledger.check_before_step()
        stats = self.clipped.fill_grads(model, batches, loss_fn)
        if self.ledger is not None:
            self.ledger.record_step()
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clipped.state_dict(),
                "ledger": self.ledger.to_dict() if self.ledger is not None else None,
                "noise_rng": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipped.load_state_dict(state["clip"])
        if state.get("ledger") is not None:
            self.ledger = PrivacyLedger.from_dict(state["ledger"])
        if state.get("noise_rng") is not None and self.generator is not None:
            self.generator.set_state(state["noise_rng"])


@dataclass
class TrainingSetup:
    strategy: GradientStrategy
    plan: Any
    ledger: PrivacyLedger | None
    policy: ClipPolicy | None


def build_setup(cfg: TrainConfig, train_ds: AsrDataset) -> TrainingSetup:
    """The strategy and batch plan the recipe asks for, validated against each other."""
    pc = cfg.privacy
    n = len(train_ds)
    if pc.sampling not in ("bucket", "poisson"):
        raise PolicyError(f"privacy.sampling={pc.sampling!r}; valid: bucket, poisson")
    if pc.sampling == "poisson":
        plan = PoissonPlan(PoissonSampler(n, expected_batch_size=pc.expected_batch_size,
                                          max_physical=pc.max_physical, seed=cfg.seed))
    else:
        plan = BucketPlan(DurationBucketSampler(
            train_ds.durations, max_seconds=cfg.batch.max_seconds, max_utts=cfg.batch.max_utts,
            seed=cfg.seed), cfg.optim.grad_accum)
    if not pc.policy:
        if pc.target_epsilon is not None:
            raise PolicyError("privacy.target_epsilon needs a privacy.policy (unit, clip_norm)")
        return TrainingSetup(BatchClipGradient(max_norm=cfg.optim.max_grad_norm), plan, None, None)

    fields = dict(pc.policy)
    if pc.sampling == "poisson":
        fields.setdefault("expected_batch_size", pc.expected_batch_size)
    ledger = None
    if pc.target_epsilon is not None or fields.get("noise_multiplier", 0) > 0:
        if pc.sampling != "poisson":
            raise PolicyError("noise with an (ε, δ) claim needs privacy.sampling=poisson: the "
                              "accountant assumes Poisson sampling; duration buckets would "
                              "make the claimed ε wrong")
        if fields.get("unit", "example") == "batch":
            raise PolicyError("unit=batch cannot give DP: one example's influence on the batch "
                              "mean is not bounded per example; use unit=example or microbatch")
        delta = pc.delta if pc.delta is not None else 1.0 / n
        q = pc.expected_batch_size / n
        probe = ClipPolicy.from_dict({**fields, "noise_multiplier": 1.0})
        k = probe.sensitivity_factor
        if pc.target_epsilon is not None and "noise_multiplier" not in fields:
            # calibrate the per-step accounting multiplier z, then map it back to the policy's σ
            z = calibrate(pc.target_epsilon, delta, cfg.optim.max_steps, q, method=pc.accounting)
            if probe.bound == "quantile":
                z = split_noise_multiplier(z, probe.quantile_noise_multiplier,
                                           count_sensitivity=0.5 if probe.unit == "example" else 1)
            fields["noise_multiplier"] = z * k
        policy = ClipPolicy.from_dict(fields)
        unit = {"example": PrivacyUnit.EXAMPLE, "microbatch": PrivacyUnit.MICROBATCH,
                "core": PrivacyUnit.CORE}[policy.unit]
        # the ledger charges σ/k per step; k·(accounting multiplier) = σ unless the quantile
        # bound's noised count also costs privacy
        ledger = PrivacyLedger(noise_multiplier=policy.accounting_noise_multiplier() * k,
                               sample_rate=q, delta=delta, unit=unit, sensitivity_factor=k,
                               target_epsilon=pc.target_epsilon, method=pc.accounting)
    else:
        policy = ClipPolicy.from_dict(fields)
    gen = None if pc.secure_noise else torch.Generator().manual_seed(cfg.seed + 7919)
    chunk = {} if pc.engine == "reference" else {"chunk_size": pc.engine_chunk}
    clipped = ClippedGradient(policy, pc.engine, generator=gen, secure_noise=pc.secure_noise,
                              **chunk)
    return TrainingSetup(PrivateGradient(clipped, ledger, gen), plan, ledger, policy)
