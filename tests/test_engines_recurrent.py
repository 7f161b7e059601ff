"""Models the fast engines cannot run (nn.GRU / nn.LSTM, vmap failures): ``auto`` falls back to
``reference`` with the same ClipResult, explicit engines refuse clearly; and the
per-example independence probe (``privasr.clipping.probe``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privasr.clipping import ClipPolicy, PolicyError, get_engine
from privasr.clipping.engines import EngineFallbackWarning, UnsupportedModuleError
from privasr.clipping.probe import check_per_example_independence
from privasr.data.dataset import Batch
from privasr.models.conformer import ConformerCTC, config_for
from privasr.errors import NonFiniteLossError
from privasr.models.loss import checked, per_example_ctc

pytestmark = pytest.mark.usefixtures("one_thread")
LOSS = checked(per_example_ctc)
F_IN, VOCAB = 6, 5


def make_batches(sizes: list[int], seed: int, *, f: int = F_IN, vocab: int = VOCAB,
                 min_len: int = 5, max_len: int = 12, max_tlen: int = 2) -> list[Batch]:
    """Zero-padded batches of random lengths; ids utt0, utt1, ... across the batches."""
    gen = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for n in sizes:
        lens = torch.randint(min_len, max_len + 1, (n,), generator=gen).tolist()
        tlens = torch.randint(1, max_tlen + 1, (n,), generator=gen).tolist()
        feats = torch.zeros(n, max(lens), f)
        targets = torch.zeros(n, max(tlens), dtype=torch.long)
        for i, (t, k) in enumerate(zip(lens, tlens)):
            feats[i, :t] = torch.randn(t, f, generator=gen)
            targets[i, :k] = torch.randint(1, vocab, (k,), generator=gen)
        out.append(Batch([f"utt{start + i}" for i in range(n)], feats, torch.tensor(lens),
                         targets, torch.tensor(tlens)))
        start += n
    return out


def assert_same(res, ref) -> None:
    scale = max(float(g.abs().max()) for g in ref.grads.values())
    assert set(res.grads) == set(ref.grads)
    for k in ref.grads:
        assert float((res.grads[k] - ref.grads[k]).abs().max()) <= 1e-5 * scale + 1e-9, k
    torch.testing.assert_close(res.norms, ref.norms, rtol=1e-5, atol=1e-7)
    assert res.clipped.tolist() == ref.clipped.tolist()
    assert res.units == ref.units and res.examples == ref.examples
    assert math.isclose(res.bound, ref.bound) and math.isclose(res.loss_sum, ref.loss_sum,
                                                               rel_tol=1e-5)


def _mask(lens: Tensor, t: int) -> Tensor:
    return torch.arange(t)[None, :] < lens[:, None]


# -- models -----------------------------------------------------------------------------------
class RecurrentCTC(nn.Module):
    """Linear front end -> GRU / LSTM (batch_first) -> Linear head -> log_softmax (CTC)."""

    def __init__(self, kind: str = "gru", *, packed: bool = False, bidirectional: bool = False,
                 h: int = 8):
        super().__init__()
        self.front = nn.Linear(F_IN, h)
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind]
        self.rnn = rnn(h, h, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(h * (2 if bidirectional else 1), VOCAB)
        self.packed = packed

    def forward(self, feats: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.tanh(self.front(feats))
        if self.packed:
            p = nn.utils.rnn.pack_padded_sequence(x, lens.cpu(), batch_first=True,
                                                  enforce_sorted=False)
            y, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(p)[0], batch_first=True,
                                                    total_length=x.shape[1])
        else:
            y = self.rnn(x)[0] * _mask(lens, x.shape[1])[..., None]
        return F.log_softmax(self.head(y), dim=-1), lens


class SameConvCTC(nn.Module):
    """Conv1d(padding='same') (not bookkeeping's) -> Linear; optionally trims the batch to its
    longest example with ``int(lens.max())``, which torch.func.vmap cannot run (.item())."""

    def __init__(self, *, trim: bool = False, nan: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(F_IN, 8, 3, padding="same")
        self.head = nn.Linear(8, VOCAB)
        self.trim, self.nan = trim, nan

    def forward(self, feats: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        if self.trim:
            feats = feats[:, :int(lens.max())]
        x = feats.masked_fill(~_mask(lens, feats.shape[1])[..., None], 0.0)
        y = self.head(F.silu(self.conv(x.transpose(1, 2)).transpose(1, 2)))
        if self.nan:
            y = y * float("nan")
        return F.log_softmax(y, dim=-1), lens


class Broken(SameConvCTC):
    """Fails with or without vmap: a real error, never a fallback."""

    def forward(self, feats: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(feats), lens                    # 6 features into Linear(8, 5)


class BatchNormCTC(nn.Module):
    def __init__(self):
        super().__init__()
        self.front = nn.Linear(F_IN, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, feats: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        x = self.bn(self.front(feats).transpose(1, 2)).transpose(1, 2)
        return F.log_softmax(self.head(torch.tanh(x)), dim=-1), lens


class BatchMeanCTC(nn.Module):
    """Subtracts the mean over the batch (masked frames only): mixes examples, no padding."""

    def __init__(self):
        super().__init__()
        self.front, self.head = nn.Linear(F_IN, 8), nn.Linear(8, VOCAB)

    def forward(self, feats: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        m = _mask(lens, feats.shape[1])[..., None].float()
        x = self.front(feats)
        centre = (x * m).sum((0, 1)) / m.sum()
        return F.log_softmax(self.head(torch.tanh(x - centre)), dim=-1), lens


class GlobalMeanCTC(nn.Module):
    """Adds the mean over ALL frames (padding included) back to every frame: reads padding."""

    def __init__(self):
        super().__init__()
        self.front, self.head = nn.Linear(F_IN, 8), nn.Linear(8, VOCAB)

    def forward(self, feats: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.tanh(self.front(feats))
        return F.log_softmax(self.head(x + x.mean(1, keepdim=True)), dim=-1), lens


class TiedCTC(nn.Module):
    """The head reuses the front end's weight through F.linear: breaks bookkeeping's contract
    (its per-example gradients miss the tied use) though every example is independent."""

    def __init__(self):
        super().__init__()
        self.front = nn.Linear(F_IN, 8)

    def forward(self, feats: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.tanh(self.front(feats))
        return F.log_softmax(F.linear(x, self.front.weight.t()), dim=-1), lens


def policy(unit: str) -> ClipPolicy:
    kw = {"microbatch_size": 2} if unit == "microbatch" else {}
    return ClipPolicy(unit=unit, clip_norm=3.0, **kw)


# -- auto falls back; explicit engines refuse ---------------------------------------------------
@pytest.mark.parametrize("unit", ["example", "microbatch"])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_auto_on_rnn_is_reference_and_warns_once(kind, unit):
    torch.manual_seed(0)
    model = RecurrentCTC(kind, packed=unit == "microbatch")
    batches = make_batches([3, 2], 1)
    pol = policy(unit)
    ref = get_engine("reference").clipped_sum(model, batches, LOSS, pol, step=2)
    assert ref.clipped.any() and not ref.clipped.all()      # the bound binds for some units
    auto = get_engine("auto", chunk_size=2)
    with pytest.warns(EngineFallbackWarning, match=rf"slower 'reference' engine.*"
                                                   rf"'rnn' \({kind.upper()}\)"):
        assert_same(auto.clipped_sum(model, batches, LOSS, pol, step=2), ref)
    assert auto.choose(model).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)      # decided once: no repeat
        assert_same(auto.clipped_sum(model, batches, LOSS, pol, step=2), ref)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("unit", ["example", "microbatch"])
def test_auto_falls_back_when_vmap_fails_at_run_time(unit):
    """No known-bad module: auto tries vectorized, which is refused (.item() under vmap); the
    call is redone on reference, with the same result, and reference is kept."""
    torch.manual_seed(1)
    model = SameConvCTC(trim=True)
    batches = make_batches([3, 2], 4)
    pol = policy(unit)
    ref = get_engine("reference").clipped_sum(model, batches, LOSS, pol, step=1)
    auto = get_engine("auto")
    assert auto.choose(model).name == "vectorized"                 # provisional
    with pytest.warns(EngineFallbackWarning, match=r"'conv' \(Conv1d with padding='same'.*"
                                                   r"'<root>' \(SameConvCTC\)"):
        assert_same(auto.clipped_sum(model, batches, LOSS, pol, step=1), ref)
    assert auto.choose(model).name == "reference"


def test_auto_keeps_vectorized_when_vmap_runs():
    torch.manual_seed(2)
    model = SameConvCTC()
    batches = make_batches([3, 1], 5)
    ref = get_engine("reference").clipped_sum(model, batches, LOSS, policy("example"))
    auto = get_engine("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallbackWarning)
        assert_same(auto.clipped_sum(model, batches, LOSS, policy("example")), ref)
    assert auto.choose(model).name == "vectorized"


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_explicit_engines_refuse_rnn(kind):
    model = RecurrentCTC(kind)
    batches = make_batches([2], 0)
    name = kind.upper()
    with pytest.raises(PolicyError, match=rf"'rnn' \({name}\) is not supported by engine "
                                          rf"'vectorized'.*aten::{kind}.*'reference' or 'auto'"
                       ) as err:
        get_engine("vectorized").clipped_sum(model, batches, LOSS, policy("example"))
    assert isinstance(err.value.__cause__, RuntimeError)
    assert "Batching rule" in str(err.value.__cause__)
    assert err.value.modules == {"rnn": name}
    with pytest.raises(PolicyError, match=rf"'rnn' \({name}\).*not supported.*"
                                          r"use engine 'reference' or 'auto'") as err:
        get_engine("bookkeeping").clipped_sum(model, batches, LOSS, policy("microbatch"))
    assert isinstance(err.value, UnsupportedModuleError) and err.value.engine == "bookkeeping"


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_vectorized_refusal_names_the_failing_code():
    model = RecurrentCTC("gru", packed=True)      # fails in pack_padded_sequence, not the GRU
    with pytest.raises(PolicyError, match=r"'<root>' \(RecurrentCTC\).*pack_padded_sequence"):
        get_engine("vectorized").clipped_sum(model, make_batches([3], 0), LOSS,
                                             policy("example"))


def test_real_errors_are_not_hidden():
    batches = make_batches([2], 3)
    auto = get_engine("auto")
    nan = SameConvCTC(nan=True)
    with pytest.raises(NonFiniteLossError):
        auto.clipped_sum(nan, batches, LOSS, policy("example"))
    assert auto.choose(nan).name == "vectorized"                    # no fallback recorded
    with pytest.raises(RuntimeError, match=r"size|shape") as err:          # the original
        get_engine("vectorized").clipped_sum(Broken(), batches, LOSS, policy("example"))
    assert not isinstance(err.value, PolicyError)


# -- the per-example independence probe ---------------------------------------------------------
def test_probe_passes_on_conformer_without_side_effects():
    torch.manual_seed(0)
    model = ConformerCTC(config_for("tiny", vocab_size=29, dropout=0.1)).train()
    batch = make_batches([3], 2, f=80, vocab=29, min_len=24, max_len=44, max_tlen=4)[0]
    rng = torch.get_rng_state()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check_per_example_independence(model, batch, LOSS, "auto")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())             # dropout switched back on
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind,packed,bidirectional", [("gru", True, True),
                                                       ("gru", False, False),
                                                       ("lstm", True, False)])
def test_probe_passes_on_masked_rnn(kind, packed, bidirectional):
    torch.manual_seed(3)
    model = RecurrentCTC(kind, packed=packed, bidirectional=bidirectional)
    batch = make_batches([3], 6)[0]
    with pytest.warns(EngineFallbackWarning):
        check_per_example_independence(model, batch, LOSS, "auto")
    check_per_example_independence(model, batch, LOSS, "reference")


def test_probe_refuses_batchnorm():
    batch = make_batches([3], 7)[0]
    with pytest.raises(PolicyError, match=r"'bn' \(BatchNorm1d\).*statistics of the whole batch"):
        check_per_example_independence(BatchNormCTC().train(), batch, LOSS, "reference")
    bn = BatchNormCTC().eval()                                     # running statistics: fine
    check_per_example_independence(bn, batch, LOSS, "vectorized")


def test_probe_catches_examples_mixed_in_the_batch():
    torch.manual_seed(4)
    with pytest.raises(PolicyError, match=r"failed \(batch\): example 'utt0'.*mixes the "
                                          r"examples"):
        check_per_example_independence(BatchMeanCTC(), make_batches([3], 8)[0], LOSS,
                                       "bookkeeping")


@pytest.mark.parametrize("model", [GlobalMeanCTC(), RecurrentCTC("gru", bidirectional=True)],
                         ids=["global-mean", "unpacked-bigru"])
def test_probe_catches_padding_leaks(model):
    with pytest.raises(PolicyError, match=r"failed \(padding\).*padded to \d+ frames.*reads "
                                          r"padded frames"):
        check_per_example_independence(model, make_batches([2], 9)[0], LOSS, "reference")


def test_probe_catches_engine_contract_violation():
    torch.manual_seed(5)
    model, batch = TiedCTC(), make_batches([3], 10, vocab=F_IN)[0]
    check_per_example_independence(model, batch, LOSS, "vectorized")      # vmap sees the tie
    with pytest.raises(PolicyError, match=r"failed \(engine\).*engine 'bookkeeping'.*weight "
                                          r"tying"):
        check_per_example_independence(model, batch, LOSS, "auto")
