"""Per-segment sdpa for packed rows (lmf.model.packed_attention) equals the block-diagonal-mask path."""

from __future__ import annotations

import pytest
import torch

from lmf.loss import causal_lm_loss
from lmf.model.forward import decoder_hidden_states, lm_head_of, set_packed_sdpa
from lmf.model import packed_attention
from lmf.model.packed_attention import packed_segments

torch.set_num_threads(1)


def _position_ids(rows: list[list[int]], width: int) -> torch.Tensor:
    """Segment lengths per row -> packed position ids, right padding with 0s."""
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for b, lengths in enumerate(rows):
        pos = [p for n in lengths for p in range(n)]
        out[b, : len(pos)] = torch.tensor(pos)
    return out


def _load(model_dir, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)


def _hidden_and_grads(model, input_ids, position_ids, labels, varlen: bool, monkeypatch):
    set_packed_sdpa(model, varlen)
    model.zero_grad(set_to_none=True)
    calls = []
    original = packed_attention.varlen_sdpa_forward
    monkeypatch.setattr(packed_attention, "varlen_sdpa_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    hidden = decoder_hidden_states(model, input_ids, torch.ones_like(input_ids), position_ids)
    loss, _ = causal_lm_loss(hidden, lm_head_of(model), labels)
    (loss + hidden.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    monkeypatch.setattr(packed_attention, "varlen_sdpa_forward", original)
    return hidden.detach(), grads, len(calls)


# rows of segment lengths, padded to the width: one segment, many, trailing padding, a row of 1-token segments
LAYOUTS = [
    ([[40]], 40),
    ([[40]], 48),
    ([[7, 5, 13, 1, 9], [30, 2], [1, 1, 1, 20]], 40),
    ([[3, 17, 17, 3], [40], [12, 12, 12]], 40),
    ([[1] * 6 + [25], [2, 2, 2]], 31),
]


@pytest.mark.parametrize("layout", ["buckets", "spans"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("rows,width", LAYOUTS)
def test_varlen_equals_block_mask_path(arch, rows, width, layout, tiny_model_dir, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(packed_attention, "MIN_MEAN_SPAN", 0 if layout == "spans" else 10**9)
    model = _load(tiny_model_dir if arch == "qwen3" else tiny_llama_dir).train()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    gen = torch.Generator().manual_seed(len(rows) * width)
    input_ids = torch.randint(5, 1000, (len(rows), width), generator=gen)
    labels = torch.where(torch.rand(input_ids.shape, generator=gen) < 0.7, input_ids, torch.full_like(input_ids, -100))
    position_ids = _position_ids(rows, width)
    ref_h, ref_g, ref_calls = _hidden_and_grads(model, input_ids, position_ids, labels, False, monkeypatch)
    h, g, calls = _hidden_and_grads(model, input_ids, position_ids, labels, True, monkeypatch)
    assert ref_calls == 0 and calls == model.config.num_hidden_layers
    torch.testing.assert_close(h, ref_h, atol=2e-5, rtol=1e-5)
    assert ref_g.keys() == g.keys() and len(g) > 10
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], atol=2e-5, rtol=1e-4, msg=name)


def test_varlen_with_gradient_checkpointing_and_lora(tiny_model_dir, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from lmf.model.checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    model = get_peft_model(_load(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"],
                                                             init_lora_weights=False))
    model.train()
    rows, width = [[9, 14, 3, 6], [25, 4]], 36
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, 1000, (2, width), generator=gen)
    position_ids = _position_ids(rows, width)
    ref_h, ref_g, _ = _hidden_and_grads(model, input_ids, position_ids, input_ids, False, monkeypatch)
    assert apply_activation_checkpointing(model) == 2
    h, g, calls = _hidden_and_grads(model, input_ids, position_ids, input_ids, True, monkeypatch)
    assert calls == 4  # forward + recompute in the backward, per layer: the recompute is per-segment too
    torch.testing.assert_close(h, ref_h, atol=2e-5, rtol=1e-5)
    assert any("lora_A" in n for n in g)
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], atol=2e-5, rtol=1e-4, msg=name)


def test_layout_choice_and_spans():
    long_segments = _position_ids([[40, 33], [50, 23]], 73)
    spans = packed_segments(long_segments)  # CPU, segments of 36 tokens on average: one call each
    assert spans.spans == ((0, 40), (40, 33), (73, 50), (123, 23)) and spans.gather_index is None
    assert packed_segments(long_segments, layout="buckets").spans is None
    short = _position_ids([[7, 5, 13, 1, 9], [30, 2], [1, 1, 1, 20]], 40)  # padding: 1-token segments
    assert packed_segments(short).spans is None and packed_segments(short, layout="spans").spans is not None
    with pytest.raises(ValueError, match="layout"):
        packed_segments(short, layout="diagonal")


def test_segments_buckets_cover_every_token_once():
    position_ids = _position_ids([[7, 5, 13, 1, 9], [30, 2], [1, 1, 1, 20]], 40)
    seg = packed_segments(position_ids)
    # every pad token (5, 8 and 17 of them) is a segment of its own
    assert seg.num_segments == (5 + 5) + (2 + 8) + (4 + 17)
    assert sum(n * length for n, length in seg.buckets) == seg.gather_index.numel()
    lengths = [length for _, length in seg.buckets]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] == 30 and lengths[-1] == 1
    # scattering back the gathered token ids is the identity
    flat = torch.arange(position_ids.numel())
    assert torch.equal(flat.index_select(0, seg.gather_index).index_select(0, seg.scatter_index), flat)


def test_only_where_it_applies(tiny_model_dir, monkeypatch):
    sdpa, eager = _load(tiny_model_dir), _load(tiny_model_dir, "eager")
    pos = _position_ids([[3, 4]], 8)
    assert packed_attention.applies(sdpa.config, pos)
    assert not packed_attention.applies(eager.config, pos)
    assert not packed_attention.applies(sdpa.config, pos[0])  # not [B, T]
    assert not packed_attention.applies(sdpa.config, pos, enabled=False)  # packed_sdpa: false
    sliding = _load(tiny_model_dir).config
    sliding.layer_types = ["sliding_attention", "full_attention"]
    assert not packed_attention.applies(sliding, pos)


def test_eager_packed_and_generation_untouched(tiny_model_dir, monkeypatch):
    """Unpacked calls (generation, padded batches) never take the per-segment path, even once it is installed."""
    model = _load(tiny_model_dir).eval()
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        decoder_hidden_states(model, ids, torch.ones_like(ids), _position_ids([[4, 5], [9]], 9))  # installs
    calls = []
    monkeypatch.setattr(packed_attention, "varlen_sdpa_forward", lambda *a, **k: calls.append(1))
    mask = torch.tensor([[1] * 9, [0, 0] + [1] * 7])  # left padding: needs the real mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, 2:]).logits
        gen = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(out[1, 2:], alone[0], atol=1e-5, rtol=1e-5)
    assert gen.shape == (1, 12) and calls == []


def test_packed_sft_through_trainer_loss_decreases(tiny_model_dir, tmp_path, monkeypatch):
    from _train_helpers import losses, make_config, tokenized_sft_rows

    from lmf.data.collator import SFTCollator
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.train.sft import SFTObjective
    from lmf.train.process import set_seed, setup_runtime
    from lmf.train.trainer import Trainer

    calls = []
    original = packed_attention.varlen_sdpa_forward
    monkeypatch.setattr(packed_attention, "varlen_sdpa_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    cfg = make_config(tiny_model_dir, str(tmp_path), learning_rate=1e-2, max_steps=8, packing=True,
                      gradient_checkpointing=True)
    runtime = setup_runtime(cfg)
    set_seed(cfg.training.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg, tokenizer, is_trainable=True)
    samples = tokenized_sft_rows(tokenizer, n=32, max_len=48)
    rows = []
    for i in range(0, len(samples), 4):  # 4 samples per packed row
        group = samples[i:i + 4]
        row = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": []}
        for s in group:
            for key in ("input_ids", "attention_mask", "labels"):
                row[key] += s[key]
            row["position_ids"] += range(len(s["input_ids"]))
        rows.append(row)
    stage = SFTObjective(cfg, model, SFTCollator(tokenizer))
    state = Trainer(cfg, model, tokenizer, stage, rows, runtime).train()
    curve = losses(state)
    assert len(curve) == 8
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2 - 0.05, curve
    assert calls  # the packed batches took the per-segment path


def test_segments_that_no_attention_layer_used_are_an_error(tiny_model_dir, monkeypatch):
    """A model that does not pass the segments on would have run unmasked attention: fail loudly."""
    model = _load(tiny_model_dir)
    with pytest.raises(RuntimeError, match="packed_sdpa: false"):
        with packed_attention.packed_sdpa(model.config, _position_ids([[3, 5]], 8)) as kwargs:
            assert packed_attention.KWARG in kwargs  # ... but no decoder forward consumes it


def test_segments_of_another_batch_shape_are_refused():
    segments = packed_segments(_position_ids([[3, 5]], 8))
    q = torch.zeros(1, 2, 6, 4)
    with pytest.raises(ValueError, match="computed for 1x8 tokens, attention got 1x6"):
        packed_attention.varlen_sdpa_forward(None, q, q, q, segments)
