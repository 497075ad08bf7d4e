"""`lmf api` end to end: the real command serving the tiny model, with an API key, to the openai client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.single_process  # the server, then the client (in this process) while it waits
def test_lmf_api_command_serves_the_tiny_model(tiny_model_dir, tmp_path):
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", API_KEY="k-123", API_PORT=str(port))
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from lmf.launcher import launch; launch()", "api", "--model", tiny_model_dir,
         "--template", "qwen", "--model-name", "tiny", "do_sample=false", "max_new_tokens=6"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, open(tmp_path / "server.log").read()
            try:
                if httpx.get(f"{base}/models", timeout=1).status_code == 401:  # up, and the key is enforced
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=base, api_key="k-123", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}])
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], stream=True) if c.choices)
        assert full.choices[0].message.content == streamed and streamed.strip()
        assert full.usage.completion_tokens == 6
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    output = open(tmp_path / "server.log").read()
    assert f"serving 'tiny' on http://127.0.0.1:{port}/v1 (API key required)" in output
