"""Request/response schemas of the OpenAI chat-completions API (the subset lmf serves)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: Optional[str] = None


class ImagePart(BaseModel):
    """An image: ``url`` is a ``data:image/...;base64,`` URL, or (only with the server's image directory,
    ``--image-dir`` / ``API_IMAGE_DIR``) a local path or ``file://`` URL inside it."""

    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    data: str  # base64
    format: str  # wav, mp3, flac, ...


class AudioPart(BaseModel):
    """An audio clip, as OpenAI's API sends one: base64 ``data`` and its ``format``."""

    type: Literal["input_audio"]
    input_audio: InputAudio


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


PLACEHOLDERS = {ImagePart: "<image>", AudioPart: "<audio>"}


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: Optional[list[ToolCall]] = None  # before content: its check reads them
    content: Union[str, list[Union[TextPart, ImagePart, AudioPart]], None] = Field(default=None,
                                                                                  validate_default=True)
    tool_call_id: Optional[str] = None
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, value, info: ValidationInfo):
        """Null or absent content only in an assistant message with ``tool_calls`` (as OpenAI's API)."""
        role = info.data.get("role")
        if value is None and not (role == "assistant" and info.data.get("tool_calls")):
            raise PydanticCustomError("missing_content", "content is required in a {role} message (a string or a "
                                      "list of parts); only an assistant message with tool_calls may leave it null",
                                      {"role": role or "chat"})
        return value

    def engine_role(self) -> str:
        """The role the engine sees: an assistant message with ``tool_calls`` is a ``function`` turn;
        OpenAI's ``developer`` role (the newer name of ``system``) is a system message."""
        if self.role == "developer":
            return "system"
        return "function" if self.role == "assistant" and self.tool_calls else self.role

    def text(self) -> str:
        """The message as plain text (text parts joined; tool calls as the templates' JSON list)."""
        if self.role == "assistant" and self.tool_calls:
            from lmf.data.tools import tool_call_message_content

            return tool_call_message_content([{"name": c.function.name, "arguments": c.function.arguments}
                                              for c in self.tool_calls])
        if isinstance(self.content, list):  # a media part is its placeholder, as in training data
            return "".join(part.text if isinstance(part, TextPart) else PLACEHOLDERS[type(part)]
                           for part in self.content)
        return self.content or ""

    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        return [part.image_url.url for part in self.content if isinstance(part, ImagePart)]

    def audio_parts(self) -> list[InputAudio]:
        if not isinstance(self.content, list):
            return []
        return [part.input_audio for part in self.content if isinstance(part, AudioPart)]


class FunctionDefinition(BaseModel):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[Tool]] = None
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    n: int = Field(default=1, ge=1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: Union[str, list[str], None]) -> Optional[list[str]]:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings are allowed")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def completion_body(request_id: str, model: str, choices: list[dict], usage: dict) -> dict:
    """A non-streaming ``chat.completion`` object."""
    return {"id": request_id, "object": "chat.completion", "created": now(), "model": model,
            "choices": choices, "usage": usage}


def chunk_body(request_id: str, model: str, delta: dict, finish_reason: Optional[str] = None,
               usage: Optional[dict] = None, with_choice: bool = True) -> dict:
    """One streaming ``chat.completion.chunk`` object."""
    choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if with_choice else []
    body = {"id": request_id, "object": "chat.completion.chunk", "created": now(), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """OpenAI-style error object (what the ``openai`` client shows as the exception message)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
