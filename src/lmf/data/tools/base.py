"""The tool-format interface, its registry, and the helpers every format shares.

A call is ``(name, arguments)`` with the arguments as a JSON object string (as OpenAI sends them and
LLaMA-Factory's formats take them).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from lmf.extras.errors import ConfigError, DataError

Call = tuple  # (name: str, arguments: JSON object string)


def jinja_str(text: str) -> str:
    """``text`` as a jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def split_prompt(prompt: str, *fields: str) -> list[str]:
    """The literal parts of a ``str.format`` prompt around its ``fields`` (braces unescaped)."""
    marked = prompt.format(**{f: f"\x00{i}\x00" for i, f in enumerate(fields)})
    return re.split("\x00\\d\x00", marked)


def dumps(value: Any, **kw) -> str:
    return json.dumps(value, ensure_ascii=False, **kw)


def function_of(spec: dict) -> dict:
    """The function schema of an OpenAI tool (``{"type": "function", "function": {...}}``) or a bare schema."""
    return spec.get("function", spec) if spec.get("type") == "function" else spec


def wrapped(spec: dict) -> dict:
    """An OpenAI tool: a bare schema wrapped as ``{"type": "function", "function": spec}``."""
    return spec if spec.get("type") == "function" else {"type": "function", "function": spec}


def arguments_json(value: Any) -> Optional[str]:
    """Arguments as a JSON object string, or None when they are not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return dumps(value) if isinstance(value, dict) else None


def load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} is not valid JSON: {exc}") from exc


class ToolFormat:
    """One way of writing tools and tool calls (LLaMA-Factory's ``tool_format`` names)."""

    name = ""

    def render_tools(self, specs: list[dict]) -> str:
        """System-prompt text for a non-empty list of function schemas."""
        raise NotImplementedError

    def render_calls(self, calls: list[Call]) -> str:
        """Assistant text of a list of ``(name, arguments JSON)`` calls."""
        raise NotImplementedError

    def parse_calls(self, text: str) -> Optional[list[Call]]:
        """The calls of a well-formed tool-call reply, else None (plain text)."""
        raise NotImplementedError

    def jinja_tools(self) -> Optional[str]:
        """Jinja statements setting ``tool_text`` to :meth:`render_tools`'s text for ``tools``; None when the
        format has no jinja form (the exported template then refuses tools instead of rendering them wrong)."""
        return None

    def jinja_calls(self) -> Optional[str]:
        """Jinja statements setting ``calls`` to :meth:`render_calls`'s text for ``message['tool_calls']``."""
        return None


def jinja_calls_loop(one_call: str) -> str:
    """Statements setting ``calls`` from ``message['tool_calls']``; ``one_call`` renders ``call`` / ``args``."""
    return ("{%- set calls -%}{%- for item in message['tool_calls'] -%}"
            "{%- set call = item.get('function', item) -%}{%- set args = call.get('arguments', {}) -%}"
            "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}" + one_call + "{%- endfor -%}{%- endset -%}")


TOOL_FORMATS: dict[str, ToolFormat] = {}


def register_tool_format(tool_format: ToolFormat) -> ToolFormat:
    TOOL_FORMATS[tool_format.name] = tool_format
    return tool_format


def get_tool_format(name: str) -> ToolFormat:
    """The format called ``name``; a ConfigError naming the key ``tool_format`` when there is none."""
    if name not in TOOL_FORMATS:
        raise ConfigError(f"config key 'tool_format': unknown format {name!r}; choose one of: "
                          f"{', '.join(sorted(TOOL_FORMATS))}")
    return TOOL_FORMATS[name]
