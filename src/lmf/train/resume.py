"""Where a run starts, decided before anything is loaded and applied only once training is about to begin.

:func:`plan_resume` (decided on rank 0 by :func:`decide_resume`, read-only, and broadcast) returns a
:class:`ResumePlan`; :func:`apply_resume_plan` carries it out right before the first write of the run,
after the config, data, template, model and distributed set-up have all been checked. A run that fails
before that point leaves ``output_dir`` exactly as it was.

Rules:

- ``resume_from_checkpoint: PATH``: that checkpoint (must be complete).
- ``resume_from_checkpoint: true``: the newest intact checkpoint in ``output_dir`` (error when none).
- A checkpoint whose files do not match its manifest (truncated, missing, changed: a power loss, a full disk)
  is skipped with a warning naming the file; the run resumes the newest intact one, and the damaged ones are
  moved to ``.previous/`` with the other checkpoints newer than it (never deleted).
- unset: checkpoints of an unfinished run with the same *training trajectory* (:data:`TRAJECTORY_KEYS`)
  are resumed automatically, also with ``overwrite_output_dir: true`` (LLaMA-Factory's YAMLs set it; a
  crash must not lose work). Checkpoints of another trajectory stop the run with exit code 2 and a table
  of the changed keys; nothing is removed. A finished run (or any model) in ``output_dir`` is an error
  unless ``overwrite_output_dir: true``.
- ``resume_from_checkpoint: false``: never resume.
- Starting over never deletes: the previous run is moved to ``output_dir/.previous/<UTC time>/``.
- ``output_dir`` may never be the input model or adapter directory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from lmf.config.parser import split_list
from lmf.extras.errors import ConfigError, LmfError, everywhere
from lmf.extras.logging import get_logger
from lmf.train import checkpoint as ckpt
from lmf.train.durable import TMP_PREFIX, remove_stale_temp_dirs
from lmf.train.output_lock import LOCK_NAME

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig
    from lmf.dist.runtime import DistInfo

logger = get_logger(__name__)

#: The keys that shape the training trajectory: the model and method, the data and its preprocessing,
#: the batch, the optimizer and its schedule, the seeds. Only these are compared on an automatic
#: resume; every other key (max_steps / num_train_epochs, save/log/eval cadence, trackers, workers,
#: timeouts, kernels and memory knobs, generation/export/inference keys) may change on a relaunch.
TRAJECTORY_KEYS = frozenset({
    # model
    "model_name_or_path", "adapter_name_or_path", "model_revision", "use_fast_tokenizer", "split_special_tokens",
    "add_tokens", "add_special_tokens", "new_special_tokens_config", "init_special_tokens", "resize_vocab", "upcast_layernorm", "upcast_lmhead_output",
    "train_from_scratch", "quantization_bit", "quantization_method", "quantization_type", "double_quantization",
    "moe_aux_loss_coef", "rope_scaling",
    # data
    "template", "dataset", "dataset_dir", "media_dir", "cutoff_len", "train_on_prompt", "mask_history",
    "mix_strategy", "interleave_probs", "max_samples", "val_size", "packing", "neat_packing", "tool_format",
    "default_system", "enable_thinking", "preserve_thinking",
    # method
    "stage", "finetuning_type", "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target", "use_rslora", "use_dora",
    "pissa_init", "pissa_iter", "loraplus_lr_ratio", "loraplus_lr_embedding", "create_new_adapter", "oft_rank",
    "oft_block_size", "oft_target", "module_dropout", "use_dft_loss", "use_eaft_loss", "eaft_alpha", "ld_alpha",
    "pref_bco_weight",
    "label_smoothing_factor", "neftune_noise_alpha", "pref_beta", "pref_ftx", "pref_loss",
    "dpo_label_smoothing", "simpo_gamma", "ref_model", "ref_model_adapters", "disable_shuffling", "pure_bf16",
    "use_llama_pro", "use_galore", "use_badam", "use_apollo", "use_adam_mini", "use_muon",
    "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model",
    # optimisation
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio",
    "warmup_steps", "optim", "bf16", "fp16", "seed", "data_seed",
})

#: Trajectory keys added after checkpoints were first fingerprinted: recorded only when set away from their
#: default, so that the checkpoints of runs that never used them keep their fingerprint (resume still works).
LATER_KEYS = {"image_max_pixels": 768 * 768, "image_min_pixels": 32 * 32, "video_max_pixels": 256 * 256,
              "video_min_pixels": 16 * 16, "video_fps": 2.0, "video_maxlen": 128, "streaming": False,
              "buffer_size": 16384}

PREVIOUS_DIR = ".previous"


def trajectory_config(cfg: "LmfConfig") -> dict[str, Any]:
    """The values of :data:`TRAJECTORY_KEYS` (JSON-safe), as recorded in every checkpoint."""
    flat = cfg.to_dict()
    keys = sorted(TRAJECTORY_KEYS) + [k for k, default in LATER_KEYS.items() if flat.get(k, default) != default]
    return json.loads(json.dumps({k: flat[k] for k in keys if k in flat}, default=str))


def resume_fingerprint(cfg: "LmfConfig") -> str:
    """Hash of :func:`trajectory_config` (what an automatic resume compares)."""
    payload = json.dumps(trajectory_config(cfg), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


@dataclass(frozen=True)
class ResumePlan:
    """What :func:`apply_resume_plan` does before training: resume ``checkpoint`` (or start fresh) after
    moving the previous run aside: all of it (``move_all``) or the entries in ``move_names`` (the final
    outputs of a finished run, checkpoints newer than the one resumed)."""

    checkpoint: Optional[str] = None
    move_all: bool = False
    move_names: tuple = ()
    note: str = ""


MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "adapter_config.json", "adapter_model.safetensors")


def _holds_model(output_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(output_dir, name)) for name in MODEL_FILES)


def _run_entries(output_dir: str) -> list[str]:
    """Entries of ``output_dir`` that belong to a previous run (all but ``.previous``, half-written ``.tmp-*``
    and the lock of the run now holding the folder)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if n not in (PREVIOUS_DIR, LOCK_NAME) and not n.startswith(TMP_PREFIX))


def _refuse_input_dirs(cfg: "LmfConfig") -> None:
    """output_dir must not be the base model or an input adapter."""
    out = os.path.realpath(cfg.training.output_dir)
    
    inputs = [cfg.model.model_name_or_path] + split_list(cfg.model.adapter_name_or_path)
    for path in inputs:
        if path and os.path.isdir(path) and os.path.realpath(path) == out:
            raise ConfigError(f"output_dir {cfg.training.output_dir!r} is the input model/adapter directory; choose another")


def _format_value(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def changed_keys_table(saved: dict, now: dict) -> str:
    """``key  checkpoint -> now`` lines for every trajectory key whose value differs."""
    rows = [(k, _format_value(saved.get(k, "(unset)")), _format_value(now.get(k, "(unset)")))
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if not rows:
        return ""
    width = max(len("key"), *(len(r[0]) for r in rows))
    left = max(len("checkpoint"), *(len(r[1]) for r in rows))
    lines = [f"  {'key':<{width}}  {'checkpoint':<{left}}    now"]
    lines += [f"  {k:<{width}}  {old:<{left}} -> {new}" for k, old, new in rows]
    return "\n".join(lines)


def _different_trajectory_error(cfg: "LmfConfig", latest: str, saved_state: dict) -> ConfigError:
    out = cfg.training.output_dir
    saved = saved_state.get("trajectory")
    if isinstance(saved, dict):
        table = changed_keys_table(saved, trajectory_config(cfg))
        what = "these training keys differ:\n" + table if table else "its recorded training keys differ"
    else:
        what = "it was written by an older lmf that did not record its keys, so they cannot be compared"
    return ConfigError(
        f"output_dir {out!r} holds checkpoints ({os.path.basename(latest)}) of another training run; {what}\n"
        "Nothing was changed. Ways out:\n"
        f"  resume_from_checkpoint: {latest}   resume it anyway with the new values\n"
        "  output_dir: <another folder>        keep it and train elsewhere\n"
        f"  resume_from_checkpoint: false       start over (the old run is moved to {os.path.join(out, PREVIOUS_DIR)}/)"
    )


def decide_resume(cfg: "LmfConfig") -> ResumePlan:
    """The :class:`ResumePlan` for ``cfg`` per the module's rules. Read-only; raises ConfigError. Rank 0 only."""
    t = cfg.training
    out = t.output_dir
    _refuse_input_dirs(cfg)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"config key 'output_dir': {out!r} is a file, not a directory")
    flag = t.resume_from_checkpoint
    if isinstance(flag, str) and flag.lower() in ("true", "false"):
        flag = flag.lower() == "true"
    if isinstance(flag, str):
        if not ckpt.is_complete_checkpoint(flag):
            raise ConfigError(f"config key 'resume_from_checkpoint': {flag!r} is not a complete checkpoint-N directory")
        problem = ckpt.checkpoint_problem(flag)
        if problem:
            raise ConfigError(f"config key 'resume_from_checkpoint': {flag!r} is damaged: {problem}")
        inside = os.path.realpath(os.path.dirname(os.path.normpath(flag))) == os.path.realpath(out)
        if inside:
            return ResumePlan(checkpoint=flag, move_names=_superseded(out, flag), note=f"resuming from {flag}")
        if _run_entries(out):
            if not t.overwrite_output_dir:
                raise ConfigError(
                    f"output_dir {out!r} already holds another run; resume {flag!r} into an empty output_dir, or set "
                    "overwrite_output_dir: true (the other run is kept under .previous/)"
                )
            return ResumePlan(checkpoint=flag, move_all=True, note=f"resuming from {flag}")
        return ResumePlan(checkpoint=flag, note=f"resuming from {flag}")
    if flag is False:
        if _run_entries(out):
            return ResumePlan(move_all=True, note="resume_from_checkpoint: false: starting over")
        return ResumePlan()
    # only now are the checkpoints read (an explicit path, or starting over, needs none of them verified)
    latest, damaged = ckpt.newest_intact_checkpoint(out)
    for path, why in damaged:  # moved to .previous/ with the other checkpoints newer than the one resumed
        logger.warning("skipping damaged checkpoint %s: %s", path, why)
    # trainer_state.json at the top is written last by a finished run; a model without it and without
    # checkpoints is someone's model. (A model beside checkpoints is a crash inside the final save.)
    finished = os.path.isfile(os.path.join(out, ckpt.STATE_NAME)) or (
        latest is None and not damaged and _holds_model(out))
    if flag is True:
        if latest is None:
            raise ConfigError(f"config key 'resume_from_checkpoint': true, but {out!r} holds no complete checkpoint"
                              + (f" ({len(damaged)} damaged, see above)" if damaged else ""))
        return ResumePlan(checkpoint=latest, move_names=_superseded(out, latest), note=f"resuming from {latest}")
    if finished:
        if not t.overwrite_output_dir:
            raise ConfigError(
                f"output_dir {out!r} already holds a finished run (or a model); set overwrite_output_dir: true to "
                "start over (the old run is kept under .previous/), resume_from_checkpoint: true to continue it, "
                "or choose another output_dir"
            )
        return ResumePlan(move_all=True, note="overwrite_output_dir: starting over")
    if latest is None:
        if damaged:
            raise ConfigError(
                f"output_dir {out!r} holds checkpoints, none of them intact (newest: {damaged[0][1]}); nothing was "
                "changed. resume_from_checkpoint: false starts over (they are moved to .previous/)")
        if _run_entries(out):
            if not t.overwrite_output_dir:
                raise ConfigError(f"output_dir {out!r} is not empty; set overwrite_output_dir: true to start over "
                                  "(its files are kept under .previous/), or choose another output_dir")
            return ResumePlan(move_all=True, note="overwrite_output_dir: starting over")
        return ResumePlan()
    saved = ckpt.read_json(os.path.join(latest, ckpt.STATE_NAME))
    if saved.get("resume_fingerprint") == resume_fingerprint(cfg):
        return ResumePlan(checkpoint=latest, move_names=_superseded(out, latest),
                          note=f"found an unfinished run in {out}: resuming from {latest}")
    raise _different_trajectory_error(cfg, latest, saved)


def _utc_stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def move_aside(output_dir: str, names: Optional[list[str]] = None) -> Optional[str]:
    """Move ``names`` (default: every entry but ``.previous``) of ``output_dir`` into
    ``output_dir/.previous/<UTC time>/`` (renames on one file system: nothing is copied or deleted)."""
    names = _run_entries(output_dir) if names is None else [n for n in names if os.path.lexists(os.path.join(output_dir, n))]
    if not names:
        return None
    target = os.path.join(output_dir, PREVIOUS_DIR, _utc_stamp())
    os.makedirs(target)
    # trainer_state.json first: a crash in between never leaves something that looks finished at the top
    for name in sorted(names, key=lambda n: n != ckpt.STATE_NAME):
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def final_artefact_names(output_dir: str) -> list[str]:
    """Top-level files of a finished run (model/adapter, tokenizer, state, plot), not its checkpoints."""
    import glob

    names = [n for n in ckpt.FINAL_ARTEFACTS if os.path.isfile(os.path.join(output_dir, n))]
    names += [os.path.basename(p) for p in glob.glob(os.path.join(output_dir, "model-*.safetensors"))]
    return names


def _superseded(output_dir: str, checkpoint: str) -> tuple:
    """What resuming ``checkpoint`` inside ``output_dir`` would overwrite: a finished run's final outputs
    and the checkpoints newer than ``checkpoint``."""
    step = ckpt.checkpoint_step(checkpoint) or 0
    newer = [os.path.basename(p) for p in ckpt.list_checkpoints(output_dir) if (ckpt.checkpoint_step(p) or 0) > step]
    return tuple(final_artefact_names(output_dir) + newer)


def apply_resume_plan(cfg: "LmfConfig", plan: ResumePlan) -> None:
    """Carry out ``plan`` in ``output_dir`` (rank 0): drop half-written ``.tmp-*`` saves, move the previous
    run (or its final outputs) aside, and log what happened."""
    out = cfg.training.output_dir
    if os.path.isdir(out):
        remove_stale_temp_dirs(out)
    moved = None
    if plan.move_all:
        moved = move_aside(out)
    elif plan.move_names:
        moved = move_aside(out, list(plan.move_names))
    if moved:
        names = ", ".join(plan.move_names[:4]) + (", ..." if len(plan.move_names) > 4 else "")
        what = "run was" if plan.move_all else f"run's {names} were"
        logger.warning("%s; the previous %s moved to %s", plan.note or "starting over", what, moved)
    elif plan.note:
        logger.info("%s", plan.note)


def plan_resume(cfg: "LmfConfig", runtime: "DistInfo") -> ResumePlan:
    """:func:`decide_resume` on rank 0, broadcast to every rank (errors too, so no rank hangs); with
    ``save_on_each_node``, on each node's writer in its own ``output_dir``: the nodes must agree."""
    from lmf.dist.runtime import writers_outcome

    result: tuple[str, Any] = ("ok", None)
    if runtime.is_writer:
        try:
            result = ("ok", decide_resume(cfg))
        except LmfError as exc:
            result = ("error", str(exc))
    result = writers_outcome(runtime, result)
    if runtime.writers_per_node:  # torchrun numbers the ranks node by node
        result = _agreed_across_nodes(cfg, result, runtime.rank // runtime.local_world_size)
    if result[0] == "error":
        raise everywhere(ConfigError(result[1]))
    return result[1]


def _agreed_across_nodes(cfg: "LmfConfig", results: list, node: int) -> tuple[str, Any]:
    """``save_on_each_node``: this ``node``'s resume decision once every node's (in node order) resumes from the same
    checkpoint (what each moves aside is its own); else an error naming the nodes and the newest checkpoint they all
    hold (a save that completed on some nodes only)."""
    errors = [r for r in results if r[0] == "error"]
    if errors:
        return errors[0]
    plans = [r[1] for r in results]
    if all(p.checkpoint == plans[0].checkpoint for p in plans):
        return results[node]
    found = ", ".join(f"node {n}: {p.checkpoint or 'no checkpoint'}" for n, p in enumerate(plans))
    steps = [ckpt.checkpoint_step(p.checkpoint) if p.checkpoint else None for p in plans]
    common = min((s for s in steps if s is not None), default=None) if None not in steps else None
    hint = (f"set resume_from_checkpoint to {os.path.join(cfg.training.output_dir, f'{ckpt.CHECKPOINT_PREFIX}{common}')}"
            " (the newest every node can hold)" if common is not None else "make the nodes' output_dirs agree")
    return ("error", f"save_on_each_node: the nodes' output_dirs disagree on where to resume ({found}): a save "
                     f"completed on some nodes only; {hint}")


def prepare_output_dir(cfg: "LmfConfig", plan: ResumePlan, runtime: "DistInfo") -> None:
    """:func:`apply_resume_plan` on rank 0 (each node's writer with ``save_on_each_node``; errors shared), then
    every rank continues together."""
    from lmf.dist.runtime import first_error

    error = None
    if runtime.is_writer:
        try:
            apply_resume_plan(cfg, plan)
        except OSError as exc:
            error = f"cannot prepare output_dir {cfg.training.output_dir!r}: {exc}"
    error = first_error(runtime, error)
    if error:
        raise everywhere(LmfError(error))
