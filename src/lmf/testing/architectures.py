"""Tiny random-init configs of the decoder families LLaMA-Factory fine-tunes, for the architecture matrix test.

``tiny_config(name, vocab_size)`` -> a transformers config with a few small layers (hidden 64, 2-4 layers,
MoE with 4 experts where the family has experts); ``None`` when the installed transformers lacks the class.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

HIDDEN, HEADS, KV_HEADS, INTER = 64, 4, 2, 128


def _common(vocab_size: int, **extra: Any) -> dict:
    out = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
               tie_word_embeddings=False, head_dim=HIDDEN // HEADS)
    out.update(extra)
    return out


def _moe(**extra: Any) -> dict:
    return dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **extra)


#: name -> (config class name, kwargs builder)
ARCHITECTURES: dict[str, tuple[str, Callable[[int], dict]]] = {
    "llama": ("LlamaConfig", lambda v: _common(v)),
    "mistral": ("MistralConfig", lambda v: _common(v, sliding_window=None)),
    "mixtral": ("MixtralConfig", lambda v: _common(v, num_local_experts=4, num_experts_per_tok=2,
                                                   sliding_window=None)),
    "qwen2": ("Qwen2Config", lambda v: _common(v)),
    "qwen3": ("Qwen3Config", lambda v: _common(v)),
    "qwen3_moe": ("Qwen3MoeConfig", lambda v: _common(v, **_moe(decoder_sparse_step=1))),
    "qwen3_next": ("Qwen3NextConfig", lambda v: _common(
        v, **_moe(shared_expert_intermediate_size=32, decoder_sparse_step=1), num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4)),
    "qwen3_5": ("Qwen3_5TextConfig", lambda v: _common(
        v, num_hidden_layers=4, layer_types=["linear_attention", "linear_attention", "linear_attention",
                                             "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel_dim=4)),
    "gemma2": ("Gemma2Config", lambda v: _common(v, sliding_window=64, query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", lambda v: _common(v, sliding_window=64, query_pre_attn_scalar=16)),
    "gemma4": ("Gemma4TextConfig", lambda v: _common(v, sliding_window=64, vocab_size_per_layer_input=v,
                                                      hidden_size_per_layer_input=16, global_head_dim=16)),
    "gpt_oss": ("GptOssConfig", lambda v: _common(v, num_local_experts=4, num_experts_per_tok=2,
                                                   sliding_window=64, layer_types=["sliding_attention",
                                                                                   "full_attention"])),
    "phi3": ("Phi3Config", lambda v: _common(v, pad_token_id=0)),
    "olmo2": ("Olmo2Config", lambda v: _common(v)),
    "olmo3": ("Olmo3Config", lambda v: _common(v, sliding_window=64)),
    "glm4": ("Glm4Config", lambda v: _common(v)),
    "glm4_moe": ("Glm4MoeConfig", lambda v: _common(v, n_routed_experts=4, num_experts_per_tok=2,
                                                    moe_intermediate_size=32, n_shared_experts=1,
                                                    first_k_dense_replace=1, n_group=1, topk_group=1)),
    "granite": ("GraniteConfig", lambda v: _common(v)),
    "llama4_text": ("Llama4TextConfig", lambda v: _common(v, num_local_experts=4, num_experts_per_tok=1,
                                                          intermediate_size_mlp=INTER, interleave_moe_layer_step=1,
                                                          no_rope_layers=[1, 1], attention_chunk_size=64)),
    "deepseek_v3": ("DeepseekV3Config", lambda v: _common(
        v, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, head_dim=8)),
}


def tiny_config(name: str, vocab_size: int) -> Optional[Any]:
    """The tiny config of ``name``, or None when this transformers has no such config class."""
    import transformers

    class_name, kwargs = ARCHITECTURES[name]
    cls = getattr(transformers, class_name, None)
    return None if cls is None else cls(**kwargs(vocab_size))
