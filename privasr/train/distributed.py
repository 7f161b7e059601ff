"""Running the one trainer under ``torchrun``: process group, rank-0 duties, sharded batches.

    torchrun --nproc_per_node=K -m privasr.cli train configs/pcc.yaml        # K cores, PCC
    torchrun --nproc_per_node=K -m privasr.cli train configs/demo.yaml       # plain data parallel

``init_distributed`` reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and
starts the default process group: gloo on CPU, NCCL on CUDA (rank r uses ``cuda:LOCAL_RANK``).
What changes under torchrun, and what does not:

- The recipe's batch settings describe the *global* logical batch: every rank builds the same
  logical batch (the batch plans are pure functions of (seed, step)), SpecAugment included,
  and keeps only its share (``shard``), so K ranks train on exactly what one process would.
- Gradient strategy (built by ``privasr.train.strategies.build_setup``): ``unit=core`` →
  ``PerCoreGradient`` (PCC/APCC, one all-reduce; num_cores defaults to the world size);
  ``unit=example|speaker`` → ``ShardedClippedGradient`` (units sharded across ranks, one
  all-reduce); no policy → ``DistributedMeanGradient`` (the global batch mean, then the usual
  global-norm clip: what DDP computes). Micro-batch units are refused.
- Identical init: rank 0's parameters and buffers are broadcast once; every rank then reseeds
  its torch RNG from (seed, rank, step) every step, so dropout masks differ across ranks and a
  resumed run continues exactly.
- Rank 0 alone writes checkpoints, CSV/TensorBoard logs, dev/test evaluations and results;
  every rank resumes from the same ``last.pt``. Rank 0 builds the corpus and feature caches
  first, the others wait and then read them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from privasr.clipping.percore import FlatGrads, shard_batches
from privasr.data.dataset import Batch
from privasr.errors import NonFiniteLossError
from privasr.privacy.randomness import SecretRandomness

__all__ = ["DistContext", "init_distributed", "main_first", "broadcast_module",
           "DistributedMeanGradient", "NullLog", "contiguous_shard", "finish",
           "threads_per_rank", "share_randomness"]


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistContext | None:
    """Start the process group when launched by torchrun (None otherwise)."""
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local = int(env.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # rank 0 evaluates (dev, test) while the others wait in the next collective: allow an
        # hour rather than NCCL's 10-minute default
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(hours=1))
    return DistContext(rank, world, local, int(env.get("LOCAL_WORLD_SIZE", world)), device)


@contextlib.contextmanager
def main_first(ctx: DistContext | None) -> Iterator[None]:
    """Rank 0 runs the block first (building caches); the others run it after rank 0 is done."""
    if ctx is not None and not ctx.is_main:
        dist.barrier()
    yield
    if ctx is not None and ctx.is_main:
        dist.barrier()


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (identical init)."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src)


class NullLog:
    """The metrics logger of ranks other than 0."""

    def log(self, *_: Any, **__: Any) -> None: ...
    def truncate_after(self, *_: Any) -> None: ...
    def close(self) -> None: ...


def contiguous_shard(rank: int, world: int) -> Callable[[Sequence[Batch]], list[Batch]]:
    """Rank ``rank``'s share of a logical batch: its run of K nearly equal runs in order."""
    def shard(batches: Sequence[Batch]) -> list[Batch]:
        base, extra = divmod(sum(len(b) for b in batches), world)
        lo = rank * base + min(rank, extra)
        hi = lo + base + (rank < extra)
        return shard_batches(batches, lambda i: lo <= i < hi)

    return shard


class DistributedMeanGradient:
    """Ordinary data-parallel training: the mean gradient of the global logical batch (one
    flat all-reduce of the local sums and the example count), then global-norm clipping to
    ``max_norm`` -- ``BatchClipGradient`` across ranks."""

    def __init__(self, *, max_norm: float | None = 5.0) -> None:
        self.max_norm = max_norm
        self._flat: FlatGrads | None = None

    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn) -> dict[str, float]:
        if self._flat is None:
            self._flat = FlatGrads({n: p for n, p in model.named_parameters()
                                    if p.requires_grad}, extra=4)
        flat = self._flat
        flat.attach()
        loss_sum, n, bad = 0.0, 0, None
        try:
            for b in batches:
                if len(b):
                    losses = loss_fn(model, b)
                    losses.sum().backward()
                    loss_sum += float(losses.detach().sum())
                    n += len(b)
        except NonFiniteLossError as e:
            bad, loss_sum, n = e, 0.0, 0
            flat.buf.zero_()
        flat.slots[:] = torch.tensor([loss_sum, n, sum(b.audio_seconds for b in batches),
                                      float(bad is not None)], dtype=flat.buf.dtype)
        dist.all_reduce(flat.buf)
        total, count, audio, n_bad = flat.slots.double().cpu().tolist()
        if n_bad:
            raise bad if bad is not None else NonFiniteLossError(["(on another rank)"], [0.0])
        flat.grad.div_(max(count, 1.0))
        if self.max_norm:
            norm = torch.nn.utils.clip_grad_norm_(flat.params, self.max_norm)
        else:
            norm = torch.linalg.vector_norm(flat.grad)
        return {"loss": total / count if count else float("nan"), "grad_norm": float(norm),
                "audio_seconds": audio}


def share_randomness(plan: Any) -> None:
    """Give every rank rank 0's secret sampling key (a broadcast in memory, never written), so
    all ranks draw the same Poisson batch; seeded sources are already equal on every rank."""
    sampler = getattr(plan, "sampler", None)
    source = getattr(sampler, "source", None)
    if source is None or not source.secret:
        return
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    key = torch.tensor(list(source.key), dtype=torch.uint8, device=device)
    dist.broadcast(key, 0)
    sampler.source = SecretRandomness(bytes(key.cpu().tolist()))


def finish(ctx: DistContext | None) -> None:
    """End of a torchrun run: wait for rank 0's evaluation, then leave the process group."""
    if ctx is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def threads_per_rank(ctx: DistContext) -> int:
    """CPU threads for one rank when the recipe says threads=0: this node's cores / its ranks."""
    return max(1, len(os.sched_getaffinity(0)) // ctx.local_world_size)
