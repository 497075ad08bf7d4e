"""Exceptions that the CLI turns into a one-line message and a non-zero exit code."""

from __future__ import annotations


class LmfError(Exception):
    """A user-facing error: printed without a traceback. ``exit_code`` is what the CLI returns.
    ``same_on_every_rank``: every rank of a job raises it alike (a decision rank 0 broadcast), so each node's
    first worker prints it, once per node (:func:`everywhere`)."""

    exit_code = 1
    same_on_every_rank = False


def everywhere(exc: LmfError) -> LmfError:
    """``exc``, marked as raised alike by every rank of the job."""
    exc.same_on_every_rank = True
    return exc


class ConfigError(LmfError):
    """A bad config key or value; names the key."""

    exit_code = 2


class DataError(LmfError):
    """A bad dataset registry entry, file or record; names the dataset, file and record index."""

    exit_code = 1


class NotAvailableError(LmfError):
    """A feature that needs an optional dependency or hardware that is not present."""

    exit_code = 1
