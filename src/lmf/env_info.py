"""`lmf env`: a table of the software and hardware environment (for bug reports)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from lmf import __version__


def _pkg(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _total_ram_gib() -> str:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return f"{pages * page_size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_env() -> list[tuple[str, str]]:
    """(name, value) rows describing this machine and its software."""
    rows: list[tuple[str, str]] = [
        ("lmf", __version__),
        ("OS", f"{platform.system()} {platform.release()} ({platform.machine()})"),
        ("CPU", f"{_cpu_name()} x {os.cpu_count()} logical cores"),
        ("RAM", _total_ram_gib()),
        ("Python", platform.python_version()),
    ]
    try:
        import torch

        rows.append(("PyTorch", torch.__version__))
        rows.append(("CUDA (torch build)", str(torch.version.cuda or "none (CPU build)")))
        if torch.cuda.is_available():
            try:
                nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
            except Exception:  # noqa: BLE001 - NCCL may be absent on some builds
                nccl = "unavailable"
            rows.append(("NCCL", nccl))
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                rows.append((f"GPU {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
        else:
            rows.append(("GPU", "none visible"))
    except ImportError:
        rows.append(("PyTorch", "not installed"))
    for pkg in ("transformers", "peft", "datasets", "accelerate", "tokenizers", "deepspeed", "flash-attn", "liger-kernel", "bitsandbytes", "vllm", "ray"):
        version = _pkg(pkg)
        if version is not None or pkg in ("transformers", "peft", "datasets"):
            rows.append((pkg, version or "not installed"))
    return rows


def format_table(rows: list[tuple[str, str]]) -> str:
    """Render rows as a two-column text table."""
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    sep = f"+-{'-' * width}-+-{'-' * vwidth}-+"
    lines = [sep] + [f"| {k.ljust(width)} | {v.ljust(vwidth)} |" for k, v in rows] + [sep]
    return "\n".join(lines)


def print_env() -> None:
    """Print the environment table."""
    print(format_table(collect_env()))
