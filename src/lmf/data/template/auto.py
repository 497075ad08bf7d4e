"""``template: auto``: a :class:`Template` derived from the tokenizer's own jinja ``chat_template``."""

from __future__ import annotations

from lmf.data.template.base import Template
from lmf.data.template.pieces import BOS, Slots
from lmf.data.template.registry import list_templates
from lmf.extras.errors import DataError


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def parse_chat_template(tokenizer) -> Template:
    """Derive user/assistant/system slots from the tokenizer's jinja ``chat_template``.

    Renders probe conversations with a placeholder and takes the differences, as LLaMA-Factory's
    ``parse_template`` does. Works for the usual ChatML/Llama-style templates; a template whose
    rendering is not prefix-consistent raises DataError naming the key ``template``.
    """
    marker = "{{content}}"
    try:
        system_only = _render(tokenizer, [{"role": "system", "content": marker}], False)
        user_gen = _render(tokenizer, [{"role": "user", "content": marker}], True)
        user_gen_empty_sys = _render(tokenizer, [{"role": "system", "content": ""},
                                                 {"role": "user", "content": marker}], True)
        user_asst = _render(tokenizer, [{"role": "user", "content": marker},
                                        {"role": "assistant", "content": marker}], False)
    except Exception as exc:  # jinja errors come in many types
        raise DataError(f"config key 'template': auto could not render the tokenizer's chat_template: {exc}") from exc
    prefix = ""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and system_only.startswith(bos) and user_gen.startswith(bos):
        prefix = bos
    system_slot = system_only[len(prefix):]
    if not user_asst.startswith(user_gen):
        raise DataError("config key 'template': auto cannot split the tokenizer's chat_template into turns; "
                        f"choose a named template ({', '.join(list_templates()[1:])})")
    assistant_slot = user_asst[len(user_gen):]
    reasoning = "<think>" in assistant_slot
    assistant_slot = assistant_slot.replace("<think>", "").replace("</think>", "").lstrip("\n")
    user_slot = user_gen[len(prefix):]
    default_system = ""
    sys_part_empty = system_slot.replace(marker, "")
    if user_gen_empty_sys[len(prefix):].startswith(sys_part_empty):
        user_no_default = user_gen_empty_sys[len(prefix) + len(sys_part_empty):]
        if len(user_slot) > len(user_no_default) and user_slot.endswith(user_no_default):
            rendered_system = user_slot[: len(user_slot) - len(user_no_default)]
            before, _, after = system_slot.partition(marker)
            if rendered_system.startswith(before) and rendered_system.endswith(after):
                default_system = rendered_system[len(before): len(rendered_system) - len(after)]
                user_slot = user_no_default
    before, _, after = system_slot.partition(marker)
    if not default_system and before and user_slot.startswith(before):
        # a template that renders its default system for an empty one too: the default is the system block
        # that leads the user turn
        end = user_slot.find(after, len(before)) if after else -1
        if end > 0 and marker in user_slot[end + len(after):]:
            default_system = user_slot[len(before):end]
            user_slot = user_slot[end + len(after):]
    prefix_slots: Slots = (BOS,) if prefix else ()
    return Template(
        name="auto",
        user=(user_slot,),
        assistant=(assistant_slot,),
        system=(system_slot,),
        prefix=prefix_slots,
        default_system=default_system,
        reasoning=reasoning,
        jinja=tokenizer.chat_template,
    )
