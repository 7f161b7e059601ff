"""White-box one-run self-audit of privasr's real DP-SGD step (Dirac gradient canaries, as in
the white-box audits of Steinke, Nasr & Jagielski 2023 §6). It catches a *partial* noise bug.

Setup. A bias-free ``nn.Linear(F, O)``, W ∈ R^{O×F}, O·F ≥ m + F; canary i owns coordinate
(o_i, f_i) = divmod(i, F) of W: its input is G·e_{f_i}, its target o_i, its loss
−(W x)_{o_i}, so its gradient is −G·e_{o_i}e_{f_i}ᵀ, norm G = ``canary_norm`` > C, which clipping
scales to exactly C (a step that skipped clipping would give it weight G, and be caught). Row
O−1 belongs to ``ordinary`` examples (random inputs, norms around C, some clipped): they never
touch a canary coordinate. Each canary is inserted by an independent fair coin (seeded).

Run. ``steps`` = T calls of the real ``ClippedGradient(policy, engine, secure_noise=True)``,
``ClipPolicy(unit="example", clip_norm=C, noise_multiplier=σ_applied, expected_batch_size=q·N)``
with N = ⌈m/2⌉ + ordinary (public) and each step's batch Poisson-sampled from the inserted
examples at rate q. σ_claimed = ``accountant.calibrate(claimed ε, δ, T, q)``, σ_applied =
noise_scale·σ_claimed (1: a correct run; 0.5: the bug to catch; 0: noise off).

Auditor. It sees every released gradient W.grad and scores canary i by
s_i = −Σ_t W.grad_t[o_i, f_i]·E[B]/C (higher = inserted). With q = 1,
s_i = T·b_i + σ_applied·√T·ξ_i: the scores ARE the worst-case pair N(0,1) vs N(μ,1) of
μ-GDP with μ = √T/σ_applied, the accountant's ε for q = 1 is exactly that of √T/σ-GDP, and so a
correct run sits right at its claim -- the tightest setting there is. With q < 1 the sum
ignores which steps held the canary while the accountant credits subsampling; the audit is
valid but loose (``sample_rate`` is kept for experiments; the default is q = 1).
Then the Steinke bound (``metrics.one_run_epsilon``) and the f-DP bound
(``fdp.one_run_fdp_epsilon``, Gaussian family) at the claimed δ, both on the symmetric grid
``whitebox_grid`` (k+ = k− = m·{0.5, 1, 2, 5, 10, 20, 30, 50} %) with Bonferroni over its 8
points.

Power (numpy model of the same scores, ``simulated_audit``; 400 seeds, m = 20000, claim ε = 1,
δ = 1e-5, μ = 0.268): correct run f-DP ε_lb ≤ 0.82 (Steinke ≤ 0.61); noise ×0.5 (true ε 2.15)
f-DP ε_lb ≥ 1.047, > 1 in 400/400 seeds (Steinke in ~72 %); noise off ε_lb ≈ 12 (Steinke 5.5).
Smaller bugs are mostly missed: ×0.7 (true ε 1.48) in 7/40 seeds, ×0.8 in 1/40. m = 10000
still catches ×0.5 but with less margin; m = 5000 misses it in ~2 of 10 seeds.
The noise is from os.urandom (not seedable): ``seed`` fixes only the coins and the sampling.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from privasr.audit.fdp import gaussian_epsilon, one_run_fdp_epsilon
from privasr.audit.metrics import one_run_epsilon
from privasr.data.dataset import Batch

__all__ = ["DiracLinear", "dirac_loss", "whitebox_grid", "whitebox_self_audit",
           "simulated_audit", "whitebox_power_table", "format_power_table"]

GRID_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def whitebox_grid(m: int) -> list[tuple[int, int]]:
    """Symmetric (k, k) guesses, k = m·f for f in ``GRID_FRACTIONS`` (8 points)."""
    return sorted({(max(1, round(m * f)),) * 2 for f in GRID_FRACTIONS if 2 * round(m * f) <= m})


class DiracLinear(nn.Module):
    """W x (no bias); a Linear, so every engine (bookkeeping included) supports it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(feats)


def dirac_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-example loss −(W x_b)_{o_b}, o_b = targets[b, 0]; the trainer's loss signature."""
    out = model(batch.feats)[:, 0, :]                                  # (B, O)
    return -out.gather(1, batch.targets[:, :1]).squeeze(1)


def _shape(m: int) -> tuple[int, int]:
    f = max(1, math.ceil(math.sqrt(m)))
    return f, math.ceil(m / f) + 1          # (F, O): the last row for ordinary examples


def _examples(m: int, ordinary: int, canary_norm: float, clip_norm: float,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (m + ordinary, F) and target rows (m + ordinary,) of all potential examples."""
    f, o = _shape(m)
    x = torch.zeros(m + ordinary, f)
    idx = torch.arange(m)
    x[idx, idx % f] = canary_norm
    rows = torch.cat([idx // f, torch.full((ordinary,), o - 1)])
    if ordinary:
        z = torch.from_numpy(rng.normal(size=(ordinary, f))).float()
        norms = torch.from_numpy(rng.uniform(0.2, 1.6, ordinary)).float() * clip_norm
        x[m:] = z / z.norm(dim=1, keepdim=True) * norms[:, None]
    return x, rows


def _batch(x: torch.Tensor, rows: torch.Tensor, sel: torch.Tensor) -> Batch:
    n = int(sel.numel())
    return Batch([str(int(i)) for i in sel], x[sel].unsqueeze(1), torch.ones(n, dtype=torch.long),
                 rows[sel].unsqueeze(1), torch.ones(n, dtype=torch.long))


def _audits(scores: np.ndarray, inserted: np.ndarray, delta: float, confidence: float,
            grid: Sequence[tuple[int, int]]) -> dict[str, Any]:
    st = one_run_epsilon(scores, inserted, delta=delta, confidence=confidence, grid=grid)
    fd = one_run_fdp_epsilon(scores, inserted, delta=delta, confidence=confidence, grid=grid)
    ins, out = scores[inserted], scores[~inserted]
    pooled = math.sqrt((ins.var(ddof=1) + out.var(ddof=1)) / 2) if ins.size > 1 < out.size else 0
    return {"eps_lb_steinke": st.epsilon, "eps_lb_fdp": fd.epsilon, "mu_lb_fdp": fd.mu,
            "mu_hat": float((ins.mean() - out.mean()) / pooled) if pooled > 0 else math.inf,
            "steinke": st.to_dict(), "fdp": fd.to_dict()}


def whitebox_self_audit(*, claimed_epsilon: float = 1.0, delta: float = 1e-5,
                        noise_scale: float = 1.0, canaries: int = 20000, steps: int = 4,
                        sample_rate: float = 1.0, ordinary: int = 64, clip_norm: float = 1.0,
                        canary_norm: float = 2.0, confidence: float = 0.95, seed: int = 0,
                        engine: str = "bookkeeping", chunk_size: int = 512) -> dict[str, Any]:
    """One white-box audit of ``ClippedGradient`` (module docstring): the claimed ε, the audited
    ε lower bounds (Steinke and f-DP; m, r, v under "steinke" / "fdp"), the settings, the
    scores (in units of C, so T·b_i without noise) with the coins, and the wall time."""
    from privasr.clipping.policy import ClipPolicy
    from privasr.clipping.strategy import ClippedGradient
    from privasr.privacy.accountant import calibrate, epsilon

    if canary_norm <= clip_norm:
        raise ValueError("canary_norm must exceed clip_norm, so clipping sets it to exactly C")
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    t0 = time.time()
    m = canaries
    rng = np.random.default_rng(seed)
    inserted = rng.random(m) < 0.5
    x, rows = _examples(m, ordinary, canary_norm, clip_norm, rng)
    pool = torch.from_numpy(np.concatenate([np.flatnonzero(inserted),
                                            m + np.arange(ordinary)]))
    n_expected = math.ceil(m / 2) + ordinary        # public: does not depend on the coins
    sigma_claimed = calibrate(claimed_epsilon, delta, steps, sample_rate)
    sigma = noise_scale * sigma_claimed
    policy = ClipPolicy(unit="example", clip_norm=clip_norm, noise_multiplier=sigma,
                        expected_batch_size=sample_rate * n_expected)
    kwargs = {} if engine == "reference" else {"chunk_size": chunk_size}
    strategy = ClippedGradient(policy, engine=engine, secure_noise=True, **kwargs)
    f, o = _shape(m)
    model = DiracLinear(f, o)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    score = torch.zeros(m, dtype=torch.float64)
    for _ in range(steps):
        keep = pool if sample_rate >= 1 else pool[torch.from_numpy(
            rng.random(pool.numel()) < sample_rate)]
        strategy.fill_grads(model, [_batch(x, rows, keep)], dirac_loss)
        score -= model.linear.weight.grad.flatten()[:m].double()
        opt.step()
    scores = (score * policy.expected_units / clip_norm).numpy()
    res = _audits(scores, inserted, delta, confidence, whitebox_grid(m))
    claimed = epsilon(sigma_claimed, sample_rate, steps, delta)
    res.update({
        "claimed_epsilon": claimed, "target_epsilon": claimed_epsilon, "delta": delta,
        "true_epsilon": epsilon(sigma, sample_rate, steps, delta) if sigma > 0 else math.inf,
        "caught_fdp": res["eps_lb_fdp"] > claimed,
        "caught_steinke": res["eps_lb_steinke"] > claimed,
        "noise_scale": noise_scale, "sigma_claimed": sigma_claimed, "sigma_applied": sigma,
        "mu_expected": (math.sqrt(steps) / sigma if sigma > 0 else math.inf)
        if sample_rate >= 1 else None,
        "m": m, "inserted": int(inserted.sum()), "steps": steps, "sample_rate": sample_rate,
        "ordinary": ordinary, "clip_norm": clip_norm, "canary_norm": canary_norm,
        "confidence": confidence, "seed": seed, "engine": strategy.engine.name,
        "scores": scores, "inserted_mask": inserted, "seconds": time.time() - t0,
    })
    return res


def simulated_audit(*, claimed_epsilon: float = 1.0, delta: float = 1e-5,
                    noise_scale: float = 1.0, canaries: int = 20000, seed: int = 0,
                    confidence: float = 0.95) -> dict[str, Any]:
    """The power-analysis model of ``whitebox_self_audit`` at q = 1: scores N(μ·b_i, 1) with
    μ = μ_claim/noise_scale, μ_claim the GDP μ of the claim (no training, milliseconds)."""
    from privasr.audit.fdp import gaussian_mu

    rng = np.random.default_rng(seed)
    inserted = rng.random(canaries) < 0.5
    mu = gaussian_mu(claimed_epsilon, delta) / noise_scale if noise_scale > 0 else math.inf
    noise = rng.normal(size=canaries)
    scores = np.where(inserted, 1.0, 0.0) + (noise / mu if math.isfinite(mu) else 0 * noise)
    res = _audits(scores, inserted, delta, confidence, whitebox_grid(canaries))
    res.update({"claimed_epsilon": claimed_epsilon, "delta": delta, "noise_scale": noise_scale,
                "true_epsilon": gaussian_epsilon(mu, delta), "m": canaries, "seed": seed})
    return res


def whitebox_power_table(seeds: Iterable[int] = range(5),
                         noise_scales: Sequence[float] = (1.0, 0.5, 0.0), *,
                         simulate: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run the audit (or its numpy model, ``simulate=True``) for every (noise_scale, seed):
    {"rows": [...], "caught": {noise_scale: {"fdp": n, "steinke": n, "of": seeds}}}."""
    fn = simulated_audit if simulate else whitebox_self_audit
    seeds = list(seeds)
    rows, caught = [], {}
    for s in noise_scales:
        for seed in seeds:
            r = fn(noise_scale=s, seed=seed, **kwargs)
            claim = r["claimed_epsilon"]
            rows.append({k: r.get(k) for k in ("noise_scale", "seed", "claimed_epsilon",
                                                "true_epsilon", "eps_lb_steinke", "eps_lb_fdp",
                                                "mu_lb_fdp", "mu_hat", "m", "seconds")})
            c = caught.setdefault(s, {"fdp": 0, "steinke": 0, "of": len(seeds)})
            c["fdp"] += r["eps_lb_fdp"] > claim
            c["steinke"] += r["eps_lb_steinke"] > claim
    return {"rows": rows, "caught": caught}


def format_power_table(table: dict[str, Any]) -> str:
    """Plain-text table of ``whitebox_power_table``'s result."""
    lines = [f"{'noise':>5} {'seed':>4} {'claim':>6} {'true':>6} {'steinke':>8} {'f-DP':>7} "
             f"{'mu_hat':>7} {'s':>6}"]
    for r in table["rows"]:
        lines.append(f"{r['noise_scale']:>5.2f} {r['seed']:>4} {r['claimed_epsilon']:>6.3f} "
                     f"{r['true_epsilon']:>6.2f} {r['eps_lb_steinke']:>8.3f} "
                     f"{r['eps_lb_fdp']:>7.3f} {r['mu_hat']:>7.3f} "
                     f"{(r.get('seconds') or 0):>6.1f}")
    for s, c in table["caught"].items():
        lines.append(f"noise ×{s:g}: caught by f-DP in {c['fdp']}/{c['of']} seeds, by Steinke "
                     f"in {c['steinke']}/{c['of']}")
    return "\n".join(lines)
