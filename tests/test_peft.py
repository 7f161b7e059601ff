"""PEFT: parameter counts, frozen parameters, LoRA merge, per-example gradients, init=CKPT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from privasr.clipping import ClippedGradient, ClipPolicy, get_engine
from privasr.data.dataset import Batch
from privasr.models.conformer import ConformerCTC, config_for
from privasr.peft.apply import apply_peft, load_pretrained, rebuild
from privasr.config import FinetuneConfig
from privasr.errors import ConfigError
from privasr.peft.lora import LoRALinear, merge_lora
from privasr.checkpoint import save_checkpoint
from privasr.models.loss import per_example_ctc

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> ConformerCTC:
    torch.manual_seed(seed)
    return ConformerCTC(config_for("tiny", dropout=0.0))


def _batch(n: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([60, 45, 52, 38][:n])
    feats = torch.randn(n, int(lens.max()), 80, generator=g)
    tl = torch.tensor([5, 3, 4, 2][:n])
    targets = torch.randint(1, 29, (n, int(tl.max())), generator=g)
    return Batch([f"u{i}" for i in range(n)], feats, lens, targets, tl)


def _randomise_lora(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- parameter counts ---------------------------------------------------------------------------
D, L, FF, V = 64, 2, 256, 29          # the tiny preset: d_model, blocks, ff_mult·d, vocabulary
HEAD = D * V + V


@pytest.mark.parametrize("method,fc,expected", [
    # LoRA on q, k, v, proj (D→D) and ff1/ff2 up (D→FF) and down (FF→D): r·(in + out) each
    ("lora", FinetuneConfig(lora_rank=4), L * 4 * (4 * (D + D) + 2 * (D + FF) + 2 * (FF + D))),
    ("lora", FinetuneConfig(lora_rank=2, lora_targets=["encoder.blocks.*.attn.q"]),
     L * 2 * (D + D)),
    # random projection: only B (r → out) is trained
    ("rp", FinetuneConfig(lora_rank=4), L * 4 * (4 * D + 2 * FF + 2 * D)),
    ("adapters", FinetuneConfig(adapter_dim=8), L * (D * 8 + 8 + 8 * D + D)),
    ("head", FinetuneConfig(), 0),
])
def test_peft_parameter_count_is_what_the_config_says(method, fc, expected):
    model = _model()
    info = apply_peft(model, method, fc)
    assert info["trainable_params"] == expected + HEAD == _trainable(model)
    assert info["total_params"] == sum(p.numel() for p in model.parameters())
    assert model.ctc_head.weight.requires_grad


def test_bitfit_trains_biases_norms_and_head_only():
    model = _model()
    plain = {n: p.numel() for n, p in _model().named_parameters()}
    biases = sum(k for n, k in plain.items() if n.endswith(".bias"))
    norm_gains = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.LayerNorm))
    info = apply_peft(model, "bitfit", FinetuneConfig())
    assert info["trainable_params"] == biases + norm_gains + D * V  # head bias is a bias already
    no_norms = _model()
    assert apply_peft(no_norms, "bitfit", FinetuneConfig(bitfit_norms=False))[
        "trainable_params"] == biases + D * V
    for n, p in model.named_parameters():
        assert p.requires_grad == (n.endswith(".bias") or ".norm" in n or "_norm" in n
                                   or n.startswith("ctc_head."))


def test_full_and_extra_trainable_and_bad_names():
    model = _model()
    assert apply_peft(model, "full", FinetuneConfig())["trainable_params"] == sum(
        p.numel() for p in model.parameters())
    m2 = _model()
    info = apply_peft(m2, "head", FinetuneConfig(extra_trainable=["encoder.subsample.*"]))
    sub = sum(p.numel() for p in m2.encoder.subsample.parameters())
    assert info["trainable_params"] == HEAD + sub
    with pytest.raises(ValueError, match="valid methods"):
        apply_peft(_model(), "prefix", FinetuneConfig())
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_peft(_model(), "lora", FinetuneConfig(lora_targets=["encoder.blocks.*.atn.q"]))
    with pytest.raises(ValueError, match="exceeds"):
        apply_peft(_model(), "lora", FinetuneConfig(lora_rank=65))
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_peft(_model(), "lora", FinetuneConfig(extra_trainable=["nope.*"]))


# -- LoRA and adapters compute what they claim ----------------------------------------------------
def test_lora_and_adapters_start_as_the_pretrained_model():
    base = _model().eval()
    b = _batch()
    ref, _ = base(b.feats, b.feat_lens)
    for method in ("lora", "rp", "adapters"):
        m = copy.deepcopy(base)
        apply_peft(m, method, FinetuneConfig())
        out, _ = m(b.feats, b.feat_lens)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_merged_lora_gives_identical_outputs_and_the_plain_architecture():
    model = _model().eval()
    apply_peft(model, "lora", FinetuneConfig(lora_rank=4, lora_alpha=8))
    _randomise_lora(model)
    b = _batch()
    before, lens = model(b.feats, b.feat_lens)
    assert (before - _model().eval()(b.feats, b.feat_lens)[0]).abs().max() > 1e-3  # LoRA matters
    assert merge_lora(model) == L * 8
    after, lens2 = model(b.feats, b.feat_lens)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(lens, lens2)
    plain = _model(seed=5).eval()
    assert set(plain.state_dict()) == set(model.state_dict())
    plain.load_state_dict(model.state_dict())          # strict: same keys and shapes
    torch.testing.assert_close(plain(b.feats, b.feat_lens)[0], before, rtol=1e-5, atol=1e-5)


def test_random_projection_gradient_is_the_projected_weight_gradient():
    """rp trains B only: ∂L/∂B = (α/r)·(∂L/∂W)·Aᵀ, the full gradient of W projected onto A."""
    plain = _model()
    rp = copy.deepcopy(plain)
    apply_peft(rp, "rp", FinetuneConfig(lora_rank=4, lora_alpha=8,
                                        lora_targets=["encoder.blocks.1.ff1.up"]))
    b = _batch()
    plain.encoder.blocks[1].ff1.up.weight.requires_grad_(True)
    per_example_ctc(plain, b).sum().backward()
    per_example_ctc(rp, b).sum().backward()
    layer = rp.encoder.blocks[1].ff1.up
    assert layer.lora_A.weight.grad is None and not layer.lora_A.weight.requires_grad
    g_w = plain.encoder.blocks[1].ff1.up.weight.grad
    torch.testing.assert_close(layer.lora_B.weight.grad, 2.0 * g_w @ layer.lora_A.weight.T,
                               rtol=1e-4, atol=1e-6)


# -- DP: frozen parameters, per-example gradients -------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "bitfit", "adapters", "rp"])
def test_frozen_parameters_get_no_gradient_and_no_noise(method):
    model = _model()
    apply_peft(model, method, FinetuneConfig(lora_rank=2, adapter_dim=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen
    policy = ClipPolicy(unit="example", clip_norm=1.0, noise_multiplier=2.0,
                        expected_batch_size=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grads = []
    for seed, batches in ((0, [_batch()]), (1, [_batch()]), (2, [])):   # [] : noise alone
        strat = ClippedGradient(policy, "vectorized", generator=torch.Generator().manual_seed(seed))
        opt.zero_grad(set_to_none=True)
        strat.fill_grads(model, batches, per_example_ctc)
        for n, p in model.named_parameters():
            assert (p.grad is None) == (n in frozen), n
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    for n, g in grads[2].items():                      # the empty batch: pure noise, everywhere
        assert g.abs().sum() > 0, n                    # trainable, and different per seed
        assert not torch.equal(g, grads[1][n])
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("engine", ["vectorized", "bookkeeping"])
@pytest.mark.parametrize("method", ["lora", "rp", "adapters", "bitfit", "full"])
def test_peft_per_example_gradients_equal_reference(method, engine):
    model = _model()
    apply_peft(model, method, FinetuneConfig(lora_rank=3, adapter_dim=4))
    _randomise_lora(model)                    # so that LoRA's A also has non-zero gradients
    batches = [_batch(3, seed=1), _batch(2, seed=2)]
    policy = ClipPolicy(unit="example", clip_norm=0.05, noise_multiplier=0.0)
    ref = get_engine("reference").clipped_sum(model, batches, per_example_ctc, policy)
    vec = get_engine(engine, chunk_size=2).clipped_sum(model, batches, per_example_ctc, policy)
    assert set(ref.grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(vec.norms, ref.norms, rtol=1e-4, atol=1e-7)
    assert ref.clipped.any()
    for n in ref.grads:
        torch.testing.assert_close(vec.grads[n], ref.grads[n], rtol=1e-4, atol=1e-6)
    lora_a = [n for n in ref.grads if ".lora_A." in n]
    if method == "lora":
        assert lora_a and all(ref.grads[n].abs().sum() > 0 for n in lora_a)
    else:
        assert not lora_a                     # rp keeps A frozen; adapters have none


# -- init=CKPT -------------------------------------------------------------------------------------
def test_init_loads_the_encoder_and_a_new_head(tmp_path):
    pre = _model(seed=0)
    path = tmp_path / "pre.pt"
    save_checkpoint(path, {"model": pre.state_dict(), "config": {"peft": "none"}})
    fresh = _model(seed=1)
    head0 = fresh.ctc_head.weight.detach().clone()
    info = load_pretrained(fresh, str(path))
    assert info["new_head"] and info["loaded_tensors"] == len(pre.state_dict()) - 2
    for k, v in pre.state_dict().items():
        if k.startswith("encoder."):
            assert torch.equal(fresh.state_dict()[k], v), k
    assert torch.equal(fresh.ctc_head.weight, head0)
    kept = _model(seed=2)
    load_pretrained(kept, str(path), keep_head=True)
    assert torch.equal(kept.ctc_head.weight, pre.ctc_head.weight)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="model.size must match"):
        load_pretrained(ConformerCTC(config_for("small")), str(path))
    lora = _model()
    apply_peft(lora, "lora", FinetuneConfig())
    save_checkpoint(tmp_path / "lora.pt", {"model": lora.state_dict(), "config": {"peft": "lora"}})
    with pytest.raises(ValueError, match="peft=lora"):
        load_pretrained(_model(), str(tmp_path / "lora.pt"))


def test_rebuild_restores_a_peft_checkpoint():
    src = _model()
    apply_peft(src, "adapters", FinetuneConfig(adapter_dim=5))
    cfg = {"peft": "adapters", "finetune": {"adapter_dim": 5}}
    dst = rebuild(_model(seed=3), cfg)
    dst.load_state_dict(src.state_dict())
    b = _batch()
    torch.testing.assert_close(dst.eval()(b.feats, b.feat_lens)[0],
                               src.eval()(b.feats, b.feat_lens)[0])


# -- the public/private split ---------------------------------------------------------------------
def test_public_private_split_is_disjoint_and_shifted():
    from privasr.data.domains import DOMAINS, domain_config
    from privasr.data.synth import plan_corpus

    pub = plan_corpus(domain_config("public", hours=0.3, speakers=40))
    prv = plan_corpus(domain_config("private", hours=0.3, speakers=40))
    spk = {name: {u.speaker for u in plan} for name, plan in (("pub", pub), ("prv", prv))}
    assert not {(s.voice, s.variant, s.pitch, s.rate) for s in spk["pub"]} & \
        {(s.voice, s.variant, s.pitch, s.rate) for s in spk["prv"]}
    assert not {s.id for s in spk["pub"]} & {s.id for s in spk["prv"]}
    assert {s.voice for s in spk["pub"]} <= set(DOMAINS["public"]["voices"])
    assert {s.voice for s in spk["prv"]} <= set(DOMAINS["private"]["voices"])
    assert not {s.voice for s in spk["pub"]} & {s.voice for s in spk["prv"]}
    assert max(s.rate for s in spk["pub"]) <= 155 <= min(s.rate for s in spk["prv"])
    assert not {u.text for u in pub} & {u.text for u in prv}          # KJV vs Devil's Dictionary
    for plan in (pub, prv):                       # and each side split by speaker as usual
        by = {s: {u.speaker.id for u in plan if u.split == s} for s in ("train", "dev", "test")}
        assert by["test"] and not by["test"] & by["train"] and not by["dev"] & by["train"]
    with pytest.raises(ValueError, match="unknown corpus domain"):
        domain_config("secret", hours=1, speakers=10)


# -- the recipe: privasr train ... init=CKPT peft=lora -------------------------------------------
def test_recipe_pretrain_then_dp_lora_finetune(tiny_corpus, tmp_path):
    from privasr.config import load_config
    from privasr.inference import load_model
    from privasr.recipes.train import run_training
    from test_trainer import _overrides

    corpus, _, _ = tiny_corpus
    quiet = dict(log=lambda *_: None)
    pre = run_training(load_config("configs/pretrain.yaml", _overrides(
        corpus, tmp_path / "pre", steps=2) + ['data.synth_domain=""']), **quiet)
    assert pre["peft"] is None
    ckpt = tmp_path / "pre" / "last.pt"
    cfg = load_config("configs/dp_finetune.yaml", _overrides(corpus, tmp_path / "ft", steps=2) + [
        'data.synth_domain=""', f"init={ckpt}", "peft=lora", "finetune.lora_rank=2",
        "privacy.expected_batch_size=4", "privacy.max_physical=4", "optim.lr=0.05",
        "privacy.accounting=rdp"])   # RDP: calibration in milliseconds
    res = run_training(cfg, **quiet)
    assert res["privacy"]["epsilon"] <= 10 and res["steps"] == 2
    assert res["trainable_params"] == L * 2 * (4 * (D + D) + 2 * (D + FF) + 2 * (FF + D)) + HEAD
    assert res["peft"]["new_head"] and res["step_seconds"] > 0
    pre_w = torch.load(ckpt, weights_only=False)["model"]
    ft_w = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)["model"]
    for k, v in pre_w.items():                 # frozen encoder: bit-identical after DP steps
        if k.startswith("encoder."):
            assert torch.equal(ft_w[k], v), k
    assert not torch.equal(ft_w["ctc_head.weight"], pre_w["ctc_head.weight"])
    assert any(ft_w[k].abs().sum() > 0 for k in ft_w if k.endswith("lora_B.weight"))
    peft_model, _ = load_model(tmp_path / "ft" / "last.pt")      # rebuilds the LoRA modules
    merged, _ = load_model(res["peft"]["merged_checkpoint"])     # the plain architecture
    assert not any("lora" in k for k in merged.state_dict())
    b = _batch()
    torch.testing.assert_close(merged(b.feats, b.feat_lens)[0],
                               peft_model(b.feats, b.feat_lens)[0], rtol=1e-5, atol=1e-5)
    bad = load_config("configs/dp_finetune.yaml", _overrides(corpus, tmp_path / "x", steps=1) + [
        'data.synth_domain=""', f"init={ckpt}", "peft=prompt"])
    with pytest.raises(ValueError, match="valid methods"):
        run_training(bad, **quiet)


# -- the experiment driver --------------------------------------------------------------------------
def _row(method, eps, wer, secs):
    return {"method": method, "epsilon": eps, "test_wer": wer, "step_seconds": secs}


def test_summary_compares_best_dp_peft_with_nonprivate_and_dp_full():
    from privasr.recipes.dp_peft import summarize

    rows = [_row("zero_shot", None, 0.9, None), _row("full", None, 0.2, 1.0),
            _row("full", 10.0, 0.3, 4.0), _row("lora", 10.0, 0.25, 1.0),
            _row("bitfit", 10.0, 0.28, 2.0), _row("lora", 1.0, 0.1, 1.0)]
    s = summarize(rows, 1.3)
    assert s["best_dp_peft"] == "lora" and s["epsilon"] == 10.0      # ε=1's 0.1 is not at max ε
    assert s["wer_ratio_to_nonprivate_full"] == pytest.approx(1.25) and s["target_met"]
    assert s["step_seconds_ratio_to_dp_full"] == {"lora": 0.25, "bitfit": 0.5}
    assert s["zero_shot_wer"] == 0.9
    assert not summarize(rows[:2] + [_row("adapters", 10.0, 0.3, 1.0)], 1.3)["target_met"]


@pytest.mark.slow
def test_dp_peft_experiment_end_to_end_tiny(tiny_corpus, tmp_path):
    from privasr.recipes.dp_peft import DpPeftConfig, run_experiment
    from test_trainer import _overrides

    corpus, _, _ = tiny_corpus
    tiny = [o for o in _overrides(corpus, "unused", steps=2) if not o.startswith("out_dir=")]
    tiny += ['data.synth_domain=""']
    cfg = DpPeftConfig(out_dir=str(tmp_path / "x"), results=str(tmp_path / "dp_peft.json"),
                       methods=["full", "lora"], epsilons=[10.0], device="cpu",
                       pretrain_steps=2, finetune_steps=2, pretrain_overrides=tiny,
                       finetune_overrides=tiny + ["privacy.expected_batch_size=4",
                                                  "privacy.accounting=rdp"])
    rows = run_experiment(cfg, log=lambda *_: None)
    assert [(r["method"], r["epsilon"]) for r in rows] == [
        ("zero_shot", None), ("full", None), ("full", 10.0), ("lora", 10.0)]
    import json
    saved = json.loads((tmp_path / "dp_peft.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    for r in saved:
        assert {"method", "epsilon", "delta", "test_wer", "test_cer", "trainable_params",
                "step_seconds"} <= set(r)
    n = rows[-1]["n_private"]
    assert rows[-1]["delta"] == pytest.approx(1 / n) and rows[-1]["achieved_epsilon"] <= 10
    assert rows[-1]["trainable_params"] < rows[-2]["trainable_params"] == rows[1]["trainable_params"]
    html = (tmp_path / "x" / "report.html").read_text()
    assert "WER vs ε" in html and "data:image/png;base64" in html
    again = run_experiment(cfg, log=lambda *_: None)       # finished runs are reused, not redone
    assert [r["test_wer"] for r in again] == [r["test_wer"] for r in rows]


def test_step_seconds_come_from_the_logged_steps(tmp_path):
    from privasr.recipes.dp_peft import step_seconds
    from privasr.report.metrics_log import MetricsLogger

    assert step_seconds(tmp_path / "none", 1.5) == 1.5
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step, secs in ((10, 3.0), (20, 1.0), (30, 2.0)):
        log.log("train", step, {"loss": 1.0, "step_seconds": secs})
    assert step_seconds(tmp_path, None) == 2.0


def test_dp_peft_experiment_refuses_a_missing_pretrained_checkpoint(tmp_path):
    from privasr.errors import ConfigError
    from privasr.recipes.dp_peft import DpPeftConfig, run_experiment

    cfg = DpPeftConfig(out_dir=str(tmp_path / "x"), results=str(tmp_path / "r.json"),
                       pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="nope.pt"):
        run_experiment(cfg, log=lambda *_: None)
    assert not (tmp_path / "x" / "pretrain").exists()      # nothing was trained instead


def test_dp_peft_tag_keeps_variant_runs_apart_and_dp_overrides_reach_dp_runs_only(
        tmp_path, monkeypatch):
    import privasr.recipes.dp_peft as dp_peft

    calls: list[list[str]] = []

    def fake_run(recipe, overrides, log):
        calls.append(list(overrides))
        dp = any(o.startswith("privacy.target_epsilon=") and not o.endswith("null")
                 for o in overrides)
        return {"test_wer": 0.5, "test_cer": 0.2, "trainable_params": 10, "steps": 2,
                "train_utts": 100, "test_utts": 5, "test_speakers": 1, "device": "cpu",
                "privacy": {"epsilon": 8.0, "delta": 1e-3, "noise_multiplier": 1.0}
                if dp else None}

    monkeypatch.setattr(dp_peft, "_run", fake_run)
    monkeypatch.setattr(dp_peft, "_zero_shot", lambda *a: {"wer": 0.9, "cer": 0.4})
    ckpt = tmp_path / "pre.pt"
    ckpt.write_bytes(b"x")
    cfg = dp_peft.DpPeftConfig(out_dir=str(tmp_path / "x"), results=str(tmp_path / "r.json"),
                               pretrained=str(ckpt), methods=["adapters"], epsilons=[8.0],
                               nonprivate_peft=["adapters"], tag="top6",
                               method_overrides={"adapters": ["finetune.top_blocks=6"]},
                               dp_overrides=["privacy.expected_batch_size=1024"])
    rows = dp_peft.run_experiment(cfg, log=lambda *_: None)
    out_dirs = [next(o for o in c if o.startswith("out_dir=")).split("/")[-1] for c in calls]
    assert out_dirs == ["full_nonprivate", "adapters_top6_nonprivate", "adapters_top6_eps8"]
    assert not any("expected_batch_size" in o for c in calls[:2] for o in c)
    assert "privacy.expected_batch_size=1024" in calls[2] and "finetune.top_blocks=6" in calls[2]
    assert [r.get("variant") for r in rows] == [None, None, "top6", "top6"]
    assert rows[-1]["overrides"][-1] == "privacy.expected_batch_size=1024"
    with pytest.raises(ConfigError, match="tag"):
        dp_peft.run_experiment(dp_peft.DpPeftConfig(tag="a/b", pretrained=str(ckpt)),
                               log=lambda *_: None)


def test_dp_peft_reuses_a_finished_run_saved_before_new_config_fields(tmp_path):
    import json
    from privasr.config import load_config, to_dict
    from privasr.recipes.dp_peft import _run

    over = [f"out_dir={tmp_path / 'run'}", "peft=adapters"]
    saved = to_dict(load_config("configs/dp_finetune_assistant.yaml", over))
    del saved["audit"]["norm_probe_size"]          # a field added after the run was made
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    (tmp_path / "run" / "results.json").write_text(json.dumps({"test_wer": 0.5}))
    assert _run("configs/dp_finetune_assistant.yaml", over, lambda *_: None) == {"test_wer": 0.5}
    with pytest.raises(ConfigError, match="another config"):
        _run("configs/dp_finetune_assistant.yaml", over + ["optim.lr=0.1"], lambda *_: None)
