"""Build tiny, randomly initialised causal LMs with a locally trained tokenizer.

Used by the tests, the benchmarks and the README demo: no network, real ``save_pretrained`` /
``from_pretrained`` round trip. ``python -m lmf.testing.tiny OUT_DIR [--arch qwen3|llama]``.
"""

from __future__ import annotations

import argparse
import functools
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


def build_tokenizer(vocab_size: int = 2048, corpus: Optional[Iterable[str]] = None, style: str = "gpt2"):
    """Train a byte-level BPE tokenizer locally and wrap it as a ``PreTrainedTokenizerFast``.

    ``style`` picks the pre-tokenization pipeline: ``gpt2`` (ByteLevel regex), ``qwen2`` (NFC + Qwen2's
    Split regex + ByteLevel, as Qwen2/Qwen3 ship) or ``llama3`` (Llama-3's Split regex + ByteLevel). With the default
    corpus the trained tokenizer is kept per process (training takes ~0.8 s; test fixtures build many).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if corpus is None:
        tok = Tokenizer.from_str(_trained_on_default_corpus(vocab_size, style))
    else:
        tok = _train_bpe(vocab_size, list(corpus), style)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


@functools.lru_cache(maxsize=None)
def _trained_on_default_corpus(vocab_size: int, style: str) -> str:
    return _train_bpe(vocab_size, list(default_corpus()), style).to_str()


def _train_bpe(vocab_size: int, corpus: list, style: str):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from lmf.data.fast_bpe import LLAMA3_PATTERN, QWEN2_PATTERN

    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style in ("qwen2", "llama3"):
        pattern = QWEN2_PATTERN if style == "qwen2" else LLAMA3_PATTERN
        if style == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; expected gpt2, qwen2 or llama3")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


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


def pretraining_texts(data_dir: Optional[str] = None) -> list[str]:
    """Chat-formatted alpaca demo records and c4 demo text (not the identity data: the demo fine-tunes on it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    data_dir = data_dir or os.path.join(here, "..", "..", "..", "examples", "data")
    texts: list[str] = []
    alpaca = os.path.join(data_dir, "alpaca_en_demo.json")
    if os.path.isfile(alpaca):
        with open(alpaca, encoding="utf-8") as fh:
            for r in json.load(fh):
                user = (r.get("instruction", "") + "\n" + r.get("input", "")).strip()
                texts.append(
                    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{r.get('output', '')}<|im_end|>\n"
                )
    c4 = os.path.join(data_dir, "c4_demo.jsonl")
    if os.path.isfile(c4):
        with open(c4, encoding="utf-8") as fh:
            texts.extend(json.loads(line)["text"] for line in fh if line.strip())
    return texts or _FALLBACK_CORPUS * 50


def pretrain_tiny_model(model_dir: str, texts: Optional[list[str]] = None, steps: int = 300, seq_len: int = 128,
                        batch_size: int = 16, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Briefly pre-train a tiny model in place (full parameters, next-token loss on random windows of ``texts``).

    A randomly initialised model cannot show what LoRA fine-tuning does (its frozen head keeps
    every prediction near uniform); a few hundred steps give it token statistics and the chat
    format, so the demo's LoRA SFT has a loss that clearly goes down. Returns the loss curve.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids: list[int] = []
    for text in texts if texts is not None else pretraining_texts():
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.pad_token_id])
    stream = torch.tensor(ids, dtype=torch.long)
    if stream.numel() <= seq_len + 1:
        raise ValueError("not enough text to pre-train on")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    curve = []
    for _ in range(steps):
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,))
        batch = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(float(loss))
    model.eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    return curve


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random causal LM + local tokenizer.")
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="qwen3", choices=("qwen3", "llama"))
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="pre-train briefly on the bundled demo text (the bundled examples/tiny-qwen3 uses 400)")
    parser.add_argument("--tokenizer-from", default=None, help="reuse the tokenizer saved in this directory")
    args = parser.parse_args(argv)
    tokenizer = None
    if args.tokenizer_from:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_from)
    build_tiny_model(args.out_dir, arch=args.arch, vocab_size=args.vocab_size, seed=args.seed, tokenizer=tokenizer,
                     hidden_size=args.hidden_size, num_layers=args.layers)
    if args.pretrain_steps > 0:
        curve = pretrain_tiny_model(args.out_dir, steps=args.pretrain_steps, seed=args.seed)
        print(f"pre-trained {args.pretrain_steps} steps: loss {curve[0]:.3f} -> {sum(curve[-10:]) / 10:.3f}")
    print(f"tiny {args.arch} model written to {args.out_dir}")


if __name__ == "__main__":
    main()
