"""lmf.train.allocator: glibc's mmap threshold is fixed so that freed activations leave the heap."""

import os
import subprocess
import sys
import textwrap

import pytest

from lmf.extras.errors import ConfigError
from lmf.train import allocator

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs


def test_threshold_from_the_config_key():
    from lmf.config.parser import build_config

    assert build_config({"model_name_or_path": "m"}).model.malloc_mmap_threshold_mb is None  # opt-in
    assert allocator.threshold_bytes(None) == 0
    assert allocator.limit_heap_fragmentation(0) is False  # 0 = leave malloc alone
    assert allocator.threshold_bytes(4) == 4 << 20
    assert allocator.threshold_bytes(0.5) == 1 << 19


@pytest.mark.parametrize("value", [-1, 64])
def test_bad_threshold_names_the_key(value):
    with pytest.raises(ConfigError, match="malloc_mmap_threshold_mb"):
        allocator.threshold_bytes(value)


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
    applied = limit_heap_fragmentation(4 << 20) if sys.argv[1] == "limit" else False
    libc.free(libc.malloc(24 << 20))  # by default this raises glibc's mmap threshold to 24 MiB
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(4 << 20)
    mmapped = libc.mallinfo2().hblkhd - before >= 4 << 20
    libc.free(block)
    print(applied, mmapped)
""")


def _probe(mode: str) -> str:
    env = dict(os.environ)
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
