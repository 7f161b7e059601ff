"""Load a checkpoint, transcribe audio, evaluate a manifest (greedy or beam + word LM)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from privasr.atomic import atomic_write_text
from privasr.data.dataset import AsrDataset, compute_features
from privasr.data.features import FeatureConfig, fbank, waveform
from privasr.data.manifest import AudioError, read_manifest, validate
from privasr.data.tokenizer import CharTokenizer
from privasr.decoding.ctc import beam_search, greedy_decode
from privasr.decoding.lm import Lexicon, WordNgramLM
from privasr.decoding.metrics import error_report
from privasr.models.conformer import ConformerConfig, ConformerCTC
from privasr.peft.apply import rebuild
from privasr.checkpoint import load_checkpoint
from privasr.decoding.evaluate import predict


def model_from_config(model_config: dict) -> torch.nn.Module:
    """A randomly initialised model of the architecture a checkpoint's ``model_config``
    describes: a Conformer-CTC, or (``family: hf_ctc``) a transformers CTC model."""
    if model_config.get("family") == "hf_ctc":
        from privasr.models.hf_ctc import from_model_config

        return from_model_config(model_config)
    return ConformerCTC(ConformerConfig(**model_config))


def feature_config_of(model: torch.nn.Module) -> FeatureConfig:
    """The features ``model`` takes: waveforms for a transformers CTC model, else fbank."""
    if getattr(getattr(model, "cfg", None), "family", "conformer") == "hf_ctc":
        return FeatureConfig(kind="waveform")
    return FeatureConfig()


def load_model(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, list[str]]:
    ck = load_checkpoint(path, map_location=device)
    if not ck.get("model_config"):
        raise ValueError(f"{path}: checkpoint has no model_config")
    model = model_from_config(ck["model_config"])
    rebuild(model, ck.get("config") or {})      # LoRA / adapter modules of a PEFT checkpoint
    model.load_state_dict(ck["model"])
    model.eval()
    return model.to(device), list(ck["vocab"])


def transcribe_files(model: torch.nn.Module, vocab: list[str], paths: list[str]):
    fc = feature_config_of(model)
    for p in paths:
        try:
            x, sr = sf.read(p, dtype="float32", always_2d=True)
        except Exception as e:
            raise AudioError(f"{p}: cannot read audio ({e})") from None
        if sr != 16000:
            raise AudioError(f"{p}: sample rate {sr} Hz; privasr models expect 16000 Hz")
        if fc.kind == "waveform":
            f = torch.from_numpy(waveform(x.mean(1), fc))[None]
        else:
            f = torch.from_numpy(fbank(x.mean(1), FeatureConfig()))[None]
        with torch.no_grad():
            lp, lens = model(f, torch.tensor([f.shape[1]]))
        yield p, greedy_decode(lp, lens, vocab)[0]


def decode_beam(log_probs: list[torch.Tensor], vocab: list[str], *, beam: int,
                lm: WordNgramLM | None, lm_weight: float = 0.3, word_bonus: float = 1.0,
                oov_penalty: float = -3.0) -> list[str]:
    lex = Lexicon.from_lm(lm) if lm is not None else None
    return [beam_search(lp.numpy(), vocab, beam_size=beam, lm=lm, lm_weight=lm_weight,
                        word_bonus=word_bonus, lexicon=lex, oov_penalty=oov_penalty)
            for lp in log_probs]


def eval_command(ckpt: str, manifest: str, *, out: str | None = None, beam: int = 0,
                 lm_train: str | None = None, lm_weight: float = 0.3, word_bonus: float = 1.0
                 ) -> int:
    model, vocab = load_model(ckpt)
    utts = validate(read_manifest(manifest))
    feats = compute_features(utts, feature_config_of(model),
                             cache_dir=Path(manifest).parent / "feats")
    ds = AsrDataset(utts, feats, CharTokenizer(tuple(vocab)),
                    output_frames=getattr(model, "output_frames", None))
    t = time.time()
    p = predict(model, ds, vocab, keep_log_probs=beam > 0)
    rows = {"greedy": error_report(p.refs, p.hyps)}
    if beam > 0:
        lm = None
        if lm_train:
            lm = WordNgramLM.from_transcripts(u.text for u in read_manifest(lm_train))
        rows[f"beam{beam}" + ("+lm" if lm else "")] = error_report(
            p.refs, decode_beam(p.log_probs, vocab, beam=beam, lm=lm, lm_weight=lm_weight,
                                word_bonus=word_bonus))
    print(f"{'decoder':<14} {'WER':>7} {'CER':>7}  utts={len(ds)}")
    for name, r in rows.items():
        print(f"{name:<14} {r['wer']:7.2%} {r['cer']:7.2%}")
    result = {"checkpoint": str(ckpt), "manifest": str(manifest), "seconds": time.time() - t,
              "results": rows}
    out_path = Path(out) if out else Path(ckpt).with_suffix(".eval.json")
    atomic_write_text(out_path, json.dumps(result, indent=1))
    print(f"wrote {out_path}")
    return 0
