"""Run under torchrun by test_percore.py: one step of every per-core policy across the ranks.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/pcc_worker.py OUT

Rank r saves ``OUT/{case}.rank{r}.pt`` = (its .grad tensors after the step, the step's stats).
The test recomputes every case on one process with 2 virtual cores and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from privasr.clipping.policy import ClipPolicy
from privasr.data.dataset import Batch
from privasr.models.conformer import ConformerCTC, config_for
from privasr.models.loss import checked, per_example_ctc

NOISE_SEED = 123


def make_model() -> ConformerCTC:
    torch.manual_seed(0)
    return ConformerCTC(config_for("tiny", vocab_size=12, dropout=0.0))


def make_batches() -> list[Batch]:
    """A logical batch of 7 examples in two physical batches (4 + 3), random fbank-like input."""
    gen = torch.Generator().manual_seed(5)
    out, start = [], 0
    for n in (4, 3):
        lens = torch.randint(40, 90, (n,), generator=gen)
        tlens = torch.randint(2, 6, (n,), generator=gen)
        feats = torch.zeros(n, int(lens.max()), 80)
        targets = torch.zeros(n, int(tlens.max()), dtype=torch.long)
        for i in range(n):
            feats[i, :lens[i]] = torch.randn(int(lens[i]), 80, generator=gen)
            targets[i, :tlens[i]] = torch.randint(1, 12, (int(tlens[i]),), generator=gen)
        out.append(Batch([f"utt{start + i}" for i in range(n)], feats, lens, targets, tlens,
                         [f"spk{(start + i) * 5 % 3}" for i in range(n)]))   # 3 speakers
        start += n
    return out


def policies(c: float) -> dict[str, ClipPolicy]:
    """The cases; ``c`` lies between the two cores' norms, so one core is clipped."""
    core = dict(unit="core", num_cores=2)
    return {
        "fixed": ClipPolicy(**core, clip_norm=c),
        "fixed_contiguous": ClipPolicy(**core, clip_norm=c, grouping="contiguous"),
        "adaptive": ClipPolicy(**core, bound="adaptive_min", clip_norm=None),
        "uniform": ClipPolicy(**core, clip_norm=c, scope="per_layer", per_layer_rule="uniform"),
        "uniform_adaptive": ClipPolicy(**core, bound="adaptive_min", clip_norm=None,
                                       scope="per_layer", per_layer_rule="uniform"),
        "layers": ClipPolicy(**core, clip_norm=None, scope="per_layer",
                             layer_bounds={"*.bias": c / 10, "*": c / 3}),
        "noise": ClipPolicy(**core, clip_norm=c, noise_multiplier=0.7),
        "quantile": ClipPolicy(**core, bound="quantile", clip_norm=c, noise_multiplier=0.7,
                               quantile_noise_multiplier=0.5, target_quantile=0.3),
    }


def sharded_policies(c: float) -> dict[str, ClipPolicy]:
    """Example and speaker units sharded across the ranks (ShardedClippedGradient)."""
    return {
        "sharded_speaker": ClipPolicy(unit="speaker", clip_norm=c, expected_batch_size=2.5),
        "sharded_speaker_noise": ClipPolicy(unit="speaker", clip_norm=c, noise_multiplier=0.7,
                                            expected_batch_size=2.5),
        "sharded_example_quantile": ClipPolicy(unit="example", bound="quantile", clip_norm=c,
                                               noise_multiplier=0.7, expected_batch_size=6.0,
                                               quantile_noise_multiplier=0.5),
        "sharded_example_layers": ClipPolicy(unit="example", clip_norm=None, scope="per_layer",
                                             layer_bounds={"*.bias": c / 10, "*": c / 3},
                                             expected_batch_size=6.0),
    }


def loss_fn():
    return checked(per_example_ctc)


def main(out: Path) -> None:
    from privasr.clipping.percore import PerCoreGradient
    from privasr.train.distributed import (DistributedMeanGradient, broadcast_module,
                                           contiguous_shard, init_distributed)

    torch.set_num_threads(1)
    ctx = init_distributed(torch.device("cpu"))
    model = make_model()
    broadcast_module(model)
    batches = make_batches()

    def run(name: str, strategy, local: list[Batch]) -> dict:
        model.zero_grad(set_to_none=True)
        stats = strategy.fill_grads(model, local, loss_fn())
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        state = strategy.state_dict() if hasattr(strategy, "state_dict") else None
        torch.save((grads, stats, state), out / f"{name}.rank{ctx.rank}.pt")
        return stats

    probe = PerCoreGradient(ClipPolicy(unit="core", num_cores=2, clip_norm=1e9))
    s = run("probe", probe, probe.local_batches(batches))
    c = (s["norm_core0"] * s["norm_core1"]) ** 0.5
    for name, pol in policies(c).items():
        gen = torch.Generator().manual_seed(NOISE_SEED)
        strat = PerCoreGradient(pol, generator=gen)
        run(name, strat, strat.local_batches(batches))
    from privasr.clipping.sharded import ShardedClippedGradient

    for name, pol in sharded_policies(c).items():
        gen = torch.Generator().manual_seed(NOISE_SEED)
        strat = ShardedClippedGradient(pol, "bookkeeping", generator=gen)
        run(name, strat, strat.local_batches(batches))
    mean = DistributedMeanGradient(max_norm=0.5)
    run("mean", mean, contiguous_shard(ctx.rank, ctx.world_size)(batches))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
