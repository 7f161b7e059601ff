"""BitFit (Ben Zaken et al., 2022): train only the biases (and, optionally, LayerNorm gains)."""

from __future__ import annotations

from torch import nn

__all__ = ["bitfit_names"]


def bitfit_names(model: nn.Module, *, norms: bool = True) -> list[str]:
    """Names of every bias parameter, plus every LayerNorm parameter when ``norms``."""
    out = []
    for mname, m in model.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            if pname == "bias" or (norms and isinstance(m, nn.LayerNorm)):
                out.append(f"{mname}.{pname}" if mname else pname)
    return out
