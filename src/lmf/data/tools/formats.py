"""The tool formats of LLaMA-Factory 0.9.5 whose calls are text or JSON: ``default``, ``qwen``, ``ling``,
``glm4_moe``, ``glm4``, ``llama3``, ``mistral``, ``minimax1`` (the tagged ones are in :mod:`lmf.data.tools.tagged`).
Each produces LLaMA-Factory's text; ``default`` and ``qwen`` also have their jinja form."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Optional

from lmf.data.tools import prompts
from lmf.data.tools.base import (
    Call,
    ToolFormat,
    arguments_json,
    dumps,
    function_of,
    jinja_calls_loop,
    jinja_str,
    register_tool_format,
    split_prompt,
    wrapped,
)


def _value_text(value: Any) -> str:
    """An argument value inside XML-style calls: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else dumps(value)


class DefaultToolFormat(ToolFormat):
    """A described list of tools; calls as ``Action: NAME`` + ``Action Input: {...}``."""

    name = "default"
    _CALL = re.compile(r"Action:\s*(.+?)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", re.DOTALL)

    def render_tools(self, specs):
        tool_text, names = "", []
        for spec in specs:
            spec = function_of(spec)
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
        return prompts.DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(names))

    def render_calls(self, calls):
        return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)

    def parse_calls(self, text):
        calls = []
        for name, raw in self._CALL.findall(text):
            arguments = arguments_json(raw.strip().strip('"').strip("```"))
            if arguments is None:
                return None
            calls.append((name.strip(), arguments))
        return calls or None

    def jinja_tools(self):
        before, middle, after = split_prompt(prompts.DEFAULT_TOOL_PROMPT, "tool_text", "tool_names")
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

    def jinja_calls(self):
        return jinja_calls_loop("{{- 'Action: ' ~ call['name'] ~ '\\nAction Input: ' -}}{%- if args is mapping -%}"
                                "{{- args | tojson -}}{%- else -%}{{- args -}}{%- endif -%}")


class QwenToolFormat(ToolFormat):
    """Qwen 2.5 / 3: the tools as JSON lines in ``<tools>``, each call a ``<tool_call>`` JSON block."""

    name = "qwen"
    prompt = prompts.QWEN_TOOL_PROMPT
    _CALL = re.compile(r"<tool_call>(.+?)</tool_call>(?=\s*<tool_call>|\s*$)", re.DOTALL)

    def render_tools(self, specs):
        return self.prompt.format(tool_text="".join("\n" + dumps(wrapped(s)) for s in specs))

    def render_calls(self, calls):
        return "\n".join("<tool_call>\n" + dumps({"name": n, "arguments": json.loads(a)}) + "\n</tool_call>"
                         for n, a in calls)

    def parse_calls(self, text):
        calls = []
        for block in self._CALL.findall(text):
            try:
                obj = json.loads(block.strip())
            except json.JSONDecodeError:
                return None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
                return None
            arguments = arguments_json(obj["arguments"])
            if arguments is None:
                return None
            calls.append((obj["name"], arguments))
        return calls or None

    def jinja_tools(self):
        if self.prompt is not prompts.QWEN_TOOL_PROMPT:
            return None
        before, after = split_prompt(self.prompt, "tool_text")
        body = ("{%- for tool in tools -%}{{- '\\n' -}}{%- if tool.get('type') == 'function' -%}{{- tool | tojson -}}"
                "{%- else -%}{{- {'type': 'function', 'function': tool} | tojson -}}{%- endif -%}{%- endfor -%}")
        return ("{%- set tool_text -%}{%- if tools -%}{{- " + jinja_str(before) + " -}}" + body + "{{- "
                + jinja_str(after) + " -}}{%- endif -%}{%- endset -%}")

    def jinja_calls(self):
        if type(self) is not QwenToolFormat:
            return None
        return jinja_calls_loop(
            "{{- '<tool_call>\\n' -}}{%- if args is mapping -%}{{- {'name': call['name'], 'arguments': args} | tojson -}}"
            "{%- else -%}{{- '{\"name\": ' ~ call['name'] | tojson ~ ', \"arguments\": ' ~ args ~ '}' -}}"
            "{%- endif -%}{{- '\\n</tool_call>' -}}")


class LingToolFormat(QwenToolFormat):
    """Ling v2: Qwen's calls, its own tools preamble with thinking turned off."""

    name = "ling"
    prompt = prompts.LING_TOOL_PROMPT

    def render_tools(self, specs):
        return super().render_tools(specs) + "\ndetailed thinking off"


class Glm4MoeToolFormat(QwenToolFormat):
    """GLM-4.5 / 4.6 / 4.7: Qwen-style tools preamble, calls as ``<tool_call>NAME`` + ``<arg_key>``/``<arg_value>``."""

    name = "glm4_moe"
    prompt = prompts.GLM4_MOE_TOOL_PROMPT

    def render_calls(self, calls):
        texts = []
        for name, arguments in calls:
            text = "\n<tool_call>" + name
            for key, value in json.loads(arguments).items():
                text += "\n<arg_key>" + key + "</arg_key>" + "\n<arg_value>" + _value_text(value) + "</arg_value>"
            texts.append(text)
        return "\n".join(texts)


class Glm4ToolFormat(ToolFormat):
    """GLM-4 (0414): a Chinese preamble with each tool as indented JSON; one call as ``NAME\\n{arguments}``."""

    name = "glm4"

    def render_tools(self, specs):
        tool_text = ""
        for spec in specs:
            spec = spec.get("function", "") if spec.get("type") == "function" else spec
            tool_text += "\n\n## {name}\n\n{body}\n在调用上述函数时，请使用 Json 格式表示调用的参数。".format(
                name=spec["name"], body=dumps(spec, indent=4))
        return prompts.GLM4_TOOL_PROMPT.format(tool_text=tool_text)

    def render_calls(self, calls):
        if len(calls) > 1:
            from lmf.extras.errors import DataError

            raise DataError("tool_format glm4: GLM-4 does not support parallel function calls")
        return f"{calls[0][0]}\n{calls[0][1]}"

    def parse_calls(self, text):
        if "\n" not in text:
            return None
        name, raw = text.split("\n", maxsplit=1)
        arguments = arguments_json(raw.strip())
        return [(name, arguments)] if arguments is not None else None


class Llama3ToolFormat(ToolFormat):
    """Llama 3.x JSON tool calling (tools in the system message, dated today)."""

    name = "llama3"

    def render_tools(self, specs):
        tool_text = "".join(dumps(wrapped(s), indent=4) + "\n\n" for s in specs)
        return prompts.LLAMA3_TOOL_PROMPT.format(date=datetime.now().strftime("%d %b %Y"), tool_text=tool_text)

    def render_calls(self, calls):
        objects = [{"name": n, "parameters": json.loads(a)} for n, a in calls]
        return dumps(objects[0] if len(objects) == 1 else objects)

    def parse_calls(self, text):
        return _parse_json_calls(text, "parameters")


class MistralToolFormat(ToolFormat):
    """Mistral v0.3: ``[AVAILABLE_TOOLS] [...] [/AVAILABLE_TOOLS]``, calls as a JSON list."""

    name = "mistral"

    def render_tools(self, specs):
        return "[AVAILABLE_TOOLS] " + dumps([wrapped(s) for s in specs]) + "[/AVAILABLE_TOOLS]"

    def render_calls(self, calls):
        return dumps([{"name": n, "arguments": json.loads(a)} for n, a in calls])

    def parse_calls(self, text):
        return _parse_json_calls(text, "arguments")


def _parse_json_calls(text: str, key: str) -> Optional[list[Call]]:
    try:
        obj = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    try:
        return [(item["name"], dumps(item[key])) for item in items] or None
    except (KeyError, TypeError):
        return None


class MiniMax1ToolFormat(ToolFormat):
    """MiniMax-M1: schemas as JSON lines in ``<tools>``, calls as JSON lines in ``<tool_calls>``."""

    name = "minimax1"
    _CALLS = re.compile(r"<tool_calls>\s*(.+?)\s*</tool_calls>", re.DOTALL)

    def render_tools(self, specs):
        tool_text = "".join(dumps(s.get("function", "") if s.get("type") == "function" else s) + "\n" for s in specs)
        return prompts.MINIMAX_M1_TOOL_PROMPT.format(tool_text=tool_text)

    def render_calls(self, calls):
        lines = [dumps({"name": n, "arguments": json.loads(a)}) for n, a in calls]
        return "<tool_calls>\n" + "\n".join(lines) + "\n</tool_calls>"

    def parse_calls(self, text):
        match = self._CALLS.search(text)
        if not match:
            return None
        calls = []
        for line in match.group(1).split("\n"):
            try:
                obj = json.loads(line.strip())
                calls.append((obj["name"], dumps(obj["arguments"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        return calls or None


for _format in (DefaultToolFormat(), QwenToolFormat(), LingToolFormat(), Glm4MoeToolFormat(), Glm4ToolFormat(),
                Llama3ToolFormat(), MistralToolFormat(), MiniMax1ToolFormat()):
    register_tool_format(_format)
