"""Checkpoints: atomic directories, discovery of the newest complete one, rotation, RNG state.

Layout of ``output_dir/checkpoint-N/`` (written by global rank 0 into ``.tmp-checkpoint-N-*`` and
renamed when complete)::

    adapter_config.json + adapter_model.safetensors   (LoRA)  |  config.json + model*.safetensors (full/freeze)
    tokenizer files, optimizer.pt, scheduler.pt, rng_state_{rank}.pth, trainer_state.json (written last)

A directory named ``checkpoint-N`` that holds ``trainer_state.json`` is complete; ``.tmp-*`` leftovers
of a crash are ignored and removed on the next start.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import tempfile
from typing import Any, Optional

from lmf.extras.logging import get_logger

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
#: Files of a finished run at the top of output_dir (removed when a run starts over).
FINAL_ARTEFACTS = (
    STATE_NAME, "adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
    "model.safetensors", "model.safetensors.index.json", "training_loss.png", "all_results.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "README.md",
    "value_head.safetensors", "value_head_config.json",
)


def rng_state_name(rank: int) -> str:
    return f"rng_state_{rank}.pth"


def checkpoint_step(path: str) -> Optional[int]:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str) -> bool:
    return checkpoint_step(path) is not None and os.path.isfile(os.path.join(path, STATE_NAME))


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [p for p in glob.glob(os.path.join(output_dir, f"{CHECKPOINT_PREFIX}*")) if is_complete_checkpoint(p)]
    return sorted(found, key=lambda p: checkpoint_step(p))


def latest_checkpoint(output_dir: str) -> Optional[str]:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_stale_temp_dirs(output_dir: str) -> None:
    """Delete ``.tmp-*`` directories left behind by an interrupted save."""
    for path in glob.glob(os.path.join(output_dir, f"{TMP_PREFIX}*")):
        logger.warning("removing an incomplete save left by an interrupted run: %s", path)
        shutil.rmtree(path, ignore_errors=True)


def make_temp_dir(output_dir: str, name: str) -> str:
    """A fresh ``.tmp-NAME-*`` directory inside ``output_dir`` (same file system: renames are atomic)."""
    os.makedirs(output_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=output_dir)


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
    """Rename a fully written temp dir to its final name (replacing an older one of that name)."""
    fix_permissions(tmp_dir)
    if os.path.exists(final_dir):
        trash = os.path.join(os.path.dirname(final_dir), TMP_PREFIX + "old-" + os.path.basename(final_dir))
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def commit_files(tmp_dir: str, output_dir: str, last: str = STATE_NAME) -> None:
    """Move every file of ``tmp_dir`` into ``output_dir`` (each rename atomic; ``last`` moved last), drop tmp_dir."""
    fix_permissions(tmp_dir)
    names = sorted(os.listdir(tmp_dir), key=lambda n: n == last)
    for name in names:
        dst = os.path.join(output_dir, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp_dir, name), dst)
    shutil.rmtree(tmp_dir, ignore_errors=True)


def rotate_checkpoints(output_dir: str, limit: Optional[int], keep: Optional[str] = None) -> None:
    """Keep the newest ``limit`` complete checkpoints (never ``keep``)."""
    if not limit or limit <= 0:
        return
    found = list_checkpoints(output_dir)
    for path in found[: max(len(found) - limit, 0)]:
        if keep and os.path.abspath(path) == os.path.abspath(keep):
            continue
        logger.info("deleting old checkpoint %s (save_total_limit=%d)", path, limit)
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, default=str)
        fh.write("\n")


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def capture_rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states of this process."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rng_state(checkpoint_dir: str, rank: int) -> None:
    """Restore this rank's RNG state (a rank without its own file takes rank 0's, with a warning)."""
    import torch

    path = os.path.join(checkpoint_dir, rng_state_name(rank))
    if not os.path.isfile(path):
        fallback = os.path.join(checkpoint_dir, rng_state_name(0))
        if not os.path.isfile(fallback):
            logger.warning("%s has no RNG state; the resumed run will not be bit-exact", checkpoint_dir)
            return
        logger.warning("%s has no RNG state for rank %d (different world size?); using rank 0's", checkpoint_dir, rank)
        path = fallback
    restore_rng_state(torch.load(path, weights_only=False))
