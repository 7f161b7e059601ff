"""Conformer-CTC: sizes, shapes, padding invariance, per-example gradients (vmap), overfitting."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from privasr.models.conformer import (SIZES, ConformerCTC, ConformerConfig, config_for,
                                      count_parameters)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides) -> ConformerCTC:
    torch.manual_seed(0)
    return ConformerCTC(config_for("tiny", dropout=0.0, **overrides)).eval()


def padded_batch(lengths: list[int], n_mels: int = 80, pad_value: float = 0.0):
    feats = torch.full((len(lengths), max(lengths), n_mels), pad_value)
    for i, n in enumerate(lengths):
        feats[i, :n] = torch.randn(n, n_mels)
    return feats, torch.tensor(lengths)


def ctc_sum(log_probs: Tensor, out_len: Tensor, target: Tensor, target_len: Tensor) -> Tensor:
    """CTC loss (sum) of ONE example, (1, T', V); usable inside vmap.

    F.ctc_loss has no vmap batching rule; the per-example fallback stacks its internal alpha
    table, shaped by the max target length, so examples with different target lengths clash.
    A dummy copy with the padded target length pins that shape; only row 0 is returned.
    """
    s = target.shape[0]
    lp = torch.cat([log_probs, log_probs]).transpose(0, 1)                # (T', 2, V)
    losses = F.ctc_loss(lp, torch.stack([target, target]), torch.cat([out_len, out_len]),
                        torch.stack([target_len, torch.full_like(target_len, s)]),
                        blank=0, reduction="none", zero_infinity=True)
    return losses[0]


def test_parameter_counts():
    counts = {name: count_parameters(ConformerCTC(cfg)) for name, cfg in SIZES.items()}
    assert counts["tiny"] < 500_000
    assert 3_000_000 <= counts["small"] <= 5_000_000
    assert 25_000_000 <= counts["base"] <= 35_000_000
    model = ConformerCTC(SIZES["tiny"])
    model.ctc_head.requires_grad_(False)
    assert count_parameters(model) < count_parameters(model, trainable_only=False)


def test_config_for():
    cfg = config_for("small", vocab_size=40, dropout=0.0)
    assert isinstance(cfg, ConformerConfig)
    assert (cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.dropout) == (144, 6, 40, 0.0)
    with pytest.raises(ValueError, match="tiny.*small.*base"):
        config_for("huge")


def test_structure_for_dp_and_peft():
    for name in ("tiny", "small"):
        model = ConformerCTC(SIZES[name])
        for m in model.modules():
            assert not isinstance(m, nn.modules.batchnorm._NormBase), type(m)  # BatchNorm*/InstanceNorm*
            assert not isinstance(m, nn.MultiheadAttention)
        assert isinstance(model.encoder, nn.Module)
        assert isinstance(model.ctc_head, nn.Linear)
        assert model.ctc_head.out_features == SIZES[name].vocab_size
        assert model.subsampling == 4


@pytest.mark.parametrize("max_len", [7, 8, 9, 10, 63, 64, 101, 102])
def test_shapes_and_output_lengths(max_len: int):
    model = tiny()
    lengths = sorted({max_len, max(7, max_len - 1), max(7, max_len - 4), 7}, reverse=True)
    feats, lens = padded_batch(lengths)
    with torch.no_grad():
        log_probs, out_lens = model(feats, lens)
        assert log_probs.shape == (len(lengths), int(model.output_lengths(lens).max()), 29)
        assert torch.equal(out_lens, model.output_lengths(lens))
        assert log_probs.shape[1] == out_lens.max()
        for i, n in enumerate(lengths):               # each example alone: its real output length
            alone, alone_len = model(feats[i:i + 1, :n], lens[i:i + 1])
            assert alone.shape[1] == alone_len.item() == out_lens[i].item() >= 1
        assert torch.allclose(log_probs.exp().sum(-1), torch.ones(()), atol=1e-5)


def test_output_frame_rate():
    model = ConformerCTC(SIZES["tiny"])
    secs = torch.tensor([1, 4, 16])
    out = model.output_lengths(secs * 100)            # 100 input frames/s -> 25 output frames/s
    assert torch.all((out <= 25 * secs) & (out >= 25 * secs - 1))


@pytest.mark.parametrize("pad_value", [0.0, 1e3, float("nan")])
def test_padding_invariance(pad_value: float):
    model = tiny()
    torch.manual_seed(1)
    feats, lens = padded_batch([160, 97, 41], pad_value=pad_value)
    with torch.no_grad():
        batch, out_lens = model(feats, lens)
        for i, n in enumerate(lens.tolist()):
            alone, _ = model(feats[i:i + 1, :n], lens[i:i + 1])
            k = out_lens[i]
            assert torch.allclose(batch[i, :k], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(batch).all()


def test_per_example_grads_vmap_match_loop():
    model = tiny()
    torch.manual_seed(2)
    feats, lens = padded_batch([60, 45, 31])
    targets = torch.randint(1, 29, (3, 5))
    target_lens = torch.tensor([5, 3, 4])
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p, feat, feat_len, target, target_len):
        log_probs, out_len = functional_call(model, p, (feat[None], feat_len[None]))
        return ctc_sum(log_probs, out_len, target, target_len)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_example = vmap(grad(loss_fn), in_dims=(None, 0, 0, 0, 0))(
            params, feats, lens, targets, target_lens)
    fallbacks = [str(w.message) for w in caught if "batching rule" in str(w.message)]
    assert all("ctc_loss" in m for m in fallbacks), fallbacks   # the model itself is fully batched

    for i in range(3):                                   # reference: batch of 1, no padding
        model.zero_grad()
        log_probs, out_len = model(feats[i:i + 1, :lens[i]], lens[i:i + 1])
        F.ctc_loss(log_probs.transpose(0, 1), targets[i:i + 1, :target_lens[i]], out_len,
                   target_lens[i:i + 1], blank=0, reduction="sum").backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_example[name][i], p.grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{name}[{i}]: {m}")


def test_ctc_finite_and_overfits():
    torch.manual_seed(3)
    model = ConformerCTC(config_for("tiny", dropout=0.0)).train()
    feats, lens = padded_batch([100, 80])
    targets = torch.tensor([[3, 7, 7, 12], [5, 9, 2, 0]])
    target_lens = torch.tensor([4, 3])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step() -> float:
        log_probs, out_lens = model(feats, lens)
        loss = F.ctc_loss(log_probs.transpose(0, 1), targets, out_lens, target_lens, blank=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    first = step()
    assert torch.isfinite(torch.tensor(first))
    for _ in range(100):
        last = step()
    assert last < 0.5 * first, (first, last)
