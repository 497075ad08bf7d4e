"""Environment fingerprint: every rank checks at start-up that all nodes run the same software and config.

Mismatched torch / CUDA / NCCL / DeepSpeed versions across servers make multi-node jobs hang or
crash deep inside a collective. ``check_consistency`` gathers one fingerprint per rank and, if any
compared key differs, raises :class:`EnvironmentMismatchError` on *every* rank with a table of the
differences, so the whole job fails fast with the same message everywhere.

:data:`FINGERPRINT_HOOKS` may rewrite this process's fingerprint before it is compared (the tests fake a mismatched
node with one: :mod:`lmf.testing.faults`); lmf itself adds none.
"""

from __future__ import annotations

import os
import platform
import socket
from importlib import metadata
from typing import Callable, Optional, Sequence

from lmf.extras.errors import LmfError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

#: Functions ``fingerprint -> fingerprint`` applied, in order, to this process's fingerprint before it is compared.
FINGERPRINT_HOOKS: list[Callable[[dict], dict]] = []

# Keys shown in the table but never compared (they legitimately differ between nodes).
DISPLAY_ONLY_KEYS = ("host",)

# Package versions read from installed metadata (no heavy imports).
FINGERPRINT_PACKAGES = ("transformers", "peft", "datasets", "accelerate", "deepspeed")

NOT_INSTALLED = "not installed"
_ERROR_KEY = "__error__"


class EnvironmentMismatchError(LmfError):
    """The ranks of one job run different software versions or configs."""


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _torch_fields() -> dict[str, str]:
    """torch version, the CUDA it was built with and the NCCL it ships (``none`` on CPU builds)."""
    try:
        import torch
    except ImportError:
        return {"torch": NOT_INSTALLED, "cuda": "none", "nccl": "none"}
    nccl = "none"
    if torch.cuda.is_available():
        try:
            version = torch.cuda.nccl.version()
            nccl = ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)
        except Exception:  # noqa: BLE001 - builds without NCCL raise various errors
            nccl = "unavailable"
    return {"torch": torch.__version__, "cuda": str(torch.version.cuda or "none"), "nccl": nccl}


def collect_fingerprint(config_hash: Optional[str]) -> dict[str, str]:
    """This process's fingerprint: software versions, the config hash, and the host (display only)."""
    from lmf import __version__

    fingerprint = {"lmf": __version__, "python": platform.python_version()}
    fingerprint.update(_torch_fields())
    for name in FINGERPRINT_PACKAGES:
        fingerprint[name] = _package_version(name)
    fingerprint["config_hash"] = str(config_hash)
    fingerprint["host"] = socket.gethostname()
    for hook in FINGERPRINT_HOOKS:
        fingerprint = hook(fingerprint)
    return fingerprint


def find_mismatches(fingerprints: Sequence[dict]) -> list[str]:
    """Compared keys whose values are not identical on every rank (sorted; display-only keys excluded)."""
    keys = sorted({k for fp in fingerprints for k in fp if k not in DISPLAY_ONLY_KEYS})
    return [k for k in keys if len({fp.get(k, "<missing>") for fp in fingerprints}) > 1]


def format_mismatch_table(fingerprints: Sequence[dict], keys: Sequence[str]) -> str:
    """A text table: one row per rank, columns rank, host and each differing key."""
    header = ["rank", "host", *keys]
    rows = [[str(rank), str(fp.get("host", "?")), *(str(fp.get(k, "<missing>")) for k in keys)]
            for rank, fp in enumerate(fingerprints)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    return "\n".join([sep, line(header), sep, *(line(r) for r in rows), sep])


def mismatch_message(fingerprints: Sequence[dict], keys: Sequence[str]) -> str:
    """The full error text for a mismatch between ranks."""
    return (
        f"the {len(fingerprints)} ranks of this job do not share the same environment "
        f"(differing: {', '.join(keys)}); install the same versions and use the same config on every node:\n"
        + format_mismatch_table(fingerprints, keys)
    )


def check_consistency(config_hash: Optional[str]) -> list[dict]:
    """Gather every rank's fingerprint; raise :class:`EnvironmentMismatchError` on every rank on a difference.

    Returns the fingerprints by rank (just this process's one without a process group).
    Collective: every rank of the default group must call it.
    """
    from lmf.dist.runtime import is_dist

    if not is_dist():
        return [collect_fingerprint(config_hash)]
    import torch.distributed as dist

    try:
        own = collect_fingerprint(config_hash)
    except LmfError as exc:  # still join the exchange, so the other ranks fail now instead of at the timeout
        own = {_ERROR_KEY: str(exc)}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    failed = [(rank, fp[_ERROR_KEY]) for rank, fp in enumerate(gathered) if _ERROR_KEY in fp]
    if failed:
        raise EnvironmentMismatchError(
            "could not compare the ranks' environments: " + "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        )
    mismatched = find_mismatches(gathered)
    if mismatched:
        raise EnvironmentMismatchError(mismatch_message(gathered, mismatched))
    logger.info("environment fingerprint identical on all %d ranks (torch %s, config %s)",
                len(gathered), own.get("torch"), own.get("config_hash"))
    return gathered
