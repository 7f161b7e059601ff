"""Per-example gradients from ONE ordinary forward and ONE activation-only backward.

The ``bookkeeping`` engine (after Bu et al., "Differentially private optimization on large
model at small cost", 2023) never runs the model under ``vmap`` and never asks autograd for
parameter gradients:

1. forward hooks on every module that owns trainable parameters keep its input ``x`` and its
   output ``y`` (the tensor in the graph);
2. ``autograd.grad(Σ_i loss_i, [y, ...])`` returns ``∂L/∂y`` for every hooked output. The weight
   gradients are not needed for these inputs, so autograd skips them (each matmul backward does
   one product instead of two);
3. each module's per-example parameter gradients are rebuilt from (x_i, ∂L_i/∂y_i) with one
   batched product -- for a Linear, ``g_i = (∂L_i/∂y_i)ᵀ x_i`` -- whose cost is what the
   ordinary weight gradient costs anyway.

Example i's loss depends only on example i's rows (no BatchNorm), so row i of ``∂(Σ loss)/∂y``
is ``∂loss_i/∂y_i``. Padding rows have zero output gradient when the model masks padding (the
engines' equality with the reference, which runs every example alone and unpadded, tests it).

Supported modules: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (zero padding, any stride,
dilation, groups) and ``nn.LayerNorm``, and subclasses that keep their ``forward``; a module called several times per forward has its
per-call gradients summed. Contract: a trainable parameter is used only inside its own module's
``forward`` (no weight tying through ``F.linear(x, other.weight)``), and a hooked module's output
is not modified in place afterwards (checked: it raises). Any other module owning trainable
parameters raises a ``TypeError`` naming it -- use the ``vectorized`` engine for such models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privasr.data.dataset import Batch

__all__ = ["SUPPORTED", "hooked_per_example_grads", "hooked_clipped_sum", "check_supported"]

LossFn = Callable[[nn.Module, Batch], Tensor]
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm)


@dataclass
class _Calls:
    """What one module saw during the forward: its inputs and outputs, one per call."""

    module: nn.Module
    prefix: str
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: module} for every module that directly owns a trainable parameter."""
    return {name: mod for name, mod in model.named_modules()
            if any(p.requires_grad for p in mod.parameters(recurse=False))}


def check_supported(model: nn.Module) -> dict[str, nn.Module]:
    """The modules to hook; raises TypeError naming the first unsupported one."""
    owners = _owners(model)
    for name, mod in owners.items():
        base = next((c for c in SUPPORTED if isinstance(mod, c)), None)
        if base is None or type(mod).forward is not base.forward:
            raise TypeError(
                f"engine 'bookkeeping' computes per-example gradients of nn.Linear, nn.Conv1d, "
                f"nn.Conv2d and nn.LayerNorm; module {name or '<root>'!r} "
                f"({type(mod).__name__}) owns trainable parameters: use engine='vectorized'")
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and (
                mod.padding_mode != "zeros" or isinstance(mod.padding, str)
                and mod.padding != "valid"):
            raise TypeError(f"engine 'bookkeeping': module {name!r} uses padding="
                            f"{mod.padding!r}, padding_mode={mod.padding_mode!r}; only explicit "
                            f"zero padding is supported (use engine='vectorized')")
    return owners


# -- per-module per-example gradients from (x, dL/dy) --------------------------------------------
def _linear(mod: nn.Linear, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    b = x.shape[0]
    x3, g3 = x.reshape(b, -1, x.shape[-1]), gy.reshape(b, -1, gy.shape[-1])
    out = {"weight": torch.bmm(g3.transpose(1, 2), x3)}
    if mod.bias is not None:
        out["bias"] = g3.sum(1)
    return out


def _layer_norm(mod: nn.LayerNorm, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    b, dims = x.shape[0], len(mod.normalized_shape)
    reduce = tuple(range(1, x.dim() - dims))
    out = {}
    if mod.weight is not None:
        xhat = F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)
        out["weight"] = (gy * xhat).sum(reduce) if reduce else gy * xhat
    if mod.bias is not None:
        out["bias"] = gy.sum(reduce) if reduce else gy
    return {k: v.reshape(b, *mod.normalized_shape) for k, v in out.items()}


def _conv(mod: nn.Conv1d | nn.Conv2d, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    """Per-example weight gradients as ONE weight-only ``convolution_backward``: the batch is
    folded into the channels, (B, C, ...) -> (1, B·C, ...), with B× the groups, so every
    example is its own group and the "summed" weight gradient comes out per example. Exact,
    and on CPU faster than unfold + einsum (im2col of a batch is memory-bound)."""
    b, w = x.shape[0], mod.weight.detach().to(x.dtype)
    pad = _pad(mod)
    wb = torch.ops.aten.convolution_backward(
        gy.reshape(1, -1, *gy.shape[2:]), x.reshape(1, -1, *x.shape[2:]),
        w.repeat(b, *[1] * (w.dim() - 1)), None, mod.stride, pad, mod.dilation, False,
        [0] * len(pad), mod.groups * b, [False, True, False])[1]
    out = {"weight": wb.reshape(b, *w.shape)}
    if mod.bias is not None:
        out["bias"] = gy.flatten(2).sum(2)
    return out


def _pad(mod: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    return (0,) * len(mod.kernel_size) if mod.padding == "valid" else tuple(mod.padding)


def _module_grads(mod: nn.Module, x: Tensor, gy: Tensor) -> dict[str, Tensor]:
    if isinstance(mod, nn.Linear):
        return _linear(mod, x, gy)
    if isinstance(mod, nn.LayerNorm):
        return _layer_norm(mod, x, gy)
    return _conv(mod, x, gy)


# -- one forward + activation-only backward -------------------------------------------------------
def _capture(model: nn.Module, batch: Batch, loss_fn: LossFn,
             check_losses: Callable[[Tensor, int], Tensor], want: bool
             ) -> tuple[list[tuple[_Calls, list[tuple[Tensor, Tensor]]]], Tensor]:
    """[(module record, [(x, ∂L/∂y) per call])], (B,) losses."""
    calls = {name: _Calls(mod, f"{name}." if name else "")
             for name, mod in check_supported(model).items()}

    def hook(rec: _Calls):
        def save(_mod: nn.Module, args: tuple, output: Tensor) -> None:
            if isinstance(output, Tensor) and output.requires_grad:
                rec.inputs.append(args[0].detach())
                rec.outputs.append(output)
                rec.versions.append(output._version)
        return save

    handles = [rec.module.register_forward_hook(hook(rec)) for rec in calls.values()]
    try:
        losses = check_losses(loss_fn(model, batch), len(batch))
    finally:
        for h in handles:
            h.remove()
    recs = [(rec, i) for rec in calls.values() for i in range(len(rec.outputs))]
    for rec, i in recs:
        if rec.outputs[i]._version != rec.versions[i]:
            raise RuntimeError(f"engine 'bookkeeping': the output of {rec.prefix[:-1]!r} was "
                               f"modified in place after its forward; use engine='vectorized'")
    if want and not recs:
        raise RuntimeError("the loss does not depend on any hooked module output: loss_fn must "
                           "get its outputs by calling model(...) on the batch")
    out_grads = torch.autograd.grad(losses.sum(), [rec.outputs[i] for rec, i in recs],
                                    allow_unused=True) if recs else ()
    per_module: dict[int, tuple[_Calls, list[tuple[Tensor, Tensor]]]] = {}
    for (rec, i), gy in zip(recs, out_grads):
        if gy is not None:
            x = rec.inputs[i]
            dtype = torch.promote_types(x.dtype, torch.float32)
            per_module.setdefault(id(rec), (rec, []))[1].append((x.to(dtype), gy.to(dtype)))
    for rec in calls.values():
        rec.inputs.clear(), rec.outputs.clear()
    return list(per_module.values()), losses.detach()


def _summed_grads(rec: _Calls, pairs: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for x, gy in pairs:
        for pname, g in _module_grads(rec.module, x, gy).items():
            out[pname] = out[pname] + g if pname in out else g
    return out


def hooked_per_example_grads(model: nn.Module, params: dict[str, nn.Parameter], batch: Batch,
                             loss_fn: LossFn, check_losses: Callable[[Tensor, int], Tensor]
                             ) -> tuple[dict[str, Tensor], Tensor]:
    """({name: (B, *shape)} per-example gradients of ``loss_fn``'s (B,) losses, the losses)."""
    n = len(batch)
    modules, losses = _capture(model, batch, loss_fn, check_losses, bool(params))
    grads = {rec.prefix + k: g for rec, pairs in modules
             for k, g in _summed_grads(rec, pairs).items() if rec.prefix + k in params}
    return ({k: grads[k].to(p.dtype) if k in grads
             else torch.zeros(n, *p.shape, dtype=p.dtype, device=p.device)
             for k, p in params.items()}, losses)


def hooked_clipped_sum(model: nn.Module, params: dict[str, nn.Parameter], batch: Batch,
                       loss_fn: LossFn, check_losses: Callable[[Tensor, int], Tensor],
                       names: tuple[str, ...], factors: Callable[[Tensor], Tensor],
                       sums: dict[str, Tensor]) -> Tensor:
    """Add Σ_i clip(g_i) of one batch (unit = example) to ``sums``; return the (B,) losses.

    Two passes over the captured (x, ∂L/∂y), never holding B × (all parameters): a Linear
    weight's per-example gradients are built one layer at a time, only to take their norms;
    the clipped sum is then ONE matrix product per layer with ∂L/∂y scaled per example,
    Σ_i f_i (∂L_i/∂y_i)ᵀ x_i. Small tensors (biases, norms, convolutions, layers called twice)
    keep their per-example gradients. ``factors`` maps the (B, L) squared per-tensor norms of
    ``names`` to the (B, L) clipping factors (``_UnitClipper.factors``).
    """
    n = len(batch)
    modules, losses = _capture(model, batch, loss_fn, check_losses, bool(params))
    kept: dict[str, Tensor] = {}
    sq: dict[str, Tensor] = {}
    deferred: dict[str, tuple[Tensor, Tensor]] = {}       # Linear weight -> (x3, g3)
    for rec, pairs in modules:
        mod = rec.module
        if isinstance(mod, nn.Linear) and len(pairs) == 1 and mod.weight.requires_grad:
            x, gy = pairs[0]
            x3, g3 = x.reshape(n, -1, x.shape[-1]), gy.reshape(n, -1, gy.shape[-1])
            key = rec.prefix + "weight"
            sq[key] = torch.bmm(g3.transpose(1, 2), x3).square().sum((1, 2))
            deferred[key] = (x3, g3)
            if mod.bias is not None and mod.bias.requires_grad:
                kept[rec.prefix + "bias"] = g3.sum(1)
            continue
        for k, g in _summed_grads(rec, pairs).items():
            if rec.prefix + k in params:
                kept[rec.prefix + k] = g
    for k, g in kept.items():
        sq[k] = g.flatten(1).square().sum(1)
    if not names:
        return losses
    ref = next(iter(params.values()))
    zero = torch.zeros(n, dtype=torch.float32, device=ref.device)
    f = factors(torch.stack([sq.get(k, zero).float() for k in names], dim=1))     # (B, L)
    for j, k in enumerate(names):
        w = f[:, j]
        if k in deferred:
            x3, g3 = deferred[k]
            g = (g3 * w.to(g3.dtype)[:, None, None]).flatten(0, 1).t() @ x3.flatten(0, 1)
        elif k in kept:
            g = torch.tensordot(w.to(kept[k].dtype), kept[k], dims=1)
        else:
            continue
        sums[k] += g.to(sums[k].dtype)
    return losses
