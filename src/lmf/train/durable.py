"""Durable saves: written in a ``.tmp-*`` directory, checked for space, fsynced, renamed into place, verifiable.

A save is never written in place: :func:`make_temp_dir` gives a ``.tmp-NAME-*`` directory beside the target
(same file system), :func:`commit_dir` / :func:`commit_files` rename it into place after :func:`fsync_tree`,
and sync the parent directory, so "renamed into place" means "on disk". Only the holder of the
``output_dir`` lock (:mod:`lmf.train.output_lock`) removes ``.tmp-*`` leftovers of an interrupted save.
:func:`writing_into` turns a full disk into one line naming the file, the free space and the size needed,
and removes the partial save.

Every checkpoint gets ``lmf_manifest.json`` (written last): each file's size and CRC-32 (zlib, ~3 GB/s, read
back from the page cache right after writing). :func:`verify` re-reads the files and names the first one that
is missing, truncated or changed, so a resume can skip a checkpoint that a power loss, a full disk or a bad
copy damaged. :func:`fsync_tree` and :func:`fsync_dir` make "renamed into place" mean "on disk".
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import tempfile
import zlib
from typing import Iterator, Optional

from lmf.extras.errors import LmfError
from lmf.extras.logging import get_logger

logger = get_logger("lmf.train.trainer")
TMP_PREFIX = ".tmp-"

MANIFEST_NAME = "lmf_manifest.json"
_BLOCK = 8 << 20


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_BLOCK)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


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
    entries = {rel: {"size": os.path.getsize(os.path.join(root, rel)), "crc32": file_crc32(os.path.join(root, rel))}
               for rel in _files(root)}
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
    for rel, want in sorted(entries.items()):
        file = os.path.join(root, rel)
        try:
            size = os.path.getsize(file)
        except OSError:
            return f"{file} is missing"
        if size != want["size"]:
            return f"{file} has {size} bytes, {want['size']} were written"
        if file_crc32(file) != want["crc32"]:
            return f"{file} does not hold what was written (CRC-32 differs)"
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


@contextlib.contextmanager
def writing_into(tmp_dir: Optional[str], final: str, needed: int = 0) -> Iterator[None]:
    """Guard a save into ``tmp_dir`` (published later as ``final``): check ~``needed`` bytes fit first; on a full disk (or any failure) remove
    the partial ``tmp_dir`` (this writer's own), and say which file could not be written and why."""
    if tmp_dir is None:  # ranks that do not write
        yield
        return
    try:
        if needed:
            check_free_space(tmp_dir, needed)
        yield
    except NoSpaceError as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise NoSpaceError(final, exc.free, exc.needed) from None
    except BaseException as exc:
        written = _newest_file(tmp_dir)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(exc, LmfError) or not _is_disk_full(exc):
            raise
        free = shutil.disk_usage(os.path.dirname(tmp_dir)).free
        where = f"while writing {os.path.join(final, os.path.relpath(written, tmp_dir)) if written else final}"
        raise LmfError(f"no space left on device {where} ({_gib(free)} free"
                       + (f", the checkpoint needs ~{_gib(needed)}" if needed else "")
                       + "); the partial save was removed, earlier checkpoints are intact") from None


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
