"""Runtime helpers: the per-restart rendezvous key space and the recorded collective timeout."""

from __future__ import annotations

import datetime

import pytest

from lmf.dist import runtime
from lmf.torchrun import find_available_port

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

TIMEOUT = datetime.timedelta(seconds=10)


@pytest.mark.parametrize("env", [
    {},  # not under torchrun
    {"TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"},  # first attempt
    {"TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "False"},  # workers host their own store
])
def test_no_special_store_unless_a_restart_on_the_agent_store(monkeypatch, env):
    for key in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert runtime.restart_attempt_store(2, TIMEOUT) is None


def test_restart_gets_a_fresh_key_space_on_the_agent_store(monkeypatch):
    import torch.distributed as dist

    port = find_available_port()
    agent_store = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=TIMEOUT)
    agent_store.set("default_pg/0//cpu//0/rank_1", "stale address of the dead group")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    store = runtime.restart_attempt_store(1, TIMEOUT)
    assert isinstance(store, dist.PrefixStore)
    assert not store.check(["default_pg/0//cpu//0/rank_1"])  # the dead group's keys are invisible
    store.set("k", "v")
    assert agent_store.get("lmf/restart_1/k") == b"v"


def test_single_process_has_no_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    info = runtime.init_distributed(timeout_s=5)
    assert info.world_size == 1 and not info.is_distributed and info.backend is None
    assert not runtime.is_dist()
