"""`privasr export CKPT OUT_DIR`: a privasr checkpoint of a ``model.family=hf_ctc`` model as a
transformers directory (LoRA merged; privasr's character vocabulary as a Wav2Vec2CTCTokenizer),
loadable with ``AutoModelForCTC.from_pretrained(OUT_DIR)`` and ``Wav2Vec2Processor``."""

from __future__ import annotations

from pathlib import Path

__all__ = ["export_checkpoint"]


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, log=print) -> Path:
    from privasr.inference import load_model

    model, vocab = load_model(ckpt)
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"{ckpt}: a {type(model).__name__} checkpoint; `privasr export` writes "
                         f"transformers directories of model.family=hf_ctc models only")
    out = model.save_pretrained(out_dir, vocab=vocab)
    log(f"wrote {out} (transformers {type(model.hf).__name__}, vocabulary of {len(vocab)})")
    return out
