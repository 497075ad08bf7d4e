"""The named templates and :func:`get_template`, which resolves the config's ``template`` (a name, or ``auto``).

Every template of LLaMA-Factory 0.9.5 is registered under its name, built from the generated table
:mod:`lmf.data.template.lf_templates` (slots, default system, stop words, thought words, tool format), so
the meaning is LLaMA-Factory's by construction; tests and ``bench/bench_templates.py`` compare the tokens.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from lmf.data.template.base import Template
from lmf.data.template.pieces import BOS, EOS, Token
from lmf.data.template.lf_templates import LF_TEMPLATES
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

TEMPLATES: dict[str, Template] = {}


def register_template(template: Template) -> Template:
    """Add ``template`` to the registry under its name."""
    if template.name in TEMPLATES:
        raise ValueError(f"template {template.name!r} is already registered")
    TEMPLATES[template.name] = template
    return template


#: Model families by template-name prefix (for `lmf data templates`), longest prefix first.
FAMILIES = {
    "qwen": "Qwen", "llama": "Llama", "mistral": "Mistral", "ministral": "Mistral", "pixtral": "Mistral",
    "gemma": "Gemma", "paligemma": "Gemma", "phi": "Phi", "glm": "GLM", "chatglm": "GLM", "deepseek": "DeepSeek",
    "yi": "Yi", "intern": "InternLM", "baichuan": "Baichuan", "falcon": "Falcon", "granite": "Granite",
    "gpt_oss": "GPT-OSS", "olmo": "OLMo", "mimo": "MiMo", "minimax": "MiniMax", "hunyuan": "Hunyuan", "hy_dense": "Hunyuan", "moss": "MOSS",
    "ernie": "ERNIE", "exaone": "EXAONE", "seed": "Seed", "smollm": "SmolLM", "openchat": "OpenChat",
    "llava": "LLaVA", "minicpm": "MiniCPM", "kimi": "Kimi", "lfm2": "LFM2", "bailing": "Ling",
}


def family_of(name: str) -> str:
    for prefix in sorted(FAMILIES, key=len, reverse=True):
        if name.startswith(prefix):
            return FAMILIES[prefix]
    return "other"


def _pieces(slots: list) -> tuple:
    """LLaMA-Factory slots (see :mod:`lmf.data.template.lf_templates`) as template pieces."""
    out = []
    for slot in slots:
        if isinstance(slot, str):
            out.append(slot)
        elif slot.get("special") in ("bos_token", "eos_token"):
            out.append(BOS if slot["special"] == "bos_token" else EOS)
        elif "special" in slot:  # a named token ({"<|endoftext|>"}): that token, where LLaMA-Factory drops it
            out.append(Token(slot["special"]))
        else:
            out.append(Token(slot["token"]))
    return tuple(out)


def template_from_lf(name: str, spec: dict) -> Template:
    """lmf's :class:`Template` for an entry of LLaMA-Factory's registry (same slots and meaning)."""
    kind = spec["template_class"]
    return Template(
        name=name, user=_pieces(spec["user"]), assistant=_pieces(spec["assistant"]), system=_pieces(spec["system"]),
        observation=_pieces(spec["observation"]), function=_pieces(spec["function"]), prefix=_pieces(spec["prefix"]),
        default_system=spec["default_system"], stop_words=tuple(spec["stop_words"]), replace_eos=spec["replace_eos"],
        efficient_eos=spec["efficient_eos"], system_in_user=kind == "Llama2Template",
        tool_format=spec["function_format"] or "default",
        tools_slots=_pieces(spec["tools_slots"]) if spec.get("tools_slots") else None,
        reasoning=kind in ("ReasoningTemplate", "Glm47ReasoningTemplate"), thought_words=tuple(spec["thought_words"]),
        tool_call_words=tuple(spec["tool_call_words"]), empty_thought_close_only=kind == "Glm47ReasoningTemplate",
        enable_thinking=spec["enable_thinking"], mm_plugin=spec["mm_plugin"], family=family_of(name),
        tools_alone_lstrip=kind == "MossVLTemplate",
    )


for _name, _spec in LF_TEMPLATES.items():
    register_template(template_from_lf(_name, _spec))


def get_template(name: Optional[str], tokenizer, *, default_system: Optional[str] = None,
                 enable_thinking: Optional[bool] = True, tool_format: Optional[str] = None,
                 preserve_thinking: bool = False, fix_tokenizer: bool = True) -> Template:
    """The template called ``name`` (or ``'auto'``), adjusted by the data arguments; fixes ``tokenizer``.

    ``name`` None means ``auto`` when the tokenizer has a chat_template, otherwise a ConfigError naming
    the key ``template``. An unknown name is a ConfigError listing the valid names.
    """
    if name is None:
        if isinstance(getattr(tokenizer, "chat_template", None), str):
            logger.info("config key 'template' not set: using the tokenizer's chat_template (template: auto)")
            name = "auto"
        else:
            raise ConfigError("config key 'template' is required: the tokenizer has no chat_template "
                              f"(choose one of: auto, {', '.join(sorted(TEMPLATES))})")
    if name == "auto":
        if not isinstance(getattr(tokenizer, "chat_template", None), str):
            raise ConfigError("config key 'template': 'auto' needs a tokenizer with a chat_template; "
                              f"choose one of: {', '.join(sorted(TEMPLATES))}")
        from lmf.data.template.auto import parse_chat_template

        template = parse_chat_template(tokenizer)
    elif name in TEMPLATES:
        template = TEMPLATES[name]
    else:
        import difflib

        close = difflib.get_close_matches(name, list(TEMPLATES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"config key 'template': unknown template {name!r}{hint} "
                          f"Valid: auto, {', '.join(sorted(TEMPLATES))}")
    changes: dict[str, Any] = {}
    if default_system is not None:
        changes["default_system"] = default_system
    if template.reasoning:
        changes["enable_thinking"] = enable_thinking
        changes["preserve_thinking"] = bool(preserve_thinking)
    if tool_format is not None:  # as LLaMA-Factory: the calls and the tools in that format, plain function slots
        from lmf.data.tools import get_tool_format

        get_tool_format(tool_format)
        changes.update(tool_format=tool_format, tools_slots=None,
                       function=("{{content}}",) if template.efficient_eos else ("{{content}}", EOS))
    template = replace(template, **changes) if changes else template
    if fix_tokenizer:
        template.fix_tokenizer(tokenizer)
    return template


def template_from_args(data_args, tokenizer, fix_tokenizer: bool = True) -> Template:
    """:func:`get_template` with the config's ``template``, ``default_system``, ``enable_thinking``,
    ``preserve_thinking`` and ``tool_format``."""
    return get_template(data_args.template, tokenizer, default_system=data_args.default_system,
                        enable_thinking=data_args.enable_thinking, tool_format=data_args.tool_format,
                        preserve_thinking=data_args.preserve_thinking, fix_tokenizer=fix_tokenizer)


def list_templates() -> list[str]:
    """Names accepted by the ``template`` key."""
    return ["auto"] + sorted(TEMPLATES)
