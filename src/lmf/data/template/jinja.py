"""The chat template (jinja) lmf writes into saved tokenizers: :func:`build_jinja` renders what the
training template does, and :func:`renders_alike` tells whether a model's own template already does
(checked on :data:`PROBE_CONVERSATIONS`: system, history, tools, a tool call and its result)."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from lmf.data.template.pieces import FUNCTION, Slots, _Marker
from lmf.data.tools import get_tool_format, jinja_str

if TYPE_CHECKING:
    from lmf.data.template.base import Template


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


def renders_alike(template: "Template", tokenizer) -> bool:
    """Whether the tokenizer's chat_template renders the probe prompts (system, history, tools, a tool
    call and its result) exactly like this template."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return False
    try:
        for messages, tools in PROBE_CONVERSATIONS:
            rendered = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                     add_generation_prompt=True)
            ours = template.prompt_text(_probe_as_lmf(messages), tokenizer=tokenizer,
                                        tools=json.dumps(tools, ensure_ascii=False) if tools else None)
            if rendered != ours:
                return False
    except Exception:  # a template that cannot render the probes is not equivalent
        return False
    return True


def renders_tools(template: "Template") -> bool:
    """Whether the exported chat template can render ``tools`` and assistant ``tool_calls`` (else it refuses them
    with a clear error: ``lmf chat`` / ``lmf api`` render tools with lmf's own code for every format)."""
    if template.tools_slots is not None:
        return get_tool_format(template.tool_format).jinja_calls() is not None
    fmt = get_tool_format(template.tool_format)
    return fmt.jinja_tools() is not None and fmt.jinja_calls() is not None


def build_jinja(template: "Template", tokenizer) -> str:
    """A jinja chat template that renders exactly like ``template.encode_prompt``: system and default system,
    ``tools`` in the template's tool format, assistant ``tool_calls`` and ``tool`` results, thoughts dropped
    from the history of reasoning templates, and the empty thought block of ``adds_empty_thought`` (a
    caller's ``enable_thinking`` overrides the trained default)."""

    def expr(slots: Slots, var: str, idx: str = "''") -> str:
        parts = []
        for piece in slots:
            if isinstance(piece, _Marker):
                text = piece.text(tokenizer)
                if text is not None:
                    parts.append(jinja_str(text))
                continue
            for chunk in re.split(r"(\{\{content\}\}|\{\{idx\}\})", piece):
                if chunk == "{{content}}":
                    parts.append(var)
                elif chunk == "{{idx}}":
                    parts.append(idx)
                elif chunk:
                    parts.append(jinja_str(chunk))
        return " + ".join(parts) if parts else "''"

    fmt = get_tool_format(template.tool_format) if template.tool_format else None
    refuse = "{{- raise_exception(" + jinja_str(
        f"this chat template (lmf template {template.name!r}, tool format {template.tool_format!r}) cannot render "
        "tools; lmf chat / lmf api render them") + ") -}}"
    if template.tools_slots is not None:
        first = template.tools_slots[0] if isinstance(template.tools_slots[0], str) else ""
        tools_block = ("{%- set tool_text -%}{%- if tools -%}{{- " + expr((first,), "(tools | tojson)")
                       + " -}}{%- endif -%}{%- endset -%}")
    else:
        tools_block = (fmt.jinja_tools() if fmt is not None else None) or \
            ("{%- if tools -%}" + refuse + "{%- endif -%}{%- set tool_text = '' -%}")
    calls_block = (fmt.jinja_calls() if fmt is not None else None) or ("{%- set calls = '' -%}" + refuse)
    thought = jinja_str(template.empty_thought())
    thinking_default = {True: "true", False: "false", None: "none"}[template.enable_thinking]
    out = []
    if template.reasoning:
        out.append("{%- set thinking = enable_thinking if enable_thinking is defined else "
                   + thinking_default + " -%}")
    out.append(
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system_message = messages[0]['content'] -%}"
        "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set system_message = '' -%}"
        "{%- set loop_messages = messages -%}{%- endif -%}"
    )
    out.append(tools_block)
    if template.tools_alone_lstrip:
        out.append("{%- set system_head = system_message or " + jinja_str(template.default_system) + " -%}"
                   "{%- set system_text = system_head + (tool_text if system_head else tool_text.lstrip('\\n')) -%}")
    else:
        out.append("{%- set system_text = (system_message or " + jinja_str(template.default_system)
                   + ") + tool_text -%}")
    if template.prefix:
        out.append("{{- " + expr(template.prefix, "''") + " -}}")
    if not template.system_in_user:
        out.append("{%- if system_text -%}{{- " + expr(template.system, "system_text") + " -}}{%- endif -%}")
    out.append("{%- for message in loop_messages -%}")
    out.append("{%- set content = message['content'] or '' -%}")
    if template.system_in_user:
        out.append("{%- if loop.first and system_text and message['role'] == 'user' -%}{%- set content = "
                   + expr(template.system[:1], "system_text") + " + content -%}{%- endif -%}")
    idx = "((loop.index0 // 2) | string)"
    out.append("{%- if message['role'] == 'user' -%}{{- " + expr(template.user, "content", idx) + " -}}")
    out.append("{%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}" + calls_block + "{{- "
               + expr(template.function if template.function is not None else template.assistant, "calls") + " -}}")
    out.append("{%- elif message['role'] == 'assistant' -%}")
    if template.reasoning:  # history keeps no thoughts (as in training prompts), unless preserve_thinking
        close = jinja_str(template.thought_words[1].strip())
        cond = ("thinking == false and " if template.preserve_thinking else "") + close + " in content"
        out.append("{%- if " + cond + " -%}{%- set content = content.split(" + close
                   + ")[-1].lstrip('\\n') -%}{%- endif -%}")
    out.append("{{- " + expr(template.assistant, "content") + " -}}")
    out.append("{%- elif message['role'] in ('tool', 'observation', 'ipython') -%}{{- "
               + expr(template.observation if template.observation is not None else template.user, "content", idx)
               + " -}}")
    out.append("{%- endif -%}{%- endfor -%}")
    if template.reasoning:
        out.append("{%- if add_generation_prompt and not thinking and loop_messages "
                   "and loop_messages[-1]['role'] != 'assistant' -%}{{- " + thought + " -}}{%- endif -%}")
    return "".join(out)
