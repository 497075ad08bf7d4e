"""Chat templates: rendered strings (written out from LLaMA-Factory's slot definitions), token ids, masks."""

from __future__ import annotations

import pytest

from lmf.testing.char_tokenizer import build_char_tokenizer
from lmf.data.processor import IGNORE_INDEX, SupervisedProcessor
from lmf.data.template import TEMPLATES, get_template, list_templates
from lmf.extras.errors import ConfigError, DataError

CONV = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2"},
]

# Expected text per message (system "S"), from LLaMA-Factory's register_template slots.
EXPECTED = {
    "default": ["System: S</s>\nHuman: Hi</s>\nAssistant:", "Yo</s>\n", "Human: Q2</s>\nAssistant:", "A2</s>\n"],
    "alpaca": ["S### Instruction:\nHi\n\n### Response:\n", "Yo</s>\n\n", "### Instruction:\nQ2\n\n### Response:\n",
               "A2</s>\n\n"],
    "chatml": ["<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
               "Yo<|im_end|>\n", "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", "A2<|im_end|>\n"],
    "qwen": ["<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
             "Yo<|im_end|>\n", "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", "A2<|im_end|>\n"],
    "qwen3_nothink": ["<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                      "Yo<|im_end|>\n", "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", "A2<|im_end|>\n"],
    "llama2": ["<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]", "Yo</s>", "<s>[INST] Q2 [/INST]", "A2</s>"],
    "llama3": ["<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
               "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
               "Yo<|eot_id|>",
               "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               "A2<|eot_id|>"],
    "mistral": ["<s>[INST] S\n\nHi[/INST]", " Yo</s>", "[INST] Q2[/INST]", " A2</s>"],
    "gemma": ["<s><start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\n", "Yo<end_of_turn>\n",
              "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\n", "A2<end_of_turn>\n"],
    "vicuna": ["SUSER: Hi ASSISTANT:", "Yo</s>", "USER: Q2 ASSISTANT:", "A2</s>"],
    "zephyr": ["<|system|>\nS</s><|user|>\nHi</s><|assistant|>\n", "Yo</s>", "<|user|>\nQ2</s><|assistant|>\n",
               "A2</s>"],
    "phi": ["<|system|>\nS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n", "Yo<|end|>\n",
            "<|user|>\nQ2<|end|>\n<|assistant|>\n", "A2<|end|>\n"],
    "empty": ["SHi", "Yo", "Q2", "A2"],
}


def _tok(**kw):
    kw.setdefault("bos_token", "<s>")
    kw.setdefault("eos_token", "</s>")
    return build_char_tokenizer(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), **kw)


def ids(text: str) -> list[int]:
    """Char tokenizer ids of plain ASCII text."""
    return [ord(c) for c in text]


# char tokenizer special ids: <|endoftext|>=128, <|im_start|>=129, <|im_end|>=130, then eos/pad/bos additions
IM_START, IM_END = 129, 130


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rendering_matches_reference(name):
    tok = _tok()
    template = get_template(name, tok, fix_tokenizer=False)
    assert template.render_messages(CONV, system="S", tokenizer=tok) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_token_ids_are_the_rendered_text(name):
    """encode_multiturn tokenizes each message of the rendering; pairs concatenate to the full text."""
    tok = _tok()
    template = get_template(name, tok, fix_tokenizer=False)
    pairs = template.encode_multiturn(tok, CONV, system="S")
    assert len(pairs) == 2
    flat = [t for p, r in pairs for t in p + r]
    assert tok.decode(flat, skip_special_tokens=False) == "".join(EXPECTED[name])
    assert tok.decode(pairs[1][1], skip_special_tokens=False) == EXPECTED[name][3]


def test_chatml_ids_and_mask_written_out():
    tok = build_char_tokenizer()  # eos <|im_end|>, pad <|endoftext|>
    template = get_template("qwen3_nothink", tok)
    proc = SupervisedProcessor(tok, template, cutoff_len=1024)
    input_ids, labels, truncated = proc.encode([{"role": "user", "content": "Hi"}],
                                               [{"role": "assistant", "content": "Yo"}], "", "")
    prompt = [IM_START] + ids("user\nHi") + [IM_END] + ids("\n") + [IM_START] + ids("assistant\n")
    response = ids("Yo") + [IM_END] + ids("\n")
    assert prompt == [129, 117, 115, 101, 114, 10, 72, 105, 130, 10, 129, 97, 115, 115, 105, 115, 116, 97, 110, 116, 10]
    assert input_ids == prompt + response
    assert labels == [IGNORE_INDEX] * len(prompt) + [89, 111, 130, 10]
    assert not truncated


def test_multiturn_labels_every_assistant_turn_including_end_token():
    tok = build_char_tokenizer()
    template = get_template("chatml", tok)
    proc = SupervisedProcessor(tok, template, cutoff_len=1024)
    input_ids, labels, _ = proc.encode(CONV[:3], CONV[3:], "", "")
    labelled = [t for t, l in zip(input_ids, labels) if l != IGNORE_INDEX]
    assert labelled == ids("Yo") + [IM_END] + ids("\n") + ids("A2") + [IM_END] + ids("\n")
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(input_ids, labels))


def test_mask_history_keeps_only_last_turn():
    tok = build_char_tokenizer()
    template = get_template("chatml", tok)
    proc = SupervisedProcessor(tok, template, cutoff_len=1024, mask_history=True)
    input_ids, labels, _ = proc.encode(CONV[:3], CONV[3:], "", "")
    labelled = [t for t, l in zip(input_ids, labels) if l != IGNORE_INDEX]
    assert labelled == ids("A2") + [IM_END] + ids("\n")
    full = SupervisedProcessor(tok, template, cutoff_len=1024).encode(CONV[:3], CONV[3:], "", "")[0]
    assert input_ids == full  # same tokens, only the mask differs


def test_train_on_prompt_labels_everything():
    tok = build_char_tokenizer()
    template = get_template("chatml", tok)
    proc = SupervisedProcessor(tok, template, 1024, train_on_prompt=True)
    input_ids, labels, _ = proc.encode(CONV[:3], CONV[3:], "", "")
    assert labels == input_ids


def test_qwen3_empty_thought_is_learned_by_default_and_prompt_without_thinking():
    tok = build_char_tokenizer()
    thinking = get_template("qwen3", tok)
    (prompt, response), = thinking.encode_multiturn(tok, CONV[:2])
    assert tok.decode(response, skip_special_tokens=False) == "<think>\n\n</think>\n\nYo<|im_end|>\n"
    no_thinking = get_template("qwen3", tok, enable_thinking=False)
    (prompt2, response2), = no_thinking.encode_multiturn(tok, CONV[:2])
    assert tok.decode(prompt2, skip_special_tokens=False).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(response2, skip_special_tokens=False) == "Yo<|im_end|>\n"
    # an existing thought is kept as is (and learned)
    conv = [CONV[0], {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nYo"}]
    (_, r3), = thinking.encode_multiturn(tok, conv)
    assert tok.decode(r3, skip_special_tokens=False) == "<think>\nhmm\n</think>\n\nYo<|im_end|>\n"


def test_encode_prompt_and_stop_tokens():
    tok = build_char_tokenizer()
    template = get_template("qwen", tok)
    prompt = template.encode_prompt(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert tok.decode(prompt, skip_special_tokens=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    default_prompt = template.encode_prompt(tok, [{"role": "user", "content": "Hi"}])
    assert tok.decode(default_prompt, skip_special_tokens=False).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>")
    assert template.stop_token_ids(tok) == [IM_END]
    assert get_template("chatml", tok).stop_token_ids(tok) == [IM_END, IM_START]


def test_replace_eos_uses_the_end_of_turn_token():
    tok = build_char_tokenizer(eos_token="<|endoftext|>")
    assert tok.eos_token == "<|endoftext|>"
    get_template("qwen", tok)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == IM_END


def test_phi_small_starts_with_endoftext_even_though_eos_is_replaced():
    """Deliberate deviation: LLaMA-Factory 0.9.5 declares the ``{"<|endoftext|>"}`` prefix and drops it;
    Phi-3-small's own template starts with ``{{ bos_token }}`` = ``<|endoftext|>``."""
    tok = build_char_tokenizer(eos_token="<|endoftext|>", special_tokens=("<|endoftext|>", "<|end|>"))
    template = get_template("phi_small", tok)
    assert tok.eos_token == "<|end|>"  # replace_eos
    (prompt, response), = template.encode_multiturn(tok, CONV[:2])
    assert prompt[0] == tok.convert_tokens_to_ids("<|endoftext|>") != tok.eos_token_id
    assert tok.decode(prompt, skip_special_tokens=False) == "<|endoftext|><|user|>\nHi<|end|>\n<|assistant|>\n"


def test_missing_stop_words_are_added_as_special_tokens_as_llamafactory_does(caplog):
    import logging

    tok = build_char_tokenizer()  # no <|eot_id|> / <|eom_id|> in the vocabulary
    size = len(tok)
    with caplog.at_level(logging.WARNING, logger="lmf"):
        template = get_template("llama3", tok)
    eot, eom = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|eom_id|>")
    assert (eot, eom) == (size, size + 1) and tok.eos_token == "<|eot_id|>"  # replace_eos, as LLaMA-Factory
    (prompt, response), = template.encode_multiturn(tok, CONV[:2])
    assert response == ids("Yo") + [eot]
    assert set(template.stop_token_ids(tok)) == {eot, eom}
    assert "<|eot_id|>, <|eom_id|> not in the tokenizer's vocabulary: added as special tokens" in caplog.text
    get_template("llama3", tok)
    assert len(tok) == size + 2  # idempotent


def test_added_special_tokens_are_single_ids():
    tok = build_char_tokenizer(special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                               "<|eot_id|>", "<|eom_id|>"),
                               eos_token="<|end_of_text|>", pad_token="<|end_of_text|>", bos_token="<|begin_of_text|>")
    template = get_template("llama3", tok)
    assert tok.eos_token == "<|eot_id|>"
    (prompt, response), = template.encode_multiturn(tok, CONV[:2])
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert response == ids("Yo") + [eot]
    assert prompt[0] == tok.bos_token_id
    assert set(template.stop_token_ids(tok)) == {eot, tok.convert_tokens_to_ids("<|eom_id|>")}


@pytest.mark.parametrize("name", ["qwen", "chatml", "default", "alpaca", "gemma", "mistral", "llama3", "qwen3_nothink"])
def test_jinja_template_renders_like_encode_prompt(name):
    tok = build_char_tokenizer(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos_token="<s>")
    tok.chat_template = None
    template = get_template(name, tok)
    assert isinstance(tok.chat_template, str)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Q2"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == tok.decode(template.encode_prompt(tok, messages), skip_special_tokens=False)


def test_auto_uses_tokenizer_chat_template():
    from lmf.testing.tiny import CHATML_TEMPLATE

    tok = build_char_tokenizer(chat_template=CHATML_TEMPLATE)
    template = get_template("auto", tok)
    assert template.default_system == "You are a helpful assistant."
    for system in (None, "S"):
        messages = ([{"role": "system", "content": system}] if system else []) + CONV
        pairs = template.encode_multiturn(tok, messages)
        expected = tok.apply_chat_template(messages, tokenize=False)
        assert tok.decode([t for p, r in pairs for t in p + r], skip_special_tokens=False) == expected
        assert tok.decode(pairs[0][1], skip_special_tokens=False) == "Yo<|im_end|>\n"
        prompt = template.encode_prompt(tok, messages[:-1])
        assert tok.decode(prompt, skip_special_tokens=False) == tok.apply_chat_template(
            messages[:-1], tokenize=False, add_generation_prompt=True)
    assert get_template(None, tok).name == "auto"


def test_template_errors():
    tok = build_char_tokenizer()
    with pytest.raises(ConfigError, match=r"'template'.*'qwen4'.*did you mean 'qwen'"):
        get_template("qwen4", tok)
    with pytest.raises(ConfigError, match="config key 'template' is required"):
        get_template(None, tok)
    with pytest.raises(DataError, match="alternate"):
        get_template("qwen", tok).encode_multiturn(tok, [CONV[1], CONV[0]])
    required = {"default", "alpaca", "chatml", "qwen", "qwen3", "qwen3_nothink", "llama3", "mistral", "gemma"}
    assert required <= set(TEMPLATES)
    assert list_templates()[0] == "auto"


def test_tool_call_and_observation_rendering_qwen():
    tok = build_char_tokenizer()
    template = get_template("qwen", tok, default_system="")
    tools = '[{"name": "add", "description": "Add numbers", "parameters": {"type": "object", "properties": {}}}]'
    messages = [
        {"role": "user", "content": "1+2?"},
        {"role": "function", "content": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
        {"role": "observation", "content": "3"},
        {"role": "assistant", "content": "3"},
    ]
    text = template.render_messages(messages, tools=tools, tokenizer=tok)
    assert text[0].startswith("<|im_start|>system\n\n\n# Tools\n\nYou may call one or more functions")
    assert '<tools>\n{"type": "function", "function": {"name": "add"' in text[0]
    assert text[1] == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>\n'
    assert text[2] == "<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_fix_tokenizer_keeps_an_equivalent_template_and_replaces_a_different_one():
    from lmf.testing.tiny import CHATML_TEMPLATE

    tok = build_char_tokenizer(chat_template=CHATML_TEMPLATE)  # default system "You are a helpful assistant."
    qwen = get_template("qwen", tok)  # default system differs: the template is replaced
    assert tok.chat_template != CHATML_TEMPLATE
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.decode(qwen.encode_prompt(tok, messages), skip_special_tokens=False)
    installed = tok.chat_template
    get_template("qwen", tok)
    assert tok.chat_template == installed  # idempotent

    # a native template that renders every probe alike (system, history, tools, tool calls) is kept
    native = "{# the model's own template #}" + installed
    tok2 = build_char_tokenizer(chat_template=native)
    same = get_template("qwen", tok2)
    assert tok2.chat_template == native
    assert same.prompt_text(messages, tokenizer=tok2) == tok2.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    # one that renders the plain probes alike but knows no tools is replaced
    tok3 = build_char_tokenizer(chat_template=CHATML_TEMPLATE)
    get_template("qwen", tok3, default_system="You are a helpful assistant.")
    assert tok3.chat_template != CHATML_TEMPLATE


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_mask_labels_exactly_the_assistant_messages(name):
    """Multi-turn: labels are the rendered assistant messages (with their end-of-turn text), nothing else."""
    tok = _tok()
    template = get_template(name, tok, fix_tokenizer=False)
    input_ids, labels, _ = SupervisedProcessor(tok, template, 4096).encode(CONV[:3], CONV[3:], "S", "")
    assert len(input_ids) == len(labels)
    labelled = [t for t, l in zip(input_ids, labels) if l != IGNORE_INDEX]
    assert tok.decode(labelled, skip_special_tokens=False) == EXPECTED[name][1] + EXPECTED[name][3]
    masked = [t for t, l in zip(input_ids, labels) if l == IGNORE_INDEX]
    assert tok.decode(masked, skip_special_tokens=False) == EXPECTED[name][0] + EXPECTED[name][2]


def test_mistral_ids_written_out():
    tok = _tok()  # bos <s>, eos </s>: specials 128-130, then </s>=131, <s>=132
    assert (tok.eos_token_id, tok.bos_token_id) == (131, 132)
    template = get_template("mistral", tok)
    (prompt, response), = template.encode_multiturn(tok, CONV[:2])
    assert prompt == [132] + ids("[INST] Hi[/INST]")
    assert response == ids(" Yo") + [131]


QWEN3_LIKE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{ '<|im_start|>system\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'user' -%}{{ '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.last -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}{{ m.content + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_auto_detects_a_reasoning_chat_template():
    tok = build_char_tokenizer(chat_template=QWEN3_LIKE)
    template = get_template("auto", tok)
    assert template.reasoning and template.default_system == ""
    (prompt, response), = template.encode_multiturn(tok, CONV[:2])
    assert tok.decode(prompt + response, skip_special_tokens=False) == tok.apply_chat_template(CONV[:2], tokenize=False)
    assert tok.decode(response, skip_special_tokens=False) == "<think>\n\n</think>\n\nYo<|im_end|>\n"
    assert tok.chat_template == QWEN3_LIKE  # auto never replaces the tokenizer's own template
