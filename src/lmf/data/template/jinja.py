"""The chat template (jinja) lmf writes into saved tokenizers: :func:`build_jinja` renders what the
training template does, and :func:`renders_alike` tells whether a model's own template already does
(checked on :data:`PROBE_CONVERSATIONS`: system, history, tools, a tool call and its result)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from lmf.data.template.base import FUNCTION, Slots, _Marker
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


def build_jinja(template: "Template", tokenizer) -> str:
    """A jinja chat template that renders exactly like ``template.encode_prompt``: system and default system,
    ``tools`` in the template's tool format, assistant ``tool_calls`` and ``tool`` results, thoughts dropped
    from the history of reasoning templates, and the empty thought block of ``adds_empty_thought`` (a
    caller's ``enable_thinking`` overrides the trained default)."""

    def expr(slots: Slots, var: str) -> str:
        parts = []
        for piece in slots:
            if isinstance(piece, _Marker):
                if getattr(tokenizer, piece.attr + "_id", None) is not None:
                    parts.append(jinja_str(getattr(tokenizer, piece.attr)))
                continue
            chunks = piece.split("{{content}}")
            for k, chunk in enumerate(chunks):
                if k:
                    parts.append(var)
                if chunk:
                    parts.append(jinja_str(chunk))
        return " + ".join(parts) if parts else "''"

    thought = jinja_str(template.thought_words[0] + template.thought_words[1])
    thinking_default = {True: "true", False: "false", None: "none"}[template.enable_thinking]
    out = []
    if template.reasoning:
        out.append("{%- set thinking = enable_thinking if enable_thinking is defined else "
                   + thinking_default + " -%}")
    out.append("{%- set system_message = " + jinja_str(template.default_system) + " -%}")
    out.append(
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system_message = messages[0]['content'] -%}"
        "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    )
    out.append(get_tool_format(template.tool_format).jinja_tools())
    out.append("{%- set system_text = (system_message or '') + tool_text -%}")
    if template.prefix:
        out.append("{{- " + expr(template.prefix, "''") + " -}}")
    if not template.system_in_user:
        out.append("{%- if system_text -%}{{- " + expr(template.system, "system_text") + " -}}{%- endif -%}")
    out.append("{%- for message in loop_messages -%}")
    out.append("{%- set content = message['content'] or '' -%}")
    if template.system_in_user:
        out.append("{%- if loop.first and system_text -%}{%- set content = " + expr(template.system, "system_text")
                   + " + content -%}{%- endif -%}")
    out.append("{%- if message['role'] == 'user' -%}{{- " + expr(template.user, "content") + " -}}")
    out.append("{%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}"
               + get_tool_format(template.tool_format).jinja_calls() + "{{- "
               + expr(template.function if template.function is not None else template.assistant, "calls") + " -}}")
    out.append("{%- elif message['role'] == 'assistant' -%}")
    if template.reasoning:  # history keeps no thoughts (as in training prompts)
        close = jinja_str(template.thought_words[1].strip())
        out.append("{%- if " + close + " in content -%}{%- set content = content.split(" + close
                   + ")[-1].lstrip('\n') -%}{%- endif -%}")
    out.append("{{- " + expr(template.assistant, "content") + " -}}")
    out.append("{%- elif message['role'] in ('tool', 'observation', 'ipython') -%}{{- "
               + expr(template.observation if template.observation is not None else template.user, "content") + " -}}")
    out.append("{%- endif -%}{%- endfor -%}")
    if template.reasoning:
        out.append("{%- if add_generation_prompt and not thinking and loop_messages "
                   "and loop_messages[-1]['role'] != 'assistant' -%}{{- " + thought + " -}}{%- endif -%}")
    return "".join(out)
