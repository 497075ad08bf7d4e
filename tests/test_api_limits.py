"""lmf api limits: request body size, max_tokens ceiling, bounded n, opaque 500s, the developer role, and a
200-request load test against a 1-slot server."""

from __future__ import annotations

import asyncio
import json
import os
import time

import httpx
import psutil
import pytest

from lmf.api.server import create_app
from lmf.api.settings import ApiSettings, parse_api_settings
from lmf.chat.engine import GenerationSettings
from lmf.extras.errors import ConfigError
from test_api import ScriptedEngine, serve, serve_app

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def engine():
    eng = ScriptedEngine()
    eng.settings = GenerationSettings(max_new_tokens=64)
    return eng


def test_request_body_over_the_limit_is_413(engine):
    with serve(engine, max_body_mb=1) as url:
        big = {"model": "tiny-test", "messages": [{"role": "user", "content": "x" * (6 << 20)}]}
        response = httpx.post(f"{url}/chat/completions", json=big, timeout=30)
        assert response.status_code == 413
        assert "1 MB" in response.json()["error"]["message"]

        def chunks():  # no Content-Length: counted while it streams in
            yield b'{"model": "tiny-test", "messages": [{"role": "user", "content": "'
            for _ in range(40):
                yield b"y" * (64 << 10)
            yield b'"}]}'

        response = httpx.post(f"{url}/chat/completions", content=chunks(), timeout=30,
                              headers={"content-type": "application/json"})
        assert response.status_code == 413
        ok = httpx.post(f"{url}/chat/completions", json={"model": "tiny-test", "messages": HI}, timeout=30)
        assert ok.status_code == 200
    assert len(engine.calls) == 1


def test_max_tokens_above_the_configured_ceiling_is_400(engine):
    with serve(engine) as url:  # ceiling: the config's max_new_tokens (64)
        for key in ("max_tokens", "max_completion_tokens"):
            response = httpx.post(f"{url}/chat/completions", json={"model": "tiny-test", "messages": HI, key: 65})
            assert response.status_code == 400 and key in response.json()["error"]["message"]
            assert "64" in response.json()["error"]["message"]
        assert httpx.post(f"{url}/chat/completions", json={"model": "tiny-test", "messages": HI,
                                                           "max_tokens": 64}).status_code == 200
    with serve(engine, max_tokens=500) as url:
        assert httpx.post(f"{url}/chat/completions", json={"model": "tiny-test", "messages": HI,
                                                           "max_tokens": 400}).status_code == 200
    assert engine.calls[-1]["gen"]["max_new_tokens"] == 400


def test_n_is_bounded(engine):
    with serve(engine, max_n=2) as url:
        response = httpx.post(f"{url}/chat/completions", json={"model": "tiny-test", "messages": HI, "n": 3})
        assert response.status_code == 400 and "API_MAX_N" in response.json()["error"]["message"]
        two = httpx.post(f"{url}/chat/completions", json={"model": "tiny-test", "messages": HI, "n": 2})
        assert len(two.json()["choices"]) == 2


def test_a_server_error_returns_an_opaque_id_and_logs_the_exception(engine, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("secret path /home/alice/model and a stack")

    engine.stream_chat = boom
    with serve(engine) as url, caplog.at_level("ERROR", logger="lmf"):
        response = httpx.post(f"{url}/chat/completions", json={"model": "tiny-test", "messages": HI})
        assert response.status_code == 500
        message = response.json()["error"]["message"]
        assert "secret" not in message and "RuntimeError" not in message
        error_id = message.split("(id ")[1].split(")")[0]
        assert error_id in caplog.text and "secret path" in caplog.text


def test_developer_role_is_a_system_message(engine):
    with serve(engine) as url:
        body = {"model": "tiny-test", "messages": [{"role": "developer", "content": "Be terse."}] + HI}
        assert httpx.post(f"{url}/chat/completions", json=body).status_code == 200
    assert engine.calls[-1]["system"] == "Be terse."


def test_settings_from_flags_and_environment():
    settings, _ = parse_api_settings(["--max-body-mb", "0.5", "--max-n=2"], env={"API_MAX_TOKENS": "128"})
    assert (settings.max_body_mb, settings.max_n, settings.max_tokens) == (0.5, 2, 128)
    for env in ({"API_MAX_BODY_MB": "0"}, {"API_MAX_N": "0"}, {"API_MAX_TOKENS": "0"}, {"API_MAX_BODY_MB": "big"}):
        with pytest.raises(ConfigError):
            parse_api_settings([], env=env)


@pytest.mark.slow
@pytest.mark.single_process
def test_200_concurrent_requests_against_one_slot_all_answered_in_bounded_time(engine):
    """Every request gets a 200 or a 503 (never a hang or a reset), the server stays up, memory stays bounded."""
    engine.delay = 0.001
    app = create_app(engine, ApiSettings(max_concurrent=1, max_queue=8))
    process = psutil.Process(os.getpid())
    with serve_app(app) as url:
        async def one(client, i):
            body = {"model": "tiny-test", "messages": [{"role": "user", "content": f"request {i} " + "w " * 50}]}
            started = time.perf_counter()
            response = await client.post(f"{url}/chat/completions", json=body)
            return response.status_code, time.perf_counter() - started

        async def burst():
            limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                return await asyncio.gather(*(one(client, i) for i in range(200)))

        rss_before = process.memory_info().rss
        results = []
        for _ in range(3):
            results += asyncio.run(burst())
        rss_after = process.memory_info().rss
        codes = [code for code, _ in results]
        assert set(codes) <= {200, 503}, sorted(set(codes))
        assert codes.count(200) >= 9 * 3  # the slot and the queue were used each time
        assert max(seconds for _, seconds in results) < 30
        assert app.state.limiter.pending == 0
        assert (rss_after - rss_before) < 200 << 20
        ok = httpx.post(f"{url}/chat/completions", json={"model": "tiny-test", "messages": HI}, timeout=10)
        assert ok.status_code == 200 and json.loads(ok.text)["choices"][0]["message"]["content"] == "echo: hi"
