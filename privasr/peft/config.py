"""The ``finetune`` recipe section: options of the PEFT methods (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass, field

# every nn.Linear inside the Conformer blocks: attention projections, FFN and conv pointwise
DEFAULT_LORA_TARGETS = ["encoder.blocks.*.attn.q", "encoder.blocks.*.attn.k",
                        "encoder.blocks.*.attn.v", "encoder.blocks.*.attn.proj",
                        "encoder.blocks.*.ff?.up", "encoder.blocks.*.ff?.down"]

METHODS = ("none", "full", "head", "bitfit", "lora", "rp", "adapters")


@dataclass
class FinetuneConfig:
    """How ``peft`` (none | full | head | bitfit | lora | rp | adapters) adapts the model.

    ``none`` leaves the model as built (every parameter trained); ``full`` is the same but
    states it; ``head`` trains only the CTC head; the others freeze the encoder and add or
    unfreeze a few parameters (the CTC head is always trained).
    """

    keep_head: bool = False  # with init=CKPT: keep its CTC head (default: a new, random one)
    lora_rank: int = 8
    lora_alpha: float = 16.0  # LoRA scale = alpha / rank
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    adapter_dim: int = 32  # bottleneck width of the residual adapter after each block
    bitfit_norms: bool = True  # BitFit also trains LayerNorm gains (biases always)
    extra_trainable: list[str] = field(default_factory=list)  # fnmatch parameter names
