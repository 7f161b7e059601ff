"""Under torchrun every rank must draw the same secret Poisson batch: rank 0's key is broadcast
in memory (``share_randomness``), so two ranks that start with different keys agree after it."""

import os
import socket

import torch.multiprocessing as mp


def _worker(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    from privasr.data.poisson import PoissonSampler
    from privasr.privacy.randomness import SecretRandomness
    from privasr.train.distributed import share_randomness
    from privasr.train.trainer import PoissonPlan

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    plan = PoissonPlan(PoissonSampler(500, expected_batch_size=20, max_physical=8,
                                      source=SecretRandomness()))
    before = plan.sampler.draw(0)
    share_randomness(plan)
    out.put((rank, before, [plan.sampler.draw(t) for t in range(5)]))
    dist.destroy_process_group()


def test_ranks_share_rank0_secret_key():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (b, a)) for r, b, a in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    assert got[0][0] != got[1][0]          # independent keys before the broadcast...
    assert got[0][1] == got[1][1]          # ...the same batches after it
    assert got[0][1][0] == got[0][0]       # rank 0 kept its own key
