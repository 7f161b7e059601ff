"""PCC / APCC across 2 torchrun processes (gloo, CPU) == the one-process simulation with 2
virtual cores, for fixed and adaptive bounds, global and per-layer scope, with and without noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from privasr.clipping import ClippedGradient
from privasr.train.gradient import BatchClipGradient

sys.path.insert(0, str(Path(__file__).parent))
from pcc_worker import NOISE_SEED, loss_fn, make_batches, make_model, policies  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REL = 1e-6


def torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pcc")
    torchrun(2, [str(ROOT / "tests" / "pcc_worker.py"), str(out)])
    return out


def _load(out: Path, case: str, rank: int = 0):
    return torch.load(out / f"{case}.rank{rank}.pt", weights_only=False)


def _max_rel_diff(model, grads) -> float:
    scale = max(float(p.grad.abs().max()) for p in model.parameters())
    return max(float((p.grad - grads[n]).abs().max()) for n, p in model.named_parameters()) / scale


@pytest.mark.parametrize("case", list(policies(1.0)))
def test_torchrun_matches_simulation(dist_run, case, one_thread):
    _, probe = _load(dist_run, "probe")
    c = (probe["norm_core0"] * probe["norm_core1"]) ** 0.5
    pol = policies(c)[case]
    g0, s0 = _load(dist_run, case)
    g1, _ = _load(dist_run, case, rank=1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)       # every rank holds the same update
    for engine, tol in (("reference", REL), ("vectorized", 2 * REL)):
        model = make_model()
        sim = ClippedGradient(pol, engine, generator=torch.Generator().manual_seed(NOISE_SEED))
        st = sim.fill_grads(model, make_batches(), loss_fn())
        assert _max_rel_diff(model, g0) <= tol, (engine, case)
        for k in ("loss", "frac_clipped", "bound", "units", "examples", "norm_p10", "norm_p90",
                  "noise_std"):
            assert s0[k] == pytest.approx(st[k], rel=1e-5), (engine, k)
    # the per-core logs: each core's norm, and the bound in force
    norms = sorted([s0["norm_core0"], s0["norm_core1"]])
    assert s0["norm_p10"] == pytest.approx(norms[0] + 0.1 * (norms[1] - norms[0]), rel=1e-6)
    if pol.bound == "adaptive_min":
        assert s0["bound"] == pytest.approx(norms[0], rel=1e-6)
    elif pol.scope == "global":
        assert s0["frac_clipped"] == 0.5 and norms[0] < s0["bound"] < norms[1]
    if case == "noise":
        assert s0["noise_std"] > 0


def test_distributed_mean_is_the_batch_mean(dist_run, one_thread):
    model = make_model()
    BatchClipGradient(max_norm=0.5).fill_grads(model, make_batches(), loss_fn())
    g0, s0 = _load(dist_run, "mean")
    assert _max_rel_diff(model, g0) <= REL
    assert s0["audio_seconds"] == pytest.approx(sum(b.audio_seconds for b in make_batches()))


def test_percore_needs_a_process_group():
    from privasr.clipping.percore import PerCoreGradient

    with pytest.raises(RuntimeError, match="torchrun"):
        PerCoreGradient(policies(1.0)["fixed"])
