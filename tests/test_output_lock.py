"""One run per output_dir: the lock (lmf.train.output_lock), in one process and between real concurrent runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmf.extras.errors import ConfigError
from lmf.train.durable import verify
from lmf.train.output_lock import LOCK_NAME, OutputDirBusy, acquire
from test_e2e_sft import DEMO, REPO_ROOT, run_lmf

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

HOLD = ("import sys, time; from lmf.train.output_lock import acquire; lock = acquire(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(600)")


def test_second_acquire_is_refused_naming_the_holder_and_release_cleans_up(tmp_path):
    out = str(tmp_path / "new")
    lock = acquire(out)
    info = json.loads((tmp_path / "new" / LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["host"] and info["started"]
    with pytest.raises(OutputDirBusy, match=rf"in use by another lmf run: host .*, pid {os.getpid()}, started"):
        acquire(out)
    assert issubclass(OutputDirBusy, ConfigError)  # exit code 2
    lock.release()
    assert not os.path.exists(out)  # it created the folder and the run left nothing: gone again
    kept = tmp_path / "kept"
    kept.mkdir()
    lock = acquire(str(kept))
    (kept / "result.txt").write_text("x")
    lock.release()
    assert sorted(os.listdir(kept)) == ["result.txt"]
    acquire(str(kept)).release()  # free again


def test_output_dir_that_is_a_file_names_the_key(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="config key 'output_dir'"):
        acquire(str(tmp_path / "f"))


def test_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputDirBusy, match=f"pid {holder.pid}"):
            acquire(str(tmp_path))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    acquire(str(tmp_path)).release()  # kill -9 released it: a crashed run never blocks its relaunch


def _start_run(out, *extra, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("FORCE_TORCHRUN", None)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-c", "from lmf.launcher import launch; launch()", "sft", DEMO,
                             f"output_dir={out}", "max_steps=40", "save_steps=1", *extra],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(out, proc, timeout=120):
    deadline = time.monotonic() + timeout
    path = os.path.join(out, LOCK_NAME)
    while time.monotonic() < deadline:
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            return json.loads(open(path, encoding="utf-8").read())
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    raise AssertionError("the first run never took its lock")


@pytest.mark.parametrize("second_processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_second_run_into_a_busy_output_dir_stops_and_the_first_is_untouched(tmp_path, second_processes):
    out = str(tmp_path / "o")
    first = _start_run(out)
    try:
        holder = _wait_for_lock(out, first)
        assert holder["pid"] == first.pid
        env = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"} if second_processes == 2 else None
        start = time.monotonic()
        second = run_lmf("sft", DEMO, f"output_dir={out}", "max_steps=40", "save_steps=1", "learning_rate=1e-3",
                         env_extra=env, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        lines = [ln for ln in second.stderr.splitlines() if "in use by another lmf run" in ln]
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0], second.stderr[-3000:]
        assert time.monotonic() - start < 120
        assert first.poll() is None or first.returncode == 0  # the first run was not disturbed
        _, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert "removing an incomplete save" not in err
    state = json.loads(open(os.path.join(out, "trainer_state.json"), encoding="utf-8").read())
    assert state["global_step"] == 40 and not os.path.exists(os.path.join(out, ".previous"))
    checkpoints = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert len(checkpoints) == 40 and all(verify(os.path.join(out, c)) is None for c in checkpoints)
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")] and not os.path.exists(os.path.join(out, LOCK_NAME))
