"""Per-core clipping (PCC) and adaptive PCC (APCC) on ``torch.distributed``: unit = core, one rank
per core (docs/per-core-clipping.md; paxml ``PercoreClippedDpSgdGradient``).

    g = ( Σ_k clip(g_k ; C, scope)  +  σ·C·ξ ) / K          g_k = rank k's local mean gradient

Each step, on every rank (launch with ``torchrun --nproc_per_node=K``)::

    1. backward of the local mean loss, straight into .grad tensors that are views of ONE flat
       buffer (no DDP, no bucketed all-reduce: DDP's comm hooks see buckets, and per-bucket
       clipping would be wrong);
    2. the full local norm (global, or per tensor for scope=per_layer), the clip factors, scale;
    3. ONE all-reduce (SUM) of the flat buffer, whose trailing 3K+5 slots carry each core's
       norm, liveness and clipped flag, the loss sum, example count, audio seconds, a
       non-finite flag and the quantile count's noise -- so the logs, APCC's bound and the
       quantile bound's update need no extra collective.

APCC (``bound=adaptive_min``, C_t = min_k ‖g_k‖) needs C_t before scaling, which would cost a
second collective; instead each core sends its *direction* g_k/‖g_k‖ (for the uniform per-layer
rule g_{k,l}/(‖g_{k,l}‖+ε)/√L), and after the sum every rank multiplies by C_t = the minimum of
the norms in the slots (the vectorized engine's trick). One all-reduce for PCC and APCC alike.

Sharding: ``local_batches`` keeps the rows whose unit is this rank under ``assign_groups`` --
the very function the single-process engines use for ``unit=core`` with ``num_cores=K`` virtual
cores (``grouping=hash``: blake2b(group_seed, step, id) mod K; ``contiguous``: K nearly equal
runs of the logical batch in order). Every rank builds the same logical batch (the batch plans
are pure functions of (seed, step)), so core k of a torchrun run sees exactly the examples of
virtual core k of ``ClippedGradient(policy, engine)`` on one process; the step that salts the
hash is this strategy's own counter, as in ``ClippedGradient`` (skipped steps do not advance it).

Noise (σ > 0): added ONCE, by rank 0, to its contribution before the all-reduce -- σ·C·ξ/K, ξ
drawn per trainable tensor in name order from the strategy's generator (or the OS CSPRNG with
``secure_noise``). So the sum carries exactly one draw of std σ·C, every rank receives the same
noised gradient, and with the same seed it is the very draw ``ClippedGradient`` makes on one
process; likewise the noise of the quantile bound's count (``bound=quantile``, drawn after
the gradient noise, as ``ClippedGradient`` does) travels in a slot. (Alternatives rejected: every rank drawing the same seeded ξ after the all-reduce rules
out secure noise; K independent draws of std σ·C/√K, paxml's choice, give the same mechanism
but cannot be reproduced by the one-process simulation.) Only rank 0's generator is used, so
only its state is checkpointed. Privacy unit: one *example* -- examples are Poisson-sampled,
then routed to their core by a fixed function of the id (``grouping=hash``; ``contiguous`` is
refused with σ > 0), so adding one example changes one core's clipped mean by ≤ 2C: sensitivity
factor 2, exactly as ``ClipPolicy.sensitivity_factor`` and the ledger charge.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from privasr.clipping.factors import (LayerSpec, adaptive_bound, clip_factors, resolve_layers,
                                      trainable_parameters)
from privasr.clipping.noise import GaussianNoise
from privasr.clipping.policy import ClipPolicy, batch_units
from privasr.clipping.release import Release, ReleaseOwner
from privasr.errors import PolicyError
from privasr.data.dataset import Batch
from privasr.errors import NonFiniteLossError

__all__ = ["FlatGrads", "PerCoreGradient", "select_rows", "shard_batches"]

LossFn = Any


class FlatGrads:
    """``.grad`` of the trainable parameters as views of one flat buffer, plus ``extra`` slots.

    ``attach()`` zeroes the buffer and points every ``p.grad`` at its view, so ``backward``
    accumulates in place and the buffer can be all-reduced without a copy (DDP's
    ``gradient_as_bucket_view``, for the whole gradient at once).
    """

    def __init__(self, params: dict[str, nn.Parameter], extra: int) -> None:
        ps = list(params.values())
        if not ps:
            raise ValueError("the model has no trainable parameters")
        dtypes = {p.dtype for p in ps}
        if len(dtypes) != 1:
            raise ValueError(f"trainable parameters of one dtype are needed (got {dtypes})")
        self.params = ps
        self.size = sum(p.numel() for p in ps)
        self.buf = torch.zeros(self.size + extra, dtype=ps[0].dtype, device=ps[0].device)
        self.views = [v.view_as(p) for v, p in
                      zip(torch.split(self.buf[:self.size], [p.numel() for p in ps]), ps)]

    @property
    def grad(self) -> Tensor:
        return self.buf[:self.size]

    @property
    def slots(self) -> Tensor:
        return self.buf[self.size:]

    def attach(self) -> None:
        self.buf.zero_()
        for p, v in zip(self.params, self.views):
            p.grad = v

    def layer_norms(self) -> Tensor:
        """(L,) L2 norm of each parameter's gradient."""
        return torch.stack(torch._foreach_norm(self.views))


def select_rows(b: Batch, keep: list[int]) -> Batch:
    """Rows ``keep`` of ``b``, with the padding no kept example needs trimmed."""
    idx = torch.tensor(keep, dtype=torch.long)
    lens, tl = b.feat_lens[idx], b.target_lens[idx]
    t, s = int(lens.max()), max(1, int(tl.max()))
    return Batch([b.ids[i] for i in keep], b.feats[idx, :t], lens, b.targets[idx, :s], tl,
                 b.speakers_of(keep), b.seconds_per_frame)


def shard_batches(batches: Sequence[Batch], mine: Callable[[int], bool]) -> list[Batch]:
    """The examples at positions ``i`` (counted across the logical batch) with ``mine(i)``,
    batch by batch (empty batches dropped)."""
    out, pos = [], 0
    for b in batches:
        keep = [r for r in range(len(b)) if mine(pos + r)]
        pos += len(b)
        if keep:
            out.append(select_rows(b, keep))
    return out


class PerCoreGradient(ReleaseOwner):
    """PCC / APCC across the ranks of the default process group (one rank = one core).

    A drop-in for ``ClippedGradient`` (same ``policy``, ``fill_grads``, ``state_dict`` and stats
    keys, ``norm_core{k}`` included): ``PrivateGradient`` wraps it for the ledger, and
    checkpoints of the torchrun run and of its one-process simulation are interchangeable.
    Noise, denominator, bound update and stats are the shared
    :class:`~privasr.clipping.release.Release`'s.
    """

    def __init__(self, policy: ClipPolicy, *, generator: torch.Generator | None = None,
                 secure_noise: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("PerCoreGradient needs torch.distributed initialised (launch with "
                               "torchrun); on one process use unit=core with ClippedGradient, "
                               "which simulates num_cores virtual cores")
        if policy.unit != "core":
            raise PolicyError(f"PerCoreGradient clips per core; got unit={policy.unit!r}")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if policy.num_cores != self.world:
            raise PolicyError(f"privacy.policy.num_cores={policy.num_cores} but torchrun started "
                              f"{self.world} processes: under torchrun each rank is one core "
                              "(leave num_cores out to use the world size)")
        self.release = Release(policy, GaussianNoise(generator=generator, secure=secure_noise))
        self._flat: FlatGrads | None = None
        self._spec: LayerSpec | None = None

    # -- sharding ------------------------------------------------------------------------------
    def local_batches(self, batches: Sequence[Batch]) -> list[Batch]:
        """This rank's share of the logical batch: the rows of virtual core ``rank``."""
        unit_of, _ = batch_units(self.policy, batches, self.release.step)
        return shard_batches(batches, lambda i: unit_of[i] == self.rank)

    # -- the step ------------------------------------------------------------------------------
    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        rel, pol, k_cores, r = self.release, self.policy, self.world, self.rank
        params = trainable_parameters(model)
        if self._flat is None:
            self._flat = FlatGrads(params, extra=3 * k_cores + 5)
            self._spec = resolve_layers(pol, list(params))
        flat, spec = self._flat, self._spec
        flat.attach()
        batches = [b for b in batches if len(b)]
        n = sum(len(b) for b in batches)
        loss_sum, bad = 0.0, None
        try:
            for b in batches:
                losses = loss_fn(model, b)
                (losses.sum() / n).backward()
                loss_sum += float(losses.detach().sum())
        except NonFiniteLossError as e:        # tell the other ranks instead of leaving them
            bad, n = e, 0                       # waiting in the all-reduce
            flat.buf.zero_()

        adaptive = pol.bound == "adaptive_min"
        c = None if adaptive else rel.clip_norm
        layer = flat.layer_norms()
        norm = float(layer.square().sum().sqrt())
        was_clipped = False
        if n:
            factors, flags = clip_factors(layer[None, :], spec, c, adaptive)
            factors, was_clipped = factors[0] / k_cores, bool(flags[0])
            if spec.mode == "global":
                flat.grad.mul_(factors[0])
            else:
                torch._foreach_mul_(flat.views, list(factors.unbind()))
        bound = spec.total_bound(c) if not adaptive else math.nan
        std = rel.noise_std(bound)
        count_noise = 0.0
        if r == 0:                              # the one noise draw of the step (see module doc)
            for v, noised in zip(flat.views, rel.add_noise(flat.views, std, scale=1 / k_cores)):
                v.copy_(noised)
            count_noise = rel.count_noise()
        s = flat.slots
        s[r], s[k_cores + r], s[2 * k_cores + r] = norm, float(n > 0), float(was_clipped)
        s[3 * k_cores:] = torch.tensor([loss_sum, n, sum(b.audio_seconds for b in batches),
                                        float(bad is not None), count_noise], dtype=s.dtype)
        dist.all_reduce(flat.buf)

        got = s.detach().double().cpu()
        norms, live = got[:k_cores], got[k_cores:2 * k_cores] > 0.5
        clipped = got[2 * k_cores:3 * k_cores] > 0.5
        total_loss, examples, audio, n_bad, count_noise = got[3 * k_cores:].tolist()
        if n_bad > 0:
            if bad is not None:
                raise bad
            raise NonFiniteLossError([f"(on {int(n_bad)} other rank(s))"], [math.nan])
        live_norms = norms[live]
        if adaptive:
            bound, flags = adaptive_bound(live_norms, spec)
            flat.grad.mul_(bound if live_norms.numel() else 0.0)
            clipped[live] = flags
        denom = float(k_cores)
        rel.update_bound(int((live_norms <= bound).sum()), int(live.sum()), count_noise, denom)
        stats = rel.stats(live_norms, clipped[live], bound=bound, loss_sum=total_loss,
                          examples=int(examples), denominator=denom, std=std)
        rel.step += 1
        return {**stats, **{f"norm_core{k}": float(norms[k]) if live[k] else math.nan
                            for k in range(k_cores)}, "audio_seconds": audio}
