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
- ``bound="quantile"``: the bound C_t lives in the :class:`~privasr.clipping.release.Release`
  (``state_dict`` / ``load_state_dict`` for checkpoints, with the step that salts the
  micro-batch grouping) and is updated after each step from the noised count of unclipped units.
- ``unit="core"`` on one process is the K-core simulation: the stats gain ``norm_core{k}`` (NaN
  for a core that got no example), the columns of the torchrun run (``PerCoreGradient``), so
  either run resumes the other.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import nn

from privasr.clipping.engines import ClipResult, Engine, LossFn, get_engine
from privasr.clipping.factors import trainable_parameters
from privasr.clipping.noise import GaussianNoise
from privasr.clipping.policy import ClipPolicy, batch_units
from privasr.clipping.release import Release, ReleaseOwner
from privasr.data.dataset import Batch

__all__ = ["ClippedGradient"]


class ClippedGradient(ReleaseOwner):
    """Clip each unit, sum, add one Gaussian draw, divide by E[#units]; fill ``p.grad``."""

    def __init__(self, policy: ClipPolicy, engine: str | Engine = "auto", *,
                 generator=None, secure_noise: bool = False, **engine_kwargs: Any) -> None:
        if not isinstance(policy, ClipPolicy):
            raise TypeError(f"policy must be a ClipPolicy (use ClipPolicy.from_dict for YAML), "
                            f"got {type(policy).__name__}")
        self.engine = get_engine(engine, **engine_kwargs) if isinstance(engine, str) else engine
        self.release = Release(policy, GaussianNoise(generator=generator, secure=secure_noise))

    # -- the equation --------------------------------------------------------------------------
    def fill_grads(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn
                   ) -> dict[str, float]:
        rel, pol = self.release, self.policy
        res = self.engine.clipped_sum(model, batches, loss_fn, pol, clip_norm=rel.clip_norm,
                                      step=rel.step)
        denom = rel.denominator(res.units)
        std = rel.noise_std(res.bound)
        params = trainable_parameters(model)
        noised = rel.add_noise([res.grads[n] for n in params], std)
        for p, g in zip(params.values(), noised):      # g: the engine's sum or a fresh draw
            p.grad = g.div_(denom).to(p.dtype)
        rel.update_bound(res.unclipped, res.units, rel.count_noise(), denom)
        stats = rel.stats(res.norms, res.clipped, bound=res.bound, loss_sum=res.loss_sum,
                          examples=res.examples, denominator=denom, std=std)
        if pol.unit == "core":
            stats.update(self._core_norms(batches, res))
        rel.step += 1
        return stats

    def _core_norms(self, batches: Sequence[Batch], res: ClipResult) -> dict[str, float]:
        """``norm_core{k}`` of the K virtual cores (NaN: no example this step)."""
        unit_of, groups = batch_units(self.policy, batches, self.release.step)
        live = sorted(set(unit_of))     # every engine reports the live units in index order
        if len(live) != res.units:
            raise RuntimeError(f"engine reported {res.units} cores, the grouping {len(live)}")
        norms = [math.nan] * groups
        for k, n in zip(live, res.norms.tolist()):
            norms[k] = float(n)
        return {f"norm_core{k}": n for k, n in enumerate(norms)}
