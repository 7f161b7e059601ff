"""Is each example's gradient a function of that example alone? A cheap check before DP training.

Per-example clipping bounds one example's influence only if its gradient ``g_i`` depends on
example i alone. Two model defects break that silently, and make the engines disagree
(``reference`` runs each example alone, trimmed; ``vectorized`` / ``bookkeeping`` see the
padded batch):

- mixing examples: BatchNorm using batch statistics (training mode), a mean over the batch;
- reading padding: an unmasked mean / sum over time, a convolution, attention or a
  bidirectional RNN run over padded frames whose output flows back into valid frames.

``check_per_example_independence`` compares, on a probe batch of a few short examples padded
with ``extra_frames`` more zero frames (so every example, the longest too, has padding), each
example's gradient alone at its own length (the ground truth) with

1. ``padding``: the example alone, padded to the probe batch's length;
2. ``batch``: the example's loss in ONE ordinary forward of the whole padded batch;
3. ``engine``: what the engine computes for the padded batch (unit = example, no clipping,
   σ = 0): each example's gradient norm, and their sum.

It raises ``PolicyError`` naming the example, the check and the likely cause. BatchNorm with
batch statistics is refused up front (it always mixes examples, and its running statistics
are updated from private data without noise). The probe has no side effects: ``nn.Dropout``
modules are switched off while it runs, and RNG streams and buffers are restored.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from privasr.clipping.bookkeeping import describe_modules
from privasr.clipping.engines import (AutoEngine, Engine, LossFn, check_losses, batch_rows,
                                      SavedState, get_engine, trainable_parameters)
from privasr.clipping.policy import ClipPolicy
from privasr.errors import PolicyError
from privasr.data.dataset import Batch

__all__ = ["check_per_example_independence", "batch_statistics_modules"]

_NO_CLIP = ClipPolicy(unit="example", clip_norm=1e30)

_PADDING_CAUSE = (
    "the model reads padded frames: mask them (masked_fill) before anything that pools or "
    "mixes over time -- a mean or sum over time, convolutions, attention keys -- and pack RNN "
    "inputs (nn.utils.rnn.pack_padded_sequence) or mask a unidirectional RNN's outputs. The "
    "gradient then depends on how much padding the example's batch happens to have, and the "
    "engines disagree")
_BATCH_CAUSE = (
    "the model mixes the examples of a batch (batch statistics, a mean or sum over dim 0, "
    "...): an example's clipped gradient depends on the other examples, which per-example "
    "clipping cannot bound")


def batch_statistics_modules(model: nn.Module) -> dict[str, str]:
    """{qualified name: type} of BatchNorm modules normalising with batch statistics (in
    training mode, or without running statistics)."""
    return {name: type(m).__name__ for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)}


def check_per_example_independence(model: nn.Module, batch: Batch, loss_fn: LossFn,
                                   engine: str | Engine = "auto", *, rtol: float = 1e-3,
                                   atol: float = 1e-6, extra_frames: int = 8,
                                   max_examples: int = 4) -> None:
    """Raise ``PolicyError`` if an example's gradient depends on other examples or on padding.

    ``batch``: a few (2-4) short examples of different lengths (its first ``max_examples``
    are used); ``loss_fn(model, batch) -> (B,)`` per-example losses, as the trainer's;
    ``engine``: the name or instance the run will use. A difference counts when
    ‖g - g_alone‖ > atol + rtol·‖g_alone‖ (L2 over all trainable parameters).
    """
    mixing = batch_statistics_modules(model)
    if mixing:
        raise PolicyError(
            f"per-example independence probe: module(s) {describe_modules(mixing)} normalise "
            f"with the statistics of the whole batch, so each example's gradient depends on "
            f"the other examples (and the running statistics are updated from private data "
            f"without noise): per-example clipping bounds nothing. Use LayerNorm / GroupNorm, "
            f"or put BatchNorm in eval mode with frozen running statistics")
    params = trainable_parameters(model)
    if not params:
        return
    if len(batch) == 0 or extra_frames < 1:
        raise ValueError(f"the probe needs a non-empty batch and extra_frames >= 1 (got "
                         f"{len(batch)} examples, extra_frames={extra_frames})")
    probe = _pad_more(batch_rows(batch, 0, min(len(batch), max_examples)), extra_frames)
    saved, dropout = SavedState(model), _dropout_off(model)
    try:
        _run_checks(model, probe, loss_fn, engine, params, rtol, atol)
    finally:
        for m, was in dropout:
            m.training = was
        saved.restore()


# -- the checks -------------------------------------------------------------------------------
def _run_checks(model: nn.Module, probe: Batch, loss_fn: LossFn, engine: str | Engine,
                params: dict[str, nn.Parameter], rtol: float, atol: float) -> None:
    alone = [_losses_and_grads(model, batch_rows(probe, i, i + 1), loss_fn, params)[0]
             for i in range(len(probe))]
    again = _losses_and_grads(model, batch_rows(probe, 0, 1), loss_fn, params)[0]
    if _differs(again[1], alone[0][1], rtol, atol):
        raise PolicyError(
            f"per-example independence probe: example {probe.ids[0]!r} alone gets different "
            f"gradients in two identical runs (relative difference "
            f"{_rel(again[1], alone[0][1]):.1e}): the model is random beyond its nn.Dropout "
            f"modules (functional dropout?), so independence cannot be checked")
    for i in range(len(probe)):
        (loss, g), = _losses_and_grads(model, _single(probe, i), loss_fn, params)
        _expect(probe, i, "padding", f"its gradient alone, padded to {probe.feats.shape[1]} "
                f"frames,", g, alone[i][1], rtol, atol, _PADDING_CAUSE)
    for i, (loss, g) in enumerate(_losses_and_grads(model, probe, loss_fn, params)):
        _expect(probe, i, "batch", f"its gradient in the padded batch of {len(probe)}", g,
                alone[i][1], rtol, atol, _BATCH_CAUSE)
    _check_engine(model, probe, loss_fn, engine, params, alone, rtol, atol)


def _check_engine(model: nn.Module, probe: Batch, loss_fn: LossFn, engine: str | Engine,
                  params: dict[str, nn.Parameter], alone: list[tuple[float, Tensor]],
                  rtol: float, atol: float) -> None:
    """The engine's per-example norms and their sum, unclipped, against the examples alone."""
    eng = get_engine(engine) if isinstance(engine, str) else engine
    res = eng.clipped_sum(model, [probe], loss_fn, _NO_CLIP)
    name = eng.choose(model).name if isinstance(eng, AutoEngine) else eng.name
    cause = (f"engine {name!r} computes it differently from the example alone although the "
             f"model's own batched forward agrees: the model breaks the engine's contract "
             f"(bookkeeping: a parameter used outside its own module's forward, e.g. weight "
             f"tying through F.linear(x, other.weight); vectorized / bookkeeping: loss_fn "
             f"must get the outputs by calling model(...) on the batch)")
    norms = res.norms.double()
    if norms.numel() != len(probe):
        raise PolicyError(f"per-example independence probe: engine {name!r} reported "
                          f"{norms.numel()} units for {len(probe)} examples (unit='example')")
    for i, (_, g) in enumerate(alone):
        _expect(probe, i, "engine", f"the gradient norm engine {name!r} computes in the padded "
                f"batch", norms[i:i + 1], g.norm().reshape(1), rtol, atol, cause)
    total = _flat([res.grads[k] for k in params])
    want = torch.stack([g for _, g in alone]).sum(0)
    scale = sum(float(g.norm()) for _, g in alone)
    if float((total - want).norm()) > atol * len(alone) + rtol * scale:
        raise PolicyError(f"per-example independence probe failed (engine): the sum of the "
                          f"per-example gradients engine {name!r} computes in the padded batch "
                          f"differs from the sum over the examples alone (relative difference "
                          f"{float((total - want).norm()) / max(scale, 1e-30):.1e}, rtol="
                          f"{rtol:g}): {cause}")


def _expect(probe: Batch, i: int, check: str, what: str, got: Tensor, want: Tensor,
            rtol: float, atol: float, cause: str) -> None:
    if _differs(got, want, rtol, atol):
        raise PolicyError(
            f"per-example independence probe failed ({check}): example {probe.ids[i]!r} "
            f"({int(probe.feat_lens[i])} frames, padded to {probe.feats.shape[1]}): {what} "
            f"differs from its gradient alone at its own length (relative difference "
            f"{_rel(got, want):.1e}, rtol={rtol:g}): {cause}")


# -- helpers ----------------------------------------------------------------------------------
def _losses_and_grads(model: nn.Module, batch: Batch, loss_fn: LossFn,
                      params: dict[str, nn.Parameter]) -> list[tuple[float, Tensor]]:
    """[(loss_i, flat float64 ∂loss_i/∂θ)] for each example, from ONE ordinary forward."""
    losses = check_losses(loss_fn(model, batch), len(batch))
    out = []
    for i in range(len(batch)):
        gs = torch.autograd.grad(losses[i], list(params.values()), allow_unused=True,
                                 retain_graph=i + 1 < len(batch))
        out.append((float(losses[i].detach()),
                    _flat([torch.zeros_like(p) if g is None else g
                           for p, g in zip(params.values(), gs)])))
    return out


def _flat(gs: Sequence[Tensor]) -> Tensor:
    return torch.cat([g.detach().double().flatten().cpu() for g in gs])


def _rel(got: Tensor, want: Tensor) -> float:
    return float((got - want).norm()) / max(float(want.norm()), 1e-30)


def _differs(got: Tensor, want: Tensor, rtol: float, atol: float) -> bool:
    diff = float((got - want).norm())
    return not math.isfinite(diff) or diff > atol + rtol * float(want.norm())


def _single(b: Batch, i: int) -> Batch:
    """Example ``i`` alone, keeping all of ``b``'s padding."""
    return Batch([b.ids[i]], b.feats[i:i + 1], b.feat_lens[i:i + 1], b.targets[i:i + 1],
                 b.target_lens[i:i + 1])


def _pad_more(b: Batch, frames: int) -> Batch:
    """``b`` with ``frames`` more zero frames of padding (so every example has some)."""
    zeros = b.feats.new_zeros((len(b), frames, b.feats.shape[2]))
    return Batch(list(b.ids), torch.cat([b.feats, zeros], 1), b.feat_lens, b.targets,
                 b.target_lens)


def _dropout_off(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Switch every nn.Dropout-like module to eval; return (module, previous mode)."""
    out = [(m, m.training) for m in model.modules() if isinstance(m, _DropoutNd)]
    for m, _ in out:
        m.training = False
    return out
