"""Where a run starts: a fresh output_dir, a given checkpoint, or the newest complete one (automatic resume).

Rules (:func:`decide_resume`, run on rank 0 and broadcast by :func:`resolve_resume_checkpoint`):

- ``resume_from_checkpoint: PATH``: that checkpoint (must be complete).
- ``resume_from_checkpoint: true``: the newest complete checkpoint in ``output_dir`` (error when none).
- unset: a finished run (or any model) in ``output_dir`` is an error, or is started over with
  ``overwrite_output_dir: true``. Checkpoints of an unfinished run with the same training config
  (:func:`resume_fingerprint`) are resumed automatically, also with ``overwrite_output_dir: true``
  (LLaMA-Factory's YAMLs set it; a crash must not lose work); with a different config they are an
  error, or removed with ``overwrite_output_dir: true``.
- ``resume_from_checkpoint: false``: never resume; a non-empty run needs ``overwrite_output_dir``.
- ``output_dir`` may never be the input model or adapter directory.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import TYPE_CHECKING, Any, Optional

from lmf.extras.errors import ConfigError, LmfError
from lmf.extras.logging import get_logger
from lmf.train import checkpoint as ckpt

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig
    from lmf.dist.runtime import DistInfo

logger = get_logger("lmf.train.trainer")  # one logger name for the whole training log

#: Keys that do not change the training trajectory: a run may be resumed with different values.
RESUME_NEUTRAL_KEYS = frozenset({
    "resume_from_checkpoint", "overwrite_output_dir", "output_dir", "logging_steps", "logging_dir", "logging_first_step",
    "save_steps", "save_strategy", "save_total_limit", "save_only_model", "report_to", "run_name", "disable_tqdm",
    "ddp_timeout", "dataloader_num_workers", "dataloader_pin_memory", "plot_loss", "print_param_status",
    "preprocessing_num_workers", "preprocessing_batch_size", "overwrite_cache", "preprocessing_cache_dir",
    "tokenized_path", "eval_steps", "per_device_eval_batch_size", "do_eval", "eval_strategy", "evaluation_strategy",
    "cache_dir", "low_cpu_mem_usage", "max_checkpoint_wait",
})


def resume_fingerprint(cfg: "LmfConfig") -> str:
    """Hash of the config keys that shape the training trajectory (for automatic resume)."""
    import hashlib

    relevant = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_NEUTRAL_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _start_over(output_dir: str) -> None:
    """Remove a previous run's checkpoints and final artefacts (overwrite_output_dir: true)."""
    state = os.path.join(output_dir, ckpt.STATE_NAME)
    if os.path.isfile(state):
        os.remove(state)  # first: a crash below must not leave something that looks finished
    for path in glob.glob(os.path.join(output_dir, f"{ckpt.CHECKPOINT_PREFIX}*")):
        if ckpt.checkpoint_step(path) is not None:
            shutil.rmtree(path, ignore_errors=True)
    for name in ckpt.FINAL_ARTEFACTS:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    for path in glob.glob(os.path.join(output_dir, "model-*.safetensors")):
        os.remove(path)


MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "adapter_config.json", "adapter_model.safetensors")


def _holds_model(output_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(output_dir, name)) for name in MODEL_FILES)


def _refuse_input_dirs(cfg: "LmfConfig") -> None:
    """output_dir must not be the base model or an input adapter (overwrite_output_dir would delete it)."""
    out = os.path.realpath(cfg.training.output_dir)
    inputs = [cfg.model.model_name_or_path] + [p.strip() for p in (cfg.model.adapter_name_or_path or "").split(",") if p.strip()]
    for path in inputs:
        if path and os.path.isdir(path) and os.path.realpath(path) == out:
            raise ConfigError(f"output_dir {cfg.training.output_dir!r} is the input model/adapter directory; choose another")


def decide_resume(cfg: "LmfConfig") -> Optional[str]:
    """Which checkpoint to resume from (None: start fresh), per the module's rules; may clean ``output_dir``. Rank 0 only."""
    t = cfg.training
    out = t.output_dir
    _refuse_input_dirs(cfg)
    if os.path.isdir(out):
        ckpt.remove_stale_temp_dirs(out)
    flag = t.resume_from_checkpoint
    if isinstance(flag, str) and flag.lower() not in ("true", "false"):
        if not ckpt.is_complete_checkpoint(flag):
            raise ConfigError(f"config key 'resume_from_checkpoint': {flag!r} is not a complete checkpoint-N directory")
        return flag
    if isinstance(flag, str):
        flag = flag.lower() == "true"
    latest = ckpt.latest_checkpoint(out)
    if flag is True:
        if latest is None:
            raise ConfigError(f"config key 'resume_from_checkpoint': true, but {out!r} holds no complete checkpoint")
        return latest
    finished = os.path.isfile(os.path.join(out, ckpt.STATE_NAME)) or (latest is None and _holds_model(out))
    if finished or (flag is False and latest):
        if not t.overwrite_output_dir:
            what = "a finished run (or a model)" if finished else "checkpoints"
            raise ConfigError(
                f"output_dir {out!r} already holds {what}; set overwrite_output_dir: true to start over, "
                "or choose another output_dir"
            )
        logger.warning("overwrite_output_dir: starting over in %s (previous outputs removed)", out)
        _start_over(out)
        return None
    if latest is None:
        return None
    saved = ckpt.read_json(os.path.join(latest, ckpt.STATE_NAME)).get("resume_fingerprint")
    if saved == resume_fingerprint(cfg):
        logger.info("found an unfinished run in %s: resuming from %s", out, latest)
        return latest
    if t.overwrite_output_dir:
        logger.warning("%s holds checkpoints of a run with a different config; starting over (overwrite_output_dir)", out)
        _start_over(out)
        return None
    raise ConfigError(
        f"output_dir {out!r} holds checkpoints ({os.path.basename(latest)}) of a run with a different config; "
        "set resume_from_checkpoint: PATH to resume it anyway, or overwrite_output_dir: true to start over"
    )


def resolve_resume_checkpoint(cfg: "LmfConfig", runtime: "DistInfo") -> Optional[str]:
    """:func:`decide_resume` on rank 0, broadcast to every rank (errors too, so no rank hangs)."""
    from lmf.dist.runtime import broadcast_object

    result: tuple[str, Any] = ("ok", None)
    if runtime.is_main:
        try:
            result = ("ok", decide_resume(cfg))
        except LmfError as exc:
            result = ("error", str(exc))
    result = broadcast_object(result)
    if result[0] == "error":
        raise ConfigError(result[1])
    return result[1]
