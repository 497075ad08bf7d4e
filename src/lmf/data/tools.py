"""Tool (function) calling: every format's rendering, parsing and chat-template (jinja) form, in one place.

A :class:`ToolFormat` turns function schemas into the system-prompt text a model is trained on
(:meth:`~ToolFormat.render_tools`), tool calls into the assistant text (:meth:`~ToolFormat.render_calls`),
a model reply back into calls (:meth:`~ToolFormat.parse_calls`, the inverse, for ``lmf chat`` / ``api``),
and gives the jinja statements that render the same two texts in an exported chat template.

Formats (LLaMA-Factory's names): ``default`` (``Action: NAME`` / ``Action Input: {...}``) and ``qwen``
(``<tool_call>{"name": ..., "arguments": ...}</tool_call>`` blocks; the tools as JSON in ``<tools>``).
:func:`get_tool_format` looks one up; new formats register with :func:`register_tool_format`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from lmf.extras.errors import ConfigError, DataError

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


def jinja_str(text: str) -> str:
    """``text`` as a jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _split_prompt(prompt: str, *fields: str) -> list[str]:
    """The literal parts of a ``str.format`` prompt around its ``fields`` (braces unescaped)."""
    marked = prompt.format(**{f: f"\x00{i}\x00" for i, f in enumerate(fields)})
    return re.split("\x00\\d\x00", marked)


def _load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} is not valid JSON: {exc}") from exc


def _arguments_json(value: Any) -> Optional[str]:
    """Arguments as a JSON object string (OpenAI's wire format), or None when they are not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _function_of(spec: dict) -> dict:
    """The function schema of an OpenAI tool (``{"type": "function", "function": {...}}``) or a bare schema."""
    return spec.get("function", spec) if spec.get("type") == "function" else spec


class ToolFormat:
    """One way of writing tools and tool calls. Subclasses implement the four conversions."""

    name = ""

    def render_tools(self, specs: list[dict]) -> str:
        """System-prompt text for a non-empty list of function schemas."""
        raise NotImplementedError

    def render_calls(self, calls: list[dict]) -> str:
        """Assistant text of ``[{"name", "arguments": {...}}]``."""
        raise NotImplementedError

    def parse_calls(self, text: str) -> Optional[list[dict[str, str]]]:
        """``[{"name", "arguments": JSON string}]`` when ``text`` is a well-formed tool-call reply, else None."""
        raise NotImplementedError

    def jinja_tools(self) -> str:
        """Jinja statements that set ``tool_text`` to :meth:`render_tools`'s text for ``tools`` ('' when none)."""
        raise NotImplementedError

    def jinja_calls(self) -> str:
        """Jinja statements that set ``calls`` to :meth:`render_calls`'s text for ``message['tool_calls']``."""
        raise NotImplementedError


class DefaultToolFormat(ToolFormat):
    """LLaMA-Factory's default: a described list of tools, ``Action: NAME`` + ``Action Input: {...}`` calls."""

    name = "default"
    _CALL = re.compile(r"Action:\s*(.+?)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)

    def render_tools(self, specs: list[dict]) -> str:
        tool_text, names = "", []
        for spec in specs:
            spec = _function_of(spec)
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

    def render_calls(self, calls: list[dict]) -> str:
        return "\n".join(f"Action: {c['name']}\nAction Input: {json.dumps(c.get('arguments', {}), ensure_ascii=False)}"
                         for c in calls)

    def parse_calls(self, text: str) -> Optional[list[dict[str, str]]]:
        calls = []
        for name, raw_args in self._CALL.findall(text):
            arguments = _arguments_json(raw_args.strip())
            if arguments is None:
                return None
            calls.append({"name": name.strip(), "arguments": arguments})
        return calls or None

    def jinja_tools(self) -> str:
        before, middle, after = _split_prompt(DEFAULT_TOOL_PROMPT, "tool_text", "tool_names")
        param = ("{{- '  - ' ~ name ~ ' (' ~ param.get('type', '') ~ (', required' if name in required else '') "
                 "~ '): ' ~ param.get('description', '') ~ ((', should be one of [' ~ param['enum'] | join(', ') "
                 "~ ']') if param.get('enum') else '') ~ ((', where each item should be ' "
                 "~ param['items'].get('type', '')) if param.get('items') else '') ~ '\\n' -}}")
        return (
            "{%- set tool_text -%}{%- if tools -%}{{- " + jinja_str(before) + " -}}{%- set names = namespace(v=[]) -%}"
            "{%- for tool in tools -%}"
            "{%- set spec = tool.get('function', tool) if tool.get('type') == 'function' else tool -%}"
            "{%- set params = spec.get('parameters') or {} -%}{%- set required = params.get('required', []) -%}"
            "{{- '> Tool Name: ' ~ spec['name'] ~ '\\nTool Description: ' ~ spec.get('description', '') "
            "~ '\\nTool Args:\\n' -}}"
            "{%- for name, param in (params.get('properties', {}) or {}).items() -%}" + param + "{%- endfor -%}"
            "{{- '\\n' -}}{%- set names.v = names.v + [spec['name']] -%}{%- endfor -%}"
            "{{- " + jinja_str(middle) + " ~ names.v | join(', ') ~ " + jinja_str(after) + " -}}"
            "{%- endif -%}{%- endset -%}"
        )

    def jinja_calls(self) -> str:
        one = ("{{- 'Action: ' ~ call['name'] ~ '\\nAction Input: ' -}}{%- if args is mapping -%}{{- args | tojson -}}"
               "{%- else -%}{{- args -}}{%- endif -%}")
        return _jinja_calls_loop(one)


class QwenToolFormat(ToolFormat):
    """Qwen's: the tools as JSON lines in ``<tools>``, each call a ``<tool_call>`` JSON block."""

    name = "qwen"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def render_tools(self, specs: list[dict]) -> str:
        text = "".join("\n" + json.dumps(s if s.get("type") == "function" else {"type": "function", "function": s},
                                         ensure_ascii=False) for s in specs)
        return QWEN_TOOL_PROMPT.format(tool_text=text)

    def render_calls(self, calls: list[dict]) -> str:
        return "\n".join("<tool_call>\n" + json.dumps({"name": c["name"], "arguments": c.get("arguments", {})},
                                                      ensure_ascii=False) + "\n</tool_call>" for c in calls)

    def parse_calls(self, text: str) -> Optional[list[dict[str, str]]]:
        calls = []
        for block in self._CALL.findall(text):
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
        return calls or None

    def jinja_tools(self) -> str:
        before, after = _split_prompt(QWEN_TOOL_PROMPT, "tool_text")
        body = ("{%- for tool in tools -%}{{- '\\n' -}}{%- if tool.get('type') == 'function' -%}{{- tool | tojson -}}"
                "{%- else -%}{{- {'type': 'function', 'function': tool} | tojson -}}{%- endif -%}{%- endfor -%}")
        return ("{%- set tool_text -%}{%- if tools -%}{{- " + jinja_str(before) + " -}}" + body + "{{- "
                + jinja_str(after) + " -}}{%- endif -%}{%- endset -%}")

    def jinja_calls(self) -> str:
        one = ("{{- '<tool_call>\\n' -}}{%- if args is mapping -%}"
               "{{- {'name': call['name'], 'arguments': args} | tojson -}}"
               "{%- else -%}{{- '{\"name\": ' ~ call['name'] | tojson ~ ', \"arguments\": ' ~ args ~ '}' -}}"
               "{%- endif -%}{{- '\\n</tool_call>' -}}")
        return _jinja_calls_loop(one)


def _jinja_calls_loop(one_call: str) -> str:
    """Statements setting ``calls`` from ``message['tool_calls']``, ``one_call`` rendering ``call`` / ``args``."""
    return ("{%- set calls -%}{%- for item in message['tool_calls'] -%}"
            "{%- set call = item.get('function', item) -%}{%- set args = call.get('arguments', {}) -%}"
            "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}" + one_call + "{%- endfor -%}{%- endset -%}")


TOOL_FORMATS: dict[str, ToolFormat] = {}


def register_tool_format(tool_format: ToolFormat) -> ToolFormat:
    TOOL_FORMATS[tool_format.name] = tool_format
    return tool_format


register_tool_format(DefaultToolFormat())
register_tool_format(QwenToolFormat())


def get_tool_format(name: str) -> ToolFormat:
    """The format called ``name``; a ConfigError naming the key ``tool_format`` when there is none."""
    if name not in TOOL_FORMATS:
        raise ConfigError(f"config key 'tool_format': unknown format {name!r}; choose one of: "
                          f"{', '.join(sorted(TOOL_FORMATS))}")
    return TOOL_FORMATS[name]


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
    return get_tool_format(tool_format).render_tools(specs)


def format_function_call(content: str, tool_format: str) -> str:
    """Assistant text of a tool call (``content`` is JSON: one call or a list of {name, arguments}); text that
    is not such JSON is returned as it is."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError:
        return content
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and "name" in c for c in calls):
        return content
    return get_tool_format(tool_format).render_calls(calls)


def parse_tool_calls(text: str, tool_format: str) -> Optional[list[dict[str, str]]]:
    """``[{"name", "arguments"}]`` when ``text`` is a well-formed tool call reply, else None (plain text)."""
    return get_tool_format(tool_format).parse_calls(text)


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
