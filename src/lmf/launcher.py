"""The ``lmf`` command: routes commands and relaunches training through torchrun.

``launch()`` is the console entry point. For a training command (``train``, ``sft``, ``dpo``,
``rm``, ``kto``) it re-executes itself through ``python -m torch.distributed.run`` when ``FORCE_TORCHRUN``
is truthy or more than one accelerator is visible; each worker then enters ``main()``, which
routes the command to its trainer. Everything else runs in-process.

Only the standard library is imported at module level so that ``lmf help`` starts in a blink.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Mapping, Optional, Sequence

from lmf import __version__
from lmf.extras.errors import LmfError
from lmf.extras.logging import is_truthy

USAGE = f"""lmf {__version__} - fine-tune large language models from a YAML file

Usage: lmf <command> [config.yaml] [key=value ...]

Training (relaunched through torchrun with >1 GPU or FORCE_TORCHRUN=1):
  sft | train   supervised fine-tuning (`train` follows the config's `stage`)
  dpo           direct preference optimisation (sigmoid, ipo, hinge, orpo, simpo)
  rm            reward model (pairwise Bradley-Terry)
  kto           Kahneman-Tversky optimisation (answers labelled desirable / undesirable)

Models and data:
  chat          interactive chat with a model or adapter (streams tokens)
  export|merge  merge a LoRA adapter into its base model and save it
  expand        LLaMA-Pro: insert identity blocks into a model (--model_name_or_path --output_dir --num_expand)
  api           OpenAI-compatible HTTP server (/v1/chat/completions)
  data check    load, convert and tokenize the config's datasets; print statistics

Information:
  env           a table of the software and hardware environment
  version       versions of lmf and its main dependencies
  help [config] this text, or `lmf help config` for every config key (`--v1`: LLaMA-Factory v1's keys)

Examples:
  lmf sft examples/demo_lora_sft.yaml
  lmf sft examples/demo_lora_sft.yaml learning_rate=1e-4 max_steps=20
  FORCE_TORCHRUN=1 NPROC_PER_NODE=2 lmf sft cfg.yaml
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 lmf sft cfg.yaml

Distributed environment variables:
  FORCE_TORCHRUN  NNODES  NODE_RANK  NPROC_PER_NODE  MASTER_ADDR  MASTER_PORT
  MAX_RESTARTS  RDZV_ID  MIN_NNODES  MAX_NNODES  OPTIM_TORCH (default 1)
"""

DIST_TRAIN_COMMANDS = ("train", "sft", "dpo", "rm", "kto")
HELP_COMMANDS = ("help", "-h", "--help")


def find_available_port() -> int:
    """A free TCP port on this machine (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def get_device_count() -> int:
    """Number of visible accelerators (CUDA, then NPU/XPU/MPS count as one or more); 0 on CPU."""
    try:
        import torch
    except ImportError:
        return 0
    if torch.cuda.is_available():
        return torch.cuda.device_count()
    for name in ("xpu", "npu"):
        backend = getattr(torch, name, None)
        if backend is not None and hasattr(backend, "is_available") and backend.is_available():
            return backend.device_count()
    return 0


def should_use_torchrun(env: Mapping[str, str], device_count: int) -> bool:
    """True when a training command must be relaunched through torchrun (forced, >1 device, multi-node or elastic)."""
    if is_truthy(env.get("USE_RAY")):
        return False
    nnodes = env.get("NNODES") or "1"
    multi_node = nnodes.isdigit() and int(nnodes) > 1  # one process per node still needs torchrun's rendezvous
    return is_truthy(env.get("FORCE_TORCHRUN")) or device_count > 1 or multi_node or bool(env.get("RDZV_ID"))


def build_torchrun_argv(
    command: str,
    args: Sequence[str],
    env: Mapping[str, str],
    device_count: int,
    python: str = sys.executable,
    port_finder=find_available_port,
) -> list[str]:
    """The exact argv of the torchrun relaunch for ``lmf <command> <args>`` under ``env``.

    Static (default): ``--nnodes N --node_rank R --master_addr A --master_port P``.
    Elastic (``RDZV_ID`` set): ``--nnodes N|MIN:MAX --rdzv-id ID --rdzv-backend c10d
    --rdzv-endpoint A:P``. Both carry ``--nproc-per-node`` and ``--max-restarts``.
    """
    nnodes = env.get("NNODES", "1")
    node_rank = env.get("NODE_RANK", "0")
    nproc_per_node = env.get("NPROC_PER_NODE") or str(max(device_count, 1))
    master_addr = env.get("MASTER_ADDR", "127.0.0.1")
    master_port = env.get("MASTER_PORT") or str(port_finder())
    max_restarts = env.get("MAX_RESTARTS", "0")
    rdzv_id = env.get("RDZV_ID")
    min_nnodes, max_nnodes = env.get("MIN_NNODES"), env.get("MAX_NNODES")

    argv = [python, "-m", "torch.distributed.run", "--nproc-per-node", nproc_per_node]
    if rdzv_id:
        rdzv_nnodes = f"{min_nnodes}:{max_nnodes}" if min_nnodes and max_nnodes else nnodes
        argv += [
            "--nnodes", rdzv_nnodes,
            "--rdzv-id", rdzv_id,
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{master_addr}:{master_port}",
        ]
    else:
        argv += [
            "--nnodes", nnodes,
            "--node_rank", node_rank,
            "--master_addr", master_addr,
            "--master_port", master_port,
        ]
    argv += ["--max-restarts", max_restarts, "--module", "lmf.launcher", command, *args]
    return argv


def build_child_env(env: Mapping[str, str]) -> dict[str, str]:
    """Environment of the torchrun children: ``OPTIM_TORCH`` (default on) adds allocator/NCCL tweaks."""
    child = dict(env)
    if is_truthy(env.get("OPTIM_TORCH", "1")):
        child["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        child["TORCH_NCCL_AVOID_RECORD_STREAMS"] = "1"
    child.setdefault("PYTHONUNBUFFERED", "1")
    if env.get("RDZV_ID"):
        # Elastic restarts break when workers share the rendezvous TCPStore: the new group reads the dead
        # group's addresses (pytorch/pytorch#135712). A per-attempt store avoids it.
        child.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return child


def _validate_dist_env(env: Mapping[str, str]) -> None:
    for key in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_PORT", "MAX_RESTARTS", "MIN_NNODES", "MAX_NNODES"):
        value = env.get(key)
        if value not in (None, "") and not value.isdigit():
            raise LmfError(f"environment variable {key}={value!r} must be a non-negative integer")
    if bool(env.get("MIN_NNODES")) != bool(env.get("MAX_NNODES")):
        raise LmfError("set both MIN_NNODES and MAX_NNODES for an elastic range, or neither")


#: Environment variable naming the folder where each torchrun worker writes its exit code (``rank-N``).
EXIT_DIR_ENV = "LMF_WORKER_EXIT_DIR"
#: Seconds torchrun gives workers to finish after a SIGTERM/SIGINT before SIGKILL (a checkpoint is being written).
DEFAULT_SHUTDOWN_TIMEOUT_S = "300"
FORWARDED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def read_worker_exit_codes(exit_dir: str) -> dict[int, int]:
    """The exit codes the workers reported, by global rank (a worker killed by a signal reports none)."""
    codes = {}
    for name in os.listdir(exit_dir) if os.path.isdir(exit_dir) else ():
        if name.startswith("rank-"):
            try:
                with open(os.path.join(exit_dir, name), encoding="utf-8") as fh:
                    codes[int(name[5:])] = int(fh.read().strip())
            except (OSError, ValueError):
                continue
    return codes


def launcher_exit_code(torchrun_code: int, worker_codes: dict[int, int], local_workers: int,
                       signals: Sequence[int] = ()) -> int:
    """What ``lmf`` exits with after torchrun: the first failing worker's own code (by rank); else torchrun's.

    A worker reports its code after its work (and the final barrier) is done. When torchrun failed although
    no reporting worker did, success needs every one of this node's ``local_workers`` to have reported: one
    that did not died (a signal, an abort) and the run failed. ``signals``: the ones the launcher forwarded
    (then a failure reads 128 + the first).
    """
    failing = [worker_codes[rank] for rank in sorted(worker_codes) if worker_codes[rank] != 0]
    if failing:
        return failing[0]
    if torchrun_code == 0 or (len(worker_codes) >= local_workers and not signals):
        return 0
    return 128 + signals[0] if signals else torchrun_code


def _die_with_parent() -> None:
    """In the torchrun child (Linux): get SIGTERM when the lmf launcher dies, instead of running on orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    except (OSError, AttributeError):
        pass


def relaunch_with_torchrun(command: str, args: Sequence[str]) -> int:
    """Run the training command through torchrun; return the workers' exit code (torchrun's when they gave none).

    torchrun runs in its own session and receives exactly one copy of a SIGTERM/SIGINT/SIGHUP sent to
    the launcher (or typed as Ctrl-C); it passes it to the workers, which finish their step, save a
    checkpoint and exit 143/130 (:mod:`lmf.train.preemption`), within ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``
    seconds (default here: 300).
    """
    import signal
    import tempfile

    env = os.environ
    _validate_dist_env(env)
    argv = build_torchrun_argv(command, args, env, get_device_count())
    nproc = argv[argv.index("--nproc-per-node") + 1]
    endpoint = env.get("MASTER_ADDR", "127.0.0.1")
    print(f"lmf: launching {nproc} process(es) per node through torchrun ({endpoint})", file=sys.stderr, flush=True)
    if int(env.get("NNODES", "1")) > 1:
        print(f"lmf: multi-node training: {env.get('NNODES')} nodes, this is node {env.get('NODE_RANK', '0')}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="lmf-exit-") as exit_dir:
        child_env = build_child_env(env)
        child_env[EXIT_DIR_ENV] = exit_dir
        child_env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT_S)
        proc = subprocess.Popen(argv, env=child_env, start_new_session=True,  # list argv, never shell=True
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        received: list[int] = []

        def forward(signum, frame) -> None:
            if not received:  # one copy: a second signal would cut torchrun's own graceful shutdown short
                print(f"lmf: {signal.Signals(signum).name} received: asking the workers to save a checkpoint "
                      "and stop", file=sys.stderr, flush=True)
                proc.send_signal(signum)
            received.append(signum)

        previous = {getattr(signal, n): signal.signal(getattr(signal, n), forward) for n in FORWARDED_SIGNALS}
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        workers = read_worker_exit_codes(exit_dir)
    result = launcher_exit_code(code, workers, int(nproc), received)
    if code != 0 and not received and not any(workers.values()):
        if result == 0:
            print(f"lmf: warning: torchrun exited {code} after all {nproc} workers reported success "
                  "(a worker crashed while exiting; its work was complete)", file=sys.stderr, flush=True)
        else:
            print(f"lmf: error: torchrun exited {code}: a worker died without an exit code of its own "
                  f"({len(workers)} of {nproc} reported; torchrun's report above names the rank and signal)",
                  file=sys.stderr, flush=True)
    return result


def print_version() -> None:
    """Versions of lmf and its main dependencies, read from package metadata (no heavy imports)."""
    from importlib import metadata
    import platform

    print(f"lmf {__version__}")
    print(f"python {platform.python_version()}")
    for pkg in ("torch", "transformers", "peft", "datasets", "accelerate", "deepspeed"):
        try:
            print(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            print(f"{pkg} not installed")


def run_command(command: str, args: list[str]) -> int:
    """Run one command in this process (training commands run on the current process group)."""
    if command in DIST_TRAIN_COMMANDS:
        from lmf.predict.runner import run_experiment

        run_experiment(args, command=command)
        return 0
    if command == "chat":
        from lmf.chat.cli import run_chat

        return run_chat(args) or 0
    if command in ("export", "merge"):  # merge: LLaMA-Factory v1's name
        from lmf.export import run_export

        run_export(args)
        return 0
    if command == "expand":
        from lmf.expand import run_expand

        return run_expand(args)
    if command == "api":
        from lmf.api.server import run_api

        return run_api(args) or 0
    if command == "data":
        from lmf.data_check import run_data_command

        return run_data_command(args) or 0
    if command == "env":
        from lmf.env_info import print_env

        print_env()
        return 0
    if command == "version":
        print_version()
        return 0
    if command in HELP_COMMANDS:
        if args and args[0] == "config" and "--v1" in args:
            from lmf.config.v1 import describe_v1_keys

            print(describe_v1_keys())
        elif args and args[0] == "config":
            from lmf.config.parser import describe_keys

            print(describe_keys())
        else:
            print(USAGE)
        return 0
    print(f"lmf: unknown command {command!r}\n", file=sys.stderr)
    print(USAGE, file=sys.stderr)
    return 2


def _guarded(fn, *args) -> int:
    """Run ``fn``; turn :class:`LmfError` into a one-line message and its exit code."""
    try:
        return fn(*args)
    except LmfError as exc:
        kind = "" if exc.exit_code >= 128 else "error: "  # 128 + N: stopped by signal N, not a failure
        print(f"lmf: {kind}{exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lmf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmf data templates | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _wants_ray(argv: list[str]) -> bool:
    """Ray Train runs the command with ``USE_RAY=1`` or when the config sets a Ray key (``ray_num_workers``...)."""
    if is_truthy(os.environ.get("USE_RAY")):
        return True
    from lmf.config.parser import raw_config
    from lmf.ray_launcher import config_requests_ray

    try:
        return config_requests_ray(raw_config(argv)[0])
    except LmfError:  # a bad config or argument: the command itself reports it
        return False


def launch(argv: Optional[list[str]] = None) -> None:
    """Console entry point of ``lmf``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "help"
    if command in DIST_TRAIN_COMMANDS and os.environ.get("LOCAL_RANK") is None:
        if _wants_ray(argv):
            from lmf.ray_launcher import run_with_ray

            sys.exit(_guarded(run_with_ray, command, argv))
        forced = is_truthy(os.environ.get("FORCE_TORCHRUN"))
        if should_use_torchrun(os.environ, 0 if forced else get_device_count()):
            sys.exit(_guarded(relaunch_with_torchrun, command, argv))
    sys.exit(_guarded(run_command, command, argv))


def main(argv: Optional[list[str]] = None) -> None:
    """Worker entry point (what torchrun runs): ``<command> [config.yaml] [key=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "sft"
    if argv and argv[0] in DIST_TRAIN_COMMANDS:
        command = argv.pop(0)
    elif argv and not argv[0].lower().endswith((".yaml", ".yml", ".json")) and "=" not in argv[0]:
        print(f"lmf worker: unknown training command {argv[0]!r}", file=sys.stderr)
        _report_exit_code(2)
        sys.exit(2)
    code = _guarded(run_worker_command, command, argv)
    _report_exit_code(code)
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Exit a finished worker: Python's exit handlers (loggers, trackers), then no C++ teardown.

    A library's background thread torn down at interpreter exit can abort a worker whose work is done
    ("terminate called without an active exception"); torchrun would then kill the peers that are still
    writing. The result was reported already, so the worker leaves with ``os._exit``.
    """
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _report_exit_code(code: int) -> None:
    """Tell the launcher this worker's exit code (torchrun itself only says that a worker failed)."""
    exit_dir = os.environ.get(EXIT_DIR_ENV)
    if not exit_dir or not os.path.isdir(exit_dir):
        return
    try:
        with open(os.path.join(exit_dir, f"rank-{os.environ.get('RANK', '0')}"), "w", encoding="utf-8") as fh:
            fh.write(str(code))
    except OSError:
        pass


def run_worker_command(command: str, args: list[str]) -> int:
    """``run_command`` in a torchrun worker: a dead or hung peer becomes a one-line PeerLostError."""
    from lmf.dist.faults import peer_failure_guard

    with peer_failure_guard():
        return run_command(command, args)


if __name__ == "__main__":
    main()
