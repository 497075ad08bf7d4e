"""A character-level tokenizer with predictable ids, for tests and examples.

Every ASCII character ``c`` has id ``ord(c)``; special tokens get ids 128, 129, ... in the order
given. So ``"Hi\\n"`` encodes to ``[72, 105, 10]`` and expected ids can be written out by hand.
"""

from __future__ import annotations

from typing import Optional, Sequence

DEFAULT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def build_char_tokenizer(special_tokens: Sequence[str] = DEFAULT_SPECIALS, eos_token: Optional[str] = "<|im_end|>",
                         pad_token: Optional[str] = "<|endoftext|>", bos_token: Optional[str] = None,
                         chat_template: Optional[str] = None):
    """``PreTrainedTokenizerFast`` mapping ASCII char -> ord(char), specials -> 128 + position."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(128)}
    unk = "\x00"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    specials = list(dict.fromkeys([*special_tokens, *(t for t in (eos_token, pad_token, bos_token) if t)]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, model_max_length=1 << 20)
    fast.add_special_tokens({k: v for k, v in (("eos_token", eos_token), ("pad_token", pad_token),
                                               ("bos_token", bos_token)) if v})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
