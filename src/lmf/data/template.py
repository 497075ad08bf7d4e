"""Chat templates: turn a conversation into token ids, split into (prompt, response) pairs.

A template is a set of *slots* per role. A slot is a tuple of pieces: plain strings (``{{content}}``
is replaced by the message text) or the markers :data:`BOS` / :data:`EOS` (the tokenizer's bos/eos
token, skipped when the tokenizer has none). Each message is rendered and tokenized on its own, so
the boundary between prompt and response never falls inside a token.

Named templates follow LLaMA-Factory's ``src/llamafactory/data/template.py`` (same slot strings,
default systems, stop words). ``template: auto`` derives the slots from the tokenizer's own jinja
``chat_template``.

Verified against the reference (slot strings read from LLaMA-Factory's template.py and the rendered
text compared in tests/test_template.py): default, alpaca, chatml, qwen, qwen3, qwen3_nothink,
llama2, llama3, mistral, gemma, empty, vicuna, zephyr, phi, yi.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from lmf.extras.errors import ConfigError, DataError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)


class _Marker:
    """A special token resolved at encode time (``bos_token`` / ``eos_token``)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __repr__(self) -> str:
        return f"<{self.attr}>"


BOS = _Marker("bos_token")
EOS = _Marker("eos_token")

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


@dataclass(frozen=True)
class Template:
    """One chat format. Build instances with :func:`get_template`; registry entries are never mutated."""

    name: str
    user: Slots
    assistant: Slots
    system: Slots
    observation: Optional[Slots] = None  # default: the user slots
    function: Optional[Slots] = None  # default: the assistant slots
    prefix: Slots = ()
    default_system: str = ""
    stop_words: tuple = ()
    replace_eos: bool = False
    efficient_eos: bool = False
    system_in_user: bool = False  # llama2-style: the system text is prepended to the first user message
    tool_format: str = "default"
    reasoning: bool = False  # qwen3-style thought block handling
    thought_words: tuple = ("<think>\n", "\n</think>\n\n")
    enable_thinking: Optional[bool] = True
    jinja: Optional[str] = field(default=None, compare=False)  # tokenizer's own template (``auto``)

    # ------------------------------------------------------------------ rendering
    def _slots_for(self, role: str) -> Slots:
        if role == USER:
            return self.user
        if role == ASSISTANT:
            return self.assistant
        if role == OBSERVATION:
            return self.observation if self.observation is not None else self.user
        if role == FUNCTION:
            return self.function if self.function is not None else self.assistant
        raise DataError(f"template {self.name!r}: unexpected role {role!r}")

    @staticmethod
    def _fill(slots: Slots, content: str) -> list[Piece]:
        return [p.replace("{{content}}", content) if isinstance(p, str) else p for p in slots]

    def _system_text(self, system: Optional[str], tools: Optional[str]) -> str:
        system = self.default_system if system is None else system
        return (system or "") + format_tools(tools, self.tool_format)

    def _message_pieces(self, messages: list[dict], system: Optional[str], tools: Optional[str]) -> list[list[Piece]]:
        """Pieces per message: turn 0 carries prefix + system."""
        system_text = self._system_text(system, tools)
        out: list[list[Piece]] = []
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            pieces: list[Piece] = []
            if i == 0:
                pieces += [_Const(p) if isinstance(p, str) else p for p in self.prefix]
                if system_text and not self.system_in_user:
                    pieces += [_Const(p) if isinstance(p, str) else p for p in self._fill(self.system, system_text)]
                elif system_text:
                    content = "".join(p for p in self._fill(self.system, system_text) if isinstance(p, str)) + content
            if role == FUNCTION:
                content = format_function_call(content, self.tool_format)
            pieces += self._fill(self._slots_for(role), content)
            out.append(pieces)
        return out

    def _pieces_to_ids(self, tokenizer, pieces: list[Piece], cache: Optional[dict] = None) -> list[int]:
        """Ids of ``pieces``; with ``cache`` (a dict owned by the caller, one tokenizer) the ids of
        constant pieces (prefix, system prompt) are encoded once and reused."""
        ids: list[int] = []
        for piece in pieces:
            if isinstance(piece, _Marker):
                token_id = getattr(tokenizer, piece.attr + "_id", None)
                if token_id is not None:
                    ids.append(token_id)
            elif not piece:
                continue
            elif cache is not None and type(piece) is _Const:
                cached = cache.get(piece)
                if cached is None:
                    cached = encode_text(tokenizer, piece)
                    if len(cache) < MAX_CACHED_PIECES:
                        cache[str(piece)] = cached
                ids += cached
            else:
                ids += encode_text(tokenizer, piece)
        return ids

    def _pieces_to_ids_many(self, tokenizer, pieces_lists: list[list[Piece]], cache: Optional[dict] = None,
                            parallel: bool = False) -> list[list[int]]:
        """:meth:`_pieces_to_ids` of each list, the non-constant texts encoded by one :func:`encode_many` call."""
        marker_ids: dict = {}
        texts: list[str] = []
        plans = []  # per list: items that are an index into ``texts`` or a list of ids
        for pieces in pieces_lists:
            plan: list = []
            for piece in pieces:
                if isinstance(piece, _Marker):
                    if piece.attr not in marker_ids:
                        marker_ids[piece.attr] = getattr(tokenizer, piece.attr + "_id", None)
                    if marker_ids[piece.attr] is not None:
                        plan.append([marker_ids[piece.attr]])
                elif not piece:
                    continue
                elif cache is not None and type(piece) is _Const:
                    plan.append(self._pieces_to_ids(tokenizer, [piece], cache))
                else:
                    plan.append(len(texts))
                    texts.append(piece)
            plans.append(plan)
        encoded = encode_many(tokenizer, texts, parallel)
        out: list[list[int]] = []
        for plan in plans:
            if len(plan) == 1 and type(plan[0]) is int:
                out.append(encoded[plan[0]])
                continue
            ids: list[int] = []
            for item in plan:
                ids += encoded[item] if type(item) is int else item
            out.append(ids)
        return out

    def _pieces_to_text(self, tokenizer, pieces: list[Piece]) -> str:
        out = []
        for piece in pieces:
            if isinstance(piece, _Marker):
                token = getattr(tokenizer, piece.attr, None) if tokenizer is not None else f"<{piece.attr}>"
                has_id = tokenizer is None or getattr(tokenizer, piece.attr + "_id", None) is not None
                if token is not None and has_id:
                    out.append(str(token))
            else:
                out.append(piece)
        return "".join(out)

    # ------------------------------------------------------------------ encoding
    def _prepare(self, messages: list[dict], system: Optional[str]) -> tuple[list[dict], Optional[str]]:
        """Canonical roles; a leading system message becomes ``system`` (unless given)."""
        normalized = [{"role": canonical_role(m["role"]), "content": _as_text(m.get("content"))} for m in messages]
        if normalized and normalized[0]["role"] == SYSTEM:
            if system is None:
                system = normalized[0]["content"]
            normalized = normalized[1:]
        for i, m in enumerate(normalized):
            expected = (USER, OBSERVATION) if i % 2 == 0 else (ASSISTANT, FUNCTION)
            if m["role"] not in expected:
                raise DataError(
                    f"template {self.name!r}: message {i} has role {m['role']!r}; "
                    f"expected {' or '.join(expected)} (turns must alternate user/assistant)"
                )
        return normalized, system

    def encode_messages(self, tokenizer, messages: list[dict], system: Optional[str] = None,
                        tools: Optional[str] = None) -> list[list[int]]:
        """Token ids of each message (turn 0 includes prefix and system)."""
        messages, system = self._prepare(messages, system)
        return [self._pieces_to_ids(tokenizer, p) for p in self._message_pieces(messages, system, tools)]

    def render_messages(self, messages: list[dict], system: Optional[str] = None, tools: Optional[str] = None,
                        tokenizer=None) -> list[str]:
        """Text of each message as the template renders it (for inspection and tests)."""
        messages, system = self._prepare(messages, system)
        return [self._pieces_to_text(tokenizer, p) for p in self._message_pieces(messages, system, tools)]

    def _thought_ids(self, tokenizer, cache: Optional[dict] = None) -> list[int]:
        return self._pieces_to_ids(tokenizer, [_Const(self.thought_words[0] + self.thought_words[1])], cache)

    def _has_thought(self, text: str) -> bool:
        return self.thought_words[0].strip() in text or self.thought_words[1].strip() in text

    def remove_thought(self, text: str) -> str:
        """Drop a ``<think>...</think>`` block from an assistant message."""
        pattern = re.compile(f"{re.escape(self.thought_words[0])}(.*?){re.escape(self.thought_words[1])}", re.DOTALL)
        return re.sub(pattern, "", text).lstrip("\n")

    def encode_multiturn(self, tokenizer, messages: list[dict], system: Optional[str] = None,
                         tools: Optional[str] = None,
                         cache: Optional[dict] = None) -> list[tuple[list[int], list[int]]]:
        """(prompt_ids, response_ids) per assistant turn; concatenated they give the full sequence.

        ``cache``: optional dict (one per tokenizer, owned by the caller) reusing the ids of the
        prefix and system prompt across calls."""
        return self.encode_multiturn_many(tokenizer, [(messages, system, tools)], cache)[0]

    def encode_multiturn_many(self, tokenizer, conversations: list[tuple[list[dict], Optional[str], Optional[str]]],
                              cache: Optional[dict] = None,
                              parallel: bool = False) -> list[list[tuple[list[int], list[int]]]]:
        """:meth:`encode_multiturn` of each ``(messages, system, tools)``: the message texts of all of them are
        collected and tokenized together (:func:`encode_many`; each text on its own, so the ids are the same)."""
        prepared, all_pieces = [], []
        for messages, system, tools in conversations:
            messages, system = self._prepare(messages, system)
            if len(messages) % 2 != 0:
                raise DataError(f"template {self.name!r}: a conversation must end with an assistant turn")
            if self.reasoning and self.enable_thinking is False:
                messages = [dict(m, content=self.remove_thought(m["content"])) if i % 2 else m
                            for i, m in enumerate(messages)]
            prepared.append(messages)
            all_pieces.extend(self._message_pieces(messages, system, tools))
        encoded = self._pieces_to_ids_many(tokenizer, all_pieces, cache, parallel)
        out, start = [], 0
        for messages in prepared:
            ids = encoded[start:start + len(messages)]
            start += len(messages)
            pairs = []
            for i in range(0, len(ids), 2):
                prompt_ids, response_ids = ids[i], ids[i + 1]
                if self.reasoning and not self._has_thought(messages[i + 1]["content"]):
                    if self.enable_thinking:
                        response_ids = self._thought_ids(tokenizer, cache) + response_ids  # learned: empty thought
                    else:
                        prompt_ids = prompt_ids + self._thought_ids(tokenizer, cache)  # given: not learned
                pairs.append((prompt_ids, response_ids))
            out.append(pairs)
        return out

    def encode_oneturn(self, tokenizer, messages: list[dict], system: Optional[str] = None,
                       tools: Optional[str] = None, cache: Optional[dict] = None) -> tuple[list[int], list[int]]:
        """(prompt_ids, response_ids) where the response is the last assistant message; history is prompt."""
        messages, system = self._prepare(messages, system)
        if self.reasoning:
            # history keeps no thoughts (as the chat template renders it); the last answer follows enable_thinking
            messages = [dict(m, content=self.remove_thought(m["content"])) if i % 2 and i < len(messages) - 1 else m
                        for i, m in enumerate(messages)]
            if self.enable_thinking is False:
                messages[-1] = dict(messages[-1], content=self.remove_thought(messages[-1]["content"]))
        if len(messages) % 2 != 0:
            raise DataError(f"template {self.name!r}: a conversation must end with an assistant turn")
        encoded = [self._pieces_to_ids(tokenizer, p, cache) for p in self._message_pieces(messages, system, tools)]
        prompt_ids = [t for ids in encoded[:-1] for t in ids]
        response_ids = encoded[-1]
        if self.reasoning and not self._has_thought(messages[-1]["content"]):
            if self.enable_thinking:
                response_ids = self._thought_ids(tokenizer, cache) + response_ids
            else:
                prompt_ids = prompt_ids + self._thought_ids(tokenizer, cache)
        return prompt_ids, response_ids

    def encode_prompt(self, tokenizer, messages: list[dict], system: Optional[str] = None,
                      tools: Optional[str] = None) -> list[int]:
        """Prompt ids for generation: ``messages`` ends with a user (or tool) turn; ends with the assistant prefix."""
        conversation = list(messages) + [{"role": ASSISTANT, "content": ""}]
        prompt_ids, _ = self.encode_oneturn(tokenizer, conversation, system, tools)
        return prompt_ids

    # ------------------------------------------------------------------ tokenizer
    def stop_token_ids(self, tokenizer) -> list[int]:
        """eos plus every stop word that is a single token of ``tokenizer``."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for word in self.stop_words:
            token_id = _single_token_id(tokenizer, word)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    def fix_tokenizer(self, tokenizer) -> None:
        """Make ``tokenizer`` consistent with the template (idempotent).

        - ``replace_eos`` templates: eos becomes the first stop word when it is a token of the vocabulary
          (no new tokens are ever added here: that would need resized embeddings);
        - a missing eos becomes ``<|endoftext|>`` when that token exists; a missing pad becomes eos;
        - a jinja ``chat_template`` equivalent to this template is installed unless the tokenizer's own
          template already renders the same prompts (checked on probe conversations; a model's native
          template, e.g. with tool support, is then kept), so exported models and vLLM render the
          same prompt as :meth:`encode_prompt`.
        """
        if self.replace_eos and self.stop_words:
            word = self.stop_words[0]
            if tokenizer.eos_token != word:
                if _single_token_id(tokenizer, word) is not None:
                    tokenizer.eos_token = word
                    logger.info("template %s: eos token set to %s", self.name, word)
                else:
                    logger.warning("template %s: stop word %r is not a token of this tokenizer; keeping eos %r",
                                   self.name, word, tokenizer.eos_token)
        if tokenizer.eos_token_id is None and _single_token_id(tokenizer, "<|endoftext|>") is not None:
            tokenizer.eos_token = "<|endoftext|>"
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.jinja is None and not self._tokenizer_renders_alike(tokenizer):
            tokenizer.chat_template = self.jinja_template(tokenizer)

    def prompt_text(self, messages: list[dict], system: Optional[str] = None, tokenizer=None,
                    tools: Optional[str] = None) -> str:
        """Text of the generation prompt for ``messages`` (what :meth:`encode_prompt` tokenizes)."""
        conversation, system = self._prepare(list(messages) + [{"role": ASSISTANT, "content": ""}], system)
        if self.reasoning:
            conversation = [dict(m, content=self.remove_thought(m["content"])) if i % 2 else m
                            for i, m in enumerate(conversation)]
        parts = [self._pieces_to_text(tokenizer, p) for p in self._message_pieces(conversation, system, tools)]
        text = "".join(parts[:-1])
        if self.adds_empty_thought():
            text += self.thought_words[0] + self.thought_words[1]
        return text

    def _tokenizer_renders_alike(self, tokenizer) -> bool:
        """Whether the tokenizer's chat_template renders the probe prompts (system, history, tools, a tool
        call and its result) exactly like this template."""
        if not isinstance(getattr(tokenizer, "chat_template", None), str):
            return False
        try:
            for messages, tools in PROBE_CONVERSATIONS:
                rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                         add_generation_prompt=True)
                ours = self.prompt_text(_probe_as_lmf(messages), tokenizer=tokenizer,
                                        tools=json.dumps(tools, ensure_ascii=False) if tools else None)
                if rendered != ours:
                    return False
        except Exception:  # a template that cannot render the probes is not equivalent
            return False
        return True

    def adds_empty_thought(self) -> bool:
        """Whether a generation prompt ends with an empty thought block: a reasoning template whose
        ``enable_thinking`` is false *or unset* (LLaMA-Factory's rule; the one rule lmf's prompts, the
        training data and the exported chat template all follow)."""
        return self.reasoning and not self.enable_thinking

    def jinja_template(self, tokenizer) -> str:
        """A jinja chat template that renders exactly like :meth:`encode_prompt` (what vLLM and
        ``apply_chat_template`` use): system and default system, ``tools`` in this template's tool
        format, assistant ``tool_calls`` and ``tool`` results, thoughts dropped from the history of
        reasoning templates, and the empty thought block of :meth:`adds_empty_thought` (a caller's
        ``enable_thinking`` overrides the trained default)."""
        if self.jinja is not None:
            return self.jinja

        def expr(slots: Slots, var: str) -> str:
            parts = []
            for piece in slots:
                if isinstance(piece, _Marker):
                    if getattr(tokenizer, piece.attr + "_id", None) is not None:
                        parts.append(_jinja_str(getattr(tokenizer, piece.attr)))
                    continue
                chunks = piece.split("{{content}}")
                for k, chunk in enumerate(chunks):
                    if k:
                        parts.append(var)
                    if chunk:
                        parts.append(_jinja_str(chunk))
            return " + ".join(parts) if parts else "''"

        thought = _jinja_str(self.thought_words[0] + self.thought_words[1])
        thinking_default = {True: "true", False: "false", None: "none"}[self.enable_thinking]
        out = []
        if self.reasoning:
            out.append("{%- set thinking = enable_thinking if enable_thinking is defined else "
                       + thinking_default + " -%}")
        out.append("{%- set system_message = " + _jinja_str(self.default_system) + " -%}")
        out.append(
            "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system_message = messages[0]['content'] -%}"
            "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
        )
        out.append(_jinja_tool_block(self.tool_format))
        out.append("{%- set system_text = (system_message or '') + tool_text -%}")
        if self.prefix:
            out.append("{{- " + expr(self.prefix, "''") + " -}}")
        if not self.system_in_user:
            out.append("{%- if system_text -%}{{- " + expr(self.system, "system_text") + " -}}{%- endif -%}")
        out.append("{%- for message in loop_messages -%}")
        out.append("{%- set content = message['content'] or '' -%}")
        if self.system_in_user:
            out.append("{%- if loop.first and system_text -%}{%- set content = " + expr(self.system, "system_text")
                       + " + content -%}{%- endif -%}")
        out.append("{%- if message['role'] == 'user' -%}{{- " + expr(self.user, "content") + " -}}")
        out.append("{%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}"
                   + _jinja_tool_calls(self.tool_format) + "{{- "
                   + expr(self.function if self.function is not None else self.assistant, "calls") + " -}}")
        out.append("{%- elif message['role'] == 'assistant' -%}")
        if self.reasoning:  # history keeps no thoughts (as in training prompts)
            close = _jinja_str(self.thought_words[1].strip())
            out.append("{%- if " + close + " in content -%}{%- set content = content.split(" + close
                       + ")[-1].lstrip('\n') -%}{%- endif -%}")
        out.append("{{- " + expr(self.assistant, "content") + " -}}")
        out.append("{%- elif message['role'] in ('tool', 'observation', 'ipython') -%}{{- "
                   + expr(self.observation if self.observation is not None else self.user, "content") + " -}}")
        out.append("{%- endif -%}{%- endfor -%}")
        if self.reasoning:
            out.append("{%- if add_generation_prompt and not thinking and loop_messages "
                       "and loop_messages[-1]['role'] != 'assistant' -%}{{- " + thought + " -}}{%- endif -%}")
        return "".join(out)

    def describe(self) -> str:
        """Stable text identifying everything that changes the rendered tokens (used in cache keys)."""
        fields_ = {k: repr(v) for k, v in sorted(self.__dict__.items())}
        return json.dumps(fields_, sort_keys=True)


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
        encode = backend.encode
        for i in rest:
            out[i] = encode(texts[i], add_special_tokens=False).ids
    return out


def _jinja_str(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _split_prompt(prompt: str, *fields: str) -> list[str]:
    """The literal parts of a ``str.format`` prompt around its ``fields`` (braces unescaped)."""
    marked = prompt.format(**{f: f"\x00{i}\x00" for i, f in enumerate(fields)})
    return re.split("\x00\\d\x00", marked)


def _jinja_tool_block(tool_format: str) -> str:
    """Jinja statements that set ``tool_text`` to :func:`format_tools`'s text for ``tools`` ('' when none)."""
    if tool_format == "qwen":
        before, after = _split_prompt(QWEN_TOOL_PROMPT, "tool_text")
        body = ("{%- for tool in tools -%}{{- '\\n' -}}{%- if tool.get('type') == 'function' -%}{{- tool | tojson -}}"
                "{%- else -%}{{- {'type': 'function', 'function': tool} | tojson -}}{%- endif -%}{%- endfor -%}")
        return ("{%- set tool_text -%}{%- if tools -%}{{- " + _jinja_str(before) + " -}}" + body + "{{- "
                + _jinja_str(after) + " -}}{%- endif -%}{%- endset -%}")
    before, middle, after = _split_prompt(DEFAULT_TOOL_PROMPT, "tool_text", "tool_names")
    param = ("{{- '  - ' ~ name ~ ' (' ~ param.get('type', '') ~ (', required' if name in required else '') ~ '): ' "
             "~ param.get('description', '') ~ ((', should be one of [' ~ param['enum'] | join(', ') ~ ']') "
             "if param.get('enum') else '') ~ ((', where each item should be ' ~ param['items'].get('type', '')) "
             "if param.get('items') else '') ~ '\\n' -}}")
    return (
        "{%- set tool_text -%}{%- if tools -%}{{- " + _jinja_str(before) + " -}}{%- set names = namespace(v=[]) -%}"
        "{%- for tool in tools -%}"
        "{%- set spec = tool.get('function', tool) if tool.get('type') == 'function' else tool -%}"
        "{%- set params = spec.get('parameters') or {} -%}{%- set required = params.get('required', []) -%}"
        "{{- '> Tool Name: ' ~ spec['name'] ~ '\\nTool Description: ' ~ spec.get('description', '') "
        "~ '\\nTool Args:\\n' -}}"
        "{%- for name, param in (params.get('properties', {}) or {}).items() -%}" + param + "{%- endfor -%}"
        "{{- '\\n' -}}{%- set names.v = names.v + [spec['name']] -%}{%- endfor -%}"
        "{{- " + _jinja_str(middle) + " ~ names.v | join(', ') ~ " + _jinja_str(after) + " -}}"
        "{%- endif -%}{%- endset -%}"
    )


def _jinja_tool_calls(tool_format: str) -> str:
    """Jinja statements that set ``calls`` to :func:`format_function_call`'s text for ``message['tool_calls']``."""
    if tool_format == "qwen":
        one = ("{{- '<tool_call>\\n' -}}{%- if args is mapping -%}{{- {'name': call['name'], 'arguments': args} | tojson -}}"
               "{%- else -%}{{- '{\"name\": ' ~ call['name'] | tojson ~ ', \"arguments\": ' ~ args ~ '}' -}}{%- endif -%}"
               "{{- '\\n</tool_call>' -}}")
    else:
        one = ("{{- 'Action: ' ~ call['name'] ~ '\\nAction Input: ' -}}{%- if args is mapping -%}{{- args | tojson -}}"
               "{%- else -%}{{- args -}}{%- endif -%}")
    return ("{%- set calls -%}{%- for item in message['tool_calls'] -%}"
            "{%- set call = item.get('function', item) -%}{%- set args = call.get('arguments', {}) -%}"
            "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}" + one + "{%- endfor -%}{%- endset -%}")


_PROBE_TOOLS = [{"name": "get_weather", "description": "Weather of a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
                                "required": ["city"]}}]
#: (messages in OpenAI/transformers form, tools) rendered by both sides in :meth:`Template._tokenizer_renders_alike`.
PROBE_CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
     None),
    ([{"role": "user", "content": "Weather in Paris?"}], _PROBE_TOOLS),
    ([{"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
          "name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "{\"temperature\": 21}"}], _PROBE_TOOLS),
]


def _probe_as_lmf(messages: list[dict]) -> list[dict]:
    """OpenAI/transformers-form messages as lmf's templates take them (tool calls as a ``function`` turn)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [c.get("function", c) for c in m["tool_calls"]]
            out.append({"role": FUNCTION, "content": json.dumps(calls, ensure_ascii=False)})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


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


def _single_token_id(tokenizer, token: str) -> Optional[int]:
    """Id of ``token`` when it is one token of the vocabulary, else None."""
    vocab_id = tokenizer.convert_tokens_to_ids(token)
    if vocab_id is None or (tokenizer.unk_token_id is not None and vocab_id == tokenizer.unk_token_id
                            and token != tokenizer.unk_token):
        return None
    return vocab_id


# ---------------------------------------------------------------------- tools
DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n'
    "```\n"
)
QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)


def _load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} is not valid JSON: {exc}") from exc


def format_tools(tools, tool_format: str) -> str:
    """System-prompt text describing ``tools`` (a JSON list of function schemas); "" for no tools
    (None, "", or an empty list: no tool preamble at all, as in LLaMA-Factory and Qwen's own template)."""
    if not tools:
        return ""
    specs = _load_json(tools, "tools") if isinstance(tools, str) else tools
    if isinstance(specs, dict):
        specs = [specs]
    if not specs:
        return ""
    if tool_format == "qwen":
        text = "".join("\n" + json.dumps(s if s.get("type") == "function" else {"type": "function", "function": s},
                                         ensure_ascii=False) for s in specs)
        return QWEN_TOOL_PROMPT.format(tool_text=text)
    tool_text, names = "", []
    for spec in specs:
        spec = spec.get("function", spec) if spec.get("type") == "function" else spec
        params = spec.get("parameters", {}) or {}
        required = set(params.get("required", []))
        lines = []
        for name, param in (params.get("properties", {}) or {}).items():
            req = ", required" if name in required else ""
            enum = f", should be one of [{', '.join(param['enum'])}]" if param.get("enum") else ""
            items = f", where each item should be {param['items'].get('type', '')}" if param.get("items") else ""
            lines.append(f"  - {name} ({param.get('type', '')}{req}): {param.get('description', '')}{enum}{items}\n")
        tool_text += f"> Tool Name: {spec['name']}\nTool Description: {spec.get('description', '')}\n" \
                     f"Tool Args:\n{''.join(lines)}\n"
        names.append(spec["name"])
    return DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(names))


def format_function_call(content: str, tool_format: str) -> str:
    """Assistant text of a tool call (``content`` is JSON: one call or a list of {name, arguments})."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError:
        return content  # already plain text
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and "name" in c for c in calls):
        return content
    if tool_format == "qwen":
        return "\n".join(
            "<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c.get("arguments", {})}, ensure_ascii=False)
            + "\n</tool_call>" for c in calls
        )
    return "\n".join(
        f"Action: {c['name']}\nAction Input: {json.dumps(c.get('arguments', {}), ensure_ascii=False)}" for c in calls
    )


# ---------------------------------------------------------------------- registry
TEMPLATES: dict[str, Template] = {}


def register_template(template: Template) -> Template:
    """Add ``template`` to the registry under its name."""
    if template.name in TEMPLATES:
        raise ValueError(f"template {template.name!r} is already registered")
    TEMPLATES[template.name] = template
    return template


_CHATML_USER = ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)
_CHATML_ASSISTANT = ("{{content}}<|im_end|>\n",)
_CHATML_SYSTEM = ("<|im_start|>system\n{{content}}<|im_end|>\n",)
_QWEN_OBSERVATION = (
    "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
)

register_template(Template(name="empty", user=("{{content}}",), assistant=("{{content}}",), system=("{{content}}",)))
register_template(Template(
    name="default",
    user=("Human: {{content}}", EOS, "\nAssistant:"),
    assistant=("{{content}}", EOS, "\n"),
    system=("System: {{content}}", EOS, "\n"),
))
register_template(Template(
    name="alpaca",
    user=("### Instruction:\n{{content}}\n\n### Response:\n",),
    assistant=("{{content}}", EOS, "\n\n"),
    system=("{{content}}",),
    default_system="Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n",
))
register_template(Template(
    name="vicuna",
    user=("USER: {{content}} ASSISTANT:",),
    assistant=("{{content}}", EOS),
    system=("{{content}}",),
    default_system="A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.",
))
register_template(Template(
    name="chatml",
    user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM,
    observation=("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
    stop_words=("<|im_end|>", "<|im_start|>"),
    replace_eos=True,
))
register_template(Template(
    name="yi", user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM, stop_words=("<|im_end|>",),
))
register_template(Template(
    name="qwen",
    user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM, observation=_QWEN_OBSERVATION,
    function=("{{content}}<|im_end|>\n",),
    default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    stop_words=("<|im_end|>",), replace_eos=True, tool_format="qwen",
))
register_template(Template(
    name="qwen3",
    user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM, observation=_QWEN_OBSERVATION,
    function=("{{content}}<|im_end|>\n",),
    stop_words=("<|im_end|>",), replace_eos=True, tool_format="qwen", reasoning=True,
))
register_template(Template(
    name="qwen3_nothink",
    user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM, observation=_QWEN_OBSERVATION,
    function=("{{content}}<|im_end|>\n",),
    stop_words=("<|im_end|>",), replace_eos=True, tool_format="qwen",
))
register_template(Template(
    name="llama2",
    user=(BOS, "[INST] {{content}} [/INST]"),
    assistant=("{{content}}", EOS),
    system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
    system_in_user=True,
))
register_template(Template(
    name="llama3",
    user=("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n",),
    assistant=("{{content}}<|eot_id|>",),
    system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
    observation=("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n",),
    prefix=(BOS,),
    stop_words=("<|eot_id|>", "<|eom_id|>"),
    replace_eos=True,
))
register_template(Template(
    name="mistral",
    user=("[INST] {{content}}[/INST]",),
    assistant=(" {{content}}", EOS),
    system=("{{content}}\n\n",),
    observation=('[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',),
    function=("[TOOL_CALLS] {{content}}", EOS),
    prefix=(BOS,),
    system_in_user=True,
))
register_template(Template(
    name="gemma",
    user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    assistant=("{{content}}<end_of_turn>\n",),
    system=("{{content}}\n\n",),
    observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    prefix=(BOS,),
    stop_words=("<end_of_turn>",),
    replace_eos=True,
    system_in_user=True,
))
register_template(Template(
    name="phi",
    user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",),
    assistant=("{{content}}<|end|>\n",),
    system=("<|system|>\n{{content}}<|end|>\n",),
    stop_words=("<|end|>",),
    replace_eos=True,
))
register_template(Template(
    name="zephyr",
    user=("<|user|>\n{{content}}", EOS, "<|assistant|>\n"),
    assistant=("{{content}}", EOS),
    system=("<|system|>\n{{content}}", EOS),
    default_system="You are Zephyr, a helpful assistant.",
))


# ---------------------------------------------------------------------- auto (tokenizer's own template)
def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def parse_chat_template(tokenizer) -> Template:
    """Derive user/assistant/system slots from the tokenizer's jinja ``chat_template``.

    Renders probe conversations with a placeholder and takes the differences, as LLaMA-Factory's
    ``parse_template`` does. Works for the usual ChatML/Llama-style templates; a template whose
    rendering is not prefix-consistent raises DataError naming the key ``template``.
    """
    marker = "{{content}}"
    try:
        system_only = _render(tokenizer, [{"role": "system", "content": marker}], False)
        user_gen = _render(tokenizer, [{"role": "user", "content": marker}], True)
        user_gen_empty_sys = _render(tokenizer, [{"role": "system", "content": ""},
                                                 {"role": "user", "content": marker}], True)
        user_asst = _render(tokenizer, [{"role": "user", "content": marker},
                                        {"role": "assistant", "content": marker}], False)
    except Exception as exc:  # jinja errors come in many types
        raise DataError(f"config key 'template': auto could not render the tokenizer's chat_template: {exc}") from exc
    prefix = ""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and system_only.startswith(bos) and user_gen.startswith(bos):
        prefix = bos
    system_slot = system_only[len(prefix):]
    if not user_asst.startswith(user_gen):
        raise DataError("config key 'template': auto cannot split the tokenizer's chat_template into turns; "
                        f"choose a named template ({', '.join(sorted(TEMPLATES))})")
    assistant_slot = user_asst[len(user_gen):]
    reasoning = "<think>" in assistant_slot
    assistant_slot = assistant_slot.replace("<think>", "").replace("</think>", "").lstrip("\n")
    user_slot = user_gen[len(prefix):]
    default_system = ""
    sys_part_empty = system_slot.replace(marker, "")
    if user_gen_empty_sys[len(prefix):].startswith(sys_part_empty):
        user_no_default = user_gen_empty_sys[len(prefix) + len(sys_part_empty):]
        if len(user_slot) > len(user_no_default) and user_slot.endswith(user_no_default):
            rendered_system = user_slot[: len(user_slot) - len(user_no_default)]
            before, _, after = system_slot.partition(marker)
            if rendered_system.startswith(before) and rendered_system.endswith(after):
                default_system = rendered_system[len(before): len(rendered_system) - len(after)]
                user_slot = user_no_default
    prefix_slots: Slots = (BOS,) if prefix else ()
    return Template(
        name="auto",
        user=(user_slot,),
        assistant=(assistant_slot,),
        system=(system_slot,),
        prefix=prefix_slots,
        default_system=default_system,
        reasoning=reasoning,
        jinja=tokenizer.chat_template,
    )


def get_template(name: Optional[str], tokenizer, *, default_system: Optional[str] = None,
                 enable_thinking: Optional[bool] = True, tool_format: Optional[str] = None,
                 fix_tokenizer: bool = True) -> Template:
    """The template called ``name`` (or ``'auto'``), adjusted by the data arguments; fixes ``tokenizer``.

    ``name`` None means ``auto`` when the tokenizer has a chat_template, otherwise a ConfigError naming
    the key ``template``. An unknown name is a ConfigError listing the valid names.
    """
    if name is None:
        if isinstance(getattr(tokenizer, "chat_template", None), str):
            logger.info("config key 'template' not set: using the tokenizer's chat_template (template: auto)")
            name = "auto"
        else:
            raise ConfigError("config key 'template' is required: the tokenizer has no chat_template "
                              f"(choose one of: auto, {', '.join(sorted(TEMPLATES))})")
    if name == "auto":
        if not isinstance(getattr(tokenizer, "chat_template", None), str):
            raise ConfigError("config key 'template': 'auto' needs a tokenizer with a chat_template; "
                              f"choose one of: {', '.join(sorted(TEMPLATES))}")
        template = parse_chat_template(tokenizer)
    elif name in TEMPLATES:
        template = TEMPLATES[name]
    else:
        import difflib

        close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key 'template': unknown template {name!r}{hint} "
                          f"Valid: auto, {', '.join(sorted(TEMPLATES))}")
    changes: dict[str, Any] = {}
    if default_system is not None:
        changes["default_system"] = default_system
    if template.reasoning:
        changes["enable_thinking"] = enable_thinking
    if tool_format is not None:
        changes["tool_format"] = tool_format
    template = replace(template, **changes) if changes else template
    if fix_tokenizer:
        template.fix_tokenizer(tokenizer)
    return template


def template_from_args(data_args, tokenizer, fix_tokenizer: bool = True) -> Template:
    """:func:`get_template` with the config's ``template``, ``default_system``, ``enable_thinking``."""
    return get_template(data_args.template, tokenizer, default_system=data_args.default_system,
                        enable_thinking=data_args.enable_thinking, fix_tokenizer=fix_tokenizer)


def list_templates() -> list[str]:
    """Names accepted by the ``template`` key."""
    return ["auto"] + sorted(TEMPLATES)
