"""Tool (function) calling: every format's rendering, parsing and chat-template (jinja) form.

A :class:`~lmf.data.tools.base.ToolFormat` turns function schemas into the system-prompt text a model is
trained on, tool calls into the assistant text, a model reply back into calls (for ``lmf chat`` / ``api``),
and, where it has one, gives the jinja form of the first two for exported chat templates. The formats
are LLaMA-Factory's (:mod:`lmf.data.tools.formats`, :mod:`lmf.data.tools.tagged`); :func:`get_tool_format` looks one up.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional, Sequence

from lmf.data.tools import formats as _formats  # noqa: F401  (registers the formats)
from lmf.data.tools import tagged as _tagged  # noqa: F401
from lmf.data.tools.base import (  # noqa: F401  (the package's API)
    TOOL_FORMATS,
    ToolFormat,
    get_tool_format,
    jinja_str,
    load_json,
    register_tool_format,
)
from lmf.extras.errors import DataError


def format_tools(tools, tool_format: str) -> str:
    """System-prompt text describing ``tools`` (a JSON list of function schemas); "" for no tools
    (None, "", or an empty list: no tool preamble at all, as in LLaMA-Factory and the models' own templates)."""
    if not tools:
        return ""
    specs = load_json(tools, "tools") if isinstance(tools, str) else tools
    if isinstance(specs, dict):
        specs = [specs]
    if not specs:
        return ""
    return get_tool_format(tool_format).render_tools(specs)


def _calls(json_text: str) -> list[tuple[str, str]]:
    try:
        obj = json.loads(json_text)
    except json.JSONDecodeError as exc:
        raise DataError(f"a function (tool call) message is not valid JSON: {json_text[:200]!r}") from exc
    items = obj if isinstance(obj, list) else [obj]
    if not all(isinstance(c, dict) and "name" in c for c in items):
        raise DataError(f"a function (tool call) message must hold {{name, arguments}} objects: {json_text[:200]!r}")
    return [(c["name"], json.dumps(c.get("arguments", {}), ensure_ascii=False)) for c in items]


def format_function_call(content: str, tool_format: str, thought_words: Optional[Sequence[str]] = None,
                         tool_call_words: Optional[Sequence[str]] = None) -> str:
    """Assistant text of a ``function`` turn whose ``content`` is JSON (one call or a list of {name, arguments}),
    as LLaMA-Factory renders it: a thought block before the JSON is kept in front; with ``tool_call_words``,
    JSON between them is the calls and the text around them is kept in front."""
    fmt = get_tool_format(tool_format)
    if tool_call_words and len(tool_call_words) == 2:
        match = re.search(f"{re.escape(tool_call_words[0])}(.*?){re.escape(tool_call_words[1])}", content, re.DOTALL)
        if match:
            return content.replace(match.group(0), "") + fmt.render_calls(_calls(match.group(1)))
    thought = None
    if thought_words and len(thought_words) == 2:
        thought = re.search(f"{re.escape(thought_words[0])}(.*?){re.escape(thought_words[1])}", content, re.DOTALL)
    if thought:
        return thought.group(0) + fmt.render_calls(_calls(content.replace(thought.group(0), "")))
    return fmt.render_calls(_calls(content))


def parse_tool_calls(text: str, tool_format: str) -> Optional[list[dict[str, str]]]:
    """``[{"name", "arguments"}]`` when ``text`` is a well-formed tool call reply, else None (plain text)."""
    calls = get_tool_format(tool_format).parse_calls(text)
    return [{"name": n, "arguments": a} for n, a in calls] if calls else None


def tool_call_message_content(calls: list[dict[str, Any]]) -> str:
    """The ``function`` turn content the templates render: a JSON list of ``{"name", "arguments": {...}}``."""
    out = []
    for call in calls:
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        out.append({"name": call["name"], "arguments": arguments})
    return json.dumps(out, ensure_ascii=False)
