"""Launcher: command routing, help/version/env output, and the exact torchrun argv per env combination."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmf import launcher, torchrun
from lmf.torchrun import build_child_env, build_torchrun_argv, should_use_torchrun

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

PY = "/usr/bin/python-test"


def _argv(env, command="sft", args=("cfg.yaml", "lr=1"), devices=0):
    return build_torchrun_argv(command, list(args), env, devices, python=PY, port_finder=lambda: 12345)


def test_single_node_defaults():
    assert _argv({}) == [
        PY, "-m", "lmf.torchrun", "--nproc-per-node", "1",
        "--nnodes", "1", "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", "12345",
        "--max-restarts", "0", "--module", "lmf.worker", "sft", "cfg.yaml", "lr=1",
    ]


def test_nproc_defaults_to_device_count():
    argv = _argv({}, devices=8)
    assert argv[argv.index("--nproc-per-node") + 1] == "8"


def test_multi_node():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "20000", "NPROC_PER_NODE": "4"}
    assert _argv(env, command="dpo", args=("d.yaml",)) == [
        PY, "-m", "lmf.torchrun", "--nproc-per-node", "4",
        "--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "20000",
        "--max-restarts", "0", "--module", "lmf.worker", "dpo", "d.yaml",
    ]


def test_elastic_without_min_max():
    env = {"RDZV_ID": "job1", "NNODES": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "MAX_RESTARTS": "3"}
    assert _argv(env, args=()) == [
        PY, "-m", "lmf.torchrun", "--nproc-per-node", "1",
        "--nnodes", "2", "--rdzv-id", "job1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29500",
        "--max-restarts", "3", "--module", "lmf.worker", "sft",
    ]


def test_elastic_with_min_max():
    env = {"RDZV_ID": "job1", "MIN_NNODES": "1", "MAX_NNODES": "4", "NPROC_PER_NODE": "2"}
    argv = _argv(env, command="rm", args=("r.yaml",))
    assert argv == [
        PY, "-m", "lmf.torchrun", "--nproc-per-node", "2",
        "--nnodes", "1:4", "--rdzv-id", "job1", "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:12345",
        "--max-restarts", "0", "--module", "lmf.worker", "rm", "r.yaml",
    ]
    assert "--node_rank" not in argv


def test_elastic_with_only_min_uses_nnodes():
    argv = _argv({"RDZV_ID": "j", "MIN_NNODES": "1", "NNODES": "3"})
    assert argv[argv.index("--nnodes") + 1] == "3"


def test_free_port_is_used_when_master_port_unset():
    argv = build_torchrun_argv("sft", [], {}, 0, python=PY)
    port = int(argv[argv.index("--master_port") + 1])
    assert 0 < port < 65536


@pytest.mark.parametrize(
    "env,devices,expected",
    [
        ({}, 0, False),
        ({}, 1, False),
        ({}, 2, True),
        ({"FORCE_TORCHRUN": "1"}, 0, True),
        ({"FORCE_TORCHRUN": "true"}, 1, True),
        ({"FORCE_TORCHRUN": "0"}, 1, False),
        ({"USE_RAY": "1"}, 4, False),
    ],
)
def test_should_use_torchrun(env, devices, expected):
    assert should_use_torchrun(env, devices) is expected


def test_optim_torch_env():
    child = build_child_env({"PATH": "/bin"})
    assert child["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert child["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    off = build_child_env({"OPTIM_TORCH": "0"})
    assert "PYTORCH_CUDA_ALLOC_CONF" not in off and "TORCH_NCCL_AVOID_RECORD_STREAMS" not in off


def test_bad_dist_env_is_reported(monkeypatch, capsys):
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setenv("NNODES", "two")
    with pytest.raises(SystemExit) as exc:
        launcher.launch(["sft", "cfg.yaml"])
    assert exc.value.code == 1
    assert "NNODES='two'" in capsys.readouterr().err


def test_relaunch_uses_list_argv_and_returns_child_code(monkeypatch):
    seen = {}

    class FakePopen:
        def __init__(self, argv, env=None, **kwargs):
            seen["argv"], seen["env"], seen["kwargs"] = argv, env, kwargs

        def wait(self, timeout=None):
            return 7

    monkeypatch.setattr(torchrun.subprocess, "Popen", FakePopen)
    monkeypatch.setenv("FORCE_TORCHRUN", "1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(SystemExit) as exc:
        launcher.launch(["sft", "cfg.yaml", "max_steps=2"])
    assert exc.value.code == 7
    assert isinstance(seen["argv"], list) and "shell" not in seen["kwargs"]
    assert seen["argv"][-3:] == ["sft", "cfg.yaml", "max_steps=2"]
    assert seen["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def _run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lmf", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("args", [(), ("help",), ("-h",), ("--help",)])
def test_help(args):
    out = _run_cli(*args)
    assert out.returncode == 0
    assert "Usage: lmf <command>" in out.stdout
    for cmd in ("sft", "dpo", "rm", "chat", "export", "api", "env", "version"):
        assert cmd in out.stdout


def test_help_config_lists_keys():
    out = _run_cli("help", "config")
    assert out.returncode == 0
    assert "lora_rank" in out.stdout and "cutoff_len" in out.stdout and "pref_loss" in out.stdout


def test_unknown_command_exits_2():
    out = _run_cli("frobnicate")
    assert out.returncode == 2
    assert "unknown command 'frobnicate'" in out.stderr
    assert "Usage: lmf" in out.stderr


def test_version_lists_packages():
    import torch
    import transformers

    out = _run_cli("version")
    assert out.returncode == 0
    from lmf import __version__

    assert f"lmf {__version__}" in out.stdout
    assert f"torch {torch.__version__}" in out.stdout
    assert f"transformers {transformers.__version__}" in out.stdout
    assert "peft " in out.stdout and "python " in out.stdout


def test_env_table():
    import torch

    out = _run_cli("env")
    assert out.returncode == 0
    for field in ("OS", "CPU", "RAM", "Python", "PyTorch", "CUDA (torch build)", "transformers", "peft", "datasets"):
        assert f"| {field}" in out.stdout
    assert torch.__version__ in out.stdout


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys, io, contextlib\n"
        "from lmf import launcher\n"
        "for cmd in (['help'], ['version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        launcher.run_command(cmd[0], [])\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_torchrun_relaunch_imports_torch_only_to_count_devices():
    """The launcher only waits for torchrun: with NPROC_PER_NODE given it never imports torch (~2 s of start-up)."""
    code = (
        "import sys\n"
        "from lmf import launcher, torchrun\n"
        "class Child:\n"
        "    def __init__(self, argv, **kwargs): pass\n"
        "    def wait(self, timeout=None): return 0\n"
        "torchrun.subprocess.Popen = Child\n"
        "try:\n"
        "    launcher.launch(['sft', 'cfg.yaml'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = dict(os.environ, FORCE_TORCHRUN="1", NPROC_PER_NODE="2", MASTER_PORT="29998")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr


def test_llamafactory_cli_is_installed_and_runs_lmf():
    script = os.path.join(os.path.dirname(sys.executable), "llamafactory-cli")
    assert os.path.exists(script), "reinstall lmf (pip install -e .): its llamafactory-cli console script is missing"
    out = subprocess.run([script, "version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("lmf ") and "run as `llamafactory-cli`" in out.stdout.splitlines()[0]
    out = subprocess.run([script, "help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Usage: lmf <command>" in out.stdout


@pytest.mark.parametrize("command, names", [("webui", "LlamaBoard"), ("webchat", "lmf chat"), ("eval", "MMLU")])
def test_llamafactory_commands_lmf_lacks_say_what_to_use_instead(monkeypatch, capsys, command, names):
    monkeypatch.setattr(launcher, "invoked_as", "lmf")
    with pytest.raises(SystemExit) as exc:
        launcher.launch_as_llamafactory([command, "cfg.yaml"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmf: error: `llamafactory-cli {command}`: ") and names in err and len(err.splitlines()) == 1


def test_version_says_lmf_answered_and_warns_when_llamafactory_is_installed_too(monkeypatch, capsys):
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda pkg: "0.9.5" if pkg == "llamafactory" else real(pkg))
    launcher.print_version()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("lmf ") and "the lmf package at" in lines[0] and "run as `lmf`" in lines[0]
    assert "LLaMA-Factory 0.9.5 is installed here too" in lines[1] and "this answer came from lmf" in lines[1]


def test_worker_main_rejects_unknown_command():
    out = subprocess.run([sys.executable, "-m", "lmf.worker", "bogus"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "unknown training command" in out.stderr


def test_config_error_exit_code(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: x\nlora_rnak: 4\n")
    out = _run_cli("sft", str(cfg))
    assert out.returncode == 2
    assert "lora_rnak" in out.stderr and "lora_rank" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("torchrun_code, workers, signals, expected", [
    (0, {0: 0, 1: 0}, (), 0),
    (1, {0: 0, 1: 2}, (), 2),            # a worker's own code (a config error: 2), not torchrun's 1
    (1, {0: 3, 1: 2}, (), 3),            # the first failing rank's
    (1, {1: 0}, (), 1),                  # rank 1 finished, rank 0 was killed before reporting: a failure
    (1, {}, (), 1),                      # nobody reported (every worker killed)
    (1, {0: 0, 1: 0}, (), 0),            # both finished and reported; one crashed while exiting
    (1, {0: 0}, (15,), 143),             # the launcher forwarded a SIGTERM
    (1, {0: 0, 1: 0}, (15,), 143),
    (1, {0: 143, 1: 0}, (15,), 143),
])
def test_exit_code_is_never_success_when_a_worker_did_not_finish(torchrun_code, workers, signals, expected):
    assert torchrun.launcher_exit_code(torchrun_code, workers, 2, signals) == expected


def test_worker_exit_codes_are_read_by_rank(tmp_path):
    (tmp_path / "rank-0").write_text("0")
    (tmp_path / "rank-3").write_text("130\n")
    (tmp_path / "rank-1").write_text("")  # a worker killed while writing it: ignored
    (tmp_path / "other").write_text("7")
    assert torchrun.read_worker_exit_codes(str(tmp_path)) == {0: 0, 3: 130}
    assert torchrun.read_worker_exit_codes(str(tmp_path / "missing")) == {}


def test_a_finished_worker_exits_like_the_interpreter_but_without_its_teardown(tmp_path):
    code = (
        "import atexit, sys, threading, time\n"
        "from lmf.worker import _exit_now\n"
        "out = sys.argv[1]\n"
        "def late():\n"
        "    time.sleep(0.3); open(out + '/thread', 'w').write('done')\n"
        "threading.Thread(target=late).start()\n"
        "atexit.register(lambda: open(out + '/atexit', 'w').write(str(threading.active_count())))\n"
        "print('buffered', end='')\n"
        "_exit_now(5)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONUNBUFFERED": ""})  # buffered: flushed by _exit_now
    assert proc.returncode == 5 and proc.stdout == "buffered"
    assert (tmp_path / "thread").read_text() == "done"  # joined, as at interpreter exit
    assert (tmp_path / "atexit").read_text() == "1"  # exit handlers ran after the thread finished


def test_in_process_cli_runs_return_what_a_subprocess_would_and_leave_the_environment(tmp_path):
    """lmf.testing.cli.run_lmf (the suite's way to run single-process commands): exit code, stdout, the one-line
    error on stderr, the environment and working directory of the test process restored."""
    from lmf import __version__
    from lmf.testing.cli import run_lmf

    before_env, before_cwd = dict(os.environ), os.getcwd()
    ok = run_lmf("version", env_extra={"LMF_SOME_SETTING": "1"}, cwd=str(tmp_path))
    assert ok.returncode == 0 and __version__ in ok.stdout
    bad = run_lmf("sft", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr and "Traceback" not in bad.stderr
    assert dict(os.environ) == before_env and os.getcwd() == before_cwd
