"""The named templates (LLaMA-Factory's names, slot strings, default systems and stop words) and
:func:`get_template`, which resolves the config's ``template`` (a name, or ``auto``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

from lmf.data.template.base import BOS, EOS, Template
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

logger = get_logger("lmf.data.template")

TEMPLATES: dict[str, Template] = {}


def register_template(template: Template) -> Template:
    """Add ``template`` to the registry under its name."""
    if template.name in TEMPLATES:
        raise ValueError(f"template {template.name!r} is already registered")
    TEMPLATES[template.name] = template
    return template


_CHATML_USER = ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)
_CHATML_ASSISTANT = ("{{content}}<|im_end|>\n",)
_CHATML_SYSTEM = ("<|im_start|>system\n{{content}}<|im_end|>\n",)
_QWEN_OBSERVATION = (
    "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
)

register_template(Template(name="empty", user=("{{content}}",), assistant=("{{content}}",), system=("{{content}}",)))
register_template(Template(
    name="default",
    user=("Human: {{content}}", EOS, "\nAssistant:"),
    assistant=("{{content}}", EOS, "\n"),
    system=("System: {{content}}", EOS, "\n"),
))
register_template(Template(
    name="alpaca",
    user=("### Instruction:\n{{content}}\n\n### Response:\n",),
    assistant=("{{content}}", EOS, "\n\n"),
    system=("{{content}}",),
    default_system="Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n",
))
register_template(Template(
    name="vicuna",
    user=("USER: {{content}} ASSISTANT:",),
    assistant=("{{content}}", EOS),
    system=("{{content}}",),
    default_system="A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.",
))
register_template(Template(
    name="chatml",
    user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM,
    observation=("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
    stop_words=("<|im_end|>", "<|im_start|>"),
    replace_eos=True,
))
register_template(Template(
    name="yi", user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM, stop_words=("<|im_end|>",),
))
register_template(Template(
    name="qwen",
    user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM, observation=_QWEN_OBSERVATION,
    function=("{{content}}<|im_end|>\n",),
    default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    stop_words=("<|im_end|>",), replace_eos=True, tool_format="qwen",
))
register_template(Template(
    name="qwen3",
    user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM, observation=_QWEN_OBSERVATION,
    function=("{{content}}<|im_end|>\n",),
    stop_words=("<|im_end|>",), replace_eos=True, tool_format="qwen", reasoning=True,
))
register_template(Template(
    name="qwen3_nothink",
    user=_CHATML_USER, assistant=_CHATML_ASSISTANT, system=_CHATML_SYSTEM, observation=_QWEN_OBSERVATION,
    function=("{{content}}<|im_end|>\n",),
    stop_words=("<|im_end|>",), replace_eos=True, tool_format="qwen",
))
register_template(Template(
    name="llama2",
    user=(BOS, "[INST] {{content}} [/INST]"),
    assistant=("{{content}}", EOS),
    system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
    system_in_user=True,
))
register_template(Template(
    name="llama3",
    user=("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n",),
    assistant=("{{content}}<|eot_id|>",),
    system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
    observation=("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n",),
    prefix=(BOS,),
    stop_words=("<|eot_id|>", "<|eom_id|>"),
    replace_eos=True,
))
register_template(Template(
    name="mistral",
    user=("[INST] {{content}}[/INST]",),
    assistant=(" {{content}}", EOS),
    system=("{{content}}\n\n",),
    observation=('[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',),
    function=("[TOOL_CALLS] {{content}}", EOS),
    prefix=(BOS,),
    system_in_user=True,
))
register_template(Template(
    name="gemma",
    user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    assistant=("{{content}}<end_of_turn>\n",),
    system=("{{content}}\n\n",),
    observation=("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
    prefix=(BOS,),
    stop_words=("<end_of_turn>",),
    replace_eos=True,
    system_in_user=True,
))
register_template(Template(
    name="phi",
    user=("<|user|>\n{{content}}<|end|>\n<|assistant|>\n",),
    assistant=("{{content}}<|end|>\n",),
    system=("<|system|>\n{{content}}<|end|>\n",),
    stop_words=("<|end|>",),
    replace_eos=True,
))
register_template(Template(
    name="zephyr",
    user=("<|user|>\n{{content}}", EOS, "<|assistant|>\n"),
    assistant=("{{content}}", EOS),
    system=("<|system|>\n{{content}}", EOS),
    default_system="You are Zephyr, a helpful assistant.",
))


def get_template(name: Optional[str], tokenizer, *, default_system: Optional[str] = None,
                 enable_thinking: Optional[bool] = True, tool_format: Optional[str] = None,
                 fix_tokenizer: bool = True) -> Template:
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
    if tool_format is not None:
        changes["tool_format"] = tool_format
    template = replace(template, **changes) if changes else template
    if fix_tokenizer:
        template.fix_tokenizer(tokenizer)
    return template


def template_from_args(data_args, tokenizer, fix_tokenizer: bool = True) -> Template:
    """:func:`get_template` with the config's ``template``, ``default_system``, ``enable_thinking``."""
    return get_template(data_args.template, tokenizer, default_system=data_args.default_system,
                        enable_thinking=data_args.enable_thinking, fix_tokenizer=fix_tokenizer)


def list_templates() -> list[str]:
    """Names accepted by the ``template`` key."""
    return ["auto"] + sorted(TEMPLATES)
