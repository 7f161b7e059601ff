"""``ClippedGradient``: the one equation as a trainer ``GradientStrategy``.

    g = ( Σ_{u in units} clip(g_u ; C, scope)  +  σ·C·ξ ) / E[#units]        ξ ~ N(0, I)

Usage (a trainer's ``strategy=``)::

    policy = ClipPolicy(unit="example", clip_norm=1.0, noise_multiplier=1.1,
                        expected_batch_size=q * N)
    strategy = ClippedGradient(policy, engine="auto", secure_noise=True)
    stats = strategy.fill_grads(model, physical_batches, loss_fn)    # then optimizer.step()

- The engine (``privasr.clipping.engines``) sums the clipped unit gradients over ALL physical
  batches of the logical batch; then ONE noise draw per logical batch is added.
- Noise std is σ·C_total with C_total the L2 sensitivity bound of one unit's clipped gradient:
  C (global scope, and per_layer_rule="uniform", whose units have total norm ≤ C), C_t for the
  quantile bound, and sqrt(Σ_l C_l²) for ``layer_bounds`` -- isotropic noise on the
  concatenated vector, so the noise multiplier of the mechanism is exactly σ (per-layer noise
  σ·C_l would be worth only σ/√L). For micro-batch / core / batch units the sensitivity is
  2·C_total; the accountant reads ``policy.accounting_noise_multiplier()``.
- Denominator: ``policy.expected_units``, a constant (q·N examples, G groups, K cores, 1
  batch), so a Poisson-sampled batch that happens to be large or small is neither reweighted
  nor revealed. Only when σ = 0 and no expectation is known does it fall back to the realised
  number of units (1 if there are none).
- Empty logical batch (Poisson sampling can give zero examples): the gradient is σ·C·ξ/E[#units]
  (σ > 0) or zero; ``loss`` is reported as NaN.
- Frozen parameters (requires_grad=False) are untouched: no gradient, no noise. ``p.grad`` of
  every trainable parameter is overwritten (not accumulated).
- ``bound="quantile"``: the bound C_t lives here (``state_dict`` / ``load_state_dict`` for
  checkpoints, with the step that salts the micro-batch grouping) and is updated after each
  step from the noised count of unclipped units.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from privasr.clipping.engines import Engine, LossFn, get_engine, trainable_parameters
from privasr.clipping.noise import GaussianNoise
from privasr.clipping.policy import ClipPolicy
from privasr.data.dataset import Batch

__all__ = ["ClippedGradient"]


class ClippedGradient:
    """Clip each unit, sum, add one Gaussian draw, divide by E[#units]; fill ``p.grad``."""

    def __init__(self, policy: ClipPolicy, engine: str | Engine = "auto", *,
                 generator: torch.Generator | None = None, secure_noise: bool = False,
                 **engine_kwargs: Any) -> None:
        if not isinstance(policy, ClipPolicy):
            raise TypeError(f"policy must be a ClipPolicy (use ClipPolicy.from_dict for YAML), "
                            f"got {type(policy).__name__}")
        self.policy = policy
        self.engine = get_engine(engine, **engine_kwargs) if isinstance(engine, str) else engine
        self.noise = GaussianNoise(generator=generator, secure=secure_noise)
        self.clip_norm = policy.clip_norm      # C_t: moves only with bound="quantile"
        self.step = 0

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.clip_norm = state["clip_norm"]

    # -- the equation --------------------------------------------------------------------------
    def denominator(self, realised_units: int) -> float:
        if self.policy.expected_units is not None:
            return float(self.policy.expected_units)
        return float(max(realised_units, 1))      # σ = 0 only (the policy enforces it)

    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        pol = self.policy
        res = self.engine.clipped_sum(model, batches, loss_fn, pol, clip_norm=self.clip_norm,
                                      step=self.step)
        denom = self.denominator(res.units)
        std = pol.noise_multiplier * res.bound if pol.noise_multiplier > 0 else 0.0
        for name, p in trainable_parameters(model).items():
            g = res.grads[name]
            if std > 0:
                g = g + self.noise.sample(p.shape, std, device=p.device, dtype=g.dtype)
            p.grad = (g / denom).to(p.dtype)

        bound_used = res.bound
        if pol.bound == "quantile":
            count = pol.quantile_count(res.unclipped, res.units)
            if pol.quantile_noise_multiplier > 0:
                count += float(self.noise.sample((), pol.quantile_noise_multiplier))
            frac = pol.quantile_fraction(count, denom)
            self.clip_norm = float(self.clip_norm * math.exp(-pol.quantile_lr
                                                             * (frac - pol.target_quantile)))
        self.step += 1

        norms = res.norms.double()
        q = (torch.quantile(norms, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
             if res.units else [math.nan] * 3)
        return {
            "loss": res.loss_sum / res.examples if res.examples else math.nan,
            "frac_clipped": float(res.clipped.float().mean()) if res.units else 0.0,
            "norm_p10": q[0], "norm_p50": q[1], "norm_p90": q[2],
            "bound": float(bound_used),
            "units": float(res.units),
            "examples": float(res.examples),
            "noise_std": std / denom,
        }
