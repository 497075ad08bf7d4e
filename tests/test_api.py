"""lmf api: the OpenAI-compatible server, driven by the official `openai` client over loopback.

A scripted engine stands in for the model here (fast, deterministic); tests/test_chat_engine.py
serves the real tiny model through the same app.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from lmf.api.server import create_app
from lmf.api.settings import ApiSettings, parse_api_settings
from lmf.chat.engine import ChatEngine, ChatStream
from lmf.extras.errors import ConfigError

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs


class ScriptedEngine(ChatEngine):
    """Replies 'echo: <last user message>' one word per piece; can block until released."""

    model_name = "tiny-test"

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)
        self.closed_streams = 0
        self.delay = 0.0
        self.streams: list[ChatStream] = []

    def stream_chat(self, messages, system=None, tools=None, **gen):
        self.calls.append({"messages": messages, "system": system, "tools": tools, "gen": gen})
        words = ("echo: " + messages[-1]["content"]).split(" ")
        limit = gen.get("max_new_tokens") or 1024
        stream = ChatStream(prompt_tokens=sum(len(m["content"].split()) for m in messages), stop=tuple(gen.get("stop") or ()))

        def pieces():
            self.started.release()
            self.gate.wait(timeout=30)
            for i, word in enumerate(words[:limit]):
                if stream.cancelled.is_set():
                    break
                stream.completion_tokens += 1
                time.sleep(self.delay)
                yield word if i == 0 else " " + word
            stream.finish_reason = "length" if len(words) > limit else "stop"

        def on_close():
            self.closed_streams += 1

        self.streams.append(stream)
        return stream.attach(pieces(), on_close)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(engine: ChatEngine, **settings):
    """Serve ``engine`` with uvicorn in a background thread on a free loopback port; yield the base URL."""
    with serve_app(create_app(engine, ApiSettings(**settings))) as url:
        yield url


@contextlib.contextmanager
def serve_app(app):
    """Run ``app`` with uvicorn in a background thread on a free loopback port; yield the base URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def engine():
    return ScriptedEngine()


@pytest.fixture()
def base_url(engine):
    with serve(engine) as url:
        yield url


def _client(base_url, api_key="unused"):
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)


def test_models_lists_the_served_model(base_url):
    models = _client(base_url).models.list()
    assert [m.id for m in models.data] == ["tiny-test"]


def test_non_streaming_completion(engine, base_url):
    reply = _client(base_url).chat.completions.create(
        model="tiny-test",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
        temperature=0.3, top_p=0.9, max_tokens=50,
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 2 and reply.usage.completion_tokens == 3 and reply.usage.total_tokens == 5
    call = engine.calls[-1]
    assert call["system"] == "be brief"
    assert call["messages"] == [{"role": "user", "content": "hello there"}]
    assert call["gen"]["temperature"] == 0.3 and call["gen"]["top_p"] == 0.9 and call["gen"]["max_new_tokens"] == 50


def test_streaming_completion_with_usage(engine, base_url):
    stream = _client(base_url).chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": "one two three"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == ["echo:", " one", " two", " three"]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens == 3
    assert engine.streams[-1].finished and engine.closed_streams == 0  # ran to the end: nothing to cancel


def test_length_finish_reason_and_stop_strings(base_url):
    client = _client(base_url)
    reply = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "a b c d"}], max_tokens=2)
    assert reply.choices[0].message.content == "echo: a" and reply.choices[0].finish_reason == "length"
    reply = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "a b STOP c"}], stop=["STOP"])
    assert reply.choices[0].message.content == "echo: a b " and reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "x yy zzz"}],
                                            stop="yy", stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "echo: x "


def test_multi_turn_history_and_extra_sampling_fields(engine, base_url):
    _client(base_url).chat.completions.create(
        model="tiny-test",
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": [{"type": "text", "text": "again"}]}],
        extra_body={"top_k": 5, "repetition_penalty": 1.2},
    )
    call = engine.calls[-1]
    assert [m["role"] for m in call["messages"]] == ["user", "assistant", "user"]
    assert call["messages"][-1]["content"] == "again"
    assert call["gen"]["top_k"] == 5 and call["gen"]["repetition_penalty"] == 1.2


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_tools_are_passed_to_the_engine_and_plain_replies_stay_text(engine, base_url):
    reply = _client(base_url).chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL])
    assert json.loads(engine.calls[-1]["tools"])[0]["name"] == "get_weather"
    assert reply.choices[0].message.content == "echo: weather?" and reply.choices[0].finish_reason == "stop"


def test_tool_call_replies_and_tool_results_round_trip(engine, base_url):
    engine.tool_format = "qwen"
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reply = _client(base_url).chat.completions.create(
        model="tiny-test", messages=[{"role": "user", "content": call_text}], tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")

    _client(base_url).chat.completions.create(
        model="tiny-test", tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                  {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}])
    seen = engine.calls[-1]["messages"]
    assert [m["role"] for m in seen] == ["user", "function", "tool"]
    assert json.loads(seen[1]["content"]) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert seen[2]["content"] == "sunny, 21C"

    with pytest.raises(openai.BadRequestError, match="stream"):
        _client(base_url).chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "x"}],
                                                  tools=[WEATHER_TOOL], stream=True)


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"model": "tiny-test"}, 400, "messages"),
        ({"model": "tiny-test", "messages": []}, 400, "messages"),
        ({"model": "tiny-test", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        ({"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "temperature": 3.5}, 400, "temperature"),
        ({"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "top_p": -0.1}, 400, "top_p"),
        ({"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny-test", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "expected a user"),
        ({"model": "tiny-test", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "alternate"),
        ({"model": "tiny-test", "messages": [{"role": "system", "content": "s"}]}, 400, "only a system"),
        ({"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True}, 400, "n > 1"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "tiny-test"),
        ({"model": "tiny-test", "messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
        ({"model": "tiny-test", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ({"model": "tiny-test", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None},
                                             {"role": "user", "content": "b"}]}, 400, "messages[1].content"),
    ],
)
def test_bad_requests_get_4xx_with_a_message(base_url, engine, body, status, fragment):
    response = httpx.post(f"{base_url}/chat/completions", json=body, timeout=10)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"]
    assert engine.calls == []  # nothing reached the model


def test_null_user_content_is_refused_naming_the_field(base_url, engine):
    """A user message with content null is a 400 whose param names it (an assistant one with tool_calls stays valid:
    test_tool_call_replies_and_tool_results_round_trip)."""
    body = {"model": "tiny-test", "messages": [{"role": "user", "content": None}]}
    error = httpx.post(f"{base_url}/chat/completions", json=body, timeout=10).json()["error"]
    assert error["param"] == "messages[0].content" and "content is required in a user message" in error["message"]
    assert engine.calls == []


@pytest.mark.parametrize("headers", [{}, {"content-type": "text/plain"}, {"content-type": "text/plain; charset=utf-8"}])
def test_a_json_body_is_read_whatever_its_content_type(base_url, engine, headers):
    """As OpenAI's server: a JSON body without a Content-Type (or with text/plain) is a request like any other."""
    body = json.dumps({"model": "tiny-test", "messages": [{"role": "user", "content": "hi there"}]})
    response = httpx.post(f"{base_url}/chat/completions", content=body.encode(), headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi there"
    assert engine.calls[-1]["messages"] == [{"role": "user", "content": "hi there"}]


def test_malformed_json_is_400(base_url):
    response = httpx.post(f"{base_url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"]


def test_openai_client_raises_bad_request_with_message(base_url):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _client(base_url).chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "x"}], temperature=9)


def test_api_key_required_on_every_request(engine):
    with serve(engine, api_key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            _client(url, api_key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            _client(url, api_key="wrong").chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "x"}])
        assert httpx.get(f"{url}/models").status_code == 401  # no header at all
        assert httpx.post(f"{url}/chat/completions", json={}).status_code == 401  # auth before validation
        assert httpx.get(f"{url}/nowhere").status_code == 401
        reply = _client(url, api_key="s3cret").chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "ok"}])
        assert reply.choices[0].message.content == "echo: ok"
    assert len(engine.calls) == 1


def test_full_queue_answers_503(engine):
    engine.gate.clear()  # generation blocks until the gate opens
    app = create_app(engine, ApiSettings(max_concurrent=1, max_queue=1))
    with serve_app(app) as url:
        results: dict[str, object] = {}

        def call(tag):
            try:
                results[tag] = _client(url).chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": tag}])
            except Exception as exc:  # noqa: BLE001
                results[tag] = exc

        running = threading.Thread(target=call, args=("first",))
        running.start()
        assert engine.started.acquire(timeout=10)  # first request is generating
        waiting = threading.Thread(target=call, args=("second",))
        waiting.start()
        deadline = time.time() + 10
        while app.state.limiter.pending < 2 and time.time() < deadline:  # until the second request is queued
            time.sleep(0.02)
        assert app.state.limiter.pending == 2
        response = httpx.post(f"{url}/chat/completions", json={"model": "tiny-test", "messages": [{"role": "user", "content": "third"}]})
        assert response.status_code == 503
        assert "busy" in response.json()["error"]["message"]
        engine.gate.set()
        running.join(10)
        waiting.join(10)
    assert results["first"].choices[0].message.content == "echo: first"
    assert results["second"].choices[0].message.content == "echo: second"


def test_parse_api_settings_flags_and_env():
    settings, rest = parse_api_settings(["cfg.yaml", "--port", "9001", "--model-name=m", "--template", "qwen"],
                                        env={"API_HOST": "0.0.0.0", "API_KEY": "k", "API_MAX_QUEUE": "3"})
    assert (settings.host, settings.port, settings.model_name, settings.api_key, settings.max_queue) == ("0.0.0.0", 9001, "m", "k", 3)
    assert rest == ["cfg.yaml", "--template", "qwen"]
    defaults, _ = parse_api_settings([], env={})
    assert (defaults.host, defaults.port, defaults.api_key, defaults.max_concurrent) == ("127.0.0.1", 8000, None, 1)
    with pytest.raises(ConfigError, match="port"):
        parse_api_settings(["--port", "abc"], env={})
    with pytest.raises(ConfigError, match="max_concurrent"):
        parse_api_settings([], env={"API_MAX_CONCURRENT": "0"})


def _assert_generation_cancelled_and_slot_freed(app, engine, url):
    """After a client left mid-reply: the slot is released, generation stopped early, the next request is served."""
    deadline = time.time() + 10
    while app.state.limiter.pending and time.time() < deadline:
        time.sleep(0.02)
    assert app.state.limiter.pending == 0
    assert engine.closed_streams == 1
    assert 0 < engine.streams[0].completion_tokens < 1000  # generation stopped early
    reply = _client(url).chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "next"}])
    assert reply.choices[0].message.content == "echo: next"


def test_client_disconnect_mid_stream_cancels_generation_and_frees_the_slot(engine):
    app = create_app(engine, ApiSettings(max_concurrent=1, max_queue=0))
    long_text = " ".join(f"w{i}" for i in range(2000))
    engine.delay = 0.002
    with serve_app(app) as url:
        with httpx.stream("POST", f"{url}/chat/completions", timeout=10,
                          json={"model": "tiny-test", "stream": True, "messages": [{"role": "user", "content": long_text}]}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk
        _assert_generation_cancelled_and_slot_freed(app, engine, url)


def test_client_disconnect_before_a_non_streamed_reply_cancels_generation_and_frees_the_slot(engine):
    app = create_app(engine, ApiSettings(max_concurrent=1, max_queue=0))
    long_text = " ".join(f"w{i}" for i in range(2000))
    engine.delay = 0.002  # the whole reply would take ~4 s
    with serve_app(app) as url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{url}/chat/completions", timeout=0.5,
                       json={"model": "tiny-test", "messages": [{"role": "user", "content": long_text}]})
        _assert_generation_cancelled_and_slot_freed(app, engine, url)


def test_a_busy_port_fails_fast_with_a_message():
    from lmf.api.settings import check_port_free
    from lmf.extras.errors import LmfError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        with pytest.raises(LmfError, match=f"cannot serve on 127.0.0.1:{port}"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", _free_port())
