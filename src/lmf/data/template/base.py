"""The :class:`Template`: a chat format as slots per role, rendered and tokenized message by message.

A slot is a tuple of pieces: plain strings (``{{content}}`` is replaced by the message text) or the
markers :data:`BOS` / :data:`EOS` (the tokenizer's bos/eos token, skipped when the tokenizer has none).
Each message is rendered and tokenized on its own, so the boundary between prompt and response never
falls inside a token. Named templates: :mod:`lmf.data.template.registry`; tools: :mod:`lmf.data.tools`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

from lmf.data.template.encoding import encode_many, single_token_id
from lmf.data.template.pieces import (
    ASSISTANT,
    FUNCTION,
    MAX_CACHED_PIECES,
    OBSERVATION,
    SYSTEM,
    USER,
    Piece,
    Slots,
    _as_text,
    _Const,
    _Marker,
    canonical_role,
)
from lmf.data.tools import format_function_call, format_tools, load_json
from lmf.extras.errors import DataError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)


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
    efficient_eos: bool = False  # eos once at the end (LLaMA-Factory's GLM / ChatGLM-family templates)
    system_in_user: bool = False  # llama2-style: the system text is prepended to the first user message
    tool_format: str = "default"  # tools and tool calls (lmf.data.tools)
    tools_slots: Optional[Slots] = None  # instead: slots around the raw tools JSON (phi4_mini)
    tools_alone_lstrip: bool = False  # MOSS-VL: tools without a system prompt lose their leading newlines
    reasoning: bool = False  # qwen3-style thought block handling
    thought_words: tuple = ("<think>\n", "\n</think>\n\n")
    tool_call_words: tuple = ("<tool_call>", "</tool_call>")
    empty_thought_close_only: bool = False  # GLM-4.7: an empty thought is the closing word alone
    enable_thinking: Optional[bool] = True
    preserve_thinking: bool = False  # keep the thoughts of history turns in prompts
    mm_plugin: Optional[str] = None  # the multimodal plugin of vision/audio templates (text renders alike)
    family: str = ""  # model family, for `lmf data templates`
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
    def _fill(slots: Slots, content: str, idx: str = "") -> list[Piece]:
        return [p.replace("{{content}}", content, 1).replace("{{idx}}", idx, 1) if isinstance(p, str) else p
                for p in slots]

    def tools_text(self, tools: Optional[str]) -> str:
        """The system-prompt text of ``tools`` ("" for none or an empty list)."""
        if self.tools_slots is None:
            return format_tools(tools, self.tool_format)
        specs = load_json(tools, "tools") if isinstance(tools, str) and tools else tools
        if not specs:
            return ""
        text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        first = self._fill(self.tools_slots, text)[0]
        return first if isinstance(first, str) else ""

    def _system_text(self, system: Optional[str], tools: Optional[str]) -> str:
        system, tool_text = system or self.default_system or "", self.tools_text(tools)
        if self.tools_alone_lstrip and not system:
            tool_text = tool_text.lstrip("\n")
        return system + tool_text

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
                elif system_text and role == USER:  # llama2-style: the system's first slot leads the first user turn
                    first = self._fill(self.system, system_text)[0]
                    content = (first if isinstance(first, str) else "") + content
            if role == FUNCTION:
                if self.system_in_user:  # LLaMA-Factory's Llama2Template passes no thought / tool-call words
                    content = format_function_call(content, self.tool_format)
                else:
                    content = format_function_call(content, self.tool_format, self.thought_words, self.tool_call_words)
            pieces += self._fill(self._slots_for(role), content, str(i // 2))
            out.append(pieces)
        return out

    def _pieces_to_ids_many(self, tokenizer, pieces_lists: list[list[Piece]], cache: Optional[dict] = None,
                            parallel: bool = False) -> list[list[int]]:
        """The ids of each list of pieces, its non-constant texts encoded by one :func:`encode_many` call; with
        ``cache`` (a dict owned by the caller, one tokenizer) constant pieces (prefix, system prompt) are encoded once
        and reused."""
        marker_ids: dict = {}
        texts: list[str] = []
        new_consts: dict[str, int] = {}  # constant pieces not cached yet -> their index in ``texts`` (encoded once)
        plans = []  # per list: items that are an index into ``texts`` or a list of ids
        for pieces in pieces_lists:
            plan: list = []
            for piece in pieces:
                if isinstance(piece, _Marker):
                    if piece not in marker_ids:
                        marker_ids[piece] = piece.token_id(tokenizer)
                    if marker_ids[piece] is not None:
                        plan.append([marker_ids[piece]])
                elif not piece:
                    continue
                elif cache is not None and type(piece) is _Const:
                    cached = cache.get(piece)
                    if cached is not None:
                        plan.append(cached)
                    else:
                        index = new_consts.get(piece)
                        if index is None:
                            index = new_consts[piece] = len(texts)
                            texts.append(piece)
                        plan.append(index)
                else:
                    plan.append(len(texts))
                    texts.append(piece)
            plans.append(plan)
        encoded = encode_many(tokenizer, texts, parallel)
        for piece, index in new_consts.items():
            if len(cache) < MAX_CACHED_PIECES:
                cache[str(piece)] = encoded[index]
        shared = set(new_consts.values())
        out: list[list[int]] = []
        for plan in plans:
            if len(plan) == 1 and type(plan[0]) is int:
                out.append(list(encoded[plan[0]]) if plan[0] in shared else encoded[plan[0]])
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
                token = piece.text(tokenizer)
                if token is not None:
                    out.append(token)
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

    def render_messages(self, messages: list[dict], system: Optional[str] = None, tools: Optional[str] = None,
                        tokenizer=None) -> list[str]:
        """Text of each message as the template renders it (for inspection and tests)."""
        messages, system = self._prepare(messages, system)
        return [self._pieces_to_text(tokenizer, p) for p in self._message_pieces(messages, system, tools)]

    def empty_thought(self) -> str:
        """The text of an empty thought block (GLM-4.7: the closing word alone)."""
        return self.thought_words[1] if self.empty_thought_close_only else self.thought_words[0] + self.thought_words[1]

    def _thought_ids(self, tokenizer, cache: Optional[dict] = None) -> list[int]:
        return self._pieces_to_ids_many(tokenizer, [[_Const(self.empty_thought())]], cache)[0]

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
        return self.encode_oneturn_many(tokenizer, [(messages, system, tools)], cache)[0]

    def encode_oneturn_many(self, tokenizer, conversations: list[tuple[list[dict], Optional[str], Optional[str]]],
                            cache: Optional[dict] = None) -> list[tuple[list[int], list[int]]]:
        """:meth:`encode_oneturn` of each ``(messages, system, tools)``, their texts tokenized together."""
        prepared, all_pieces = [], []
        for messages, system, tools in conversations:
            messages, system = self._prepare(messages, system)
            if self.reasoning and not self.preserve_thinking:
                # history keeps no thoughts (as the chat template renders it); the last answer follows enable_thinking
                messages = [dict(m, content=self.remove_thought(m["content"])) if i % 2 and i < len(messages) - 1
                            else m for i, m in enumerate(messages)]
                if self.enable_thinking is False:
                    messages[-1] = dict(messages[-1], content=self.remove_thought(messages[-1]["content"]))
            if len(messages) % 2 != 0:
                raise DataError(f"template {self.name!r}: a conversation must end with an assistant turn")
            prepared.append(messages)
            all_pieces.extend(self._message_pieces(messages, system, tools))
        encoded = self._pieces_to_ids_many(tokenizer, all_pieces, cache)
        out, start = [], 0
        for messages in prepared:
            start += len(messages)
            prompt_ids: list[int] = []
            for ids in encoded[start - len(messages):start - 1]:
                prompt_ids += ids
            response_ids = encoded[start - 1]
            if self.reasoning and not self._has_thought(messages[-1]["content"]):
                if self.enable_thinking:
                    response_ids = self._thought_ids(tokenizer, cache) + response_ids
                else:
                    prompt_ids = prompt_ids + self._thought_ids(tokenizer, cache)
            out.append((prompt_ids, response_ids))
        return out

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
            token_id = single_token_id(tokenizer, word)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    def fix_tokenizer(self, tokenizer) -> None:
        """Make ``tokenizer`` consistent with the template (idempotent), as LLaMA-Factory's fix_special_tokens does:

        - ``replace_eos`` templates: eos becomes the first stop word;
        - a missing eos becomes ``<|endoftext|>``; a missing pad becomes eos;
        - the other stop words become special tokens (text holding them then tokenizes them whole);
        - a stop word (or eos) that is not a token of the vocabulary is added as a new special token, said in the
          log: its id is past the vocabulary, so the model needs an embedding row for it (the Qwen checkpoints
          have spare rows; otherwise the model loader adds rows, :func:`lmf.model.loader.load_model`);
        - a jinja ``chat_template`` equivalent to this template is installed unless the tokenizer's own
          template already renders the same prompts (checked on probe conversations; a model's native
          template, e.g. with tool support, is then kept), so exported models and vLLM render the
          same prompt as :meth:`encode_prompt`.
        """
        added: list[str] = []

        def set_eos(word: str) -> None:
            if tokenizer.eos_token == word:
                return
            if single_token_id(tokenizer, word) is None:
                added.append(word)
            tokenizer.add_special_tokens({"eos_token": word})
            logger.info("template %s: eos token set to %s", self.name, word)

        if self.replace_eos and self.stop_words:
            set_eos(self.stop_words[0])
        if tokenizer.eos_token_id is None:
            set_eos("<|endoftext|>")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        others = self.stop_words[1:] if self.replace_eos else self.stop_words
        special = set(getattr(tokenizer, "all_special_tokens", ()))
        promote = [w for w in others if w not in special]
        if promote:
            added += [w for w in promote if single_token_id(tokenizer, w) is None]
            tokenizer.add_special_tokens({"additional_special_tokens": promote}, replace_extra_special_tokens=False)
        if added:  # the model loader gives them rows when the model has none spare (lmf.model.loader)
            tokenizer._lmf_template_tokens = tuple(dict.fromkeys((*getattr(tokenizer, "_lmf_template_tokens", ()),
                                                                   *added)))
            logger.warning("template %s: %s not in the tokenizer's vocabulary: added as special tokens (ids %s), as "
                           "LLaMA-Factory does; a model without spare embedding rows gets new ones", self.name, ", ".join(added),
                           ", ".join(str(single_token_id(tokenizer, w)) for w in added))
        if self.jinja is None and not self._tokenizer_renders_alike(tokenizer):
            tokenizer.chat_template = self.jinja_template(tokenizer)

    def prompt_text(self, messages: list[dict], system: Optional[str] = None, tokenizer=None,
                    tools: Optional[str] = None) -> str:
        """Text of the generation prompt for ``messages`` (what :meth:`encode_prompt` tokenizes)."""
        conversation, system = self._prepare(list(messages) + [{"role": ASSISTANT, "content": ""}], system)
        if self.reasoning and (not self.preserve_thinking or self.enable_thinking is False):
            conversation = [dict(m, content=self.remove_thought(m["content"])) if i % 2 else m
                            for i, m in enumerate(conversation)]
        parts = [self._pieces_to_text(tokenizer, p) for p in self._message_pieces(conversation, system, tools)]
        text = "".join(parts[:-1])
        if self.adds_empty_thought():
            text += self.empty_thought()
        return text

    def _tokenizer_renders_alike(self, tokenizer) -> bool:
        """Whether the tokenizer's chat_template renders the probe prompts (system, history, tools, a tool
        call and its result) exactly like this template (:func:`lmf.data.template.jinja.renders_alike`)."""
        from lmf.data.template.jinja import renders_alike

        return renders_alike(self, tokenizer)

    def adds_empty_thought(self) -> bool:
        """Whether a generation prompt ends with an empty thought block: a reasoning template whose
        ``enable_thinking`` is false *or unset* (LLaMA-Factory's rule; the one rule lmf's prompts, the
        training data and the exported chat template all follow)."""
        return self.reasoning and not self.enable_thinking

    def jinja_template(self, tokenizer) -> str:
        """A jinja chat template that renders exactly like :meth:`encode_prompt` (what vLLM and
        ``apply_chat_template`` use; :func:`lmf.data.template.jinja.build_jinja`)."""
        if self.jinja is not None:
            return self.jinja
        from lmf.data.template.jinja import build_jinja

        return build_jinja(self, tokenizer)

    def describe(self) -> str:
        """Stable text identifying everything that changes the rendered tokens (used in cache keys)."""
        fields_ = {k: repr(v) for k, v in sorted(self.__dict__.items())}
        return json.dumps(fields_, sort_keys=True)
