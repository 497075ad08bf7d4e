"""Chat templates: turn a conversation into token ids, split into (prompt, response) pairs.

- :mod:`~lmf.data.template.base`: the :class:`Template` (slots per role, encode / render, thinking);
- :mod:`~lmf.data.template.registry`: the named templates and :func:`get_template`;
- :mod:`~lmf.data.template.auto`: ``template: auto`` from the tokenizer's own chat template;
- :mod:`~lmf.data.template.jinja`: the chat template written into saved tokenizers;
- :mod:`~lmf.data.template.encoding`: exact fast tokenization of template pieces.

Tool formats live in :mod:`lmf.data.tools`. Named templates follow LLaMA-Factory's (same slot strings,
default systems, stop words); tokens are compared with LLaMA-Factory 0.9.5's in tests/test_lf_parity.py.
"""

from lmf.data.template.base import Template
from lmf.data.template.pieces import ASSISTANT, BOS, EOS, FUNCTION, OBSERVATION, SYSTEM, USER, canonical_role
from lmf.data.template.encoding import encode_many, encode_text
from lmf.data.template.registry import TEMPLATES, get_template, list_templates, register_template, template_from_args

__all__ = [
    "ASSISTANT", "BOS", "EOS", "FUNCTION", "OBSERVATION", "SYSTEM", "TEMPLATES", "USER", "Template", "canonical_role",
    "encode_many", "encode_text", "get_template", "list_templates", "register_template", "template_from_args",
]
