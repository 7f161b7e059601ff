"""Per-example and per-speaker clipping across torchrun ranks: the units are sharded.

Every rank builds the same logical batch (Poisson draws from rank 0's key, see
``privasr.train.distributed.share_randomness``) and keeps the units u with u mod K = rank
(``local_batches``; a speaker's utterances all go to one rank). Each rank then computes
Σ_{u on this rank} clip(g_u) with its engine, exactly as ``ClippedGradient`` does on one
process; one all-reduce (SUM) of a flat buffer adds the K partial sums together with the
counts the tail needs (loss, examples, units, unclipped units, audio, a non-finite flag and
the quantile count's noise), and the unit norms are gathered for the stats. Rank 0 adds the
one noise draw σ·C·ξ to its partial sum before the all-reduce (per trainable tensor in name
order, then the count's draw: the draws ``ClippedGradient`` makes with the same generator), so
the released gradient is the one equation of the whole logical batch, on every rank.
``bound=adaptive_min`` (a bound that needs every unit's norm before any is scaled) is refused
here; it is a σ = 0 tool (run it on one process or per core).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from privasr.clipping.engines import Engine, LossFn, get_engine
from privasr.clipping.factors import resolve_layers, trainable_parameters
from privasr.clipping.noise import GaussianNoise
from privasr.clipping.percore import FlatGrads, shard_batches
from privasr.clipping.policy import ClipPolicy, batch_units
from privasr.clipping.release import Release, ReleaseOwner
from privasr.data.dataset import Batch
from privasr.errors import NonFiniteLossError, PolicyError

__all__ = ["ShardedClippedGradient", "SHARDED_UNITS"]

SHARDED_UNITS = ("example", "speaker")
SLOTS = 7


class ShardedClippedGradient(ReleaseOwner):
    """``ClippedGradient`` for unit ∈ {example, speaker} across the ranks of the default group."""

    def __init__(self, policy: ClipPolicy, engine: str | Engine = "auto", *,
                 generator: torch.Generator | None = None, secure_noise: bool = False,
                 **engine_kwargs: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedClippedGradient needs torch.distributed initialised "
                               "(launch with torchrun); on one process use ClippedGradient")
        if policy.unit not in SHARDED_UNITS:
            raise PolicyError(f"unit={policy.unit!r} is not sharded across ranks (valid: "
                              f"{', '.join(SHARDED_UNITS)}; unit=core runs one core per rank)")
        if policy.bound == "adaptive_min":
            raise PolicyError("bound='adaptive_min' under torchrun needs unit=core (its bound "
                              "is the minimum over all units before any is scaled)")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.engine = get_engine(engine, **engine_kwargs) if isinstance(engine, str) else engine
        self.release = Release(policy, GaussianNoise(generator=generator, secure=secure_noise))
        self._flat: FlatGrads | None = None

    def local_batches(self, batches: Sequence[Batch]) -> list[Batch]:
        """This rank's share of the logical batch: the rows of its units (u mod K = rank)."""
        unit_of, _ = batch_units(self.policy, batches, self.release.step)
        return shard_batches(batches, lambda i: unit_of[i] % self.world == self.rank)

    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        rel, pol = self.release, self.policy
        params = trainable_parameters(model)
        if self._flat is None:
            self._flat = FlatGrads(params, extra=SLOTS)
        flat = self._flat
        flat.attach()
        bad = None
        try:
            res = self.engine.clipped_sum(model, batches, loss_fn, pol, clip_norm=rel.clip_norm,
                                          step=rel.step)
        except NonFiniteLossError as e:          # tell the other ranks, then raise
            bad, res = e, None
        bound = res.bound if res is not None else _bound(pol, rel.clip_norm, params)
        std = rel.noise_std(bound)
        if res is not None:
            for v, name in zip(flat.views, params):
                v.copy_(res.grads[name])
        count_noise = 0.0
        if self.rank == 0:                        # the one noise draw of the step
            for v, noised in zip(flat.views, rel.add_noise(flat.views, std)):
                v.copy_(noised)
            count_noise = rel.count_noise()
        ok = res is not None
        flat.slots[:] = torch.tensor(
            [res.loss_sum if ok else 0.0, res.examples if ok else 0, res.units if ok else 0,
             res.unclipped if ok else 0, sum(b.audio_seconds for b in batches),
             float(not ok), count_noise], dtype=flat.buf.dtype)
        dist.all_reduce(flat.buf)
        mine = (res.norms.tolist(), res.clipped.tolist()) if ok else ([], [])
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        loss_sum, examples, units, unclipped, audio, n_bad, count_noise = \
            flat.slots.double().cpu().tolist()
        if n_bad > 0:
            if bad is not None:
                raise bad
            raise NonFiniteLossError([f"(on {int(n_bad)} other rank(s))"], [math.nan])
        denom = rel.denominator(int(units))
        for p, v in zip(params.values(), flat.views):
            p.grad = v.div_(denom)
        rel.update_bound(int(unclipped), int(units), count_noise, denom)
        norms = torch.tensor([x for n, _ in gathered for x in n], dtype=torch.float64)
        clipped = torch.tensor([x for _, c in gathered for x in c], dtype=torch.bool)
        stats = rel.stats(norms, clipped, bound=bound, loss_sum=loss_sum,
                          examples=int(examples), denominator=denom, std=std)
        rel.step += 1
        return {**stats, "audio_seconds": audio}


def _bound(policy: ClipPolicy, clip_norm: float | None, params: dict) -> float:
    """The total bound in force when this rank computed nothing (its loss was non-finite)."""
    return resolve_layers(policy, list(params)).total_bound(clip_norm)
