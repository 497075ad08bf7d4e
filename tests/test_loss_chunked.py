"""Chunked loss == plain loss: values and gradients (hidden, weight, bias), frozen/tied heads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmf.loss import IGNORE_INDEX, causal_lm_loss, sequence_logps
from lmf.loss.chunked import chunked_causal_lm_loss, chunked_sequence_logps, select_label_rows

torch.set_num_threads(1)


def _inputs(batch, seq_len, width, vocab, seed=0, masked_prefix=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, width, generator=gen, dtype=dtype)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    labels[:, :masked_prefix] = IGNORE_INDEX  # prompt tokens
    labels[-1, -2:] = IGNORE_INDEX  # right padding
    return hidden, labels


def _grads(fn, hidden, head, labels, chunk_size, **kw):
    """Run ``fn`` and backprop a non-trivial function of its output; return value and grads."""
    hidden = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    value, count = fn(hidden, head, labels, chunk_size, **kw)
    if value.dim() == 0:
        (value / count.clamp(min=1)).backward()
    else:  # per-sequence log-probs: distinct upstream gradient per sequence, as in DPO
        weights = torch.linspace(-1.5, 2.0, value.shape[0], dtype=value.dtype)
        (value * weights).sum().backward()
    grads = {"hidden": hidden.grad}
    for name, param in head.named_parameters():
        grads[name] = param.grad
    return value.detach(), count, grads


def _assert_same(plain, chunked, atol=1e-5, rtol=1e-4):
    (v0, n0, g0), (v1, n1, g1) = plain, chunked
    torch.testing.assert_close(v1, v0, atol=atol, rtol=rtol)
    assert torch.equal(n0, n1)
    assert g0.keys() == g1.keys()
    for name in g0:
        if g0[name] is None:
            assert g1[name] is None, name
        else:
            torch.testing.assert_close(g1[name], g0[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("fn", [causal_lm_loss, sequence_logps], ids=["ce", "logps"])
@pytest.mark.parametrize(
    "batch,seq_len,width,vocab,chunk_size,bias",
    [
        (2, 17, 16, 97, 5, False),  # chunk size does not divide the label count
        (3, 9, 8, 41, 1, True),  # one token per chunk, with bias
        (1, 33, 24, 300, 64, False),  # one chunk holds everything
        (4, 12, 16, 64, 7, True),
    ],
)
def test_chunked_matches_plain(fn, batch, seq_len, width, vocab, chunk_size, bias):
    torch.manual_seed(batch * 100 + seq_len)
    head = nn.Linear(width, vocab, bias=bias)
    hidden, labels = _inputs(batch, seq_len, width, vocab, seed=seq_len)
    plain = _grads(fn, hidden, head, labels, None)
    chunked = _grads(fn, hidden, head, labels, chunk_size)
    assert plain[2]["weight"] is not None and plain[2]["weight"].abs().sum() > 0
    _assert_same(plain, chunked)


@pytest.mark.parametrize("fn", [causal_lm_loss, sequence_logps], ids=["ce", "logps"])
def test_frozen_head_gives_hidden_grads_only(fn):
    """LoRA case: the LM head is frozen, so only the hidden states get a gradient."""
    head = nn.Linear(16, 80, bias=True).requires_grad_(False)
    hidden, labels = _inputs(2, 15, 16, 80, seed=3)
    plain = _grads(fn, hidden, head, labels, None)
    chunked = _grads(fn, hidden, head, labels, 4)
    assert chunked[2]["hidden"] is not None and chunked[2]["weight"] is None and chunked[2]["bias"] is None
    _assert_same(plain, chunked)


@pytest.mark.parametrize("fn", [causal_lm_loss, sequence_logps], ids=["ce", "logps"])
def test_hidden_without_grad_still_trains_head(fn):
    head = nn.Linear(8, 30)
    hidden, labels = _inputs(2, 10, 8, 30, seed=4)
    results = []
    for chunk_size in (None, 3):
        head.zero_grad(set_to_none=True)
        value, count = fn(hidden, head, labels, chunk_size)  # hidden does not require grad
        (value.sum() / count.sum()).backward()
        results.append((value.detach(), head.weight.grad.clone(), head.bias.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fn", [causal_lm_loss, sequence_logps], ids=["ce", "logps"])
def test_tied_embeddings_accumulate_both_grads(fn):
    """The head shares its weight with the input embedding: both gradient paths must add up."""
    vocab, width = 50, 12
    embed = nn.Embedding(vocab, width)
    head = nn.Linear(width, vocab, bias=False)
    head.weight = embed.weight
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, vocab, (2, 11), generator=gen)
    labels = input_ids.clone()
    labels[:, :2] = IGNORE_INDEX
    grads = []
    for chunk_size in (None, 4):
        embed.zero_grad(set_to_none=True)
        hidden = torch.tanh(embed(input_ids))
        value, count = fn(hidden, head, labels, chunk_size)
        (value.sum() / count.sum()).backward()
        grads.append((value.detach(), embed.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fn", [causal_lm_loss, sequence_logps], ids=["ce", "logps"])
def test_softcap_matches_plain(fn):
    head = nn.Linear(16, 70)
    hidden, labels = _inputs(2, 14, 16, 70, seed=6)
    hidden = hidden * 4  # large logits, so the cap matters
    plain = _grads(fn, hidden, head, labels, None, softcap=3.0)
    chunked = _grads(fn, hidden, head, labels, 5, softcap=3.0)
    uncapped = _grads(fn, hidden, head, labels, None)
    assert not torch.allclose(plain[0], uncapped[0])
    _assert_same(plain, chunked)


def test_zero_label_tokens():
    """A batch with no label token: loss 0, count 0, zero (not missing) gradients."""
    head = nn.Linear(8, 20)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.full((2, 6), IGNORE_INDEX)
    loss, count = chunked_causal_lm_loss(hidden, head, labels, 4)
    assert loss.item() == 0.0 and count.item() == 0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(head.weight.grad) == 0

    hidden.grad = None
    logps, counts = chunked_sequence_logps(hidden, head, labels, 4)
    assert logps.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    logps.sum().backward()
    assert torch.count_nonzero(hidden.grad) == 0


def test_one_sequence_without_labels_in_logps():
    head = nn.Linear(8, 20)
    hidden, labels = _inputs(3, 7, 8, 20, seed=7, masked_prefix=0)
    labels[1] = IGNORE_INDEX
    plain = _grads(sequence_logps, hidden, head, labels, None)
    chunked = _grads(sequence_logps, hidden, head, labels, 2)
    assert chunked[1].tolist()[1] == 0 and chunked[0][1].item() == 0.0
    _assert_same(plain, chunked)


def test_bfloat16_hidden_uses_fp32_math():
    """bf16 inputs: the chunked loss stays within bf16 rounding of an fp32 reference."""
    head = nn.Linear(32, 128).to(torch.bfloat16)
    hidden, labels = _inputs(2, 20, 32, 128, seed=8)
    hidden = hidden.to(torch.bfloat16)
    ref_head = nn.Linear(32, 128)
    ref_head.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    ref = _grads(causal_lm_loss, hidden.float(), ref_head, labels, None)
    chunked = _grads(causal_lm_loss, hidden, head, labels, 6)
    assert chunked[0].dtype == torch.float32
    assert chunked[2]["hidden"].dtype == torch.bfloat16 and chunked[2]["weight"].dtype == torch.bfloat16
    torch.testing.assert_close(chunked[0], ref[0], atol=0.05, rtol=0.01)
    for name in ("hidden", "weight", "bias"):
        torch.testing.assert_close(chunked[2][name].float(), ref[2][name], atol=2e-3, rtol=0.05, msg=name)


def test_select_label_rows_skips_masked_positions():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])
    rows, targets, row_seq, counts = select_label_rows(hidden, labels)
    # position t predicts label t+1: rows 1, 2 of sequence 0 and row 0 of sequence 1
    assert rows.squeeze(1).tolist() == [1.0, 2.0, 4.0]
    assert targets.tolist() == [5, 6, 7] and row_seq.tolist() == [0, 0, 1] and counts.tolist() == [2, 1]


def test_out_of_vocab_label_is_a_clear_error():
    head = nn.Linear(8, 20)
    hidden = torch.randn(1, 5, 8)
    labels = torch.tensor([[IGNORE_INDEX, 3, 25, 1, 2]])
    with pytest.raises(ValueError, match="label id 25 is outside"):
        chunked_causal_lm_loss(hidden, head, labels, 2)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_causal_lm_loss(torch.randn(1, 3, 4), nn.Linear(4, 5), torch.zeros(1, 3, dtype=torch.long), -1)


class _ScaledHead(nn.Module):
    """Not an nn.Linear (like a LoRA-adapted head): exercises the generic module path."""

    def __init__(self, width, vocab):
        super().__init__()
        self.base = nn.Linear(width, vocab)
        self.delta = nn.Linear(width, vocab, bias=False)
        self.out_features = vocab

    def forward(self, x):
        return self.base(x) + 0.5 * self.delta(x)


@pytest.mark.parametrize("fn", [causal_lm_loss, sequence_logps], ids=["ce", "logps"])
def test_generic_head_module_matches_plain(fn):
    torch.manual_seed(9)
    head = _ScaledHead(12, 40)
    head.base.requires_grad_(False)
    hidden, labels = _inputs(2, 13, 12, 40, seed=9)
    plain = _grads(fn, hidden, head, labels, None)
    chunked = _grads(fn, hidden, head, labels, 4)
    assert chunked[2]["delta.weight"] is not None
    _assert_same(plain, chunked)


def test_no_grad_reference_forward():
    """DPO reference model: log-probs under no_grad equal the plain path and build no graph."""
    head = nn.Linear(8, 30)
    hidden, labels = _inputs(2, 9, 8, 30, seed=10)
    with torch.no_grad():
        plain, _ = sequence_logps(hidden, head, labels, None)
        chunked, _ = sequence_logps(hidden, head, labels, 3)
        loss, _ = causal_lm_loss(hidden, head, labels, 3)
    assert not chunked.requires_grad and not loss.requires_grad
    torch.testing.assert_close(chunked, plain)


def test_tiny_model_end_to_end(tiny_model_dir):
    """Through decoder_hidden_states on the real tiny Qwen3: loss equals the model's own loss."""
    from transformers import AutoModelForCausalLM

    from lmf.model.forward import decoder_hidden_states, lm_head_of

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(11)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=gen)
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX
    attention_mask = torch.ones_like(input_ids)

    reference = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    results = []
    for chunk_size in (None, 7):
        model.zero_grad(set_to_none=True)
        hidden = decoder_hidden_states(model, input_ids, attention_mask)
        loss_sum, count = causal_lm_loss(hidden, lm_head_of(model), labels, chunk_size)
        (loss_sum / count).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss_sum / count, grads))
    torch.testing.assert_close(results[0][0], reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][0], reference, atol=1e-5, rtol=1e-5)
    assert results[0][1].keys() == results[1][1].keys() and "lm_head.weight" in results[1][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_onednn_matmul_equals_torch_matmul_and_can_be_turned_off(monkeypatch, tiny_model_dir):
    """lmf.loss.onednn: x @ w.T through oneDNN on CPU fp32 (the LM head's logits and their gradient through a
    transposed view of the weight), torch.matmul elsewhere; use_onednn_matmul: false turns it off."""
    import lmf.loss.onednn as onednn

    gen = torch.Generator().manual_seed(0)
    x, w, g = (torch.randn(*s, generator=gen) for s in ((70, 32), (300, 32), (70, 300)))
    monkeypatch.setattr(onednn, "_usable", None)
    if not onednn.onednn_usable():
        pytest.skip("this torch build has no usable oneDNN linear")
    calls = []
    real_op = onednn._op()
    monkeypatch.setattr(onednn, "_op", lambda: lambda *a: calls.append(1) or real_op(*a))
    torch.testing.assert_close(onednn.matmul_nt(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn.matmul_nt(g, w.t()), g @ w, rtol=1e-5, atol=1e-4)
    assert len(calls) == 2
    bf16 = onednn.matmul_nt(x.bfloat16(), w.bfloat16())  # not fp32: torch.matmul
    assert bf16.dtype == torch.bfloat16 and len(calls) == 2
    from lmf.config.parser import build_config
    from lmf.loss import loss_kwargs

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(onednn, "_enabled", True)
    loss_kwargs(build_config({"use_onednn_matmul": False}).model, AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    onednn.matmul_nt(x, w)
    assert len(calls) == 2 and not onednn._enabled
