"""Bring your own pre-trained model: a transformers CTC model (model.family=hf_ctc) behind
privasr's model interface: loading, waveform features, per-example clipping engines, PEFT,
export to a transformers directory, and the DP fine-tuning recipe end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCTC, Wav2Vec2Config, Wav2Vec2ForCTC  # noqa: E402

from privasr.clipping import get_engine  # noqa: E402
from privasr.clipping.bookkeeping import unsupported_modules  # noqa: E402
from privasr.config import FinetuneConfig, load_config  # noqa: E402
from privasr.data.dataset import AsrDataset, Batch  # noqa: E402
from privasr.data.features import FeatureConfig  # noqa: E402
from privasr.models.hf_ctc import HF_LORA_TARGETS, load_hf_ctc  # noqa: E402
from privasr.models.loss import checked, per_example_ctc  # noqa: E402
from privasr.peft.apply import apply_peft  # noqa: E402
from privasr.peft.lora import lora_layers  # noqa: E402
from test_engines import assert_same, make_batches, policy_for  # noqa: E402
from test_trainer import _overrides  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V = 29  # privasr's character vocabulary (blank = 0)
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  feat_proj_dropout=0.0, final_dropout=0.0)


def tiny_config(**kw) -> Wav2Vec2Config:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=37, conv_dim=(16, 16), conv_kernel=(10, 3),
                conv_stride=(5, 2), num_conv_pos_embeddings=8,
                num_conv_pos_embedding_groups=4, vocab_size=12)   # a vocabulary not privasr's
    return Wav2Vec2Config(**{**base, **kw})


def save_tiny(path, seed=0, cls=Wav2Vec2ForCTC, **kw):
    torch.manual_seed(seed)
    cls(tiny_config(**kw)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def w2v_dir(tmp_path_factory):
    """wav2vec2-base style (GroupNorm feature encoder), dropout off for exact comparisons."""
    return save_tiny(tmp_path_factory.mktemp("w2v"), **NO_DROPOUT)


def hf_alone(hf, x):
    """transformers' own forward on ONE unpadded utterance, normalised as its feature
    extractor does: log-probs (T', V)."""
    x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
    with torch.no_grad():
        return F.log_softmax(hf(x[None]).logits[0], dim=-1)


def random_waves(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lens), max(lens), 1)
    for i, n in enumerate(lens):
        x[i, :n, 0] = 0.1 * torch.randn(n, generator=g)
    return x, torch.tensor(lens)


# -- the model: loading, interface, padding ------------------------------------------------------
@pytest.mark.parametrize("variant", ["group", "layer_stable", "hubert"])
def test_padded_batch_matches_transformers_on_each_utterance_alone(tmp_path, variant):
    if variant == "hubert":
        from transformers import HubertConfig, HubertForCTC

        torch.manual_seed(0)
        conf = HubertConfig(**{k: v for k, v in tiny_config().to_dict().items()
                               if k in HubertConfig().to_dict() and k != "model_type"})
        HubertForCTC(conf).save_pretrained(tmp_path)
    else:
        kw = dict(feat_extract_norm="layer", do_stable_layer_norm=True) \
            if variant == "layer_stable" else {}
        save_tiny(tmp_path, **kw)
    model = load_hf_ctc(tmp_path, V).eval()
    assert model.hf.lm_head.out_features == V and model.hf.config.pad_token_id == 0
    x, lens = random_waves([400, 251, 123])
    lp, out_lens = model(x, lens)
    assert lp.shape[-1] == V
    assert out_lens.tolist() == model.output_lengths(lens).tolist() \
        == [model.output_frames(int(n)) for n in lens]
    for i, n in enumerate(lens.tolist()):
        torch.testing.assert_close(lp[i, :out_lens[i]], hf_alone(model.hf, x[i, :n, 0]),
                                   rtol=1e-4, atol=1e-5)


def test_feature_encoder_frozen_by_default_and_option(w2v_dir):
    m = load_hf_ctc(w2v_dir, V)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen and all(".feature_extractor." in n or "masked_spec_embed" in n for n in frozen)
    assert any("feature_extractor.conv_layers.0.layer_norm" in n for n in frozen)  # GroupNorm
    m2 = load_hf_ctc(w2v_dir, V, freeze_feature_encoder=False)
    assert all(p.requires_grad for n, p in m2.named_parameters() if "masked_spec" not in n)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="model.path=DIR"):
        load_hf_ctc("", V)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_hf_ctc(tmp_path / "absent", V)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_ctc(tmp_path, V)
    from transformers import BertConfig, Wav2Vec2Model

    BertConfig(num_hidden_layers=1).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        load_hf_ctc(tmp_path / "bert", V)
    torch.manual_seed(0)
    Wav2Vec2Model(tiny_config()).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="not a CTC model"):
        load_hf_ctc(tmp_path / "base", V)
    from privasr.errors import ConfigError
    from privasr.models.build import build_model

    cfg = load_config(None, ["model.family=nope"])
    with pytest.raises(ConfigError, match="valid families: conformer, hf_ctc"):
        build_model(cfg, V)


def test_waveform_features_and_frame_rate(tiny_corpus):
    from privasr.data.dataset import compute_features
    from privasr.data.manifest import read_manifest

    corpus, _, _ = tiny_corpus
    utts = read_manifest(corpus / "dev.jsonl")[:3]
    wav = compute_features(utts, FeatureConfig(kind="waveform"), progress=False)
    fb = compute_features(utts, FeatureConfig(), progress=False)
    for u, w, f in zip(utts, wav, fb):
        assert w.shape[1] == 1 and w.shape[0] == pytest.approx(u.duration * 16000, abs=2)
        assert f.shape[1] == 80
    tok_ds = AsrDataset(utts, wav, _tok(), output_frames=lambda n: n // 320)
    assert tok_ds.frame_seconds == 1 / 16000
    assert tok_ds.durations == pytest.approx([u.duration for u in utts], abs=1e-3)
    b = tok_ds.collate([0, 1])
    assert b.frame_seconds == 1 / 16000 and b.audio_seconds == pytest.approx(
        sum(u.duration for u in utts[:2]), abs=1e-3)
    fb_ds = AsrDataset(utts, fb, _tok())
    assert fb_ds.frame_seconds == 0.01 and fb_ds.collate([0]).frame_seconds == 0.01
    with pytest.raises(ValueError, match="feature kind"):
        FeatureConfig(kind="mfcc")


def _tok():
    from privasr.data.tokenizer import CharTokenizer

    return CharTokenizer()


# -- per-example clipping: every engine == reference ----------------------------------------------
@pytest.fixture(scope="module")
def wave_batches():
    """Random waveforms of different lengths, in float64 (with the models in float64): the
    engines then agree to rounding, not to float32's accumulated error through the model."""
    return [Batch(b.ids, b.feats.double(), b.feat_lens, b.targets, b.target_lens, b.speakers)
            for b in make_batches([3, 2, 1], 11, f=1, vocab=V, min_len=300, max_len=700,
                                  max_tlen=6)]


@pytest.mark.parametrize("peft", ["none", "lora"])
@pytest.mark.parametrize("scope", ["global", "uniform", "layers"])
@pytest.mark.parametrize("unit", ["example", "microbatch", "core", "speaker", "batch"])
def test_engines_match_reference(w2v_dir, wave_batches, unit, scope, peft):
    model = load_hf_ctc(w2v_dir, V).eval().double()
    if peft == "lora":
        apply_peft(model, "lora", FinetuneConfig(lora_rank=2))
        # bookkeeping covers every trainable module (LoRA linears, the head)
        assert not unsupported_modules(model)
    else:
        # the weight-normed positional conv (a parametrization) is not bookkeeping's
        assert set(unsupported_modules(model)) == {
            "hf.wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight"}
    loss_fn = checked(per_example_ctc)
    policy = policy_for(unit, scope, "fixed", 0.5, 6)
    ref = get_engine("reference").clipped_sum(model, wave_batches, loss_fn, policy, step=1)
    assert 0 < ref.clipped.sum()
    engines = ["vectorized", "auto"] + (["bookkeeping"] if peft == "lora" else [])
    for name in engines:
        engine = get_engine(name, chunk_size=4)
        assert_same(engine.clipped_sum(model, wave_batches, loss_fn, policy, step=1), ref)
        if name == "auto":
            want = "bookkeeping" if peft == "lora" else "vectorized"
            assert engine.choose(model).name == want


def test_trainable_feature_encoder_runs_on_vectorized(tmp_path, wave_batches):
    save_tiny(tmp_path, **NO_DROPOUT)
    model = load_hf_ctc(tmp_path, V, freeze_feature_encoder=False).eval().double()
    assert "hf.wav2vec2.feature_extractor.conv_layers.0.layer_norm" in unsupported_modules(model)
    loss_fn = checked(per_example_ctc)
    policy = policy_for("example", "global", "fixed", 0.5, 6)
    ref = get_engine("reference").clipped_sum(model, wave_batches, loss_fn, policy)
    assert_same(get_engine("auto").clipped_sum(model, wave_batches, loss_fn, policy), ref)


def test_independence_probe_passes_with_dropout(tmp_path, wave_batches):
    """Attention dropout is an nn.Dropout module (the probe switches it off); padding and the
    GroupNorm's statistics never see other frames than the example's own."""
    from privasr.clipping.probe import check_per_example_independence

    save_tiny(tmp_path, attention_dropout=0.1, hidden_dropout=0.1)
    model = load_hf_ctc(tmp_path, V).double()
    apply_peft(model, "lora", FinetuneConfig(lora_rank=2))
    check_per_example_independence(model, wave_batches[0], checked(per_example_ctc), "auto")


# -- PEFT ----------------------------------------------------------------------------------------
def test_peft_methods_on_hf_names(w2v_dir):
    m = load_hf_ctc(w2v_dir, V)
    apply_peft(m, "lora", FinetuneConfig(lora_rank=2))     # the HF default targets
    assert len(lora_layers(m)) == 2 * len(HF_LORA_TARGETS)
    train = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"hf.lm_head.weight", "hf.lm_head.bias"} <= train
    assert all("lora_" in n or n.startswith("hf.lm_head.") for n in train)

    m = load_hf_ctc(w2v_dir, V)
    apply_peft(m, "lora", FinetuneConfig(lora_rank=2, lora_targets=["*.attention.v_proj"]))
    assert len(lora_layers(m)) == 2

    m = load_hf_ctc(w2v_dir, V)
    apply_peft(m, "head", FinetuneConfig())
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        "hf.lm_head.weight", "hf.lm_head.bias"}

    m = load_hf_ctc(w2v_dir, V)
    apply_peft(m, "bitfit", FinetuneConfig())
    train = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "hf.wav2vec2.encoder.layers.0.attention.q_proj.bias" in train
    assert not any("feature_extractor" in n for n in train)   # frozen encoder stays frozen
    assert not any(n.endswith(".weight") and "layer_norm" not in n and "lm_head" not in n
                   for n in train)

    m = load_hf_ctc(w2v_dir, V).eval()
    x, lens = random_waves([300, 200])
    before = m(x, lens)[0]
    apply_peft(m, "adapters", FinetuneConfig(adapter_dim=4))
    torch.testing.assert_close(m(x, lens)[0], before)       # adapters start as identity
    assert any(".adapter." in n for n, p in m.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="cannot be exported"):
        m.save_pretrained(w2v_dir.parent / "no-export")


def test_lora_merged_export_reloads_in_transformers(w2v_dir, tmp_path):
    m = load_hf_ctc(w2v_dir, V).eval()
    apply_peft(m, "lora", FinetuneConfig(lora_rank=2))
    with torch.no_grad():
        for layer in lora_layers(m).values():
            layer.lora_B.weight.normal_(0, 0.5)                 # a non-zero update
    x, lens = random_waves([400, 250])
    lp, out_lens = m(x, lens)
    vocab = list(_tok().symbols)
    m.save_pretrained(tmp_path / "hf", vocab=vocab)
    assert lora_layers(m)                                       # the live model is untouched
    hf = AutoModelForCTC.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert type(hf).__name__ == "Wav2Vec2ForCTC" and hf.config.vocab_size == V
    assert not any("lora" in k for k in hf.state_dict())
    for i, n in enumerate(lens.tolist()):
        torch.testing.assert_close(hf_alone(hf, x[i, :n, 0]), lp[i, :out_lens[i]],
                                   rtol=1e-4, atol=1e-4)
    # the processor: the feature extractor normalises as privasr did; the tokenizer decodes
    # privasr's vocabulary (blank -> <pad>, space -> |)
    from transformers import Wav2Vec2Processor

    proc = Wav2Vec2Processor.from_pretrained(tmp_path / "hf", local_files_only=True)
    inp = proc(x[0, :400, 0].numpy(), sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        logits = hf(inp.input_values).logits
    torch.testing.assert_close(F.log_softmax(logits[0], -1), lp[0, :out_lens[0]],
                               rtol=1e-4, atol=1e-4)
    from privasr.decoding.ctc import greedy_decode

    ids = logits.argmax(-1)
    assert proc.batch_decode(ids)[0] == greedy_decode(lp[:1], out_lens[:1], vocab)[0].strip() \
        or proc.batch_decode(ids)[0] == greedy_decode(lp[:1], out_lens[:1], vocab)[0]


# -- the recipe, end to end ----------------------------------------------------------------------
def test_dp_lora_finetuning_recipe_export_and_eval(tiny_corpus, tmp_path, capsys):
    """Done when: train a saved tiny Wav2Vec2ForCTC with model.family=hf_ctc peft=lora and DP
    for 3 steps (finite ε), export it, reload it with transformers: same outputs."""
    from privasr.cli import main
    from privasr.inference import load_model
    from privasr.recipes.train import run_training

    corpus, _, _ = tiny_corpus
    src = save_tiny(tmp_path / "pretrained", conv_dim=(16, 16, 16, 16),
                    conv_kernel=(10, 3, 3, 3), conv_stride=(5, 4, 4, 2))   # 100 frames/s
    run = tmp_path / "run"
    cfg = load_config("configs/demo.yaml", _overrides(corpus, run, steps=3) + [
        "model.family=hf_ctc", f"model.path={src}", "peft=lora", "finetune.lora_rank=2",
        "privacy.policy={unit: example, clip_norm: 1.0}", "privacy.sampling=poisson",
        "privacy.expected_batch_size=4", "privacy.max_physical=4", "privacy.target_epsilon=8",
        "privacy.delta=1e-3", "data.max_dev_utts=4"])
    logs = []
    res = run_training(cfg, log=logs.append)
    eps = res["privacy"]["epsilon"]
    with capsys.disabled():
        print(f"\nhf_ctc DP-LoRA fine-tuning: epsilon = {eps:.3f} (delta = 1e-3) after "
              f"{res['steps']} steps")
    assert res["steps"] == 3 and math.isfinite(eps) and 0 < eps <= 8 + 1e-9
    assert res["peft"]["lora_layers"] == 2 * len(HF_LORA_TARGETS)        # 2 layers x 6
    assert any("specaugment off" in str(x) for x in logs)
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["family"] == "hf_ctc" and saved["augment"]["specaugment"] is False

    # the privasr checkpoints load (eval, transcribe, the audit's load_model)
    model, vocab = load_model(run / "last.pt")
    merged, _ = load_model(run / "merged.pt")
    x, lens = random_waves([16000, 9000], seed=3)
    lp, out_lens = model(x, lens)
    torch.testing.assert_close(merged(x, lens)[0], lp, rtol=1e-4, atol=1e-5)

    assert main(["export", str(run / "last.pt"), str(tmp_path / "export")]) == 0
    hf = AutoModelForCTC.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    for i, n in enumerate(lens.tolist()):
        torch.testing.assert_close(hf_alone(hf, x[i, :n, 0]), lp[i, :out_lens[i]],
                                   rtol=1e-4, atol=1e-4)

    assert main(["eval", str(run / "last.pt"), str(corpus / "test.jsonl"),
                 "--out", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert 0.0 <= ev["results"]["greedy"]["cer"]
    from privasr.data.manifest import read_manifest

    wav = read_manifest(corpus / "test.jsonl")[0].audio
    capsys.readouterr()
    assert main(["transcribe", str(run / "merged.pt"), wav]) == 0
    assert capsys.readouterr().out.startswith(wav + "\t")


def test_fbank_batches_keep_their_frame_rate():
    b = Batch(["a"], torch.zeros(1, 50, 80), torch.tensor([50]), torch.zeros(1, 1).long(),
              torch.tensor([1]))
    assert b.audio_seconds == 50 * 0.01


def test_memorization_audit_on_an_hf_ctc_model(tiny_corpus, tmp_path):
    """Canaries enter an hf_ctc run as waveforms and `privasr audit run` scores its checkpoint
    (the audit reads the model's own features and output lengths)."""
    from privasr.audit.canaries import CanaryConfig, make_canaries
    from privasr.cli import main
    from privasr.recipes.train import run_training
    from test_audit_canaries import VOCAB

    corpus, _, _ = tiny_corpus
    cs = make_canaries(tmp_path / "canaries", CanaryConfig(n=6, words=2, rate=140, seed=3),
                       vocab=VOCAB, log=lambda *_: None)
    path = tmp_path / "canaries" / "canaries.jsonl"
    src = save_tiny(tmp_path / "pretrained", conv_dim=(16, 16, 16, 16),
                    conv_kernel=(10, 3, 3, 3), conv_stride=(5, 4, 4, 2))
    run = tmp_path / "run"
    res = run_training(load_config("configs/demo.yaml", _overrides(corpus, run, steps=2) + [
        "model.family=hf_ctc", f"model.path={src}", "peft=lora", "finetune.lora_rank=2",
        f"audit.canaries={path}", "data.max_dev_utts=4"]), log=lambda *_: None)
    ins = [c for c in cs if c.inserted]
    assert res["canaries"]["training_copies"] == sum(c.repetitions for c in ins)
    out = tmp_path / "audit.json"
    assert main(["audit", "run", str(run / "last.pt"), str(path), "--out", str(out)]) == 0
    a = json.loads(out.read_text())
    assert {s["id"] for s in a["scores"]} == {c.id for c in cs}
    assert all(math.isfinite(s["loss"]) for s in a["scores"])
