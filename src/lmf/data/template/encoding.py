"""Tokenizing template pieces fast and exactly: ``encode_text`` / ``encode_many`` give the ids of
``tokenizer.encode(text, add_special_tokens=False)`` through the Rust backend (checked once per tokenizer)
and the word-memo BPE path of :mod:`lmf.data.fast_bpe` where it is exact."""

from __future__ import annotations

from typing import Optional


_PROBE = "Hello <|im_start|>user\n wörld <|im_end|>\n  x\t1+2 <s></s><|endoftext|>"


def _backend(tokenizer):
    """The tokenizer's Rust backend when it gives ``tokenizer.encode(text, add_special_tokens=False)``'s ids
    (checked once per tokenizer on a probe text), else None."""
    ok = getattr(tokenizer, "_lmf_backend_ok", None)
    if ok is None:
        backend = getattr(tokenizer, "_tokenizer", None)
        try:
            ok = backend is not None and backend.encode(_PROBE, add_special_tokens=False).ids == \
                tokenizer.encode(_PROBE, add_special_tokens=False) and \
                [e.ids for e in backend.encode_batch([_PROBE, "x"], add_special_tokens=False)] == \
                [tokenizer.encode(t, add_special_tokens=False) for t in (_PROBE, "x")]
        except Exception:  # any backend quirk: use the regular path
            ok = False
        try:
            tokenizer._lmf_backend_ok = ok
        except AttributeError:
            pass
    return tokenizer._tokenizer if ok else None


def prepare_fast_encoder(tokenizer) -> None:
    """Build the word-memo encoder of ``tokenizer`` now (before worker processes fork, so they inherit it)."""
    backend = _backend(tokenizer)
    if backend is not None:
        _fast_encoder(tokenizer, backend)


def _fast_encoder(tokenizer, backend):
    """The exact word-memo encoder (:mod:`lmf.data.fast_bpe`) for this tokenizer, or None; rebuilt when the
    vocabulary size changes (added tokens change how a text is split)."""
    size = backend.get_vocab_size(with_added_tokens=True)
    cached = getattr(tokenizer, "_lmf_fast_encoder", None)
    if cached is not None and cached[0] == size:
        return cached[1]
    from lmf.data.fast_bpe import WordMemoEncoder

    fast = WordMemoEncoder.for_backend(backend)
    try:
        tokenizer._lmf_fast_encoder = (size, fast)
    except AttributeError:
        pass
    return fast


def encode_text(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode(text, add_special_tokens=False)``, through the fast paths when they are equivalent.

    The backend path skips transformers' per-call Python overhead; the word-memo path
    (:mod:`lmf.data.fast_bpe`, text of eligible characters -- ASCII, common
    Latin/Greek/Cyrillic letters, punctuation, symbols, emoji -- for a byte-level BPE tokenizer) also skips the Rust
    tokenizer's per-text bookkeeping.
    """
    return encode_many(tokenizer, [text])[0]


def encode_many(tokenizer, texts: list[str], parallel: bool = False) -> list[list[int]]:
    """:func:`encode_text` of each text (the same ids as ``tokenizer.encode(text, add_special_tokens=False)``).

    ``parallel``: the texts the word-memo path does not take go to one backend ``encode_batch`` call,
    which runs on the tokenizers thread pool (all cores, or ``RAYON_NUM_THREADS``; serial when
    ``TOKENIZERS_PARALLELISM`` is false). Off by default: preprocessing uses
    ``preprocessing_num_workers`` processes, one core each.
    """
    backend = _backend(tokenizer) if texts else None
    if backend is None:
        return [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    fast = _fast_encoder(tokenizer, backend)
    out = [fast.encode(text) for text in texts] if fast is not None else [None] * len(texts)
    rest = [i for i, ids in enumerate(out) if ids is None]
    if parallel and len(rest) > 1:
        for i, encoding in zip(rest, backend.encode_batch([texts[i] for i in rest], add_special_tokens=False)):
            out[i] = encoding.ids
    else:
        def encode(text: str) -> list[int]:
            return backend.encode(text, add_special_tokens=False).ids

        for i in rest:
            out[i] = fast.encode_mixed(texts[i], encode) if fast is not None else encode(texts[i])
    return out


def single_token_id(tokenizer, token: str) -> Optional[int]:
    """Id of ``token`` when it is one token of the vocabulary, else None."""
    vocab_id = tokenizer.convert_tokens_to_ids(token)
    if vocab_id is None or (tokenizer.unk_token_id is not None and vocab_id == tokenizer.unk_token_id
                            and token != tokenizer.unk_token):
        return None
    return vocab_id
