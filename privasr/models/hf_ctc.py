"""A pre-trained Hugging Face ``transformers`` CTC model (wav2vec2 / HuBERT) behind privasr's
model interface, ready for per-example clipping, DP-SGD, PEFT and export.

    model = load_hf_ctc("path/to/wav2vec2-dir", vocab_size=29)   # local directory only
    log_probs, out_lens = model(feats, feat_lens)     # feats (B, N, 1) 16 kHz samples, (B,)
    model.save_pretrained("out/hf")                   # a transformers-loadable directory

What is kept from the checkpoint: every weight but the CTC head, and the dropouts of its config.
What privasr changes, and why:

- **Vocabulary.** privasr's character tokenizer (``privasr.data.tokenizer.CharTokenizer``:
  blank = 0, space, a-z, apostrophe) is used throughout. The checkpoint's CTC head
  (``lm_head``) is always replaced by a new, randomly initialised ``nn.Linear`` sized to that
  vocabulary (the DP-PEFT paper's "new decoder"), even when the checkpoint's vocabulary
  happens to be the same characters; ``config.vocab_size`` and ``config.pad_token_id`` (the
  CTC blank of transformers' own loss) become ``len(vocab)`` and 0.
- **Input.** Raw 16 kHz waveforms, (B, N, 1) (``FeatureConfig(kind="waveform")``). When the
  checkpoint's ``preprocessor_config.json`` says ``do_normalize`` (or it has none), each
  utterance is normalised to zero mean and unit variance over its valid samples, as
  ``Wav2Vec2FeatureExtractor`` does; padding is zero.
- **Padding never reaches a valid frame**, so an example's output is the same alone or in a
  padded batch (what per-example clipping needs, and what the independence probe checks):
  padded samples are zeroed; the GroupNorm of ``feat_extract_norm="group"`` models (wav2vec2-
  base) takes its statistics over the valid frames only (transformers normalises over the
  whole padded length, which is why its docs say not to batch such models with padding); the
  hidden states of padded frames are zeroed before the positional convolution; attention keys
  of padded frames are masked.
- **vmap-safe forward.** The model's submodules are driven here rather than through
  ``Wav2Vec2Model.forward``, whose boolean-mask assignment (``hidden_states[~mask] = 0``) has
  no ``torch.func.vmap`` batching rule. Attention is an explicit softmax (registered as the
  ``privasr_eager`` attention implementation) whose dropout is an ``nn.Dropout`` module, so
  the probe can switch it off. transformers' SpecAugment (``mask_time_prob``) and LayerDrop
  are not applied (both draw their randomness in ways vmap cannot batch); ``masked_spec_embed``
  is frozen (unused).
- **Frozen by default**: the convolutional feature encoder (``model.freeze_feature_encoder``),
  common practice for fine-tuning, which also keeps GroupNorm out of the trainable set (the
  ``bookkeeping`` engine supports Linear / Conv1d / LayerNorm only). With PEFT the weight-normed
  positional convolution is frozen too; trained (peft=none/full) it makes ``auto`` use the
  ``vectorized`` engine.

Checkpoints: ``model.cfg`` (an ``HFCTCConfig``) holds the transformers config and the feature
extractor's settings, so a privasr checkpoint rebuilds the model without the original directory
(``from_model_config``).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HFCTCConfig", "HFCTCModel", "load_hf_ctc", "HF_LORA_TARGETS", "SUPPORTED_TYPES",
           "require_transformers", "check_model_dir"]

SUPPORTED_TYPES = ("wav2vec2", "hubert")
# every attention projection and feed-forward linear of the transformer layers
HF_LORA_TARGETS = ["*.attention.q_proj", "*.attention.k_proj", "*.attention.v_proj",
                   "*.attention.out_proj", "*.feed_forward.intermediate_dense",
                   "*.feed_forward.output_dense"]
ATTENTION = "privasr_eager"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("model.family=hf_ctc needs the `transformers` package: "
                          "pip install -e '.[hf]'") from None
    return transformers


def check_model_dir(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local transformers CTC model directory; clear errors when
    ``path`` is missing, is no model directory, or holds no supported CTC model."""
    if not str(path):
        raise ValueError("model.family=hf_ctc needs model.path=DIR: a local directory written "
                         "by transformers' save_pretrained (nothing is downloaded)")
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model.path={path}: no such directory (model.family=hf_ctc "
                                f"loads a local transformers model directory only)")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model.path={path}: no config.json; not a transformers model "
                                f"directory (write one with model.save_pretrained(DIR))")
    conf = json.loads(cfg_file.read_text())
    mtype = conf.get("model_type", "?")
    archs = conf.get("architectures") or []
    if mtype not in SUPPORTED_TYPES:
        raise ValueError(f"model.path={path}: model_type {mtype!r} is not supported by "
                         f"model.family=hf_ctc (supported: {', '.join(SUPPORTED_TYPES)}, "
                         f"CTC models with the Wav2Vec2ForCTC interface)")
    if archs and not any(a.endswith("ForCTC") for a in archs):
        raise ValueError(f"model.path={path}: not a CTC model (architectures {archs}); "
                         f"model.family=hf_ctc needs a *ForCTC model, e.g. Wav2Vec2ForCTC")
    if conf.get("add_adapter"):
        raise ValueError(f"model.path={path}: add_adapter=true (a downsampling adapter after "
                         f"the encoder) is not supported by model.family=hf_ctc")
    return conf


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Tensor | None, scaling: float | None = None,
               dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """transformers' eager attention, with the dropout of the probabilities done by the
    module's ``privasr_attn_dropout`` (an nn.Dropout) when it has one."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(dim=-1)
    drop = getattr(module, "privasr_attn_dropout", None)
    if drop is not None:
        weights = drop(weights)
    elif dropout:
        weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


_registered = False


def _register_attention() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION, _attention)
        _registered = True


@dataclass
class HFCTCConfig:
    """What a privasr checkpoint needs to rebuild an ``HFCTCModel`` (saved as model_config)."""

    family: str = "hf_ctc"
    path: str = ""                      # the directory it was first loaded from (information)
    vocab_size: int = 29
    freeze_feature_encoder: bool = True
    normalize: bool = True              # zero-mean unit-variance per utterance
    hf_config: dict = field(default_factory=dict)          # transformers config (to_dict)
    feature_extractor: dict = field(default_factory=dict)  # preprocessor_config.json, if any


def _conv_length(lens: Tensor, conv: nn.Conv1d) -> Tensor:
    k, s = conv.kernel_size[0], conv.stride[0]
    return torch.div(lens - k, s, rounding_mode="floor") + 1


def _masked_group_norm(gn: nn.GroupNorm, h: Tensor, lens: Tensor) -> Tensor:
    """``gn(h)`` of (B, C, T) with each example's statistics over its first ``lens`` frames only
    (exactly ``gn`` of the example alone, unpadded)."""
    b, c, t = h.shape
    g = gn.num_groups
    valid = (torch.arange(t, device=h.device)[None, :] < lens[:, None])[:, None, None, :]
    hg = h.reshape(b, g, c // g, t)
    n = (lens.clamp(min=1) * (c // g)).to(h.dtype).reshape(b, 1, 1, 1)
    mean = hg.masked_fill(~valid, 0.0).sum((2, 3), keepdim=True) / n
    var = (hg - mean).masked_fill(~valid, 0.0).square().sum((2, 3), keepdim=True) / n
    y = ((hg - mean) / torch.sqrt(var + gn.eps)).reshape(b, c, t)
    if gn.affine:
        y = y * gn.weight[None, :, None] + gn.bias[None, :, None]
    return y


class HFCTCModel(nn.Module):
    """A transformers CTC model (``self.hf``) with privasr's interface (see module docstring)."""

    head_name = "hf.lm_head"                 # the CTC head (privasr.peft trains it)
    default_lora_targets = HF_LORA_TARGETS

    def __init__(self, hf_model: nn.Module, cfg: HFCTCConfig) -> None:
        super().__init__()
        _register_attention()
        self.hf = hf_model
        self.cfg = cfg
        hf_model.config._attn_implementation = ATTENTION
        for m in hf_model.modules():
            rate = getattr(m, "dropout", None)
            if hasattr(m, "q_proj") and hasattr(m, "out_proj") and isinstance(rate, float):
                m.privasr_attn_dropout = nn.Dropout(rate)
        base = self.base
        if getattr(base, "masked_spec_embed", None) is not None:
            base.masked_spec_embed.requires_grad_(False)       # SpecAugment is not applied
        if cfg.freeze_feature_encoder:
            for p in base.feature_extractor.parameters():
                p.requires_grad_(False)

    # -- metadata ----------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return getattr(self.hf, self.hf.base_model_prefix)

    @property
    def subsampling(self) -> int:
        """Input samples per output frame (320 for wav2vec2: 50 frames/s)."""
        return math.prod(self.hf.config.conv_stride)

    def output_lengths(self, lens: Tensor) -> Tensor:
        return self.hf._get_feat_extract_output_lengths(lens).to(torch.long)

    def output_frames(self, n: int) -> int:
        """Output frames for ``n`` input samples (what CTC feasibility needs)."""
        for k, s in zip(self.hf.config.conv_kernel, self.hf.config.conv_stride):
            n = (n - k) // s + 1
        return max(n, 0)

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes that stay frozen whatever ``peft`` trains."""
        pre = "hf." + self.hf.base_model_prefix + "."
        out = [pre + "masked_spec_embed"]
        if self.cfg.freeze_feature_encoder:
            out.append(pre + "feature_extractor.")
        return tuple(out)

    def peft_blocks(self) -> tuple[nn.ModuleList, int]:
        """(transformer layers, hidden size): where ``peft=adapters`` puts its adapters."""
        return self.base.encoder.layers, int(self.hf.config.hidden_size)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """feats (B, N, 1) 16 kHz samples, feat_lens (B,) -> log_probs (B, T', V), (B,)."""
        if feats.dim() != 3 or feats.shape[-1] != 1:
            raise ValueError(f"model.family=hf_ctc takes waveform features (B, N, 1) "
                             f"(FeatureConfig(kind='waveform')); got {tuple(feats.shape)}")
        x = feats[..., 0]
        lens = feat_lens.to(torch.long)
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lens[:, None]
        x = x.masked_fill(~valid, 0.0)
        if self.cfg.normalize:       # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
            n = lens.clamp(min=1).to(x.dtype)[:, None]
            mean = x.sum(1, keepdim=True) / n
            var = (x - mean).masked_fill(~valid, 0.0).square().sum(1, keepdim=True) / n
            x = ((x - mean) / torch.sqrt(var + 1e-7)).masked_fill(~valid, 0.0)
        base = self.base
        h = x[:, None]
        for layer in base.feature_extractor.conv_layers:
            lens = _conv_length(lens, layer.conv)
            norm = getattr(layer, "layer_norm", None)
            if isinstance(norm, nn.GroupNorm):
                h = layer.activation(_masked_group_norm(norm, layer.conv(h), lens))
            else:
                h = layer(h)
        h = h.transpose(1, 2)                                             # (B, T', C)
        proj = base.feature_projection(h)
        hidden = proj[0] if isinstance(proj, tuple) else proj
        frames = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lens[:, None]
        hidden = hidden.masked_fill(~frames[..., None], 0.0)
        bias = (~frames)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
        enc = base.encoder
        stable = bool(getattr(self.hf.config, "do_stable_layer_norm", False))
        hidden = hidden + enc.pos_conv_embed(hidden)
        if not stable:
            hidden = enc.layer_norm(hidden)
        hidden = enc.dropout(hidden)
        for layer in enc.layers:
            out = layer(hidden, attention_mask=bias)
            hidden = out[0] if isinstance(out, tuple) else out
        if stable:
            hidden = enc.layer_norm(hidden)
        logits = self.hf.lm_head(self.hf.dropout(hidden))
        return F.log_softmax(logits, dim=-1), lens.clamp(min=0)

    # -- export ------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path, vocab: list[str] | None = None) -> Path:
        """Write a transformers directory (config, weights, feature extractor and, given the
        privasr ``vocab``, a Wav2Vec2CTCTokenizer). LoRA updates are merged first (every module
        with a ``merged()`` method, i.e. ``privasr.peft.lora.LoRALinear``, is replaced by its
        plain ``nn.Linear``); added layers transformers does not know (peft=adapters) are
        refused."""
        require_transformers()
        from transformers import Wav2Vec2FeatureExtractor

        model = copy.deepcopy(self).cpu()
        hf = model.hf
        for name, m in list(hf.named_modules()):
            if name and callable(getattr(m, "merged", None)):
                parent, _, leaf = name.rpartition(".")
                setattr(hf.get_submodule(parent) if parent else hf, leaf, m.merged())
        foreign = sorted({type(m).__name__ for m in hf.modules()
                          if type(m).__module__.startswith("privasr")})
        if foreign:
            raise ValueError(f"the model holds layers transformers' {type(hf).__name__} does "
                             f"not have ({', '.join(foreign)}, e.g. peft=adapters): it cannot be "
                             f"exported to a transformers directory")
        for m in hf.modules():
            if hasattr(m, "privasr_attn_dropout"):
                del m.privasr_attn_dropout
        hf.config._attn_implementation = "eager"
        for p in hf.parameters():
            p.requires_grad_(True)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(out)
        fe = dict(self.cfg.feature_extractor) or {
            "do_normalize": self.cfg.normalize, "feature_size": 1, "sampling_rate": 16000,
            "padding_value": 0.0,
            "return_attention_mask": self.hf.config.feat_extract_norm == "layer"}
        fe.pop("feature_extractor_type", None)
        fe.pop("processor_class", None)
        Wav2Vec2FeatureExtractor(**fe).save_pretrained(out)
        if vocab is not None:
            _save_tokenizer(out, vocab)
        return out


def _save_tokenizer(out: Path, vocab: list[str]) -> None:
    """A Wav2Vec2CTCTokenizer for privasr's vocabulary: blank -> <pad> (id 0), space -> |."""
    from transformers import Wav2Vec2CTCTokenizer

    table = {("<pad>" if i == 0 else "|" if s == " " else s): i for i, s in enumerate(vocab)}
    (out / "vocab.json").write_text(json.dumps(table, indent=1))
    Wav2Vec2CTCTokenizer(str(out / "vocab.json"), pad_token="<pad>", unk_token="<unk>",
                         word_delimiter_token="|").save_pretrained(out)


def _feature_extractor_settings(path: Path) -> dict[str, Any]:
    p = path / "preprocessor_config.json"
    if not p.is_file():
        return {}
    fe = json.loads(p.read_text())
    if fe.get("sampling_rate", 16000) != 16000 or fe.get("feature_size", 1) != 1:
        raise ValueError(f"{p}: model.family=hf_ctc takes 16 kHz mono waveforms "
                         f"(sampling_rate={fe.get('sampling_rate')}, "
                         f"feature_size={fe.get('feature_size')})")
    return fe


def _resize_head(hf: nn.Module, vocab_size: int) -> None:
    old = hf.lm_head
    hf.lm_head = nn.Linear(old.in_features, vocab_size, device=old.weight.device,
                           dtype=old.weight.dtype)
    hf.config.vocab_size = vocab_size
    hf.config.pad_token_id = 0          # privasr's CTC blank, transformers' CTC loss blank


def load_hf_ctc(path: str | Path, vocab_size: int, *, freeze_feature_encoder: bool = True
                ) -> HFCTCModel:
    """The transformers CTC model in local directory ``path`` (never downloaded), with a new
    CTC head of ``vocab_size`` outputs (blank = 0)."""
    check_model_dir(path)
    require_transformers()
    from transformers import AutoModelForCTC

    try:
        hf = AutoModelForCTC.from_pretrained(str(path), local_files_only=True,
                                             attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path={path}: transformers cannot load a CTC model from it "
                         f"({e})") from None
    _resize_head(hf, vocab_size)
    fe = _feature_extractor_settings(Path(path))
    cfg = HFCTCConfig(path=str(path), vocab_size=vocab_size,
                      freeze_feature_encoder=freeze_feature_encoder,
                      normalize=bool(fe.get("do_normalize", True)),
                      hf_config=hf.config.to_dict(), feature_extractor=fe)
    return HFCTCModel(hf.train(), cfg)


def from_model_config(mc: dict[str, Any]) -> HFCTCModel:
    """An ``HFCTCModel`` of the architecture a checkpoint's ``model_config`` describes (random
    weights: load the checkpoint's state dict into it)."""
    require_transformers()
    from transformers import AutoConfig, AutoModelForCTC

    fields = HFCTCConfig.__dataclass_fields__
    cfg = HFCTCConfig(**{k: v for k, v in mc.items() if k in fields})
    d = dict(cfg.hf_config)
    conf = AutoConfig.for_model(d.pop("model_type"), **d)
    hf = AutoModelForCTC.from_config(conf, attn_implementation="eager")
    if hf.lm_head.out_features != cfg.vocab_size:
        _resize_head(hf, cfg.vocab_size)
    return HFCTCModel(hf, cfg)
