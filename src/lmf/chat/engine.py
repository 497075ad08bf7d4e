"""The chat-engine interface shared by ``lmf chat`` and ``lmf api``.

An engine turns a conversation (OpenAI-style ``[{"role", "content"}]`` messages) into an
assistant reply, either all at once (:meth:`ChatEngine.chat`) or as a stream of text pieces
(:meth:`ChatEngine.stream_chat`). Backends: :mod:`lmf.chat.hf_engine` (transformers ``generate``)
and :mod:`lmf.chat.vllm_engine`. :func:`lmf.chat.create_engine` picks one from ``infer_backend``.

This module imports no heavy library; backends import torch/transformers/vllm lazily. :func:`lmf.chat.create_engine` picks the backend.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from lmf.config.parser import split_list
from lmf.config.args import GeneratingArguments
from lmf.extras.errors import ConfigError, LmfError

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

#: Turns that the model answers: a user message or a ``tool`` result.
USER_SIDE_ROLES = ("user", "tool")
#: Turns of the model: a text reply or a ``function`` (tool call) turn, whose content is a JSON list of
#: ``{"name", "arguments"}`` (the API turns an assistant message with ``tool_calls`` into one).
ASSISTANT_SIDE_ROLES = ("assistant", "function")


class MessageError(LmfError):
    """A conversation the engine cannot render (bad role order, empty content, too long for the model)."""


_DEFAULTS = GeneratingArguments()  # the one place generation defaults are written: lmf.config.args


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings of one request: the ``generating`` config group's values, per-request overrides."""

    do_sample: bool = _DEFAULTS.do_sample
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    top_k: int = _DEFAULTS.top_k
    max_new_tokens: int = _DEFAULTS.max_new_tokens  # <= 0: the reply is limited by max_length instead
    max_length: int = _DEFAULTS.max_length
    repetition_penalty: float = _DEFAULTS.repetition_penalty
    skip_special_tokens: bool = _DEFAULTS.skip_special_tokens
    stop: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, gen_args: Any) -> "GenerationSettings":
        """Settings from a :class:`lmf.config.args.GeneratingArguments` (validated)."""
        values = {f.name: getattr(gen_args, f.name) for f in dataclasses.fields(cls) if hasattr(gen_args, f.name)}
        return cls().updated(**values)

    def updated(self, **overrides: Any) -> "GenerationSettings":
        """A copy with ``overrides`` applied (``None`` values are ignored); raises ConfigError on bad values."""
        known = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in known:
                raise ConfigError(f"unknown generation setting {key!r}; valid: {', '.join(sorted(known))}")
        values = {k: v for k, v in overrides.items() if v is not None}
        if "stop" in values:
            stop = values["stop"]
            values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        new = dataclasses.replace(self, **values)
        new.validate()
        return new

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"config key 'temperature': must be in [0, 2], got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"config key 'top_p': must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"config key 'top_k': must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1 and self.max_length < 1:
            raise ConfigError(f"config keys 'max_new_tokens' ({self.max_new_tokens}) and 'max_length' "
                              f"({self.max_length}): one of them must be >= 1")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"config key 'repetition_penalty': must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ConfigError("generation setting 'stop': stop strings must be non-empty")

    def reply_budget(self, prompt_tokens: int) -> int:
        """New tokens a reply may have: ``max_new_tokens`` when > 0 (as in LLaMA-Factory), else what
        ``max_length`` leaves after the prompt. Raises MessageError when nothing is left."""
        if self.max_new_tokens > 0:
            return self.max_new_tokens
        room = self.max_length - prompt_tokens
        if room < 1:
            raise MessageError(f"the prompt is {prompt_tokens} tokens, which leaves no room under max_length "
                               f"{self.max_length}")
        return room

    @property
    def greedy(self) -> bool:
        """Greedy decoding: sampling off, or a temperature / top_p of 0 (as OpenAI clients send)."""
        return not self.do_sample or self.temperature == 0.0 or self.top_p == 0.0


@dataclass
class Response:
    """A complete reply: ``finish_reason`` is ``"stop"`` (stop token/string) or ``"length"`` (token limit)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class ChatStream:
    """An iterator of reply text pieces.

    Once exhausted, ``finish_reason``, ``prompt_tokens`` and ``completion_tokens`` hold the final
    counts. :meth:`close` stops the generation early (client gone, Ctrl-C); it is idempotent and
    safe to call from another thread. Stop strings are applied here, so every backend honours them:
    text is held back while it could be the start of a stop string and cut at the first match.
    """

    def __init__(self, prompt_tokens: int, stop: tuple[str, ...] = ()) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None
        self.cancelled = threading.Event()
        self._stop = stop
        self._source: Optional[Iterator[str]] = None
        self._iter: Optional[Iterator[str]] = None
        self._on_close: list[Callable[[], None]] = []
        self.finished = False

    def attach(self, source: Iterator[str], on_close: Optional[Callable[[], None]] = None) -> "ChatStream":
        """Set the backend's raw piece iterator (and a cancel hook); returns self."""
        self._source = source
        if on_close is not None:
            self._on_close.append(on_close)
        return self

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> str:
        if self._iter is None:
            if self._source is None:
                raise RuntimeError("ChatStream has no source attached")
            self._iter = self._filtered(self._source) if self._stop else iter(self._source)
        try:
            return next(self._iter)
        except StopIteration:
            self.finished = True
            raise

    def _filtered(self, source: Iterator[str]) -> Iterator[str]:
        buffer = ""
        longest = max(len(s) for s in self._stop)
        for piece in source:
            buffer += piece
            hits = [(buffer.find(s), s) for s in self._stop if s in buffer]
            if hits:
                cut = min(i for i, _ in hits)
                if buffer[:cut]:
                    yield buffer[:cut]
                self.finish_reason = "stop"
                self.close()
                for _ in source:  # drain: lets the backend finish its bookkeeping
                    pass
                self.finish_reason = "stop"
                return
            # Emit everything that cannot be the start of a stop string.
            keep = 0
            for n in range(min(longest - 1, len(buffer)), 0, -1):
                if any(s.startswith(buffer[-n:]) for s in self._stop):
                    keep = n
                    break
            if len(buffer) > keep:
                yield buffer[: len(buffer) - keep]
                buffer = buffer[len(buffer) - keep:]
        if buffer:
            yield buffer

    def close(self) -> None:
        """Stop generating (no-op when already finished)."""
        if self.cancelled.is_set() or self.finished:
            return
        self.cancelled.set()
        for hook in self._on_close:
            hook()


class ChatEngine(ABC):
    """A loaded model that answers conversations. Subclasses implement :meth:`stream_chat`."""

    #: Name under which the API serves the model.
    model_name: str = "lmf"
    #: Default sampling settings (from the config's ``generating`` group).
    settings: GenerationSettings = GenerationSettings()
    #: How the template writes tool calls (see :mod:`lmf.data.tools`).
    tool_format: str = "default"
    #: The media plugin of a multimodal model (:mod:`lmf.data.media.plugins`); None: text only.
    media: Any = None

    @abstractmethod
    def stream_chat(
        self,
        messages: list[dict[str, str]],
        system: Optional[str] = None,
        tools: Optional[str] = None,
        images: Optional[list[str]] = None,
        audios: Optional[list[str]] = None,
        **gen: Any,
    ) -> ChatStream:
        """Start generating a reply to ``messages``; ``gen`` overrides :class:`GenerationSettings` fields.
        ``images`` / ``audios``: local files, one per ``<image>`` / ``<audio>`` placeholder of the messages, in
        order."""

    def chat(
        self,
        messages: list[dict[str, str]],
        system: Optional[str] = None,
        tools: Optional[str] = None,
        images: Optional[list[str]] = None,
        audios: Optional[list[str]] = None,
        **gen: Any,
    ) -> Response:
        """Generate a complete reply."""
        stream = self.stream_chat(messages, system=system, tools=tools, images=images, audios=audios, **gen)
        try:
            text = "".join(stream)
        finally:
            stream.close()
        return Response(text, stream.prompt_tokens, stream.completion_tokens, stream.finish_reason or "stop")

    def parse_tool_calls(self, text: str) -> Optional[list[dict[str, str]]]:
        """``[{"name", "arguments"}]`` when a reply is a tool call in the template's format, else None."""
        from lmf.data.tools import parse_tool_calls

        return parse_tool_calls(text, self.tool_format)

    def close(self) -> None:
        """Release the model (optional)."""


def check_media(media: Any, messages: list[dict[str, str]], images: Optional[list[str]] = None,
                audios: Optional[list[str]] = None) -> None:
    """An engine can answer these images and audio clips: the model takes them, one ``<image>`` (``<audio>``)
    placeholder per file, each a readable file. Raises MessageError naming what is wrong."""
    from lmf.data.media import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER
    from lmf.data.media.audios import audio_problem
    from lmf.data.media.images import image_problem

    kinds = (("image", images, IMAGE_PLACEHOLDER, image_problem, True),
             ("audio", audios, AUDIO_PLACEHOLDER, audio_problem, bool(getattr(media, "takes_audio", False))))
    for kind, files, placeholder, problem_of, counted in kinds:
        files = files or []
        if files and media is None:
            raise MessageError(f"this model takes text only: {kind} input needs a multimodal model (with its "
                               "processor, preprocessor_config.json) and its template (e.g. qwen2_vl, qwen2_audio)")
        placeholders = sum(m["content"].count(placeholder) for m in messages)
        if media is not None and (files or counted) and placeholders != len(files):
            raise MessageError(f"{len(files)} {kind} file(s) but {placeholders} {placeholder} placeholder(s) in the "
                               "messages; they must match")
        for i, path in enumerate(files):
            problem = problem_of(path)
            if problem:
                raise MessageError(f"{kind} {i}: {problem}")


def served_model_name(cfg: "LmfConfig") -> str:
    """Folder name of the last adapter, else of the base model (the model id the API serves)."""
    
    adapters = split_list(cfg.model.adapter_name_or_path)
    path = (adapters[-1] if adapters else cfg.model.model_name_or_path or "lmf").strip()
    return os.path.basename(os.path.normpath(path)) or "lmf"


def split_system(messages: list[dict[str, str]]) -> tuple[Optional[str], list[dict[str, str]]]:
    """Check a conversation and split off a leading system message.

    After the optional system message, turns alternate user-side (``user`` / ``tool``) and
    assistant-side (``assistant`` / ``function``), starting and ending with a user-side turn.
    Errors name the message index.
    """
    if not messages:
        raise MessageError("messages must not be empty")
    system: Optional[str] = None
    offset = 0
    if messages[0].get("role") == "system":
        system = messages[0].get("content") or ""
        offset = 1
    rest = messages[offset:]
    if not rest:
        raise MessageError("messages hold only a system message; add a user message")
    for i, message in enumerate(rest):
        index = i + offset
        role = message.get("role")
        if role == "system":
            raise MessageError(f"messages[{index}]: a system message is only allowed first")
        if role not in USER_SIDE_ROLES + ASSISTANT_SIDE_ROLES:
            raise MessageError(f"messages[{index}]: unknown role {role!r}; use system, user, assistant or tool")
        user_turn = i % 2 == 0
        if user_turn and role not in USER_SIDE_ROLES:
            raise MessageError(f"messages[{index}]: expected a user (or tool) message, got {role!r}; "
                               "roles must alternate")
        if not user_turn and role not in ASSISTANT_SIDE_ROLES:
            raise MessageError(f"messages[{index}]: expected an assistant message, got {role!r}; roles must alternate")
        if not isinstance(message.get("content"), str):
            raise MessageError(f"messages[{index}]: content must be a string")
    if rest[-1]["role"] not in USER_SIDE_ROLES:
        raise MessageError("the last message must be a user (or tool) message")
    return system, [{"role": m["role"], "content": m["content"]} for m in rest]
