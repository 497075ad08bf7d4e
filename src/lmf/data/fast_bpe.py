"""Exact fast path for byte-level BPE tokenizers: pre-tokenize with ``re``, memoize words.

A byte-level BPE tokenizer (GPT-2 / Qwen2 / Llama-3 style; no normalizer, or a Unicode one) encodes a text as: split out the added
tokens (``<|im_start|>`` ...), split the rest into words with the pre-tokenizer's regex, run BPE on each
byte-mapped word on its own, concatenate. The ids of a word never depend on its neighbours, so the ids
of each distinct word are computed once (by the tokenizer's own BPE model) and reused. Most of the Rust
tokenizer's time goes into per-text bookkeeping (offsets, alignments, token strings) that
preprocessing never reads; skipping it is ~5x faster.

Exactness: the fast path is used only for a tokenizer whose pipeline is exactly one of the recognized
shapes (checked on its serialized JSON, then on probe texts against the backend), and only for texts
made of *eligible* characters, on which the regex classes ``\\p{L}``, ``\\p{N}``, ``\\s`` and the Unicode
normalizations have one unambiguous meaning whatever the Unicode version of either regex engine:

- printable ASCII, tab and newline;
- letters and numbers of the long-stable alphabetic blocks (Latin-1, Latin Extended-A/B, Greek,
  Cyrillic, super/subscript digits): ``é``, ``ñ``, ``Δ``, ``²``, ``₂`` ...;
- the CJK Unified Ideographs of Unicode 1.1 (U+4E00-U+9FA5, ``中文``): letters (Lo) in every Unicode version, no
  decompositions; a run of them is one word of the pre-tokenizer, like a run of Latin letters;
- punctuation and symbols (``’ “ ” – — ° × √ → €`` and emoji): whatever their Unicode version, they are
  neither letters, numbers nor spaces, so every regex engine puts them in ``[^\\s\\p{L}\\p{N}]``;
- in every case: no spaces but `` ``, no controls or format characters, no combining marks, and only
  characters that NFC/NFD/NFKC/NFKD... leave alone: each is its own NFC form and never the second half
  of a canonical composition (so a normalizer that is NFC is the identity on the text).

Any other text returns None and the caller uses the backend.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
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
#: Unicode normalizations that leave eligible text unchanged (Qwen2/Qwen3 tokenizers use NFC).
IDENTITY_NORMALIZERS = {"NFC"}
#: ... and those that leave plain ASCII unchanged (a text with non-ASCII characters then goes to the backend).
ASCII_IDENTITY_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}
#: Blocks whose letters and numbers have had the same general category since Unicode 1.1-4.1.
STABLE_ALPHABETIC_RANGES = ((0x00AA, 0x00FF), (0x0100, 0x024F), (0x0370, 0x03FF), (0x0400, 0x04FF),
                            (0x2070, 0x209F))
#: ... and the CJK Unified Ideographs assigned in Unicode 1.1 (all Lo since then; the later extensions are not taken).
STABLE_IDEOGRAPH_RANGES = ((0x4E00, 0x9FA5),)
#: Where eligible punctuation and symbols are taken from (assigned ones only).
SYMBOL_RANGES = ((0x00A1, 0x00BF), (0x00D7, 0x00D7), (0x00F7, 0x00F7), (0x2010, 0x2027), (0x2030, 0x205E),
                 (0x20A0, 0x20CF), (0x2100, 0x214F), (0x2190, 0x23FF), (0x2460, 0x24FF), (0x2500, 0x27BF),
                 (0x2900, 0x2BFF), (0x3000, 0x303F), (0xFF01, 0xFF60), (0x1F000, 0x1FAFF))
#: Most distinct words remembered (like the Rust BPE word cache, the memo stops growing when full).
MAX_WORDS = 100_000
#: Where a text may be cut and its pieces encoded apart: after a newline, before printable non-space ASCII. No word
#: of the Qwen2 / Llama-3 patterns spans such a point (none continues a run of newlines with a non-space character;
#: the space runs before it end at the newline either way), and NFC composes nothing across it.
LINE_START = re.compile(r"(?<=\n)(?=[!-~])")
#: ... and, inside a line, before a space that follows printable ASCII and precedes an ASCII letter: the space
#: starts the next word (``[^\r\n\p{L}\p{N}]?\p{L}+``) and no word before it takes a trailing space.
WORD_START = re.compile(r"(?<=[!-~])(?= [A-Za-z])")
#: Either kind of cut point.
CUT = re.compile(LINE_START.pattern + "|" + WORD_START.pattern)

PROBES = (
    "Hello <|im_start|>user\n world <|im_end|>\n  x\t1+2 <s></s><|endoftext|>",
    "It's 12,345.67 -- they'll  say: \"don't\"\n\n\n  (a)[b]{c} x\t\ty   \n end ",
    "<|im_start|><|im_end|>ab<|im_start|>  \n<|endoftext|>'S 'LL I'M WE'RE 9999 x2y3\n \n",
)
UNICODE_PROBES = (
    "Café ñandú — it’s 25°C, “x² + y₂” ≈ √2 → ok… Δt=3μs, Ωmega Привет мир, 5×7 €10 🚀🎮 ½ ¿qué? ",
    "é’s ’S “ ” ′ x–y ²³₁₂ αβγ ΑΒΓ Ж\n’ \n° 🚀x 1½ ǅ ǈ ª º µ",
    "识别并解释给定列表中的两个科学理论：细胞理论和日心说。\n“中文”，英文abc中文 123中文 （括号）、顿号 ’s中",
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


def _composition_seconds() -> set[str]:
    """Characters that can be the second half of a canonical composition (NFC would merge them)."""
    seconds = set()
    # the scan over every code point runs in C; only the ~2000 canonical decompositions reach Python
    # (no code point above plane 2 has a decomposition: the last are the CJK compatibility ideographs at U+2FA1D)
    for decomposition in filter(None, map(unicodedata.decomposition, map(chr, range(0x30000)))):
        if not decomposition.startswith("<"):
            seconds.update(chr(int(p, 16)) for p in decomposition.split()[1:])
    return seconds


@functools.lru_cache(maxsize=None)
def eligible_characters() -> tuple[str, str, str]:
    """``(letters, numbers, others)``: the non-ASCII characters the fast path accepts (module docstring)."""
    seconds = _composition_seconds()

    def stable(c: str) -> bool:
        return unicodedata.normalize("NFC", c) == c and unicodedata.combining(c) == 0 and c not in seconds

    letters, numbers, others = [], [], []
    for lo, hi in STABLE_ALPHABETIC_RANGES + STABLE_IDEOGRAPH_RANGES:
        for cp in range(lo, hi + 1):
            c, cat = chr(cp), unicodedata.category(chr(cp))
            if cat[0] in "LN" and stable(c):
                (letters if cat[0] == "L" else numbers).append(c)
    for lo, hi in SYMBOL_RANGES:
        for cp in range(lo, hi + 1):
            c = chr(cp)
            if unicodedata.category(c)[0] in "PS" and stable(c):
                others.append(c)
    return "".join(letters), "".join(numbers), "".join(others)


def _char_class(chars: str) -> str:
    """``chars`` as the body of a regex character class, with runs of code points as ranges."""
    out, cps, i = [], sorted(map(ord, set(chars))), 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        out.append(re.escape(chr(cps[i])) + (("-" + re.escape(chr(cps[j]))) if j > i else ""))
        i = j + 1
    return "".join(out)


def ranges_digest() -> str:
    """Fingerprint of the ranges the eligible characters are taken from (a shipped table is for these ranges)."""
    import hashlib

    ranges = repr((STABLE_ALPHABETIC_RANGES, STABLE_IDEOGRAPH_RANGES, SYMBOL_RANGES))
    return hashlib.sha256(ranges.encode()).hexdigest()[:16]


def compute_eligible_classes() -> tuple[str, str, str]:
    """Regex class bodies of the eligible ``(letters, numbers, all)`` characters, from this Python's Unicode tables."""
    letters, numbers, others = eligible_characters()
    return _char_class(letters), _char_class(numbers), _char_class(letters + numbers + others)


@functools.lru_cache(maxsize=None)
def eligible_classes() -> tuple[str, str, str]:
    """:func:`compute_eligible_classes`, from the table shipped for this Unicode version when there is one (~40 ms of
    scanning code points saved per process; ``scripts/gen_fast_bpe_tables.py`` writes it, a test checks it)."""
    from lmf.data.fast_bpe_tables import ELIGIBLE_CLASSES, RANGES_DIGEST

    shipped = ELIGIBLE_CLASSES.get(unicodedata.unidata_version)
    if shipped is not None and RANGES_DIGEST == ranges_digest():
        return shipped
    return compute_eligible_classes()


def _unicode_pattern(ascii_pattern: str) -> str:
    """An ASCII word pattern widened to the eligible letters and numbers."""
    letters, numbers, _ = eligible_classes()
    return ascii_pattern.replace("A-Za-z", "A-Za-z" + letters).replace("0-9", "0-9" + numbers)


def _not_eligible(unicode: bool) -> re.Pattern:
    """Matches the first character that sends a text to the backend."""
    if not unicode:
        return re.compile(r"[^\x20-\x7e\t\n]")
    return re.compile(r"[^\x20-\x7e\t\n" + eligible_classes()[2] + "]")


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


def _pipeline_spec(backend) -> dict:
    """The parts of the tokenizer's JSON the fast path checks (model type, pre-tokenizer, normalizer, added
    tokens), read from the components: serializing the whole tokenizer (151k-entry vocab and merges for Qwen)
    and parsing it back costs ~1.5 s per process."""
    try:
        model = backend.model
        if type(model).__name__ != "BPE":
            return {"model": {"type": type(model).__name__}}
        added = [{"content": t.content, "id": i, "lstrip": t.lstrip, "rstrip": t.rstrip, "single_word": t.single_word}
                 for i, t in sorted(backend.get_added_tokens_decoder().items())]

        def state(component):
            return None if component is None else json.loads(component.__getstate__())

        return {"model": {"type": "BPE", "dropout": model.dropout}, "pre_tokenizer": state(backend.pre_tokenizer),
                "normalizer": state(backend.normalizer), "added_tokens": added}
    except (AttributeError, TypeError, ValueError):  # another tokenizers version: the full JSON
        return json.loads(backend.to_str())


def _cut_before(text: str, p: int) -> int:
    """The last cut point at or before ``p`` (0 when none)."""
    width = 256
    while True:
        lo = max(0, p - width)
        last = None
        for last in CUT.finditer(text, lo, p + 1):  # lookbehinds see before ``lo``: the same cuts as on the whole text
            pass
        if last is not None:
            return last.start()
        if lo == 0:
            return 0
        width *= 4


def _cut_after(text: str, p: int) -> int:
    """The first cut point after ``p`` (``len(text)`` when none)."""
    match = CUT.search(text, p + 1)
    return match.start() if match else len(text)


class WordMemoEncoder:
    """``encode(text)``: the backend's ids for an eligible text (else None), from memoized word ids."""

    def __init__(self, backend, word_pattern: str, added_tokens: dict[str, int], unicode: bool = True) -> None:
        """``word_pattern``: the ASCII translation of the pre-tokenizer regex; ``unicode``: also accept the
        eligible non-ASCII characters (the pattern is widened to them)."""
        self._model = backend.model
        self._words = re.compile(_unicode_pattern(word_pattern) if unicode else word_pattern)
        self._not_eligible = _not_eligible(unicode)
        self._added = added_tokens
        # GPT-2's pattern ends a space run with a look-ahead (``\s+(?!\S)``) that sees across a cut; the Qwen2 and
        # Llama-3 patterns take every space run ending in newlines first (``\s*[\r\n]+``), so the cut is exact
        self._cuttable = r"\s*[\r\n]+" in word_pattern and not any("\n" in token for token in added_tokens)
        longest_first = sorted(added_tokens, key=len, reverse=True)  # leftmost-longest match, as the backend
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if added_tokens else None
        self._byte_table = _bytes_to_unicode()
        self._byte_chars = {b: c for b, c in self._byte_table.items() if b < 128}
        self._memo: dict[str, list[int]] = {}

    @classmethod
    def for_backend(cls, backend) -> Optional["WordMemoEncoder"]:
        """An encoder for a ``tokenizers.Tokenizer`` of a recognized shape that agrees on the probes, else None."""
        try:
            spec = _pipeline_spec(backend)
            model = spec.get("model") or {}
            pattern = _ascii_pattern(spec)
            if model.get("type") != "BPE" or model.get("dropout") or pattern is None:
                return None
            added = {}
            for token in spec.get("added_tokens") or []:
                if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
                    return None
                added[token["content"]] = token["id"]
            normalizer = spec.get("normalizer")
            unicode = normalizer is None or normalizer.get("type") in IDENTITY_NORMALIZERS
            encoder = cls(backend, pattern, added, unicode=unicode)
            for probe in PROBES + (UNICODE_PROBES if unicode else ()):
                if encoder.encode(probe) != backend.encode(probe, add_special_tokens=False).ids:
                    return None
            encoder._memo.clear()
            return encoder
        except Exception:  # any unexpected tokenizer shape: no fast path
            return None

    def _word_ids(self, word: str) -> list[int]:
        if word.isascii():
            mapped = word.translate(self._byte_chars)
        else:
            mapped = word.encode("utf-8").decode("latin-1").translate(self._byte_table)  # each byte as its code point
        ids = [token.id for token in self._model.tokenize(mapped)]
        if len(self._memo) < MAX_WORDS:
            self._memo[word] = ids
        return ids

    def encode_mixed(self, text: str, backend_encode) -> list[int]:
        """Ids of any text: each character the memo path declines takes the piece around it (from the cut point
        before it to the one after it, :data:`CUT`) to ``backend_encode``, overlapping or touching pieces
        together; the spans between those pieces, which start and end at cut points, come from the memo. A long
        document with a few rare characters costs a few backend calls, not one per line or word."""
        if not self._cuttable:
            return backend_encode(text)
        regions: list[list[int]] = []  # declined [start, end) pieces, merged
        for match in self._not_eligible.finditer(text):
            p = match.start()
            if regions and p < regions[-1][1]:
                continue  # inside the piece already declined
            lo, hi = _cut_before(text, p), _cut_after(text, p)
            if regions and lo <= regions[-1][1]:
                regions[-1][1] = hi
            else:
                regions.append([lo, hi])
        out: list[int] = []
        done = 0
        for lo, hi in regions:
            if lo > done:
                out.extend(self.encode(text[done:lo]))  # eligible by construction: no declined character
            out.extend(backend_encode(text[lo:hi]))
            done = hi
        if done < len(text):
            out.extend(self.encode(text[done:]))
        return out

    def encode(self, text: str) -> Optional[list[int]]:
        """Ids of ``text`` (exactly the backend's, no special tokens added); None when not eligible."""
        if self._not_eligible.search(text):
            return None
        lookup, findall = self._memo.get, self._words.findall
        out: list[int] = []
        segments = self._split.split(text) if self._split is not None else [text]
        for k, segment in enumerate(segments):
            if k % 2:  # an added token
                out.append(self._added[segment])
                continue
            words = findall(segment)
            word_ids = list(map(lookup, words))
            if None in word_ids:  # words seen for the first time
                word_ids = [ids if ids is not None else self._word_ids(w) for w, ids in zip(words, word_ids)]
            extend = out.extend  # a loop of list.extend: 2x faster than extend(chain(...)) on short id lists
            for ids in word_ids:
                extend(ids)
        return out
