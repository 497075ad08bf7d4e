"""The word-memo fast path (lmf.data.fast_bpe) gives exactly the Rust tokenizer's ids, or declines."""

from __future__ import annotations

import random

import pytest

from lmf.data.fast_bpe import WordMemoEncoder, eligible_characters
from lmf.data.template import encode_many
from lmf.testing.tiny import build_tokenizer

PIECES = ["1234567", " 89", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", " ", "  ", "\n", "\n\n", "\t", " \n ", "x", "ab",
          "Hello", " world", "12", "3456", " 7", "!", "?!", " (", ")", "--", "\"q\"", "<|im_start|>", "<|im_end|>",
          "<|endoftext|>", "<|im_", "end|>", "a.b", "e.g.,", "  ", "\t\t", " \t\n"]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 30))) for _ in range(n)]


@pytest.mark.parametrize("style", ["gpt2", "qwen2", "llama3"])
def test_word_memo_encoder_matches_the_backend_on_random_ascii(style):
    tok = build_tokenizer(style=style)
    backend = tok._tokenizer
    fast = WordMemoEncoder.for_backend(backend)
    assert fast is not None  # every byte-level BPE pipeline built here is a recognized shape
    texts = _random_texts(3000) + ["", " ", "\n", "<|im_end|>", "12345678 x1234567", "a  \n\n  b\n \t\n"]
    for text in texts:
        assert fast.encode(text) == backend.encode(text, add_special_tokens=False).ids, repr(text)
        assert fast.encode(text) == backend.encode(text, add_special_tokens=False).ids, repr(text)  # memoized


@pytest.mark.parametrize("style", ["gpt2", "qwen2"])
def test_word_memo_encoder_declines_other_texts_and_encode_many_stays_exact(style):
    tok = build_tokenizer(style=style)
    fast = WordMemoEncoder.for_backend(tok._tokenizer)
    # carriage return, vertical tab, no-break space, a combining accent, a ligature, ideographs of the later CJK
    # extensions (A, B, and U+9FA6 of Unicode 4.1), a CJK compatibility ideograph (NFC changes it), OHM SIGN
    for text in ("tab\rreturn", "\x0bvt", "nbsp\u00a0x", "e\u0301", "\ufb01ne", "\u3400", "\U00020000", "\u9fa6",
                 "\uf900", "\u2126"):
        assert fast.encode(text) is None, repr(text)
    texts = _random_texts(200, seed=1) + ["wörld 🙂 x", "a\r\nb", "e\u0301 中文 x"]
    expected = [tok.encode(t, add_special_tokens=False) for t in texts]
    assert encode_many(tok, texts) == expected
    assert encode_many(tok, texts, parallel=True) == expected


def test_unrecognized_tokenizer_shape_has_no_fast_path():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert WordMemoEncoder.for_backend(tok) is None


def test_added_tokens_invalidate_the_fast_encoder():
    tok = build_tokenizer()
    text = "hello <|new|> world"
    assert encode_many(tok, [text]) == [tok.encode(text, add_special_tokens=False)]
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert encode_many(tok, [text]) == [tok.encode(text, add_special_tokens=False)]
    assert tok.convert_tokens_to_ids("<|new|>") in encode_many(tok, [text])[0]


def test_a_normalizer_that_changes_ascii_disables_the_fast_path():
    from tokenizers import normalizers

    tok = build_tokenizer(style="qwen2")
    assert WordMemoEncoder.for_backend(tok._tokenizer) is not None  # NFC: identity on ASCII
    tok._tokenizer.normalizer = normalizers.Lowercase()
    assert WordMemoEncoder.for_backend(tok._tokenizer) is None


def _eligible() -> list[str]:
    letters, numbers, others = eligible_characters()
    return list(letters + numbers + others)


def test_eligible_characters_are_fixed_points_of_nfc():
    import unicodedata

    chars = _eligible()
    assert len(chars) > 25000 and {"é", "’", "“", "°", "²", "₂", "Δ", "ж", "—", "🚀", "中", "文", "龥"} <= set(chars)
    assert not {"\u00a0", "\u0301", "\u2126", "\u200b", "\ufe0f"} & set(chars)
    text = "".join(chars)
    assert unicodedata.normalize("NFC", text) == text
    import sys  # the scan for composition seconds stops at plane 2: nothing above it decomposes

    assert not any(unicodedata.decomposition(chr(cp)) for cp in range(0x30000, sys.maxunicode + 1))
    rng = random.Random(0)
    for _ in range(2000):  # no two eligible characters compose
        pair = rng.choice(chars) + rng.choice(chars + list("aeAE1 "))
        assert unicodedata.normalize("NFC", pair) == pair


@pytest.mark.parametrize("style", ["gpt2", "qwen2", "llama3"])
def test_every_eligible_character_matches_the_backend(style):
    """Each non-ASCII eligible character, next to letters, digits, spaces, itself and punctuation."""
    tok = build_tokenizer(style=style, corpus=_corpus_with_unicode())
    backend = tok._tokenizer
    fast = WordMemoEncoder.for_backend(backend)
    assert fast is not None
    for c in _eligible():
        text = f"a{c}b {c}{c} 1{c}2 {c}x\n{c}'s ({c}) x{c}"
        assert fast.encode(text) == backend.encode(text, add_special_tokens=False).ids, repr(text)


@pytest.mark.parametrize("style", ["gpt2", "qwen2", "llama3"])
def test_random_unicode_texts_match_the_backend(style):
    tok = build_tokenizer(style=style, corpus=_corpus_with_unicode())
    backend = tok._tokenizer
    fast = WordMemoEncoder.for_backend(backend)
    pool = _eligible()
    rng = random.Random(7)
    for _ in range(3000):
        text = "".join(rng.choice(PIECES) if rng.random() < 0.6 else rng.choice(pool) for _ in range(rng.randrange(30)))
        assert fast.encode(text) == backend.encode(text, add_special_tokens=False).ids, repr(text)


def _corpus_with_unicode() -> list[str]:
    """The demo corpus plus text whose multi-byte characters get BPE merges of their own."""
    from lmf.testing.tiny import default_corpus

    extra = ["Café ñandú — it’s 25°C, “x² + y₂” → Δt Привет мир αβγ 🚀 €10 ½ ¿qué?"] * 50
    return default_corpus() + extra


@pytest.mark.parametrize("style", ["gpt2", "qwen2", "llama3", "qwen_real"])
def test_pipeline_spec_read_from_the_components_equals_the_tokenizer_json(style):
    """The fast path reads the pre-tokenizer, normalizer and added tokens without serializing the whole tokenizer
    (~1.5 s for Qwen's vocabulary): the same facts as its JSON."""
    import json

    from lmf.data.fast_bpe import _pipeline_spec

    if style == "qwen_real":
        from lmf.testing.qwen_tokenizer import build_qwen_tokenizer

        backend = build_qwen_tokenizer()._tokenizer
    else:
        backend = build_tokenizer(style=style)._tokenizer
    full, light = json.loads(backend.to_str()), _pipeline_spec(backend)
    assert light["pre_tokenizer"] == full["pre_tokenizer"] and light["normalizer"] == full["normalizer"]
    assert light["model"] == {"type": full["model"]["type"], "dropout": full["model"].get("dropout")}
    keys = ("content", "id", "lstrip", "rstrip", "single_word")
    assert light["added_tokens"] == [{k: t[k] for k in keys} for t in full["added_tokens"]]


@pytest.mark.parametrize("style", ["gpt2", "qwen2", "llama3", "qwen_real"])
def test_texts_with_a_few_ineligible_lines_are_encoded_exactly(style):
    """encode_many cuts a text that the memo declines at line starts and sends only the ineligible lines to the
    backend: the ids equal the backend's for the whole text."""
    if style == "qwen_real":
        from lmf.testing.qwen_tokenizer import build_qwen_tokenizer

        tok = build_qwen_tokenizer()
    else:
        tok = build_tokenizer(style=style)
    rng = random.Random(1)
    rare = ["中文", "\u200b", "\u0301", "\u3000", "\x1c", "\x85", "\r", " \n", "\n\n", "ｆｕｌｌ", "🙂", "\u2028", "x",
            " abc", "a. Bc", "x 中 y", "it's ok", "I'M ", " \u0301a", "e\u0301 b", "1 2", "a  b", "a\t b", " 'll",
            "\u3400\u3401", "中\U00020000文", "\uf900", "a\u3400 b"]
    lines = PIECES + rare
    texts = []
    for _ in range(600):
        sep = ["\n", "\n\n", "\r\n", " \n", "\n ", " ", "", " x"]
        texts.append("".join(rng.choice(lines) + rng.choice(sep) for _ in range(rng.randrange(1, 16))))
    texts += ["a\n中\nb", "x\n\u0301y\nz", "\n\nA", "中\n\n\nB c\n", "line one\nline two 中\nline three\n"]
    expected = [tok._tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert encode_many(tok, texts) == expected


@pytest.mark.parametrize("style", ["qwen2", "qwen_real"])
def test_long_documents_with_rare_characters_take_few_backend_calls(style):
    """A long document with a few declined characters: exact ids, and one backend call per declined piece (the
    piece runs from the cut point before the character to the one after it)."""
    from lmf.data.fast_bpe import WordMemoEncoder

    if style == "qwen_real":
        from lmf.testing.qwen_tokenizer import build_qwen_tokenizer

        tok = build_qwen_tokenizer()
    else:
        tok = build_tokenizer(style=style)
    backend = tok._tokenizer
    fast = WordMemoEncoder.for_backend(backend)
    rng = random.Random(3)
    rare = ["\u200b", "\u0301", "\x85", "\r", "\u3400", "\uf900", "\u2028", "\u00a0"]
    for _ in range(40):
        words = [rng.choice(PIECES) for _ in range(rng.randrange(200, 2000))]
        for _ in range(rng.randrange(0, 6)):
            i = rng.randrange(len(words))
            words[i] = words[i][: rng.randrange(len(words[i]) + 1)] + rng.choice(rare) + words[i]
        text = rng.choice(["", " ", "\n"]).join(words)
        calls = []

        def backend_encode(piece):
            calls.append(piece)
            return backend.encode(piece, add_special_tokens=False).ids

        assert fast.encode_mixed(text, backend_encode) == backend.encode(text, add_special_tokens=False).ids
        declined = sum(1 for c in text if fast.encode(c) is None)
        assert len(calls) <= declined and sum(map(len, calls)) < len(text) / 2 + 200


def test_shipped_eligible_classes_are_this_pythons_and_match_the_characters():
    import re
    import unicodedata

    from lmf.data import fast_bpe
    from lmf.data.fast_bpe_tables import ELIGIBLE_CLASSES, RANGES_DIGEST

    assert RANGES_DIGEST == fast_bpe.ranges_digest(), "ranges changed: run scripts/gen_fast_bpe_tables.py"
    assert ELIGIBLE_CLASSES[unicodedata.unidata_version] == fast_bpe.compute_eligible_classes()
    letters_class, numbers_class, all_class = fast_bpe.eligible_classes()
    letters, numbers, others = eligible_characters()
    assert re.fullmatch(f"[{letters_class}]+", letters) and re.fullmatch(f"[{numbers_class}]+", numbers)
    assert re.fullmatch(f"[{all_class}]+", letters + numbers + others) and not re.search(f"[{all_class}]", "\u00a0\u0301")
