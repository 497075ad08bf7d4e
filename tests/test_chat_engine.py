"""The transformers chat engine on the tiny model: prompt rendering, streaming, stop tokens, settings,
and the same engine served through the OpenAI-compatible API."""

from __future__ import annotations

import json
import os

import openai
import pytest

from lmf.chat import create_engine
from lmf.chat.engine import ChatStream, GenerationSettings, MessageError, split_system
from lmf.chat.options import load_serving_config, translate_flags
from lmf.extras.errors import ConfigError

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    import torch

    torch.set_num_threads(1)
    cfg = load_serving_config(["--model", tiny_model_dir, "--template", "qwen", "do_sample=false", "max_new_tokens=12"])
    return create_engine(cfg)


HELLO = [{"role": "user", "content": "hello"}]


def test_prompt_is_the_training_template(engine):
    from lmf.data.template import get_template

    template = get_template("qwen", engine.tokenizer)
    expected = template.encode_prompt(engine.tokenizer, HELLO)
    assert engine.encode(HELLO) == expected
    text = engine.tokenizer.decode(expected)
    assert text.endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert engine.stop_ids == [engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_stream_matches_full_reply_and_counts_tokens(engine):
    stream = engine.stream_chat(HELLO)
    pieces = list(stream)
    assert len(pieces) > 1  # really streamed, piece by piece
    reply = engine.chat(HELLO)
    assert "".join(pieces) == reply.text and reply.text.strip()
    assert stream.prompt_tokens == reply.prompt_tokens == len(engine.encode(HELLO))
    assert reply.completion_tokens == 12 and reply.finish_reason == "length"  # a random model never says eos


def test_generation_stops_at_a_stop_token(engine):
    import torch

    first = engine.chat(HELLO, max_new_tokens=1)
    first_id = engine.tokenizer.encode(first.text, add_special_tokens=False)
    with torch.inference_mode():
        logits = engine.model(torch.tensor([engine.encode(HELLO)])).logits[0, -1]
    greedy_id = int(logits.argmax())
    assert first_id == [greedy_id]
    saved = engine.stop_ids
    engine.stop_ids = [greedy_id]  # the very first token is now a stop token
    try:
        reply = engine.chat(HELLO, max_new_tokens=10)
    finally:
        engine.stop_ids = saved
    assert reply.finish_reason == "stop" and reply.completion_tokens == 1


def test_settings_override_per_request(engine):
    assert engine.chat(HELLO, max_new_tokens=3).completion_tokens == 3
    sampled = [engine.chat(HELLO, do_sample=True, temperature=1.5, top_p=1.0, top_k=0, max_new_tokens=6).text for _ in range(4)]
    assert len(set(sampled)) > 1  # sampling is on: replies differ
    greedy = [engine.chat(HELLO, temperature=0.0, do_sample=True, max_new_tokens=6).text for _ in range(2)]
    assert greedy[0] == greedy[1]  # temperature 0 means greedy, as OpenAI clients expect
    with pytest.raises(ConfigError, match="top_p"):
        engine.chat(HELLO, top_p=1.5)
    with pytest.raises(ConfigError, match="unknown generation setting"):
        engine.chat(HELLO, beams=2)


def test_history_changes_the_prompt(engine):
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
               {"role": "user", "content": "again"}]
    ids = engine.encode(history)
    text = engine.tokenizer.decode(ids)
    assert "hello" in text and "hi there" in text and text.endswith("again<|im_end|>\n<|im_start|>assistant\n")


def test_tool_conversation_renders_in_the_template_format(engine):
    tools = json.dumps([{"name": "get_weather", "description": "Weather of a city",
                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])
    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "function", "content": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}}])},
                {"role": "tool", "content": "sunny"}]
    text = engine.tokenizer.decode(engine.encode(messages, tools=tools))
    assert "get_weather" in text and "<tool_call>" in text and "<tool_response>\nsunny\n</tool_response>" in text
    assert engine.tool_format == "qwen"
    assert engine.parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>') == [
        {"name": "f", "arguments": '{"a": 1}'}]
    assert engine.parse_tool_calls("just text") is None


def test_prompt_longer_than_the_context_is_a_clear_error(engine):
    saved = engine.max_positions
    engine.max_positions = 8
    try:
        with pytest.raises(MessageError, match="context holds 8"):
            engine.stream_chat(HELLO)
    finally:
        engine.max_positions = saved


def test_close_stops_generation_early(engine):
    stream = engine.stream_chat(HELLO, max_new_tokens=500)
    next(stream)
    stream.close()
    rest = list(stream)
    assert stream.completion_tokens < 500
    assert len(rest) < 500


def test_served_through_the_openai_api(engine):
    from test_api import serve

    with serve(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [engine.model_name]
        full = client.chat.completions.create(model=engine.model_name, messages=HELLO, max_tokens=8)
        chunks = client.chat.completions.create(model=engine.model_name, messages=HELLO, max_tokens=8, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content == engine.chat(HELLO, max_new_tokens=8).text
    assert full.usage.completion_tokens == 8 and full.choices[0].finish_reason == "length"


def test_flag_aliases_and_config_precedence(tmp_path, tiny_model_dir):
    assert translate_flags(["--model", "m", "--adapter=a", "--template", "qwen", "--backend", "vllm"]) == [
        "--model_name_or_path", "m", "--adapter_name_or_path=a", "--template", "qwen", "--infer_backend", "vllm"]
    cfg_file = tmp_path / "chat.yaml"
    cfg_file.write_text(f"model_name_or_path: {tiny_model_dir}\ntemplate: qwen\ntemperature: 0.3\ntop_k: 7\n")
    cfg = load_serving_config([str(cfg_file), "--temperature", "0.5", "max_new_tokens=9"])
    settings = GenerationSettings.from_args(cfg.generating)
    assert (settings.temperature, settings.top_k, settings.max_new_tokens) == (0.5, 7, 9)
    with pytest.raises(ConfigError, match="model_name_or_path"):
        load_serving_config(["--template", "qwen"])


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_model_dir):
    import importlib.util

    from lmf.extras.errors import NotAvailableError

    cfg = load_serving_config(["--model", tiny_model_dir, "--template", "qwen", "--backend", "vllm"])
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(NotAvailableError, match="vllm"):
        create_engine(cfg)


def test_split_system_and_stop_strings():
    system, msgs = split_system([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert system == "s" and msgs == [{"role": "user", "content": "u"}]
    stream = ChatStream(prompt_tokens=1, stop=("END",)).attach(iter(["ab", "cE", "N", "Dxyz", "more"]))
    assert "".join(stream) == "abc" and stream.finish_reason == "stop"
    stream = ChatStream(prompt_tokens=1, stop=("END",)).attach(iter(["ab", "cE", "Nx"]))
    assert "".join(stream) == "abcENx"  # a partial match is released once it cannot match any more


def test_parse_tool_calls_formats():
    from lmf.data.tools import parse_tool_calls

    assert parse_tool_calls('Action: get_weather\nAction Input: {"city": "Paris"}', "default") == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    two = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": "{\\"x\\": 2}"}\n</tool_call>'
    assert parse_tool_calls(two, "qwen") == [{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": '{"x": 2}'}]
    assert parse_tool_calls("<tool_call>\nnot json\n</tool_call>", "qwen") is None
    assert parse_tool_calls("Action: f\nAction Input: not json", "default") is None
