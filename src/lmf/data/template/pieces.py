"""The pieces template slots are made of (text, bos/eos markers, vocabulary tokens) and the message roles."""

from __future__ import annotations

from typing import Any, Optional, Union

from lmf.data.template.encoding import single_token_id
from lmf.extras.errors import DataError


class _Marker:
    """A piece resolved with the tokenizer at encode time: one token id, or nothing."""

    def token_id(self, tokenizer) -> Optional[int]:
        raise NotImplementedError

    def text(self, tokenizer) -> Optional[str]:
        raise NotImplementedError


class _Special(_Marker):
    """The tokenizer's bos/eos token (skipped when the tokenizer has none)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def token_id(self, tokenizer) -> Optional[int]:
        return getattr(tokenizer, self.attr + "_id", None)

    def text(self, tokenizer) -> Optional[str]:
        if tokenizer is None:
            return f"<{self.attr}>"
        return str(getattr(tokenizer, self.attr)) if self.token_id(tokenizer) is not None else None

    def __repr__(self) -> str:
        return f"<{self.attr}>"


class Token(_Marker):
    """One vocabulary token by its text (LLaMA-Factory's ``{"token": ...}`` slots, e.g. ChatGLM's ``[gMASK]``)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def token_id(self, tokenizer) -> Optional[int]:
        token_id = single_token_id(tokenizer, self.token)
        if token_id is None:
            raise DataError(f"the chat template needs the token {self.token!r}, which the tokenizer does not have")
        return token_id

    def text(self, tokenizer) -> Optional[str]:
        return self.token

    def __eq__(self, other) -> bool:
        return isinstance(other, Token) and other.token == self.token

    def __hash__(self) -> int:
        return hash(("token", self.token))

    def __repr__(self) -> str:
        return f"Token({self.token!r})"


BOS = _Special("bos_token")
EOS = _Special("eos_token")


class _Const(str):
    """A rendered piece that holds no message text (prefix, system prompt): its ids may be reused."""


#: Most distinct constant pieces kept per encode cache (system prompts are few per dataset).
MAX_CACHED_PIECES = 256

Piece = Union[str, _Marker]
Slots = tuple  # tuple[Piece, ...]

USER, ASSISTANT, OBSERVATION, FUNCTION, SYSTEM = "user", "assistant", "observation", "function", "system"
#: Role spellings accepted on input -> canonical role.
ROLE_ALIASES = {
    "user": USER, "human": USER,
    "assistant": ASSISTANT, "gpt": ASSISTANT, "model": ASSISTANT,
    "observation": OBSERVATION, "tool": OBSERVATION, "ipython": OBSERVATION,
    "function": FUNCTION, "function_call": FUNCTION,
    "system": SYSTEM,
}


def _as_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def canonical_role(role: Any) -> str:
    """Map a role spelling (human/gpt/tool/...) to user/assistant/observation/function/system."""
    key = str(role).strip().lower()
    if key not in ROLE_ALIASES:
        raise DataError(f"unknown message role {role!r}; expected one of: user, assistant, system, tool, function")
    return ROLE_ALIASES[key]
