"""The torchrun relaunch of a training command: its exact argv and environment, and the exit code it ends with.

The launcher (:mod:`lmf.launcher`) calls :func:`relaunch_with_torchrun`; each worker reports its own exit code
into ``$LMF_WORKER_EXIT_DIR`` (torchrun itself only says that a worker failed) and :func:`launcher_exit_code`
turns those reports and torchrun's code into the one ``lmf`` exits with. Standard library only at module level.
``python -m lmf.torchrun`` is torchrun itself (:func:`run_torchrun`), without its tracebacks: quiet when a forwarded
signal stops it, one line per worker that died without reporting when workers fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Mapping, Sequence

from lmf.extras.errors import LmfError
from lmf.extras.logging import is_truthy


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
    """The exact argv of the torchrun relaunch for ``lmf <command> <args>`` under ``env`` (torchrun's own arguments,
    run by :func:`run_torchrun`).

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

    argv = [python, "-m", "lmf.torchrun", "--nproc-per-node", nproc_per_node]  # torchrun: run_torchrun
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
    argv += ["--max-restarts", max_restarts, "--module", "lmf.worker", command, *args]
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
    # NPROC_PER_NODE set: no need to count devices, which imports torch (~2 s) in a process that only waits
    argv = build_torchrun_argv(command, args, env, 0 if env.get("NPROC_PER_NODE") else get_device_count())
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
                  f"({len(workers)} of {nproc} reported; the line above names the rank and signal)",
                  file=sys.stderr, flush=True)
    return result


def run_torchrun(argv: Sequence[str]) -> int:
    """torchrun (``torch.distributed.run``) with ``argv``, in this process: the launcher's child.

    A SIGTERM/SIGINT/SIGHUP that the launcher forwarded ends it with 128 + the signal and nothing printed: torchrun
    has shut the workers down (each reported, the one line of the preemption is theirs) and would otherwise print
    its ``SignalException`` traceback under it. Failed workers end it with 1 and, instead of torchrun's
    ``ChildFailedError`` traceback, one line for each worker that died without reporting its own error.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(list(argv))
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        # a worker that reported its exit code printed its own one-line error; name only the ones that died silently
        reported = read_worker_exit_codes(os.environ.get(EXIT_DIR_ENV, ""))
        for rank, failure in sorted(exc.failures.items()):
            if rank not in reported:
                why = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
                print(f"lmf: worker rank {rank} (local rank {failure.local_rank}, pid {failure.pid}, {exc.name}) "
                      f"died without reporting: {why}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
