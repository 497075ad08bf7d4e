"""The ``lmf`` command: routes commands and relaunches training through torchrun.

``launch()`` is the console entry point. For a training command (:data:`lmf.config.stages.TRAIN_COMMANDS`) it
re-executes itself through torchrun (``python -m lmf.torchrun``) when ``FORCE_TORCHRUN`` is truthy or more than one
accelerator is visible, or through Ray Train; each worker then enters :func:`lmf.worker.main`, which runs the same
:func:`run_command`. Everything else runs in-process.

Only the standard library is imported at module level so that ``lmf help`` starts in a blink.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from lmf import __version__
from lmf.extras.errors import LmfError
from lmf.extras.logging import is_truthy
from lmf.config.stages import STAGES, TRAIN_COMMANDS
from lmf.torchrun import get_device_count, relaunch_with_torchrun, should_use_torchrun

#: one help line per training command, from the stage registry (pt runs under `lmf sft`)
_TRAINING_COMMANDS = "\n".join(f"  {'sft | train' if spec.command == 'sft' else spec.command:<13} {spec.summary}"
                                for spec in STAGES.values() if spec.name == spec.command)

USAGE = f"""lmf {__version__} - fine-tune large language models from a YAML file

Usage: lmf <command> [config.yaml] [key=value ...]

Training (relaunched through torchrun with >1 GPU or FORCE_TORCHRUN=1):
{_TRAINING_COMMANDS}

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

`llamafactory-cli <command> ...` is the same program under LLaMA-Factory's command name.

Examples:
  lmf sft examples/demo_lora_sft.yaml
  lmf sft examples/demo_lora_sft.yaml learning_rate=1e-4 max_steps=20
  FORCE_TORCHRUN=1 NPROC_PER_NODE=2 lmf sft cfg.yaml
  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 lmf sft cfg.yaml

Distributed environment variables:
  FORCE_TORCHRUN  NNODES  NODE_RANK  NPROC_PER_NODE  MASTER_ADDR  MASTER_PORT
  MAX_RESTARTS  RDZV_ID  MIN_NNODES  MAX_NNODES  OPTIM_TORCH (default 1)
"""

HELP_COMMANDS = ("help", "-h", "--help")

#: LLaMA-Factory's subcommands lmf has no equivalent of -> why, and what to use instead
LF_ONLY_COMMANDS = {
    "webui": "LLaMA-Factory's web UI (LlamaBoard) is not implemented in lmf yet: train from a YAML with "
             "`lmf train cfg.yaml` (`lmf help` lists the commands)",
    "webchat": "a chat page in the browser is not implemented in lmf: `lmf chat cfg.yaml` chats in the terminal, "
               "`lmf api cfg.yaml` serves an OpenAI-compatible API that chat front-ends can use",
    "eval": "LLaMA-Factory's benchmark evaluation (MMLU, C-Eval, CMMLU) is not implemented in lmf: "
            "`lmf sft cfg.yaml do_predict=true` writes a model's predictions and metrics on your eval set, and "
            "`lmf api cfg.yaml` serves the model to an evaluation harness",
}

#: the console script that started this process: `lmf`, or `llamafactory-cli` (lmf's drop-in for LLaMA-Factory's)
invoked_as = "lmf"


def print_version() -> None:
    """Versions of lmf and its main dependencies, read from package metadata (no heavy imports); says which
    package answered, since LLaMA-Factory installs commands named `lmf` and `llamafactory-cli` too."""
    from importlib import metadata
    import platform

    import lmf

    print(f"lmf {__version__} (the lmf package at {os.path.dirname(lmf.__file__)}, run as `{invoked_as}`)")
    try:
        lf_version = metadata.version("llamafactory")
    except metadata.PackageNotFoundError:
        lf_version = None
    if lf_version:
        print(f"LLaMA-Factory {lf_version} is installed here too: its `lmf` and `llamafactory-cli` commands and "
              "lmf's replace each other, the package installed last wins; this answer came from lmf")
    print(f"python {platform.python_version()}")
    for pkg in ("torch", "transformers", "peft", "datasets", "accelerate", "deepspeed"):
        try:
            print(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            print(f"{pkg} not installed")


def run_command(command: str, args: list[str]) -> int:
    """Run one command in this process (training commands run on the current process group)."""
    if command in TRAIN_COMMANDS:
        from lmf.experiment import run_experiment

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
    if command in LF_ONLY_COMMANDS:
        print(f"lmf: error: `{invoked_as} {command}`: {LF_ONLY_COMMANDS[command]}", file=sys.stderr)
        return 2
    print(f"lmf: unknown command {command!r}\n", file=sys.stderr)
    print(USAGE, file=sys.stderr)
    return 2


def guarded(fn, *args, quiet_shared: bool = False) -> int:
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


def launch_as_llamafactory(argv: Optional[list[str]] = None) -> None:
    """Console entry point of ``llamafactory-cli``: lmf under LLaMA-Factory's command name, so that the commands of
    its docs (``llamafactory-cli train cfg.yaml``, ``chat``, ``export``, ``api``, ``env``, ``version``) run lmf;
    ``webui``, ``webchat`` and ``eval`` say what to use instead."""
    global invoked_as
    invoked_as = "llamafactory-cli"
    launch(argv)


def launch(argv: Optional[list[str]] = None) -> None:
    """Console entry point of ``lmf``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "help"
    if command in TRAIN_COMMANDS and os.environ.get("LOCAL_RANK") is None:
        if _wants_ray(argv):
            from lmf.ray_launcher import run_with_ray

            sys.exit(guarded(run_with_ray, command, argv))
        forced = is_truthy(os.environ.get("FORCE_TORCHRUN"))
        if should_use_torchrun(os.environ, 0 if forced else get_device_count()):
            sys.exit(guarded(relaunch_with_torchrun, command, argv))
    sys.exit(guarded(run_command, command, argv))
