"""Checkpoints: saving and loading a run (:class:`CheckpointIO`), discovery of the newest intact one,
rotation, RNG state. How a save reaches the disk (temp dir, space check, fsync, rename, manifest):
:mod:`lmf.train.durable`.

Layout of ``output_dir/checkpoint-N/`` (written by global rank 0 into ``.tmp-checkpoint-N-*`` and
renamed when complete)::

    adapter_config.json + adapter_model.safetensors   (LoRA)  |  config.json + model*.safetensors (full/freeze)
    tokenizer files, optimizer.pt, scheduler.pt, rng_state_{rank}.pth, trainer_state.json,
    lmf_manifest.json (written last: every file's size and CRC-32)

A directory named ``checkpoint-N`` that holds ``trainer_state.json`` is complete; it is *intact* when its
files match its manifest (:func:`checkpoint_problem`). ``.tmp-*`` leftovers of a crash are ignored and
removed on the next start by the run that holds the ``output_dir`` lock.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Optional

from lmf.data.media import PROCESSOR_FILES
from lmf.extras.constants import ADAPTER_TYPES
from lmf.extras.errors import LmfError
from lmf.extras.logging import get_logger
from lmf.model.forward import is_vision_language
from lmf.train.gather import full_model_state, full_optimizer_state, rank_states
from lmf.train.rng_state import load_rng_state, rng_state_name
from lmf.train.durable import (
    RankZeroSave,
    check_free_space,
    commit_dir,
    commit_files,
    dir_bytes,
    tensor_bytes,
    write_manifest,
)

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig
    from lmf.dist.runtime import DistInfo
    from lmf.train.state import Objective, Run, TrainHooks, TrainState

logger = get_logger(__name__)


CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
#: Files of a finished run at the top of output_dir (removed when a run starts over).
FINAL_ARTEFACTS = (
    STATE_NAME, "adapter_config.json", "adapter_model.safetensors", "config.json", "generation_config.json",
    "model.safetensors", "model.safetensors.index.json", "training_loss.png", "all_results.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "README.md",
    "value_head.safetensors", "value_head_config.json", *PROCESSOR_FILES,
)


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


def checkpoint_problem(path: str) -> Optional[str]:
    """None when ``path`` can be resumed: its files match its manifest and its state file parses (a checkpoint
    written before manifests only gets the latter check); else what is wrong, naming the file."""
    from lmf.train.durable import verify

    problem = verify(path)
    if problem is None:
        state = os.path.join(path, STATE_NAME)
        try:
            read_json(state)
        except (OSError, ValueError) as exc:
            problem = f"{state} is unreadable ({exc.__class__.__name__}: {exc})"
    return problem


def newest_intact_checkpoint(output_dir: str) -> tuple[Optional[str], list[tuple[str, str]]]:
    """The newest complete checkpoint that passes :func:`checkpoint_problem`, and the newer ones that did not
    (path, why), newest first. Read-only: what to do with the damaged ones is the caller's decision."""
    damaged = []
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    return None, damaged


def rotate_checkpoints(output_dir: str, limit: Optional[int], keep: tuple = ()) -> None:
    """Keep the newest ``limit`` complete checkpoints (and never delete one of ``keep``: the one just written, the
    best one)."""
    if not limit or limit <= 0:
        return
    found = list_checkpoints(output_dir)
    kept = {os.path.abspath(k) for k in keep if k}
    for path in found[: max(len(found) - limit, 0)]:
        if os.path.abspath(path) in kept:
            continue
        logger.info("deleting old checkpoint %s (save_total_limit=%d)", path, limit)
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class CheckpointIO:
    """Writes a run's checkpoints and final output, and loads them back on resume.

    Saving is a collective under FSDP (every rank takes part; global rank 0 writes, into a ``.tmp-*``
    directory renamed when complete). Loading happens in two halves: :meth:`load_weights` into the
    unwrapped model before DDP/FSDP wrapping, :meth:`load_training_state` after it.
    """

    def __init__(self, cfg: "LmfConfig", runtime: "DistInfo", model, tokenizer, objective: "Objective",
                 hooks: "TrainHooks"):
        self.cfg, self.args, self.runtime = cfg, cfg.training, runtime
        self.model, self.tokenizer, self.objective, self.hooks = model, tokenizer, objective, hooks
        self.saves_adapter = cfg.finetuning.finetuning_type in ADAPTER_TYPES  # the result is a peft adapter

    # ------------------------------------------------------------------ saving
    def _write_model(self, sd: dict, out_dir: str, final: bool) -> None:
        """Adapter (LoRA) or full model + tokenizer into ``out_dir`` (rank 0)."""
        save_extra = getattr(self.objective, "save_extra", None)
        if save_extra is not None:
            sd = save_extra(out_dir, sd)
        if not self.saves_adapter and final:
            dtype = getattr(self.model.config, "dtype", None)
            if dtype is not None and not isinstance(dtype, str):
                sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        check_free_space(out_dir, tensor_bytes(sd))
        self.model.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out_dir)
        base = self.cfg.model.model_name_or_path
        if os.path.isdir(base) and is_vision_language(self.model):  # its processors load from the output, as from
            from lmf.data.media.plugins import copy_processor_files   # the base model

            copy_processor_files(base, out_dir)

    def _already_saved(self, final_dir: str) -> bool:
        """Rank 0's answer, for every rank: ``final_dir`` is an intact checkpoint of this step already (a run resumed
        from its last step saves nothing again: rewriting it would put the only copy at risk)."""
        from lmf.dist.runtime import writers_outcome

        done = None
        if self.runtime.is_writer:
            try:
                done = is_complete_checkpoint(final_dir) and checkpoint_problem(final_dir) is None
            except LmfError:
                done = False
        done = writers_outcome(self.runtime, done)
        return all(done) if self.runtime.writers_per_node else bool(done)  # saved on every node

    def save(self, run: "Run", state: "TrainState") -> str:
        """Write ``checkpoint-{step}`` atomically: model, optimizer, scheduler, per-rank RNG, state, manifest.
        Collectives run on every rank between :class:`RankZeroSave` steps (a failed write stops every rank)."""
        out, step = self.args.output_dir, state.global_step
        final_dir = os.path.join(out, f"{CHECKPOINT_PREFIX}{step}")
        if self._already_saved(final_dir):
            logger.info("%s is saved already; not written again", final_dir)
            return final_dir
        save = RankZeroSave(self.runtime, out, f"checkpoint-{step}", final_dir)
        # the last checkpoint's size predicts this one's: refuse before writing when it cannot fit
        save.step(lambda tmp: None, needed=lambda: dir_bytes(latest_checkpoint(out)))
        sd = full_model_state(run.loss_module, self.runtime, self.saves_adapter, self.cfg.model.quantization_bit)
        save.step(functools.partial(self._write_model, sd, final=False))
        del sd
        self.hooks.during_save(step)
        rngs, state.stream_positions = rank_states(run, self.runtime)
        optim_sd = None if self.args.save_only_model else full_optimizer_state(run, self.runtime)
        save.step(lambda tmp: self._write_training_state(tmp, final_dir, run, state, rngs, optim_sd),
                  needed=lambda: tensor_bytes(optim_sd))
        return final_dir

    def _write_training_state(self, tmp: str, final_dir: str, run: "Run", state: "TrainState", rngs: list,
                              optim_sd: Optional[dict]) -> None:
        import torch

        if optim_sd is not None:
            torch.save(optim_sd, os.path.join(tmp, OPTIMIZER_NAME))
            if run.scaler is not None:
                torch.save(run.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        # the schedule and RNG states are tiny: saved even with save_only_model
        torch.save(run.scheduler.state_dict(), os.path.join(tmp, SCHEDULER_NAME))
        for rank, rank_state in enumerate(rngs):
            torch.save(rank_state, os.path.join(tmp, rng_state_name(rank)))
        if state.best_global_step == state.global_step:  # this checkpoint holds the best evaluation so far
            state.best_model_checkpoint = final_dir
        write_json(os.path.join(tmp, STATE_NAME), asdict(state))
        write_manifest(tmp)
        commit_dir(tmp, final_dir)
        rotate_checkpoints(self.args.output_dir, self.args.save_total_limit, keep=(final_dir,
                                                                                   state.best_model_checkpoint))
        logger.info("saved %s", final_dir)

    def save_if_due(self, run: "Run", state: "TrainState", epoch_ended: bool) -> None:
        """The cadence of ``save_strategy``: steps (every ``save_steps``, a count or a fraction of the run), epoch
        (when a step ends an epoch) or no."""
        from lmf.train.step import every

        strategy = self.args.save_strategy
        if strategy == "steps" and state.global_step % every(self.args.save_steps, state.max_steps) == 0:
            self.save(run, state)
        elif strategy == "epoch" and epoch_ended:
            self.save(run, state)

    def save_at_end(self, run: "Run", state: "TrainState") -> None:
        """After the last step: its checkpoint (unless ``save_strategy: no``), the best checkpoint's weights back
        (``load_best_model_at_end``: one process or DDP, whose replicas share the module's parameters), then the
        final outputs."""
        from lmf.train.evaluate import best_checkpoint_to_load

        if self.args.save_strategy != "no":
            self.save(run, state)
        best = best_checkpoint_to_load(self.args, state) if self.args.load_best_model_at_end else None
        if best is not None:
            self.load_weights(best)
        self.save_final(run, state)

    def save_final(self, run: "Run", state: "TrainState") -> None:
        """Final model/adapter, tokenizer, trainer_state.json (last) and the loss plot in output_dir."""
        out = self.args.output_dir
        save = RankZeroSave(self.runtime, out, "final", out)
        sd = full_model_state(run.loss_module, self.runtime, self.saves_adapter, self.cfg.model.quantization_bit)
        save.step(functools.partial(self._write_model, sd, final=True))
        del sd
        save.step(lambda tmp: self._publish_final(tmp, state))

    def _publish_final(self, tmp: str, state: "TrainState") -> None:
        out = self.args.output_dir
        if self.cfg.finetuning.plot_loss:
            from lmf.train.reporting import plot_loss

            plot_loss(state.log_history, tmp)
        write_json(os.path.join(tmp, STATE_NAME), asdict(state))
        commit_files(tmp, out, last=STATE_NAME)
        logger.info("saved the %s to %s", "adapter" if self.saves_adapter else "model", out)
        if self.saves_adapter:
            from lmf.model.vllm_compat import warn_if_vllm_refuses

            warn_if_vllm_refuses(out)
        if self.cfg.finetuning.pissa_convert:
            from lmf.train.pissa import write_converted_adapter

            write_converted_adapter(out, out)

    # ------------------------------------------------------------------ loading
    def load_weights(self, path: str) -> None:
        """Trainable weights from a checkpoint into the unwrapped model (before DDP/FSDP wrapping)."""
        from safetensors.torch import load_file

        load_extra = getattr(self.objective, "load_extra", None)
        restored = set(load_extra(self.model, path) or ()) if load_extra is not None else set()
        if self.saves_adapter:
            from peft import set_peft_model_state_dict

            file = os.path.join(path, "adapter_model.safetensors")
            if not os.path.isfile(file):
                raise LmfError(f"cannot resume: {path} holds no adapter_model.safetensors (was it a LoRA run?)")
            result = set_peft_model_state_dict(self.model, load_file(file))
            if getattr(result, "unexpected_keys", None):
                raise LmfError(f"cannot resume from {path}: unexpected adapter weights {result.unexpected_keys[:3]}")
            return
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise LmfError(f"cannot resume: {path} holds no model safetensors")
        sd: dict = {}
        for f in files:
            sd.update(load_file(f))
        own = self.model.state_dict()
        sd = {k: v.to(own[k].dtype) for k, v in sd.items() if k in own}
        self.model.load_state_dict(sd, strict=False)
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and n not in sd and n not in restored]
        if missing:
            raise LmfError(f"cannot resume from {path}: it lacks trainable weights such as {missing[0]}")

    def load_training_state(self, path: str, run: "Run", state: "TrainState") -> None:
        """Optimizer, scheduler, RNG and data position from a checkpoint (after wrapping)."""
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        saved = read_json(os.path.join(path, STATE_NAME))
        if saved.get("max_steps") not in (None, state.max_steps):
            logger.warning("resuming a run planned for %s steps with %d steps: the schedule differs",
                               saved.get("max_steps"), state.max_steps)
        optim_file = os.path.join(path, OPTIMIZER_NAME)
        scheduler_file = os.path.join(path, SCHEDULER_NAME)
        if os.path.isfile(optim_file):
            osd = torch.load(optim_file, map_location="cpu", weights_only=False)
            if hasattr(run.optimizer, "lmf_load_state_dict"):
                run.optimizer.lmf_load_state_dict(osd)
            else:
                set_optimizer_state_dict(run.loss_module, run.optimizer, osd,
                                         options=StateDictOptions(full_state_dict=True))
            scaler_file = os.path.join(path, "scaler.pt")
            if run.scaler is not None and os.path.isfile(scaler_file):
                run.scaler.load_state_dict(torch.load(scaler_file, weights_only=False))
        else:
            logger.warning("%s has no optimizer state (it was saved with save_only_model): the resume is "
                               "APPROXIMATE, the optimizer's moments restart from zero", path)
        if os.path.isfile(scheduler_file):
            run.scheduler.load_state_dict(torch.load(scheduler_file, weights_only=False))
        else:
            for _ in range(saved["global_step"]):
                run.scheduler.step()
        load_rng_state(path, self.runtime.rank)
        state.global_step, state.epoch = saved["global_step"], saved["epoch"]
        state.tokens_seen, state.log_history = saved.get("tokens_seen", 0), saved.get("log_history", [])
        state.log_window = saved.get("log_window", [])
        skip = not self.args.ignore_data_skip  # ignore_data_skip: the data starts over, the rest resumes
        state.data_epoch = saved.get("data_epoch", 0) if skip else 0
        state.best_metric = saved.get("best_metric", saved.get("best_eval_loss"))  # best_eval_loss: before 2026-12
        state.best_global_step, state.best_model_checkpoint = (saved.get("best_global_step"),
                                                               saved.get("best_model_checkpoint"))
        for key, value in (saved.get("objective_state") or {}).items():  # in place: the objective holds these dicts
            state.objective_state.get(key, {}).update(value)
        state.evals_without_improvement = saved.get("evals_without_improvement", 0)
        state.batch_in_epoch = saved.get("batch_in_epoch", 0) if skip else 0
        old_world, old_micro = saved.get("world_size", 1), saved.get("micro_batch_size", state.micro_batch_size)
        world = self.runtime.world_size
        if skip and (old_world, old_micro) != (world, state.micro_batch_size):
            # another shape of job: skip as many samples of the epoch as were consumed (a different subset of them)
            consumed = state.batch_in_epoch * old_micro * old_world
            state.batch_in_epoch = min(consumed // (state.micro_batch_size * world), run.stream.batches_per_epoch)
            logger.warning(
                "resuming a run of %d process(es) x micro-batch %d with %d x %d: the data order differs from an "
                "uninterrupted run (%d samples of epoch %d skipped)", old_world, old_micro, world,
                state.micro_batch_size, consumed, state.data_epoch,
            )
        run.stream.epoch, run.stream.batch_in_epoch = state.data_epoch, state.batch_in_epoch
        if skip and saved.get("stream_positions") and hasattr(run.stream, "restore"):  # streamed: each rank's own
            run.stream.restore(saved["stream_positions"], self.runtime.rank, world)
        logger.info("resumed from %s at step %d (epoch %.2f)%s", path, state.global_step, state.epoch,
                    "" if skip else "; ignore_data_skip: the data starts over from its first micro-batch")

