"""Per-core clipping (PCC) and adaptive PCC (APCC) on ``torch.distributed``: unit = core, one rank
per core (papers.md §2; paxml ``PercoreClippedDpSgdGradient``).

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

from privasr.clipping.engines import (UNIFORM_EPS, UNIFORM_ZERO_RTOL, LayerSpec, resolve_layers,
                                      trainable_parameters)
from privasr.clipping.noise import GaussianNoise
from privasr.clipping.policy import ClipPolicy, assign_groups
from privasr.errors import PolicyError
from privasr.data.dataset import Batch
from privasr.errors import NonFiniteLossError

__all__ = ["FlatGrads", "PerCoreGradient", "SimulatedCores", "clip_factors", "select_rows",
           "shard_batches"]

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


def clip_factors(layer: Tensor, spec: LayerSpec, c: float | None, adaptive: bool
                 ) -> tuple[Tensor, bool]:
    """Per-tensor scale factors that clip ONE unit with per-tensor norms ``layer`` (L,).

    The same math as the engines' (``privasr.clipping.engines``): global g·min(1, C/‖g‖);
    uniform rule: unchanged if ‖g‖ < C, else every tensor to C/√L; layer bounds: each tensor to
    C_l. ``adaptive``: the factors for C = 1 (global 1/‖g‖, uniform 1/(√L(‖g_l‖+ε))), to be
    multiplied by C_t once it is known. Returns (factors, whether the unit was clipped).
    """
    total = layer.square().sum().sqrt()
    if spec.mode == "global":
        if adaptive:
            f = 1.0 / total if float(total) > 0 else torch.zeros_like(total)
            return f.expand_as(layer), True
        f = (c / total).clamp(max=1.0)                     # total = 0 -> inf -> 1
        return f.expand_as(layer), bool(total > c)
    if spec.mode == "uniform":
        rescale = torch.where(layer > UNIFORM_ZERO_RTOL * total,
                              1.0 / math.sqrt(layer.numel()) / (layer + UNIFORM_EPS),
                              torch.zeros_like(layer))
        if adaptive:
            return rescale, True
        if bool(total < c):
            return torch.ones_like(layer), False
        return c * rescale, True
    bounds = torch.tensor(spec.layer_bounds, dtype=layer.dtype, device=layer.device)
    return (bounds / layer).clamp(max=1.0), bool((layer > bounds).any())


def select_rows(b: Batch, keep: list[int]) -> Batch:
    """Rows ``keep`` of ``b``, with the padding no kept example needs trimmed."""
    idx = torch.tensor(keep, dtype=torch.long)
    lens, tl = b.feat_lens[idx], b.target_lens[idx]
    t, s = int(lens.max()), max(1, int(tl.max()))
    return Batch([b.ids[i] for i in keep], b.feats[idx, :t], lens, b.targets[idx, :s], tl)


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


class PerCoreGradient:
    """PCC / APCC across the ranks of the default process group (one rank = one core).

    A drop-in for ``ClippedGradient`` (same ``policy``, ``fill_grads``, ``state_dict`` and stats
    keys, plus ``norm_core{k}``): ``PrivateGradient`` wraps it for the ledger, and checkpoints
    of the torchrun run and of its one-process simulation are interchangeable.
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
        self.policy = policy
        self.noise = GaussianNoise(generator=generator, secure=secure_noise)
        self.clip_norm = policy.clip_norm
        self.step = 0
        self._flat: FlatGrads | None = None
        self._spec: LayerSpec | None = None

    # -- checkpoint state (the same keys as ClippedGradient) -----------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.clip_norm = state["clip_norm"]

    # -- sharding ------------------------------------------------------------------------------
    def local_batches(self, batches: Sequence[Batch]) -> list[Batch]:
        """This rank's share of the logical batch: the rows of virtual core ``rank``."""
        unit_of, _ = assign_groups(self.policy, [i for b in batches for i in b.ids], self.step)
        return shard_batches(batches, lambda i: unit_of[i] == self.rank)

    # -- the step ------------------------------------------------------------------------------
    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        pol, k_cores, r = self.policy, self.world, self.rank
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
        c = None if adaptive else self.clip_norm
        layer = flat.layer_norms()
        norm = float(layer.square().sum().sqrt())
        was_clipped = False
        if n:
            factors, was_clipped = clip_factors(layer, spec, c, adaptive)
            factors = factors / k_cores
            if spec.mode == "global":
                flat.grad.mul_(factors[0])
            else:
                torch._foreach_mul_(flat.views, list(factors.unbind()))
        bound = spec.total_bound(c) if not adaptive else math.nan
        std = pol.noise_multiplier * bound if pol.noise_multiplier > 0 else 0.0
        count_noise = 0.0
        if r == 0:                              # the one noise draw of the step (see module doc)
            if std > 0:
                for v in flat.views:
                    v.add_(self.noise.sample(v.shape, std, device=v.device, dtype=v.dtype)
                           / k_cores)
            if pol.bound == "quantile" and pol.quantile_noise_multiplier > 0:
                count_noise = float(self.noise.sample((), pol.quantile_noise_multiplier))
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
            bound = float(live_norms.min()) if live_norms.numel() else math.nan
            flat.grad.mul_(bound if live_norms.numel() else 0.0)
            if spec.mode == "global":
                clipped = norms > bound
        if pol.bound == "quantile":             # Andrew et al.: every rank, the same update
            frac = (float((live_norms <= bound).sum()) + count_noise) / k_cores
            self.clip_norm = float(self.clip_norm * math.exp(-pol.quantile_lr
                                                             * (frac - pol.target_quantile)))
        self.step += 1

        units = int(live.sum())
        q = (torch.quantile(live_norms, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
             .tolist() if units else [math.nan] * 3)
        return {
            "loss": total_loss / examples if examples else math.nan,
            "frac_clipped": float(clipped[live].double().mean()) if units else 0.0,
            "norm_p10": q[0], "norm_p50": q[1], "norm_p90": q[2],
            "bound": float(bound),
            "units": float(units),
            "examples": float(examples),
            "noise_std": std / k_cores,
            **{f"norm_core{k}": float(norms[k]) if live[k] else math.nan
               for k in range(k_cores)},
            "audio_seconds": audio,
        }


class SimulatedCores:
    """Wraps a one-process ``ClippedGradient`` with ``unit=core`` so that its stats carry
    ``norm_core{k}`` like ``PerCoreGradient``'s: the logs (and so a run's CSV columns) of the
    K-core simulation and of the K-rank torchrun run are the same, and either resumes the other.
    NaN marks a core that got no example this step."""

    def __init__(self, clipped: Any) -> None:
        if clipped.policy.unit != "core":
            raise PolicyError(f"SimulatedCores needs unit='core' (got {clipped.policy.unit!r})")
        self.clipped = clipped
        self._engine, self._norms = clipped.engine, [math.nan] * clipped.policy.num_cores
        clipped.engine = self          # ClippedGradient calls our clipped_sum

    @property
    def policy(self) -> ClipPolicy:
        """The wrapped strategy's policy (the one its noise is drawn with)."""
        return self.clipped.policy

    @policy.setter
    def policy(self, value: ClipPolicy) -> None:
        self.clipped.policy = value

    @property
    def noise(self):
        return self.clipped.noise

    def clipped_sum(self, model, batches, loss_fn, policy, *, clip_norm=None, step=0):
        res = self._engine.clipped_sum(model, batches, loss_fn, policy, clip_norm=clip_norm,
                                       step=step)
        unit_of, groups = assign_groups(policy, [i for b in batches for i in b.ids], step)
        live = sorted(set(unit_of))     # every engine reports the live units in index order
        if len(live) != res.units:
            raise RuntimeError(f"engine reported {res.units} cores, the grouping {len(live)}")
        self._norms = [math.nan] * groups
        for k, n in zip(live, res.norms.tolist()):
            self._norms[k] = float(n)
        return res

    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        stats = self.clipped.fill_grads(model, batches, loss_fn)
        return {**stats, **{f"norm_core{k}": n for k, n in enumerate(self._norms)}}

    def state_dict(self) -> dict[str, Any]:
        return self.clipped.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipped.load_state_dict(state)
