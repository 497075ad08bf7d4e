"""Exact fast path for byte-level BPE tokenizers on plain-ASCII text: pre-tokenize with ``re``, memoize words.

A byte-level BPE tokenizer (GPT-2 / Qwen2 / Llama-3 style; no normalizer, or a Unicode one) encodes a text as: split out the added
tokens (``<|im_start|>`` ...), split the rest into words with the pre-tokenizer's regex, run BPE on each
byte-mapped word on its own, concatenate. The ids of a word never depend on its neighbours, so the ids
of each distinct word are computed once (by the tokenizer's own BPE model) and reused. Most of the Rust
tokenizer's time goes into per-text bookkeeping (offsets, alignments, token strings) that
preprocessing never reads; skipping it is ~5x faster.

Exactness: the fast path is used only for a tokenizer whose pipeline is exactly one of the recognized
shapes (checked on its serialized JSON, then on probe texts against the backend), and only for texts
made of printable ASCII, tab and newline, where the regex classes ``\\p{L}``, ``\\p{N}``, ``\\s`` have one
unambiguous meaning. Any other text returns None and the caller uses the backend.
"""

from __future__ import annotations

import json
import re
from typing import Optional

#: The GPT-2 pattern of ``ByteLevel(use_regex=True)`` and the Qwen2 ``Split`` pattern, each with its
#: translation for printable ASCII + tab + newline (``\p{L}`` = [A-Za-z], ``\p{N}`` = [0-9]).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
ASCII_PATTERNS = {
    GPT2_PATTERN: r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+",
    QWEN2_PATTERN: (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+"),
    LLAMA3_PATTERN: (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}| ?[^\sA-Za-z0-9]+[\r\n]*|"
                     r"\s*[\r\n]+|\s+(?!\S)|\s+"),
}
#: Unicode normalizations leave ASCII text unchanged (Qwen2/Qwen3 tokenizers use NFC).
ASCII_IDENTITY_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}
_NOT_ELIGIBLE = re.compile(r"[^\x20-\x7e\t\n]")  # a text with any other character goes to the backend
#: Most distinct words remembered (like the Rust BPE word cache, the memo stops growing when full).
MAX_WORDS = 100_000

PROBES = (
    "Hello <|im_start|>user\n world <|im_end|>\n  x\t1+2 <s></s><|endoftext|>",
    "It's 12,345.67 -- they'll  say: \"don't\"\n\n\n  (a)[b]{c} x\t\ty   \n end ",
    "<|im_start|><|im_end|>ab<|im_start|>  \n<|endoftext|>'S 'LL I'M WE'RE 9999 x2y3\n \n",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = dict(zip(printable, map(chr, printable))), 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _ascii_pattern(spec: dict) -> Optional[str]:
    """The ASCII word pattern of a recognized pre-tokenizer spec, else None."""
    pre, normalizer = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") not in ASCII_IDENTITY_NORMALIZERS:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return ASCII_PATTERNS[GPT2_PATTERN]
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        if split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert") \
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True) \
                and not byte_level.get("add_prefix_space"):
            return ASCII_PATTERNS.get((split.get("pattern") or {}).get("Regex"))
    return None


class WordMemoEncoder:
    """``encode(text)``: the backend's ids for an eligible text (else None), from memoized word ids."""

    def __init__(self, backend, word_pattern: str, added_tokens: dict[str, int]) -> None:
        self._model = backend.model
        self._words = re.compile(word_pattern)
        self._added = added_tokens
        longest_first = sorted(added_tokens, key=len, reverse=True)  # leftmost-longest match, as the backend
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if added_tokens else None
        self._byte_chars = {b: c for b, c in _bytes_to_unicode().items() if b < 128}
        self._memo: dict[str, list[int]] = {}

    @classmethod
    def for_backend(cls, backend) -> Optional["WordMemoEncoder"]:
        """An encoder for a ``tokenizers.Tokenizer`` of a recognized shape that agrees on the probes, else None."""
        try:
            spec = json.loads(backend.to_str())
            model = spec.get("model") or {}
            pattern = _ascii_pattern(spec)
            if model.get("type") != "BPE" or model.get("dropout") or pattern is None:
                return None
            added = {}
            for token in spec.get("added_tokens") or []:
                if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
                    return None
                added[token["content"]] = token["id"]
            encoder = cls(backend, pattern, added)
            for probe in PROBES:
                if encoder.encode(probe) != backend.encode(probe, add_special_tokens=False).ids:
                    return None
            encoder._memo.clear()
            return encoder
        except Exception:  # any unexpected tokenizer shape: no fast path
            return None

    def _word_ids(self, word: str) -> list[int]:
        ids = [token.id for token in self._model.tokenize(word.translate(self._byte_chars))]
        if len(self._memo) < MAX_WORDS:
            self._memo[word] = ids
        return ids

    def encode(self, text: str) -> Optional[list[int]]:
        """Ids of ``text`` (exactly the backend's, no special tokens added); None when not eligible."""
        if _NOT_ELIGIBLE.search(text):
            return None
        memo, findall = self._memo, self._words.findall
        out: list[int] = []
        segments = self._split.split(text) if self._split is not None else [text]
        for k, segment in enumerate(segments):
            if k % 2:  # an added token
                out.append(self._added[segment])
                continue
            for word in findall(segment):
                ids = memo.get(word)
                out += ids if ids is not None else self._word_ids(word)
        return out
