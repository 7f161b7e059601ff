"""PCC / APCC across 2 torchrun processes (gloo, CPU) == the one-process simulation with 2
virtual cores: fixed, adaptive_min and quantile bounds, global and per-layer scope, with and
without noise; plus `privasr train` and `privasr pcc-experiment` end to end (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from privasr.clipping import ClippedGradient
from privasr.train.gradient import BatchClipGradient

sys.path.insert(0, str(Path(__file__).parent))
from pcc_worker import (NOISE_SEED, loss_fn, make_batches, make_model, policies,  # noqa: E402
                        sharded_policies)

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


@pytest.mark.parametrize("case", list(sharded_policies(1.0)))
def test_sharded_units_under_torchrun_match_one_process(dist_run, case, one_thread):
    """unit = example / speaker across 2 ranks == ClippedGradient on one process (same draws)."""
    _, probe, _ = _load(dist_run, "probe")
    c = (probe["norm_core0"] * probe["norm_core1"]) ** 0.5
    pol = sharded_policies(c)[case]
    g0, s0, state0 = _load(dist_run, case)
    g1, s1, state1 = _load(dist_run, case, rank=1)
    assert state0 == state1 and all(torch.equal(g0[n], g1[n]) for n in g0)
    model = make_model()
    one = ClippedGradient(pol, "reference", generator=torch.Generator().manual_seed(NOISE_SEED))
    st = one.fill_grads(model, make_batches(), loss_fn())
    assert _max_rel_diff(model, g0) <= REL, case
    assert state0["step"] == 1 and (state0["clip_norm"] is None
                                    or state0["clip_norm"] == pytest.approx(one.clip_norm,
                                                                            rel=1e-6))
    for k in ("loss", "frac_clipped", "bound", "units", "examples", "norm_p10", "norm_p50",
              "norm_p90", "noise_std"):
        assert s0[k] == pytest.approx(st[k], rel=1e-5, nan_ok=True), (case, k)
    assert st["frac_clipped"] > 0, case                     # the bound binds


@pytest.mark.parametrize("case", list(policies(1.0)))
def test_torchrun_matches_simulation(dist_run, case, one_thread):
    _, probe, _ = _load(dist_run, "probe")
    c = (probe["norm_core0"] * probe["norm_core1"]) ** 0.5
    pol = policies(c)[case]
    g0, s0, state0 = _load(dist_run, case)
    g1, _, state1 = _load(dist_run, case, rank=1)
    assert state0 == state1            # the same bound state (quantile update) on every rank
    assert all(torch.equal(g0[n], g1[n]) for n in g0)       # every rank holds the same update
    for engine, tol in (("reference", REL), ("vectorized", 2 * REL)):
        model = make_model()
        sim = ClippedGradient(pol, engine, generator=torch.Generator().manual_seed(NOISE_SEED))
        st = sim.fill_grads(model, make_batches(), loss_fn())
        assert _max_rel_diff(model, g0) <= tol, (engine, case)
        want = sim.state_dict()
        assert state0["step"] == want["step"] == 1
        assert (state0["clip_norm"] is want["clip_norm"] is None
                or state0["clip_norm"] == pytest.approx(want["clip_norm"], rel=1e-6))
        for k in ("loss", "frac_clipped", "bound", "units", "examples", "norm_p10", "norm_p90",
                  "noise_std", "norm_core0", "norm_core1"):
            assert s0[k] == pytest.approx(st[k], rel=1e-5), (engine, k)
    # the per-core logs: each core's norm, and the bound in force
    norms = sorted([s0["norm_core0"], s0["norm_core1"]])
    assert s0["norm_p10"] == pytest.approx(norms[0] + 0.1 * (norms[1] - norms[0]), rel=1e-6)
    if pol.bound == "adaptive_min":
        assert s0["bound"] == pytest.approx(norms[0], rel=1e-6)
    elif pol.scope == "global":
        assert s0["frac_clipped"] == 0.5 and norms[0] < s0["bound"] < norms[1]
    if case in ("noise", "quantile"):
        assert s0["noise_std"] > 0
    if case == "quantile":              # the bound moved, by the noised count of unclipped cores
        assert state0["clip_norm"] != pytest.approx(c)


def test_distributed_mean_is_the_batch_mean(dist_run, one_thread):
    model = make_model()
    BatchClipGradient(max_norm=0.5).fill_grads(model, make_batches(), loss_fn())
    g0, s0, _ = _load(dist_run, "mean")
    assert _max_rel_diff(model, g0) <= REL
    assert s0["audio_seconds"] == pytest.approx(sum(b.audio_seconds for b in make_batches()))


def test_percore_needs_a_process_group():
    from privasr.clipping.percore import PerCoreGradient

    with pytest.raises(RuntimeError, match="torchrun"):
        PerCoreGradient(policies(1.0)["fixed"])


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["privacy.policy.clip_norm=2.0"],
                                   ["privacy.policy.bound=adaptive_min"],
                                   ["privacy.sampling=poisson", "privacy.expected_batch_size=6",
                                    "privacy.max_physical=4", "privacy.target_epsilon=8"]],
                         ids=["pcc", "apcc", "dp"])
def test_privasr_train_under_torchrun_matches_simulation(tiny_corpus, tmp_path, extra):
    """`privasr train configs/pcc.yaml` on 2 ranks == on one process with 2 virtual cores:
    same logs, same parameters after 3 steps (sharding, SpecAugment, Adam, checkpoints; with
    DP: the same noise, the same ledger and ε)."""
    import csv

    from privasr.config import load_config
    from privasr.recipes.train import run_training
    from test_trainer import _overrides

    corpus, _, _ = tiny_corpus
    common = _overrides(corpus, "X", steps=3) + ["model.dropout=0.0", "eval_every=3",
                                                  "privacy.policy.num_cores=2", *extra]
    dist_out, sim_out = tmp_path / "dist", tmp_path / "sim"
    torchrun(2, ["-m", "privasr.cli", "train", "configs/pcc.yaml",
                 *[o for o in common if not o.startswith("out_dir")], f"out_dir={dist_out}"])
    run_training(load_config("configs/pcc.yaml", common + [f"out_dir={sim_out}"]),
                 log=lambda *_: None)
    a = torch.load(dist_out / "last.pt", weights_only=False)
    b = torch.load(sim_out / "last.pt", weights_only=False)
    for k, v in b["model"].items():
        # attention key biases have an exactly-zero gradient (softmax ignores a per-row
        # constant): Adam turns their ~1e-9 rounding noise into lr-sized steps of either sign
        if not k.endswith("attn.k.bias"):
            torch.testing.assert_close(a["model"][k], v, rtol=1e-4, atol=1e-5)
    assert a["strategy"]["clip"] == b["strategy"]["clip"]      # interchangeable checkpoints
    assert a["strategy"]["ledger"] == b["strategy"]["ledger"]
    rows = {o: list(csv.DictReader(open(o / "train.csv"))) for o in (dist_out, sim_out)}
    for rd, rs in zip(rows[dist_out], rows[sim_out]):
        assert float(rd["loss"]) == pytest.approx(float(rs["loss"]), rel=1e-5)
        assert float(rd["bound"]) == pytest.approx(float(rs["bound"]), rel=1e-5)
        assert rd["frac_clipped"] == rs["frac_clipped"]
        for k in ("norm_core0", "norm_core1"):   # the simulation logs per-core norms too
            assert float(rd[k]) == pytest.approx(float(rs[k]), rel=1e-4, nan_ok=True)
    res = json.loads((dist_out / "results.json").read_text())
    assert res["world_size"] == 2
    if "privacy.target_epsilon=8" in extra:
        assert res["privacy"]["unit"] == "core" and 7 < res["privacy"]["epsilon"] <= 8
        assert float(rows[dist_out][0]["noise_std"]) > 0


# -- the PCC experiment driver ------------------------------------------------------------------
def test_pcc_experiment_variants_are_valid_recipes():
    from privasr.clipping.policy import ClipPolicy
    from privasr.config import load_config
    from privasr.recipes.pcc import run_pcc_experiment, variants

    vs = variants([0.5, 2.0], cores=4)
    assert list(vs) == ["baseline", "pcc_0.5", "pcc_2", "apcc"]
    for name, extra in vs.items():
        cfg = load_config("configs/pcc.yaml", extra)
        if name == "baseline":
            assert cfg.privacy.policy == {}
            continue
        pol = ClipPolicy.from_dict(cfg.privacy.policy)
        assert pol.unit == "core" and pol.num_cores == 4
        assert pol.bound == ("adaptive_min" if name == "apcc" else "fixed")
    with pytest.raises(ValueError, match="bounds"):
        run_pcc_experiment(bounds=[0.0])


@pytest.mark.slow
def test_pcc_experiment_end_to_end(tiny_corpus, tmp_path):
    from privasr.recipes.pcc import run_pcc_experiment
    from test_trainer import _overrides

    corpus, _, _ = tiny_corpus
    over = [o for o in _overrides(corpus, "X", steps=3) if not o.startswith(("out_dir",
                                                                              "optim.max"))]
    lines = []
    res = run_pcc_experiment(out=tmp_path / "exp", bounds=[2.0], cores=2, steps=3,
                             overrides=over, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    rows = {r["variant"]: r for r in res["table"]}
    assert list(rows) == ["baseline", "pcc_2", "apcc"] and res["steps"] == 3
    assert rows["pcc_2"]["mean bound"] == 2.0 and math.isnan(rows["baseline"]["mean bound"])
    assert rows["apcc"]["mean bound"] <= rows["apcc"]["median core norm"]
    for r in rows.values():
        assert 0 <= r["test WER"] and math.isfinite(r["test loss"])
    assert all(len(c["loss"]) == 3 for c in res["curves"].values())
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(res["table"]))
    html = (tmp_path / "exp" / "report.html").read_text()
    assert html.count("data:image/png;base64") == 3 and "pcc_2" in html
    lines.clear()                                   # a second call reuses the finished runs
    run_pcc_experiment(out=tmp_path / "exp", bounds=[2.0], cores=2, steps=3, overrides=over,
                       log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert sum("done already" in ln for ln in lines) == 3


@pytest.mark.slow
def test_torchrun_resumes_a_killed_simulation_run(tiny_corpus, tmp_path):
    """Checkpoints are interchangeable: a one-process 2-core run killed mid-way and resumed by
    2 torchrun ranks ends where the uninterrupted one-process run ends."""
    from test_trainer import _cli, _overrides, kill_when_checkpointed

    corpus, _, _ = tiny_corpus
    steps = 6
    over = lambda out: _overrides(corpus, out, steps) + [  # noqa: E731
        "model.dropout=0.0", "privacy.policy.num_cores=2", "privacy.policy.bound=adaptive_min"]
    ref = _cli(["train", "configs/pcc.yaml", *over(tmp_path / "ref")])
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()[-2000:]
    run = tmp_path / "killed"
    killed_at = kill_when_checkpointed(_cli(["train", "configs/pcc.yaml", *over(run)]), run, 2)
    assert killed_at is not None and killed_at < steps, "run ended before it could be killed"
    out = torchrun(2, ["-m", "privasr.cli", "train", "configs/pcc.yaml", *over(run)]).stdout
    assert "resumed from" in out
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=False)
    b = torch.load(run / "last.pt", weights_only=False)
    assert b["position"]["step"] == steps and a["strategy"]["clip"] == b["strategy"]["clip"]
    for k, v in a["model"].items():
        if not k.endswith("attn.k.bias"):     # see the test above
            torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5)
    logged = [int(ln.split(",")[0]) for ln in (run / "train.csv").read_text().split()[1:]]
    assert logged == list(range(1, steps + 1))
