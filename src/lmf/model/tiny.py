"""Build tiny, randomly initialised causal LMs with a locally trained tokenizer.

Used by the tests, the benchmarks and the README demo: no network, real ``save_pretrained`` /
``from_pretrained`` round trip. ``python -m lmf.model.tiny OUT_DIR [--arch qwen3|llama]``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Iterable, Optional

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_FALLBACK_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How can I help you today?",
    "Write a short poem about the sea.",
    "Describe a process of making crepes.",
    "1 2 3 4 5 6 7 8 9 10 + - * / = ( ) [ ] { } < > : ; , . ! ?",
]


def default_corpus() -> list[str]:
    """Text to train the tiny tokenizer on: the bundled demo data when present, else a fallback."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.path.join(here, "..", "..", "..", "examples", "data", "alpaca_en_demo.json"),
        os.path.join(here, "..", "..", "..", "..", "shared", "data", "lf-demo", "alpaca_en_demo.json"),
    ]
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                records = json.load(fh)
            texts = []
            for r in records:
                texts.extend(str(r.get(k, "")) for k in ("instruction", "input", "output"))
            return texts + _FALLBACK_CORPUS
    return _FALLBACK_CORPUS * 50


def build_tokenizer(vocab_size: int = 2048, corpus: Optional[Iterable[str]] = None):
    """Train a byte-level BPE tokenizer locally and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_config(arch: str, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 num_kv_heads: int = 2, intermediate_size: int = 128, max_position_embeddings: int = 4096,
                 tie_word_embeddings: bool = False, **extra):
    """A transformers config of the given architecture, sized for tests."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **extra,
    )
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(head_dim=hidden_size // num_heads, **common)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose qwen3 or llama")


def build_tiny_model(out_dir: str, arch: str = "qwen3", vocab_size: int = 2048, seed: int = 0,
                     tokenizer=None, **config_kwargs) -> str:
    """Build, randomly initialise and save a tiny model + tokenizer to ``out_dir``; return ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(vocab_size)
    config = build_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    config.bos_token_id = None
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random causal LM + local tokenizer.")
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="qwen3", choices=("qwen3", "llama"))
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_tiny_model(args.out_dir, arch=args.arch, vocab_size=args.vocab_size, seed=args.seed,
                     hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"tiny {args.arch} model written to {args.out_dir}")


if __name__ == "__main__":
    main()
