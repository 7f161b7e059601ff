"""Engines vs the reference, clipping semantics, noise, and the ClippedGradient strategy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from torch import Tensor, nn

from privasr.clipping import (ENGINES, ClippedGradient, ClipPolicy, GaussianNoise, PolicyError,
                              get_engine, per_example_grads, secure_standard_normal)
from privasr.data.dataset import Batch
from privasr.models.conformer import ConformerCTC, config_for
from privasr.train.gradient import BatchClipGradient
from privasr.models.loss import checked, per_example_ctc

REL_TOL = 1e-5
# "auto" only dispatches to bookkeeping / vectorized (test_auto_engine_dispatch)
ENGINE_NAMES = sorted(set(ENGINES) - {"auto"})


def fast_engines(chunk: int = 16) -> list:
    """Every non-reference engine, plus bookkeeping forced onto its two-pass (no-store) path."""
    return [get_engine(n, chunk_size=chunk) for n in ENGINE_NAMES if n != "reference"] + [
        get_engine("bookkeeping", chunk_size=chunk, store_limit_mb=0)]


pytestmark = pytest.mark.usefixtures("one_thread")


# -- small models taking variable-length padded inputs ------------------------------------------
def _mask(lens: Tensor, t: int) -> Tensor:
    return torch.arange(t)[None, :] < lens[:, None]


class PooledMLP(nn.Module):
    """Frames -> MLP -> masked mean over valid frames -> class logits (cross-entropy loss)."""

    def __init__(self, f: int = 6, h: int = 8, classes: int = 5):
        super().__init__()
        self.up, self.out = nn.Linear(f, h), nn.Linear(h, classes)
        self.classes = classes

    def forward(self, feats: Tensor, lens: Tensor) -> Tensor:
        m = _mask(lens, feats.shape[1])[..., None].to(feats.dtype)
        x = torch.tanh(self.up(feats)) * m
        return self.out(x.sum(1) / lens[:, None].to(feats.dtype))


def ce_loss(model, batch: Batch) -> Tensor:
    logits = model(batch.feats, batch.feat_lens)
    return F.cross_entropy(logits, batch.targets[:, 0] % 5, reduction="none")


class ConvLN(nn.Module):
    """Masked 'same' Conv1d -> LayerNorm -> SiLU -> Linear -> log_softmax (CTC)."""

    def __init__(self, f: int = 6, h: int = 8, vocab: int = 5):
        super().__init__()
        self.conv = nn.Conv1d(f, h, 3, padding=1)
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(h, vocab)

    def forward(self, feats: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        x = feats.masked_fill(~_mask(lens, feats.shape[1])[..., None], 0.0)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return F.log_softmax(self.head(F.silu(self.norm(x))), dim=-1), lens


MODELS = {"mlp": (PooledMLP, ce_loss), "conv": (ConvLN, checked(per_example_ctc))}


def make_batch(lens: list[int], tlens: list[int], *, start: int, f: int, vocab: int,
               gen: torch.Generator) -> Batch:
    b = len(lens)
    t, s = max(lens, default=1), max(tlens, default=1)
    feats = torch.zeros(b, t, f)
    targets = torch.zeros(b, s, dtype=torch.long)
    for i, (n, k) in enumerate(zip(lens, tlens)):
        feats[i, :n] = torch.randn(n, f, generator=gen)
        targets[i, :k] = torch.randint(1, vocab, (k,), generator=gen)
    return Batch([f"utt{start + i}" for i in range(b)], feats, torch.tensor(lens, dtype=torch.long),
                 targets, torch.tensor(tlens, dtype=torch.long),
                 [f"spk{(start + i) * 5 % 3}" for i in range(b)])   # 3 speakers, interleaved


def make_batches(sizes: list[int], seed: int, *, f: int = 6, vocab: int = 5,
                 min_len: int = 5, max_len: int = 12, max_tlen: int = 2) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for n in sizes:
        lens = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
        tlens = torch.randint(1, max_tlen + 1, (n,), generator=gen).tolist()
        out.append(make_batch(lens, tlens, start=start, f=f, vocab=vocab, gen=gen))
        start += n
    return out


def policy_for(unit: str, scope: str, bound: str, c: float, n_examples: int) -> ClipPolicy:
    kw: dict = dict(unit=unit, bound=bound, clip_norm=None if bound == "adaptive_min" else c)
    if unit == "microbatch":
        kw["microbatch_size"] = 2
    if unit == "core":
        kw["num_cores"] = 3
    if scope == "uniform":
        kw.update(scope="per_layer", per_layer_rule="uniform")
    elif scope == "layers":
        kw.update(scope="per_layer", layer_bounds={"*.bias": c / 3, "*": c}, clip_norm=None)
    return ClipPolicy(**kw)


def assert_same(res, ref, *, check_flags: bool = True):
    scale = max([float(g.abs().max()) for g in ref.grads.values()] + [1e-30])
    assert set(res.grads) == set(ref.grads)
    for k in ref.grads:
        diff = float((res.grads[k] - ref.grads[k]).abs().max())
        assert diff <= REL_TOL * scale + 1e-9, (k, diff, scale)
    assert res.units == ref.units and res.examples == ref.examples
    torch.testing.assert_close(res.norms, ref.norms, rtol=1e-5, atol=1e-7)
    if check_flags:
        assert res.clipped.tolist() == ref.clipped.tolist()
    assert math.isclose(res.bound, ref.bound, rel_tol=1e-5) or (
        math.isnan(res.bound) and math.isnan(ref.bound))
    assert math.isclose(res.loss_sum, ref.loss_sum, rel_tol=1e-5, abs_tol=1e-5)


def test_registry():
    assert {"reference", "vectorized", "bookkeeping", "auto"} <= set(ENGINES)
    assert get_engine("vectorized", chunk_size=3).chunk_size == 3
    with pytest.raises(ValueError, match="unknown clipping engine 'ghost'.*reference"):
        get_engine("ghost")


def test_auto_engine_dispatch():
    auto = get_engine("auto")
    assert auto.choose(ConformerCTC(config_for("tiny", vocab_size=5))).name == "bookkeeping"
    assert auto.choose(nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 2))).name == "vectorized"


# -- every engine == reference, small models (property test) --------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_kind=st.sampled_from(sorted(MODELS)),
       unit=st.sampled_from(["example", "microbatch", "core", "batch", "speaker"]),
       scope=st.sampled_from(["global", "uniform", "layers"]),
       bound=st.sampled_from(["fixed", "adaptive_min"]),
       sizes=st.lists(st.integers(0, 4), min_size=1, max_size=3),
       c=st.sampled_from([1e-3, 0.05, 0.3, 2.0, 1e4]),
       chunk=st.integers(1, 4), freeze=st.booleans(), seed=st.integers(0, 10**6),
       step=st.integers(0, 3))
def test_engines_match_reference_small_models(model_kind, unit, scope, bound, sizes, c, chunk,
                                              freeze, seed, step):
    if scope == "layers" and bound == "adaptive_min":
        bound = "fixed"                                  # refused by the policy (tested there)
    cls, loss_fn = MODELS[model_kind]
    torch.manual_seed(seed)
    model = cls()
    if freeze:
        next(m for m in model.children()).bias.requires_grad_(False)
    batches = make_batches(sizes, seed)
    policy = policy_for(unit, scope, bound, c, sum(sizes))
    ref = get_engine("reference").clipped_sum(model, batches, loss_fn, policy, step=step)
    for engine in fast_engines(chunk):
        res = engine.clipped_sum(model, batches, loss_fn, policy, step=step)
        assert_same(res, ref)
        if freeze:
            assert not any(k.endswith("bias") and k.startswith(("up", "conv")) for k in res.grads)
    assert all(p.grad is None for p in model.parameters())     # engines never touch .grad


# -- every engine == reference, tiny Conformer-CTC ------------------------------------------------
@pytest.fixture(scope="module")
def conformer_setup():
    torch.manual_seed(0)
    model = ConformerCTC(config_for("tiny", vocab_size=29, dropout=0.0)).eval()
    batches = make_batches([3, 2, 1], 11, f=80, vocab=29, min_len=30, max_len=70, max_tlen=6)
    return model, batches


@pytest.mark.parametrize("bound", ["fixed", "adaptive_min"])
@pytest.mark.parametrize("scope", ["global", "uniform", "layers"])
@pytest.mark.parametrize("unit", ["example", "microbatch", "core", "batch", "speaker"])
def test_engines_match_reference_conformer(conformer_setup, unit, scope, bound):
    if scope == "layers" and bound == "adaptive_min":
        pytest.skip("refused by the policy")
    model, batches = conformer_setup
    loss_fn = checked(per_example_ctc)
    policy = policy_for(unit, scope, bound, 2.0, 6)
    ref = get_engine("reference").clipped_sum(model, batches, loss_fn, policy, step=1)
    if ref.units > 1 or bound == "fixed" or scope == "uniform":
        assert 0 < ref.clipped.sum()                         # the bound binds for some unit
    for engine in fast_engines():
        assert_same(engine.clipped_sum(model, batches, loss_fn, policy, step=1), ref)


def test_per_example_grads_match_loop_conformer(conformer_setup):
    model, batches = conformer_setup
    params = dict(model.named_parameters())
    g, losses = per_example_grads(model, params, batches[0], per_example_ctc)
    for i in range(len(batches[0])):
        b = batches[0]
        one = Batch([b.ids[i]], b.feats[i:i + 1, :b.feat_lens[i]], b.feat_lens[i:i + 1],
                    b.targets[i:i + 1, :b.target_lens[i]], b.target_lens[i:i + 1])
        model.zero_grad()
        loss = per_example_ctc(model, one)
        loss.sum().backward()
        assert torch.allclose(losses[i], loss[0], rtol=1e-5)
        for k, p in params.items():
            torch.testing.assert_close(g[k][i], p.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_core_is_pcc():
    """unit=core on one process == clip each of K shards' mean gradient (paper §2), and ==
    micro-batch clipping with the same groups."""
    torch.manual_seed(3)
    model = ConvLN()
    loss_fn = checked(per_example_ctc)
    batches = make_batches([8], 5)
    k, c = 4, 0.2
    core = ClipPolicy(unit="core", num_cores=k, clip_norm=c, grouping="contiguous")
    micro = ClipPolicy(unit="microbatch", microbatch_size=2, expected_units=k, clip_norm=c,
                       grouping="contiguous")
    res = get_engine("vectorized").clipped_sum(model, batches, loss_fn, core)
    assert_same(get_engine("vectorized").clipped_sum(model, batches, loss_fn, micro), res)
    b = batches[0]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for shard in range(k):
        sl = slice(2 * shard, 2 * shard + 2)
        sub = Batch(b.ids[sl], b.feats[sl], b.feat_lens[sl], b.targets[sl], b.target_lens[sl])
        model.zero_grad()
        loss_fn(model, sub).mean().backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        for n, p in model.named_parameters():
            expected[n] += p.grad * min(1.0, c / float(norm))
    for n in expected:
        torch.testing.assert_close(res.grads[n], expected[n], rtol=1e-5, atol=1e-7)


# -- clipping semantics ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(scope=st.sampled_from(["global", "uniform", "layers"]),
       c=st.floats(1e-3, 3.0), seed=st.integers(0, 10**6), adaptive=st.booleans())
def test_clipping_binds(scope, c, seed, adaptive):
    """Each clipped unit has norm ≤ C (per tensor ≤ C_l for layer bounds); adaptive: == C_t."""
    torch.manual_seed(seed)
    model = ConvLN()
    bound = "adaptive_min" if adaptive and scope != "layers" else "fixed"
    policy = policy_for("example", scope, bound, c, 1)
    engine = get_engine("vectorized")
    for b in make_batches([1, 1, 1], seed):
        res = engine.clipped_sum(model, [b], per_example_ctc, policy)
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in res.grads.values()))
        assert norm <= res.bound * (1 + 1e-5)
        if scope == "layers":
            for k, g in res.grads.items():
                cl = c / 3 if k.endswith("bias") else c
                assert float(g.norm()) <= cl * (1 + 1e-5)
        if bound == "adaptive_min":          # one unit: C_t is its own norm, unchanged
            assert res.bound == pytest.approx(float(res.norms[0]), rel=1e-6)
    # many units, adaptive: every unit is rescaled to the smallest norm
    if bound == "adaptive_min" and scope == "global":
        batches = make_batches([4], seed)
        res = engine.clipped_sum(model, batches, per_example_ctc, policy)
        assert res.bound == pytest.approx(float(res.norms.min()), rel=1e-6)
        assert int(res.clipped.sum()) == res.units - 1


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_huge_bound_is_batch_times_mean_gradient(engine):
    torch.manual_seed(1)
    model = ConvLN()
    batches = make_batches([3, 2], 7)
    loss_fn = checked(per_example_ctc)
    res = get_engine(engine).clipped_sum(model, batches, loss_fn, ClipPolicy(clip_norm=1e9))
    assert not res.clipped.any()
    BatchClipGradient(max_norm=None).fill_grads(model, batches, loss_fn)
    for n, p in model.named_parameters():
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(res.grads[n], 5 * p.grad, rtol=1e-5, atol=5 * REL_TOL * scale)


def test_layer_bounds_errors_at_engine_time():
    model = ConvLN()
    batches = make_batches([2], 0)
    dead = ClipPolicy(scope="per_layer", clip_norm=None,
                      layer_bounds={"encoder.*": 1.0, "*": 1.0})
    uncovered = ClipPolicy(scope="per_layer", clip_norm=None, layer_bounds={"*.weight": 1.0})
    for name in ENGINE_NAMES:
        with pytest.raises(PolicyError, match=r"\['encoder\.\*'\] match no trainable parameter"):
            get_engine(name).clipped_sum(model, batches, per_example_ctc, dead)
        with pytest.raises(PolicyError, match=r"match no layer_bounds pattern.*catch-all"):
            get_engine(name).clipped_sum(model, batches, per_example_ctc, uncovered)


def test_loss_fn_contract_errors():
    model = ConvLN()
    batches = make_batches([2], 0)

    def ignores_model(model, batch):
        return batch.feats.sum((1, 2)).requires_grad_()

    def one_number(model, batch):
        return per_example_ctc(model, batch).mean()

    with pytest.raises(RuntimeError, match="must get its outputs by calling model"):
        get_engine("vectorized").clipped_sum(model, batches, ignores_model, ClipPolicy())
    for name in ENGINE_NAMES:
        with pytest.raises(ValueError, match=r"one loss per example, shape \([12],\); got \(\)"):
            get_engine(name).clipped_sum(model, batches, one_number, ClipPolicy())


def test_train_mode_dropout_runs():
    torch.manual_seed(0)
    model = ConformerCTC(config_for("tiny", vocab_size=29, dropout=0.1)).train()
    batches = make_batches([2], 3, f=80, vocab=29, min_len=30, max_len=50, max_tlen=4)
    res = get_engine("vectorized").clipped_sum(model, batches, checked(per_example_ctc),
                                               ClipPolicy(clip_norm=1.0))
    assert res.units == 2 and all(torch.isfinite(g).all() for g in res.grads.values())


# -- noise ----------------------------------------------------------------------------------------
def test_secure_noise_is_standard_normal_and_unseeded():
    z = secure_standard_normal(40_001).numpy()
    assert z.shape == (40_001,) and np.isfinite(z).all()
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1.0) < 0.02
    assert sps.kstest(z, "norm").pvalue > 1e-3
    assert abs(sps.kurtosis(z)) < 0.1                   # Gaussian tails, not just mean/std
    torch.manual_seed(0)
    a = GaussianNoise(secure=True).sample((1000,), 1.0)
    torch.manual_seed(0)
    b = GaussianNoise(secure=True).sample((1000,), 1.0)
    assert not torch.equal(a, b)                       # not reproducible from any seed
    assert a.dtype == torch.float32 and a.shape == (1000,)
    with pytest.raises(ValueError, match="cannot use a torch.Generator"):
        GaussianNoise(generator=torch.Generator(), secure=True)


def test_secure_noise_scaled_float32_across_chunks():
    from privasr.clipping.noise import _CHUNK

    n = _CHUNK + 12_345                                  # two passes of the stream, odd tail
    z = secure_standard_normal(n, scale=3.0, dtype=torch.float32)
    assert z.dtype == torch.float32 and z.shape == (n,) and torch.isfinite(z).all()
    for part in (z[:_CHUNK // 2], z[_CHUNK // 2:_CHUNK], z[_CHUNK:]):   # cos, sin, 2nd pass
        x = part.double().numpy() / 3.0
        assert abs(x.mean()) < 0.03 and abs(x.std() - 1.0) < 0.02
        assert sps.kstest(x, "norm").pvalue > 1e-4
    h = z[: _CHUNK // 2].double().numpy()               # cos and sin halves of one pass:
    c = np.corrcoef(h[:12_000], z[_CHUNK // 2:_CHUNK // 2 + 12_000].double().numpy())[0, 1]
    assert abs(c) < 0.05                                 # independent (Box–Muller pairs)


def test_secure_bytes_are_fresh_and_uniform():
    from privasr.clipping.noise import secure_bytes

    a, b = secure_bytes(1 << 16), secure_bytes(1 << 16)
    assert len(a) == 1 << 16 and a != b                      # a fresh key and nonce per draw
    counts = torch.bincount(torch.frombuffer(bytearray(a), dtype=torch.uint8).long(),
                            minlength=256).double()
    chi2 = float(((counts - 256) ** 2 / 256).sum())         # 255 degrees of freedom
    assert 150 < chi2 < 380


def test_seeded_noise_reproducible():
    a = GaussianNoise(generator=torch.Generator().manual_seed(3)).sample((5, 4), 2.0)
    b = GaussianNoise(generator=torch.Generator().manual_seed(3)).sample((5, 4), 2.0)
    assert torch.equal(a, b)
    assert torch.equal(a, 2.0 * torch.randn(5, 4, generator=torch.Generator().manual_seed(3)))


class Wide(nn.Module):
    """A big frozen layer and a big trainable one: noise statistics on 40k coordinates."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(6, 200)
        self.frozen.requires_grad_(False)
        self.big = nn.Linear(200, 200)

    def forward(self, feats, lens):
        return self.big(self.frozen(feats.mean(1)))[:, :5]


@pytest.mark.parametrize("batches", [[], "empty"])
def test_noise_scale_on_empty_batch_and_frozen_params(batches):
    if batches == "empty":
        batches = make_batches([0], 0)
    sigma, c, e = 1.5, 0.7, 8.0
    policy = ClipPolicy(clip_norm=c, noise_multiplier=sigma, expected_units=e)
    model = Wide()
    strat = ClippedGradient(policy, generator=torch.Generator().manual_seed(0))
    stats = strat.fill_grads(model, batches, ce_loss)
    assert model.frozen.weight.grad is None and model.frozen.bias.grad is None
    g = model.big.weight.grad
    assert abs(float(g.std()) / (sigma * c / e) - 1) < 0.02 and abs(float(g.mean())) < 2e-3
    assert stats["units"] == 0 and math.isnan(stats["loss"])
    assert stats["noise_std"] == pytest.approx(sigma * c / e)
    # exactly the generator's draws, in parameter order, scaled by σC/E
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(g, torch.randn(200, 200, generator=gen) * sigma * c / e)
    torch.testing.assert_close(model.big.bias.grad, torch.randn(200, generator=gen) * sigma * c / e)
    # σ = 0: an empty batch leaves a zero gradient
    model2 = Wide()
    ClippedGradient(ClipPolicy(clip_norm=c)).fill_grads(model2, batches, ce_loss)
    assert float(model2.big.weight.grad.abs().max()) == 0.0


def test_per_layer_noise_uses_total_bound():
    bounds = {"*.bias": 0.3, "*": 0.4}
    policy = ClipPolicy(scope="per_layer", layer_bounds=bounds, clip_norm=None,
                        noise_multiplier=1.0, expected_units=1)
    stats = ClippedGradient(policy, generator=torch.Generator().manual_seed(0)).fill_grads(
        Wide(), [], ce_loss)
    assert stats["bound"] == pytest.approx(math.sqrt(0.3 ** 2 + 0.4 ** 2))  # big.weight, big.bias
    assert stats["noise_std"] == pytest.approx(stats["bound"])


# -- the strategy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["example", "microbatch", "batch"])
def test_strategy_equation(unit):
    """p.grad = (engine sum + σC·ξ) / E[#units], same draws for both engines."""
    torch.manual_seed(2)
    model = ConvLN()
    batches = make_batches([3, 3], 9)
    kw = dict(microbatch_size=2) if unit == "microbatch" else {}
    policy = ClipPolicy(unit=unit, clip_norm=0.1, noise_multiplier=0.5,
                        expected_batch_size=6, **kw)
    loss_fn = checked(per_example_ctc)
    grads = {}
    for name in ENGINE_NAMES:
        model.zero_grad(set_to_none=True)
        strat = ClippedGradient(policy, engine=name, generator=torch.Generator().manual_seed(1))
        stats = strat.fill_grads(model, batches, loss_fn)
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref = get_engine("reference").clipped_sum(model, batches, loss_fn, policy)
    gen = torch.Generator().manual_seed(1)
    e = policy.expected_units
    for n, p in model.named_parameters():
        expected = (ref.grads[n] + torch.randn(p.shape, generator=gen) * 0.5 * 0.1) / e
        for name in ENGINE_NAMES:
            torch.testing.assert_close(grads[name][n], expected, rtol=1e-5, atol=1e-7)
    assert set(stats) >= {"loss", "frac_clipped", "norm_p10", "norm_p50", "norm_p90", "bound",
                          "units"}
    assert stats["loss"] == pytest.approx(ref.loss_sum / 6, rel=1e-5)
    assert stats["units"] == ref.units and stats["bound"] == 0.1
    assert stats["norm_p10"] <= stats["norm_p50"] <= stats["norm_p90"]


def test_strategy_realised_denominator_without_noise():
    torch.manual_seed(2)
    model = ConvLN()
    batches = make_batches([4], 1)
    strat = ClippedGradient(ClipPolicy(bound="adaptive_min", clip_norm=None))
    stats = strat.fill_grads(model, batches, per_example_ctc)
    ref = get_engine("reference").clipped_sum(model, batches, per_example_ctc, strat.policy)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref.grads[n] / 4, rtol=1e-5, atol=1e-7)
    assert stats["frac_clipped"] == pytest.approx(3 / 4)
    assert stats["bound"] == pytest.approx(ref.bound, rel=1e-5)


def test_quantile_bound_update():
    torch.manual_seed(2)
    model = ConvLN()
    batches = make_batches([4], 1)
    policy = ClipPolicy(bound="quantile", clip_norm=1e6, target_quantile=0.5, quantile_lr=0.2)
    strat = ClippedGradient(policy)
    s1 = strat.fill_grads(model, batches, per_example_ctc)       # all 4 unclipped: b = 1
    assert s1["bound"] == 1e6 and s1["frac_clipped"] == 0.0
    assert strat.clip_norm == pytest.approx(1e6 * math.exp(-0.2 * 0.5))
    strat.clip_norm = 1e-6
    strat.fill_grads(model, batches, per_example_ctc)            # all clipped: b = 0
    assert strat.clip_norm == pytest.approx(1e-6 * math.exp(0.2 * 0.5))
    state = strat.state_dict()
    again = ClippedGradient(policy)
    again.load_state_dict(state)
    assert again.state_dict() == state == {"step": 2, "clip_norm": strat.clip_norm}
    # noised count, fixed denominator: the bound moves towards the median unit norm
    noised = ClipPolicy(bound="quantile", clip_norm=10.0, target_quantile=0.5, quantile_lr=0.5,
                        quantile_noise_multiplier=0.2, expected_batch_size=4)
    s = ClippedGradient(noised, generator=torch.Generator().manual_seed(0))
    for _ in range(30):
        st_ = s.fill_grads(model, batches, per_example_ctc)
    assert st_["norm_p10"] * 0.7 < s.clip_norm < st_["norm_p90"] * 1.3
