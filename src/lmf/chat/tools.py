"""Tool (function) calls in model replies, in the formats lmf's templates train on.

``qwen``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks.
``default``: ``Action: NAME\\nAction Input: {...}`` lines (LLaMA-Factory's default tool format).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

_QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_DEFAULT_CALL = re.compile(r"Action:\s*(.+?)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)


def _arguments_json(value: Any) -> Optional[str]:
    """Arguments as a JSON object string (OpenAI's wire format), or None when they are not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def parse_tool_calls(text: str, tool_format: str) -> Optional[list[dict[str, str]]]:
    """``[{"name", "arguments"}]`` when ``text`` is a well-formed tool call reply, else None (plain text)."""
    calls: list[dict[str, str]] = []
    if tool_format == "qwen":
        for block in _QWEN_CALL.findall(text):
            try:
                obj = json.loads(block)
            except json.JSONDecodeError:
                return None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return None
            arguments = _arguments_json(obj.get("arguments", {}))
            if arguments is None:
                return None
            calls.append({"name": obj["name"], "arguments": arguments})
    else:
        for name, raw_args in _DEFAULT_CALL.findall(text):
            arguments = _arguments_json(raw_args.strip())
            if arguments is None:
                return None
            calls.append({"name": name.strip(), "arguments": arguments})
    return calls or None


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
