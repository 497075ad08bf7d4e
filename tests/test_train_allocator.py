"""lmf.train.allocator: glibc's mmap threshold is fixed so that freed activations leave the heap."""

import os
import subprocess
import sys
import textwrap

import pytest

from lmf.extras.errors import ConfigError
from lmf.train import allocator


def test_threshold_from_env(monkeypatch):
    monkeypatch.delenv(allocator.ENV_VAR, raising=False)
    assert allocator.mmap_threshold_from_env() == allocator.DEFAULT_MMAP_THRESHOLD
    monkeypatch.setenv(allocator.ENV_VAR, "0")
    assert allocator.mmap_threshold_from_env() == 0
    assert allocator.limit_heap_fragmentation() is False  # 0 = leave malloc alone
    monkeypatch.setenv(allocator.ENV_VAR, " 1048576 ")
    assert allocator.mmap_threshold_from_env() == 1 << 20


@pytest.mark.parametrize("value", ["2MiB", "-1", str(64 << 20)])
def test_bad_threshold_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(allocator.ENV_VAR, value)
    with pytest.raises(ConfigError, match=allocator.ENV_VAR):
        allocator.mmap_threshold_from_env()


_PROBE = textwrap.dedent("""
    import ctypes, sys
    from lmf.train.allocator import limit_heap_fragmentation

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        print("skip"); sys.exit(0)
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    applied = limit_heap_fragmentation() if sys.argv[1] == "limit" else False
    libc.free(libc.malloc(24 << 20))  # by default this raises glibc's mmap threshold to 24 MiB
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(4 << 20)
    mmapped = libc.mallinfo2().hblkhd - before >= 4 << 20
    libc.free(block)
    print(applied, mmapped)
""")


def _probe(mode: str) -> str:
    env = dict(os.environ)
    env.pop(allocator.ENV_VAR, None)
    return subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


@pytest.mark.skipif(not allocator._is_glibc(), reason="glibc malloc only")
def test_limit_sends_mid_sized_blocks_to_mmap():
    """A 4 MiB block comes from the heap after glibc raised its threshold, and is mmapped with the limit."""
    default, limited = _probe("default"), _probe("limit")
    if default == "skip":
        pytest.skip("glibc without mallinfo2")
    assert default == "False False"
    assert limited == "True True"
