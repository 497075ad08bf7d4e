"""Media containers opened with PyAV (``pip install 'lmf[video]'``), shared by video and audio input.

- :func:`require_av`: the ``av`` module, or a NotAvailableError that names the kind of input that needs it.
- :func:`stream_problem`: why a file is not a usable video / audio file (missing, not readable, no stream of that
  kind), or None; the container is opened, nothing is decoded.
"""

from __future__ import annotations

import os
from typing import Optional

from lmf.extras.errors import NotAvailableError


def require_av(kind: str):
    try:
        import av
    except ImportError:
        raise NotAvailableError(f"{kind} input needs PyAV: pip install 'lmf[video]' (or pip install av)") from None
    return av


def stream_problem(path: str, kind: str) -> Optional[str]:
    """Why ``path`` holds no readable ``kind`` ("video" or "audio") stream, or None."""
    if not os.path.isfile(path):
        return f"{kind} file {path!r} not found"
    av = require_av(kind)
    try:
        with av.open(path, "r") as container:
            if not any(s.type == kind for s in container.streams):
                return f"{kind} file {path!r} has no {kind} stream"
    except (av.FFmpegError, OSError) as exc:
        return f"{kind} file {path!r} cannot be read ({exc})"
    return None
