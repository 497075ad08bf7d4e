"""Dead and hung peers: every surviving rank exits promptly with a clear message, never hangs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from lmf.dist.faults import (
    PeerLostError,
    classify_collective_error,
    peer_failure_guard,
    peer_lost_message,
)
from lmf.dist.runtime import configure_error_handling
from lmf.extras.errors import ConfigError, LmfError
from lmf.torchrun import find_available_port

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

GLOO_RESET = RuntimeError(
    "[third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:2451: Connection reset by peer. "
    "This is typically caused by a remote worker hanging or bugs in the application."
)
GLOO_TIMEOUT = RuntimeError(
    "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"
)


def test_classify_known_failures():
    assert classify_collective_error(GLOO_RESET) == "peer"
    assert classify_collective_error(RuntimeError("NCCL communicator was aborted on rank 1")) == "peer"
    assert classify_collective_error(GLOO_TIMEOUT) == "timeout"


def test_classify_ignores_unrelated_errors():
    assert classify_collective_error(ValueError("connection reset by peer")) is None  # not a runtime error
    assert classify_collective_error(ConnectionRefusedError("[Errno 111] Connection refused")) is None  # e.g. a logger
    assert classify_collective_error(RuntimeError("CUDA out of memory")) is None
    assert classify_collective_error(KeyError("input_ids")) is None
    assert classify_collective_error(ConfigError("bad key")) is None


def test_guard_converts_peer_failures_and_keeps_the_cause(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(PeerLostError) as info:
        with peer_failure_guard():
            raise GLOO_RESET
    msg = str(info.value)
    assert msg.startswith("rank 3 lost contact with the group: a peer process died or the network failed")
    assert "see the first failing rank's log" in msg
    assert "Connection reset by peer" in msg
    assert info.value.__cause__ is GLOO_RESET
    assert isinstance(info.value, LmfError)


def test_guard_leaves_other_errors_alone():
    with pytest.raises(ZeroDivisionError):
        with peer_failure_guard():
            1 / 0
    with pytest.raises(ConfigError):
        with peer_failure_guard():
            raise ConfigError("x")


def test_timeout_message_names_ddp_timeout():
    msg = peer_lost_message("timeout", GLOO_TIMEOUT, rank=0, timeout_s=7)
    assert msg.startswith("rank 0 timed out after 7s (ddp_timeout) waiting for the other ranks")


def test_nccl_async_error_handling_is_enabled_but_user_value_wins():
    env: dict[str, str] = {}
    configure_error_handling(env)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    configure_error_handling(env)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


# A 2-rank job (plain processes, no torchrun: nobody else tears rank 0 down) where rank 1 misbehaves.
WORKER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from lmf.dist.runtime import init_distributed, all_reduce_sum
    from lmf.dist.faults import peer_failure_guard, monitored_barrier
    from lmf.launcher import guarded

    mode, timeout_s, via = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if via == "config":  # the trainer's set-up point, with ddp_timeout from the config
        from lmf.config.parser import build_config
        from lmf.train.process import setup_runtime

        info = setup_runtime(build_config({"model_name_or_path": "unused", "ddp_timeout": timeout_s}))
    else:
        info = init_distributed(timeout_s=timeout_s)

    def train():
        with peer_failure_guard():
            for step in range(200):
                if info.rank == 1 and step == 3:
                    if mode == "die":
                        os._exit(1)
                    if mode in ("hang", "skip_barrier"):
                        time.sleep(120)
                if mode == "skip_barrier":
                    monitored_barrier(timeout_s)
                else:
                    all_reduce_sum(torch.ones(4))
                time.sleep(0.02)
        return 0

    sys.exit(guarded(train))
    """
)


def _launch(tmp_path, mode: str, timeout_s: int, via: str = "runtime"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(find_available_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), mode, str(timeout_s), via], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait_rank0(procs, limit_s: float):
    start = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=limit_s)
        return procs[0].returncode, err, time.monotonic() - start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_rank_that_dies_makes_the_other_exit_promptly(tmp_path):
    # ddp_timeout is long: the survivor must notice the dead peer from the broken connection, not the timeout.
    procs = _launch(tmp_path, "die", timeout_s=300)
    rc, err, elapsed = _wait_rank0(procs, limit_s=45)
    assert rc != 0
    assert "lmf: error: rank 0 lost contact with the group: a peer process died or the network failed" in err, err
    assert "Traceback" not in err
    assert rc == 1  # a clean exit, not an abort in the process group's C++ teardown
    assert elapsed < 30
    assert procs[1].returncode == 1


@pytest.mark.slow
def test_hung_rank_makes_the_other_fail_after_ddp_timeout(tmp_path):
    procs = _launch(tmp_path, "hang", timeout_s=3)
    rc, err, elapsed = _wait_rank0(procs, limit_s=45)
    assert rc != 0
    assert "lmf: error: rank 0 timed out after 3s (ddp_timeout) waiting for the other ranks" in err, err
    assert elapsed < 30  # bounded by ddp_timeout (+ start-up), not hanging


@pytest.mark.slow
def test_monitored_barrier_names_the_missing_rank(tmp_path):
    procs = _launch(tmp_path, "skip_barrier", timeout_s=3)
    rc, err, _ = _wait_rank0(procs, limit_s=45)
    assert rc != 0
    assert "lmf: error: rank 0: Ranks 1 failed to pass monitoredBarrier" in err, err
    assert "those ranks died or hung" in err


@pytest.mark.slow
def test_config_ddp_timeout_bounds_collectives_at_the_trainer_setup_point(tmp_path):
    procs = _launch(tmp_path, "hang", timeout_s=4, via="config")
    rc, err, elapsed = _wait_rank0(procs, limit_s=60)
    assert rc != 0
    assert "environment fingerprint identical on all 2 ranks" in err  # the set-up point ran the check first
    assert "lmf: error: rank 0 timed out after 4s (ddp_timeout) waiting for the other ranks" in err, err
    assert elapsed < 45


def test_fault_injection_hooks_fire_only_where_asked():
    from lmf.testing.faults import should_die

    env = {"LMF_TEST_KILL_AT_STEP": "3", "LMF_TEST_KILL_RANK": "1", "RANK": "1"}
    assert should_die("step", 3, env)
    assert not should_die("step", 2, env)
    assert not should_die("save", 3, env)  # a different point
    assert not should_die("step", 3, dict(env, RANK="0"))  # another rank
    assert not should_die("step", 3, dict(env, TORCHELASTIC_RESTART_COUNT="1"))  # only the first attempt
    assert should_die("save", 4, {"LMF_TEST_KILL_DURING_SAVE": "4"})  # rank 0 by default
    assert not should_die("step", 3, {})  # inert by default


def test_classify_torch_distributed_error_types():
    import torch.distributed as dist

    assert classify_collective_error(dist.DistNetworkError("failed to recv, got 0 bytes")) == "peer"
    assert classify_collective_error(dist.DistStoreError("wait timeout after 30000ms")) == "timeout"
    assert classify_collective_error(dist.DistBackendError("NCCL error: invalid usage")) is None  # a bug, not a peer
