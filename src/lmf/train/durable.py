"""Durable saves: written in a ``.tmp-*`` directory, checked for space, fsynced, renamed into place, verifiable.

A save is never written in place: :func:`make_temp_dir` gives a ``.tmp-NAME-*`` directory beside the target
(same file system), :func:`commit_dir` / :func:`commit_files` rename it into place after :func:`fsync_tree`,
and sync the parent directory, so "renamed into place" means "on disk". Only the holder of the
``output_dir`` lock (:mod:`lmf.train.output_lock`) removes ``.tmp-*`` leftovers of an interrupted save.
:class:`RankZeroSave` turns a full disk into one line naming the file, the free space and the size needed,
removes the partial save, and stops every rank alike.

Every checkpoint gets ``lmf_manifest.json`` (written last): each file's size and CRC-32 (zlib, ~3 GB/s, read
back from the page cache right after writing; of the first and last 4 MiB only for files over 256 MiB). :func:`verify` re-reads the files and names the first one that
is missing, truncated or changed, so a resume can skip a checkpoint that a power loss, a full disk or a bad
copy damaged. :func:`fsync_tree` and :func:`fsync_dir` make "renamed into place" mean "on disk".
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
import zlib
from typing import Optional

from lmf.extras.errors import LmfError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)
TMP_PREFIX = ".tmp-"

MANIFEST_NAME = "lmf_manifest.json"
_BLOCK = 8 << 20


#: Files up to this size get a CRC-32 of their whole content; bigger ones (a full model's weights, its optimizer
#: state: hundreds of GB) one of their first and last 4 MiB, so a resume never re-reads a terabyte (their size is
#: always checked: a truncated file is caught either way).
FULL_CRC_LIMIT = 256 << 20
_ENDS = 4 << 20


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_BLOCK)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def ends_crc32(path: str) -> int:
    """CRC-32 of a file's first and last 4 MiB."""
    with open(path, "rb") as fh:
        crc = zlib.crc32(fh.read(_ENDS))
        fh.seek(max(os.fstat(fh.fileno()).st_size - _ENDS, 0))
        return zlib.crc32(fh.read(_ENDS), crc)


def _fingerprint(path: str) -> dict:
    size = os.path.getsize(path)
    if size <= FULL_CRC_LIMIT:
        return {"size": size, "crc32": file_crc32(path)}
    return {"size": size, "crc32_ends": ends_crc32(path)}


def _files(root: str) -> list[str]:
    """Relative paths of every file under ``root`` but the manifest, sorted."""
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


def write_manifest(root: str) -> None:
    """Record the size and CRC-32 of every file of ``root`` in ``root/lmf_manifest.json``."""
    entries = {rel: _fingerprint(os.path.join(root, rel)) for rel in _files(root)}
    with open(os.path.join(root, MANIFEST_NAME), "w", encoding="utf-8") as fh:
        json.dump({"version": 1, "files": entries}, fh, indent=1, sort_keys=True)
        fh.write("\n")


def has_manifest(root: str) -> bool:
    return os.path.isfile(os.path.join(root, MANIFEST_NAME))


def verify(root: str) -> Optional[str]:
    """None when every file of the manifest is there with its size and CRC-32; else what is wrong (naming the
    file). A directory without a manifest (written before lmf wrote manifests) is not checked here."""
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            entries = json.load(fh)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path} is unreadable ({exc.__class__.__name__}: {exc})"
    try:
        for rel, want in sorted(entries.items()):
            file = os.path.join(root, rel)
            try:
                size = os.path.getsize(file)
            except FileNotFoundError:
                return f"{file} is missing"
            if size != want["size"]:
                return f"{file} has {size} bytes, {want['size']} were written"
            crc = file_crc32(file) if "crc32" in want else ends_crc32(file)
            if crc != want.get("crc32", want.get("crc32_ends")):
                return f"{file} does not hold what was written (CRC-32 differs)"
    except OSError as exc:  # unreadable now (permissions, a flaky network file system): not proof of damage
        raise LmfError(f"cannot check {root}: {exc}; nothing was moved (fix the access, then relaunch)") from None
    return None


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: a rename or a new file inside it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the data files are synced regardless
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (before renaming it into place)."""
    for dirpath, _dirs, names in os.walk(root, topdown=False):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


# ---------------------------------------------------------------------------- temp dirs and atomic commit
def make_temp_dir(output_dir: str, name: str) -> str:
    """A fresh ``.tmp-NAME-*`` directory inside ``output_dir`` (same file system: renames are atomic)."""
    os.makedirs(output_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=output_dir)


def remove_stale_temp_dirs(output_dir: str) -> None:
    """Delete ``.tmp-*`` directories left behind by an interrupted save (call only under the output_dir lock)."""
    for path in glob.glob(os.path.join(output_dir, f"{TMP_PREFIX}*")):
        logger.warning("removing an incomplete save left by an interrupted run: %s", path)
        shutil.rmtree(path, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_permissions(root: str) -> None:
    """mkdtemp and some writers create 0700/0600 entries; give them the usual umask-based modes."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def commit_dir(tmp_dir: str, final_dir: str) -> None:
    """Rename a fully written temp dir to its final name (replacing an older one of that name), durably."""
    fix_permissions(tmp_dir)
    fsync_tree(tmp_dir)
    if os.path.exists(final_dir):
        trash = os.path.join(os.path.dirname(final_dir), TMP_PREFIX + "old-" + os.path.basename(final_dir))
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    fsync_dir(os.path.dirname(os.path.abspath(final_dir)))


def commit_files(tmp_dir: str, output_dir: str, last: str) -> None:
    """Move every file of ``tmp_dir`` into ``output_dir`` (each rename atomic; ``last`` moved last), drop tmp_dir."""
    fix_permissions(tmp_dir)
    fsync_tree(tmp_dir)
    names = sorted(os.listdir(tmp_dir), key=lambda n: n == last)
    for name in names:
        dst = os.path.join(output_dir, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp_dir, name), dst)
    fsync_dir(output_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- disk space
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def tensor_bytes(obj) -> int:
    """Bytes of every tensor in a (nested) state dict: about what it takes on disk."""
    if hasattr(obj, "nbytes") and hasattr(obj, "dtype"):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def dir_bytes(root: Optional[str]) -> int:
    """Bytes of the files under ``root`` (0 for None): the previous checkpoint predicts the next one's size."""
    if not root:
        return 0
    return sum(os.path.getsize(os.path.join(d, n)) for d, _dirs, names in os.walk(root) for n in names)


class NoSpaceError(LmfError):
    """A save that does not fit on its file system."""

    def __init__(self, directory: str, free: int, needed: int):
        self.free, self.needed = free, needed
        super().__init__(f"no space left on device for a save into {directory} ({_gib(free)} free, the checkpoint "
                         f"needs ~{_gib(needed)}); free some space or set save_total_limit, then relaunch to resume")


def check_free_space(directory: str, needed: int) -> None:
    """Refuse a save of ~``needed`` bytes that cannot fit (before anything is written)."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise NoSpaceError(directory, free, needed)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)  # torch.save's zip writer: "[enforce fail at inline_container.cc:...] . unexpected pos ..."
    return "No space left on device" in text or "unexpected pos" in text or "file write failed" in text


class RankZeroSave:
    """A save that global rank 0 writes into a ``.tmp-*`` directory, in steps every rank passes together.

    :meth:`step` runs its function on rank 0 only, then every rank learns the outcome (one small broadcast): a step
    that fails on rank 0 (a full disk, an unwritable folder) fails on every rank with the same one-line error, so
    no rank waits at the next collective for a writer that gave up. The writer removes its partial save; a full
    disk names the file being written, the free space and the size needed. Collectives (gathering sharded state)
    go between the steps, on every rank.
    """

    def __init__(self, runtime, output_dir: str, name: str, final: str):
        self.runtime, self.output_dir, self.name, self.final = runtime, output_dir, name, final
        self.is_writer = runtime.is_writer  # rank 0, or each node's local rank 0 with save_on_each_node
        self.tmp: Optional[str] = None

    def step(self, write, needed=None) -> None:
        """``write(tmp_dir)`` on rank 0, after checking that ~``needed()`` bytes fit (``needed``: a callable, run on
        rank 0 only)."""
        from lmf.dist.runtime import first_error
        from lmf.extras.errors import everywhere

        error, crash = None, None
        if self.is_writer:
            try:
                if self.tmp is None:
                    self.tmp = make_temp_dir(self.output_dir, self.name)
                if needed is not None:
                    check_free_space(self.tmp, needed())
                write(self.tmp)
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the other ranks
                error, crash = self._failed(exc)
        error = first_error(self.runtime, error)
        if crash is not None:
            raise crash  # a bug on rank 0: its own traceback there; the other ranks stop with the line below
        if error is not None:
            raise everywhere(LmfError(error))

    def _failed(self, exc: BaseException) -> tuple[str, Optional[BaseException]]:
        """(message for every rank, the exception rank 0 re-raises as it is, if any); removes the partial save."""
        written = _newest_file(self.tmp) if self.tmp else None
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, NoSpaceError):
            return str(NoSpaceError(self.final, exc.free, exc.needed)), None
        if _is_disk_full(exc):
            free = shutil.disk_usage(self.output_dir).free
            where = os.path.join(self.final, os.path.relpath(written, self.tmp)) if written and self.tmp else self.final
            return (f"no space left on device while writing {where} ({_gib(free)} free); the partial save was "
                    "removed, earlier checkpoints are intact"), None
        if isinstance(exc, LmfError):
            return str(exc), None
        if isinstance(exc, OSError):
            return f"cannot write {self.final}: {exc}; the partial save was removed, earlier checkpoints are intact", None
        return f"rank 0 failed while writing {self.final} ({exc.__class__.__name__}); see its traceback", exc


def _newest_file(root: str) -> Optional[str]:
    newest, when = None, -1.0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                mtime = os.stat(path).st_mtime_ns
            except OSError:
                continue
            if mtime > when:
                newest, when = path, mtime
    return newest
