"""An Ollama ``Modelfile`` for a template: the Go-template form of its slots, the default system prompt and the stop
tokens, written by ``lmf export`` beside the model as LLaMA-Factory's export writes it (the same text but for the
comment line; function calls are not in it, as in LLaMA-Factory).

Deviation, on purpose: a slot holding a vocabulary token by name (ChatGLM's ``[gMASK]``, ``<|user|>``) is written as
that token's text, where LLaMA-Factory stops the export with "Dict is not supported." after the model was saved; a
token named in a set (phi_small's ``<|endoftext|>`` prefix) is written, as lmf's templates train with it. Checked
against LLaMA-Factory 0.9.5 for all its templates (``bench/lf_modelfile_golden.py``).
"""

from __future__ import annotations

from lmf.data.template.pieces import _Marker


def _slots_text(slots, tokenizer, placeholder: str = "content") -> str:
    items: list[str] = []
    for piece in slots:
        if isinstance(piece, _Marker):  # bos/eos or a named token: its text (Ollama knows no {{ eos_token }})
            text = piece.text(tokenizer)
            if text is not None:
                items.append(text)
        else:
            before, *after = str(piece).split("{{content}}")
            if before:
                items.append(before)
            if after:
                items.append("{{ " + placeholder + " }}")
                if after[0]:
                    items.append(after[0])
    return "".join(items)


def ollama_template(template, tokenizer) -> str:
    """The ``TEMPLATE`` of the Modelfile: prefix, system, then each user / assistant message."""
    prefix = _slots_text(template.prefix, tokenizer)
    system = _slots_text(template.system, tokenizer, placeholder=".System")
    user = _slots_text(template.user, tokenizer, placeholder=".Content")
    assistant = _slots_text(template.assistant, tokenizer, placeholder=".Content")
    return (f"{prefix}{{{{ if .System }}}}{system}{{{{ end }}}}"
            f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{user}'
            f'{{{{ else if eq .Role "assistant" }}}}{assistant}{{{{ end }}}}{{{{ end }}}}')


def ollama_modelfile(template, tokenizer, source: str = ".") -> str:
    """The Modelfile text; ``source``: what ``FROM`` names (the export folder, or its GGUF file)."""
    text = "# ollama modelfile written by lmf export\n\n"
    text += f'FROM {source}\n\nTEMPLATE """{ollama_template(template, tokenizer)}"""\n\n'
    if template.default_system:
        text += f'SYSTEM """{template.default_system}"""\n\n'
    stop_ids: set = set()  # LLaMA-Factory lists them from a set of ids: the same additions give the same order
    for token_id in template.stop_token_ids(tokenizer):
        stop_ids.add(token_id)
    for token_id in stop_ids:
        text += f'PARAMETER stop "{tokenizer.convert_ids_to_tokens(token_id)}"\n'
    return text + "PARAMETER num_ctx 4096\n"
