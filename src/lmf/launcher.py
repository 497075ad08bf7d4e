"""The ``lmf`` command: routes commands and relaunches training through torchrun.

``launch()`` is the console entry point. For a training command (``train``, ``sft``, ``dpo``,
``rm``, ``kto``) it re-executes itself through torchrun (``python -m lmf.torchrun``) when
``FORCE_TORCHRUN`` is truthy or more than one accelerator is visible; each worker then enters ``main()``, which
routes the command to its trainer. Everything else runs in-process.

Only the standard library is imported at module level so that ``lmf help`` starts in a blink.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from lmf import __version__
from lmf.extras.errors import LmfError
from lmf.extras.logging import is_truthy
from lmf.torchrun import EXIT_DIR_ENV, get_device_count, relaunch_with_torchrun, should_use_torchrun

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


def _guarded(fn, *args, quiet_shared: bool = False) -> int:
    """Run ``fn``; turn :class:`LmfError` into a one-line message and its exit code. ``quiet_shared``: an error every
    rank raises alike (a stop by a signal, exit code 128 + N; a decision broadcast from rank 0) says nothing (a
    torchrun worker other than the node's first)."""
    try:
        return fn(*args)
    except LmfError as exc:
        stopped = exc.exit_code >= 128  # 128 + N: stopped by signal N, not a failure
        if not ((stopped or exc.same_on_every_rank) and quiet_shared):
            print(f"lmf: {'' if stopped else 'error: '}{exc}", file=sys.stderr, flush=True)
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
    # an error every rank raises alike (a stop, a broadcast decision): the node's local rank 0 prints it, once
    code = _guarded(run_worker_command, command, argv, quiet_shared=os.environ.get("LOCAL_RANK", "0") != "0")
    _report_exit_code(code)
    _exit_now(code)


def _exit_now(code: int) -> None:
    """Exit a finished worker as the interpreter would (non-daemon threads joined, exit handlers: loggers, trackers),
    then without the C++ teardown.

    A library's background thread torn down at interpreter exit can abort a worker whose work is done
    ("terminate called without an active exception"); torchrun would then kill the peers that are still
    writing. The result was reported already, so the worker leaves with ``os._exit``.
    """
    import atexit
    import threading

    for thread in threading.enumerate():  # what interpreter shutdown does first: wait for non-daemon threads
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
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
