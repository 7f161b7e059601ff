"""Parameter-efficient fine-tuning for DP (docs/peft.md): LoRA, random projection, BitFit,
residual adapters, and loading a pre-trained encoder under a new CTC head.

``privasr.peft.apply.prepare_model`` is the one entry point the recipe calls.
"""
