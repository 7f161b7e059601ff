"""Frozen-prefix caching and top-k placement: the cached run computes what the whole model does."""

from __future__ import annotations

import pytest
import torch

from privasr.clipping import ClipPolicy, get_engine
from privasr.config import FinetuneConfig
from privasr.data.dataset import AsrDataset
from privasr.data.manifest import Utterance
from privasr.data.tokenizer import CharTokenizer
from privasr.models.conformer import ConformerCTC, config_for
from privasr.models.loss import per_example_ctc
from privasr.peft.apply import apply_peft
from privasr.peft.frozen_prefix import cache_prefix, lowest_trainable_block, start_at

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(layers: int = 3) -> ConformerCTC:
    torch.manual_seed(0)
    return ConformerCTC(config_for("tiny", dropout=0.0, n_layers=layers))


def _dataset(n: int = 5) -> AsrDataset:
    g = torch.Generator().manual_seed(3)
    texts = ["call anna", "pay ten", "hello there", "at noon", "send it back"][:n]
    utts = [Utterance(id=f"u{i}", audio=f"u{i}.wav", text=t, speaker=f"s{i % 2}",
                      duration=0.01 * (90 + 17 * i)) for i, t in enumerate(texts)]
    feats = [torch.randn(90 + 17 * i, 80, generator=g).half() for i in range(n)]
    return AsrDataset(utts, feats, CharTokenizer())


@pytest.mark.parametrize("method,fc,k", [
    ("head", FinetuneConfig(), 3),
    ("adapters", FinetuneConfig(adapter_dim=4), 0),
    ("adapters", FinetuneConfig(adapter_dim=4, top_blocks=1), 2),
    ("lora", FinetuneConfig(lora_rank=2, top_blocks=2), 1),
    ("bitfit", FinetuneConfig(top_blocks=1), 2),
    ("bitfit", FinetuneConfig(), 0),          # BitFit also trains the front end's biases
    ("full", FinetuneConfig(top_blocks=1), 2),
    ("full", FinetuneConfig(), 0),
])
def test_top_blocks_places_training_and_sets_the_lowest_block(method, fc, k):
    model = _model()
    apply_peft(model, method, fc)
    assert lowest_trainable_block(model) == k
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("ctc_head.") for n in trained)
    if fc.top_blocks:
        low = 3 - fc.top_blocks
        assert all(n.startswith("ctc_head.") or int(n.split(".")[2]) >= low for n in trained)
        assert any(not n.startswith("ctc_head.") for n in trained)


def test_top_blocks_beyond_the_model_is_refused():
    with pytest.raises(ValueError, match="3 blocks"):
        apply_peft(_model(), "lora", FinetuneConfig(top_blocks=4))


def test_cached_prefix_gives_the_whole_models_outputs_and_clipped_gradients():
    model = _model()
    apply_peft(model, "adapters", FinetuneConfig(adapter_dim=4, top_blocks=1))
    for n, p in model.named_parameters():           # adapters start as identity: perturb them
        if ".adapter.up." in n:
            with torch.no_grad():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    ds = _dataset()
    k = lowest_trainable_block(model)
    cached = cache_prefix(model, ds, k, "cpu", progress=False)
    assert cached.frame_seconds == pytest.approx(0.04) and len(cached) == len(ds)
    assert cached.feats[1].shape == (((ds.feats[1].shape[0] - 1) // 2 - 1) // 2, 64)
    # one utterance alone == the same utterance in a padded cache batch
    alone, _ = model.encoder.prefix(ds.feats[1][None].float(), torch.tensor([ds.feats[1].shape[0]]),
                                    k)
    torch.testing.assert_close(cached.feats[1], alone[0], rtol=1e-5, atol=1e-5)

    idx = [0, 2, 4]
    whole, cut = ds.collate(idx), cached.collate(idx)
    model.eval()
    ref, ref_lens = model(whole.feats, whole.feat_lens)
    start_at(model, k)
    out, out_lens = model(cut.feats, cut.feat_lens)
    assert torch.equal(out_lens, ref_lens)
    for j in range(len(idx)):
        n = int(ref_lens[j])
        torch.testing.assert_close(out[j, :n], ref[j, :n], rtol=1e-4, atol=1e-5)
    assert cut.audio_seconds == pytest.approx(sum(cached.durations[i] for i in idx))

    policy = ClipPolicy(unit="example", clip_norm=0.05, noise_multiplier=0.0)
    got = get_engine("bookkeeping").clipped_sum(model, [cut], per_example_ctc, policy)
    start_at(model, 0)
    want = get_engine("reference").clipped_sum(model, [whole], per_example_ctc, policy)
    assert set(got.grads) == set(want.grads) and want.clipped.any()
    torch.testing.assert_close(got.norms, want.norms, rtol=1e-4, atol=1e-7)
    for n in want.grads:
        torch.testing.assert_close(got.grads[n], want.grads[n], rtol=1e-4, atol=1e-6)


def test_recipe_caches_the_frozen_prefix_unless_specaugment(tiny_corpus, tmp_path):
    from privasr.config import load_config
    from privasr.recipes.train import run_training
    from test_trainer import _overrides

    corpus, _, _ = tiny_corpus
    quiet = lambda *_: None  # noqa: E731
    pre = _overrides(corpus, tmp_path / "pre", steps=1) + ['data.synth_domain=""']
    run_training(load_config("configs/pretrain.yaml", pre), log=quiet)
    ft = _overrides(corpus, tmp_path / "ft", steps=2) + [
        'data.synth_domain=""', f"init={tmp_path / 'pre' / 'last.pt'}", "peft=adapters",
        "finetune.top_blocks=1", "augment.specaugment=false",
        "privacy.expected_batch_size=4", "privacy.max_physical=4", "privacy.accounting=rdp"]
    lines: list[str] = []
    res = run_training(load_config("configs/dp_finetune.yaml", ft), log=lines.append)
    assert any("frozen prefix cached" in s for s in lines)
    assert res["steps"] == 2 and res["privacy"]["epsilon"] > 0 and 0 <= res["test_wer"] <= 2
    lines.clear()
    ft2 = [o.replace("ft", "ft2") if o.startswith("out_dir=") else o for o in ft]
    ft2 = [o for o in ft2 if o != "augment.specaugment=false"] + ["augment.specaugment=true"]
    run_training(load_config("configs/dp_finetune.yaml", ft2), log=lines.append)
    assert any("not cached: augment.specaugment" in s for s in lines)
    assert not any("frozen prefix cached" in s for s in lines)


def test_prefix_cache_on_disk_is_reused_and_keyed_by_the_frozen_weights(tmp_path):
    model = _model()
    apply_peft(model, "head", FinetuneConfig())
    ds = _dataset(3)
    first = cache_prefix(model, ds, 2, "cpu", progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("prefix-*.pt"))) == 1
    again = cache_prefix(model, ds, 2, "cpu", progress=False, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first.feats, again.feats))
    with torch.no_grad():                        # block 2 and the head are not in the prefix
        model.encoder.blocks[2].norm.weight.add_(1.0)
        model.ctc_head.bias.add_(1.0)
    cache_prefix(model, ds, 2, "cpu", progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("prefix-*.pt"))) == 1
    with torch.no_grad():                        # block 1 is
        model.encoder.blocks[1].norm.weight.add_(1.0)
    changed = cache_prefix(model, ds, 2, "cpu", progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("prefix-*.pt"))) == 2
    assert not torch.equal(changed.feats[0], first.feats[0])


def test_top_blocks_adds_modules_only_above_so_methods_share_one_prefix_cache():
    from privasr.peft.frozen_prefix import prefix_key

    ds = _dataset(2)
    keys = set()
    for method, fc in (("adapters", FinetuneConfig(adapter_dim=4, top_blocks=1)),
                       ("lora", FinetuneConfig(lora_rank=2, top_blocks=1)),
                       ("rp", FinetuneConfig(lora_rank=2, top_blocks=1)),
                       ("bitfit", FinetuneConfig(top_blocks=1))):
        model = _model()
        apply_peft(model, method, fc)
        names = [n for n, _ in model.named_parameters()]
        assert not any((".adapter." in n or ".lora_" in n) and not n.startswith(
            "encoder.blocks.2.") for n in names), method
        keys.add(prefix_key(model, ds, 2))
    assert len(keys) == 1
