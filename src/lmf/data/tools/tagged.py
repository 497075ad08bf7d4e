"""The tool formats of LLaMA-Factory 0.9.5 with tagged or Python-style calls: ``qwen3_5``, ``minimax2``,
``seed_oss`` (``<function=...>`` / ``<invoke ...>`` with parameter elements), ``lfm2`` (``[f(a="x")]``) and
``gemma4`` (``call:NAME{k:v}``). Each produces LLaMA-Factory's text."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from lmf.data.tools import prompts
from lmf.data.tools.base import ToolFormat, dumps, function_of, register_tool_format
from lmf.data.tools.formats import _value_text


def _xml_params(block: str, pattern: str) -> dict:
    """``{key: value}`` of ``<parameter ...>`` elements (values parsed as JSON where they are JSON)."""
    out = {}
    for key, raw in re.findall(pattern, block, re.DOTALL):
        try:
            out[key] = json.loads(raw.strip())
        except json.JSONDecodeError:
            out[key] = raw
    return out


class Qwen35ToolFormat(ToolFormat):
    """Qwen 3.5: bare schemas in ``<tools>``, calls as ``<function=NAME>`` with ``<parameter=KEY>`` elements."""

    name = "qwen3_5"
    _CALL = re.compile(r"<tool_call>\s*<function=\s*([^\s<>]+)\s*(.*?)\s*</function>\s*</tool_call>", re.DOTALL)

    def render_tools(self, specs):
        return prompts.QWEN35_TOOL_PROMPT.format(tool_text="".join("\n" + dumps(function_of(s)) for s in specs))

    def render_calls(self, calls):
        texts = []
        for name, arguments in calls:
            text = f"<tool_call>\n<function={name}>"
            for key, value in json.loads(arguments).items():
                text += f"\n<parameter={key}>\n{_value_text(value)}\n</parameter>"
            texts.append(text + "\n</function>\n</tool_call>")
        return "\n".join(texts)

    def parse_calls(self, text):
        calls = [(name.strip(), dumps(_xml_params(block.strip(), r"<parameter=(.*?)>(.*?)</parameter>")))
                 for name, block in self._CALL.findall(text)]
        return calls or None


class MiniMax2ToolFormat(ToolFormat):
    """MiniMax-M2: ``<tool>`` JSON lines, calls as ``<invoke name=...>`` with ``<parameter name=...>``."""

    name = "minimax2"
    _CALLS = re.compile(r"<minimax:tool_call>\s*(.+?)\s*</minimax:tool_call>", re.DOTALL)

    def render_tools(self, specs):
        tool_text = "".join("<tool>" + dumps(s.get("function", "") if s.get("type") == "function" else s)
                            + "</tool>\n" for s in specs)
        return prompts.MINIMAX_M2_TOOL_PROMPT.format(tool_text=tool_text)

    def render_calls(self, calls):
        texts = []
        for name, arguments in calls:
            text = f'<invoke name="{name}">'
            for key, value in json.loads(arguments).items():
                text += f'\n<parameter name="{key}">' + _value_text(value) + "</parameter>"
            texts.append(text + "\n</invoke>")
        return "\n".join(texts)

    def parse_calls(self, text):
        match = self._CALLS.search(text)
        if not match:
            return None
        calls = [(name.strip(), dumps(_xml_params(block, r"<parameter name=\"(.*?)\">(.*?)</parameter>")))
                 for name, block in re.findall(r"<invoke name=\"(.*?)\">(.*?)</invoke>", match.group(1), re.DOTALL)]
        return calls or None


class SeedToolFormat(ToolFormat):
    """Seed-OSS: the tool list as JSON; calls as ``<seed:tool_call>`` with ``<function=...>`` elements."""

    name = "seed_oss"
    _CALL = re.compile(r"<seed:tool_call>\s*<function=\s*([^\s<]+)\s*(.*?)\s*</function>\s*</seed:tool_call>",
                       re.DOTALL)

    def render_tools(self, specs):
        return prompts.SEED_TOOL_PROMPT.format(tool_text="\n" + dumps(specs))

    def render_calls(self, calls):
        texts = []
        for name, arguments in calls:
            text = "\n<seed:tool_call>\n<function=" + name
            for key, value in json.loads(arguments).items():
                text += "\n<parameter=" + key + ">" + _value_text(value) + "</parameter>"
            texts.append(text + "\n</function>\n</seed:tool_call>")
        return "\n".join(texts)

    def parse_calls(self, text):
        calls = [(name.strip(), dumps(_xml_params(block.strip(), r"<parameter=(.*?)>(.*?)</parameter>")))
                 for name, block in self._CALL.findall(text)]
        return calls or None


class Lfm2ToolFormat(ToolFormat):
    """LFM2.5: the schemas as a JSON list; calls in Python syntax, ``[f(a="x", b=1)]``."""

    name = "lfm2"
    START, END = "<|tool_call_start|>", "<|tool_call_end|>"

    def render_tools(self, specs):
        return prompts.LFM2_TOOL_PROMPT.format(tool_text=dumps([function_of(s) for s in specs]))

    def render_calls(self, calls):
        texts = []
        for name, arguments in calls:
            parts = [f'{k}="{v}"' if isinstance(v, str) else f"{k}={dumps(v)}" for k, v in json.loads(arguments).items()]
            texts.append(f"{name}({', '.join(parts)})")
        return f"{self.START}[{', '.join(texts)}]{self.END}"

    def parse_calls(self, text):
        start = text.find(self.START)
        end = text.find(self.END, start + 1) if start >= 0 else -1
        if start < 0 or end < 0:
            return None
        try:
            tree = ast.parse(text[start + len(self.START):end].strip(), mode="eval")
        except SyntaxError:
            return None
        nodes = tree.body.elts if isinstance(tree.body, ast.List) else [tree.body]
        calls = []
        for node in nodes:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
                return None
            try:
                args = {kw.arg: _literal(kw.value) for kw in node.keywords}
            except (ValueError, SyntaxError):
                return None
            calls.append((node.func.id, dumps(args)))
        return calls or None


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal(node: ast.AST) -> Any:
    """A Python literal, or JSON's true/false/null written as names."""
    if isinstance(node, ast.Name):
        if node.id not in _JSON_NAMES:
            raise ValueError(f"unknown name {node.id}")
        return _JSON_NAMES[node.id]
    return ast.literal_eval(node)


class Gemma4ToolFormat(ToolFormat):
    """Gemma 4: ``declaration:NAME{...}`` tool lines and ``<|tool_call>call:NAME{k:v}<tool_call|>`` calls."""

    name = "gemma4"
    _CALL = re.compile(r"<\|tool_call\>call:([^{\s]+)\{(.*?)\}<tool_call\|>", re.DOTALL)

    @staticmethod
    def _quoted(text: Any) -> str:
        return f'<|"|>{text}<|"|>'

    def render_tools(self, specs):
        lines = []
        for spec in specs:
            spec = function_of(spec)
            text = f"declaration:{spec['name']}" + "{" + "description:" + self._quoted(spec.get("description", ""))
            params = spec.get("parameters")
            if params:
                parts = []
                if params.get("properties"):
                    props = []
                    for name, schema in params["properties"].items():
                        items = []
                        if schema.get("description"):
                            items.append("description:" + self._quoted(schema["description"]))
                        if schema.get("type"):
                            items.append("type:" + self._quoted(str(schema["type"]).upper()))
                        props.append(f"{name}:{{{','.join(items)}}}")
                    parts.append(f"properties:{{{','.join(props)}}}")
                if params.get("required"):
                    parts.append("required:[" + ",".join(self._quoted(r) for r in params["required"]) + "]")
                if params.get("type"):
                    parts.append("type:" + self._quoted(str(params["type"]).upper()))
                text += f",parameters:{{{','.join(parts)}}}"
            response = spec.get("response")
            if response:
                parts = []
                if response.get("description"):
                    parts.append("description:" + self._quoted(response["description"]))
                kind = str(response.get("type", "")).upper()
                if kind == "OBJECT":
                    parts.append("type:" + self._quoted(kind))
                text += f",response:{{{','.join(parts)}}}"
            lines.append(text + "}")
        return "\n".join(lines)

    def _value(self, value: Any, escape_keys: bool = True) -> str:
        if isinstance(value, str):
            return self._quoted(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dict):
            return "{" + ",".join(f"{self._quoted(k) if escape_keys else k}:{self._value(value[k], escape_keys)}"
                                  for k in sorted(value)) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(self._value(v, escape_keys) for v in value) + "]"
        return "null" if value is None else str(value)

    def render_calls(self, calls):
        texts = []
        for name, arguments in calls:
            try:
                parsed = json.loads(arguments)
            except (TypeError, json.JSONDecodeError):
                parsed = arguments
            if isinstance(parsed, dict):
                body = ",".join(f"{k}:{self._value(parsed[k], escape_keys=False)}" for k in sorted(parsed))
            elif isinstance(parsed, str):
                body = parsed
            else:
                body = self._value(parsed, escape_keys=False)
            texts.append(f"<|tool_call>call:{name}" + "{" + body + "}<tool_call|>")
        return "".join(texts)

    def parse_calls(self, text):
        calls = []
        for name, block in self._CALL.findall(text):
            inner = block.strip()
            parsed: Any = {}
            if inner:
                normal = re.sub(r"<\|\"\|\>(.*?)<\|\"\|\>", lambda m: json.dumps(m.group(1)), "{" + inner + "}",
                                flags=re.DOTALL)
                normal = re.sub(r"(^|[{\s,])([A-Za-z_][A-Za-z0-9_]*)(\s*:)", r'\1"\2"\3', normal)
                try:
                    parsed = json.loads(normal)
                except json.JSONDecodeError:
                    return None
            calls.append((name.strip(), dumps(parsed)))
        return calls or None


for _format in (Qwen35ToolFormat(), MiniMax2ToolFormat(), SeedToolFormat(), Lfm2ToolFormat(), Gemma4ToolFormat()):
    register_tool_format(_format)
