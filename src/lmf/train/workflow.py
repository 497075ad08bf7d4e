"""Training a config's stage end to end: the stage's recipe, the shared set-up, the loop.

:func:`run_training` does: process group and device -> ``output_dir`` lock -> parallelism plan -> resume plan ->
seed -> tokenizer, template and tokenized data -> trainable model -> the recipe's objective -> the shared
:class:`~lmf.train.trainer.Trainer` -> tear-down. (:func:`lmf.experiment.run_experiment` calls it for a training
command, then predicts.)

A recipe is the module the stage registry names (:data:`lmf.config.stages.STAGES`: ``lmf.train.sft``,
``lmf.train.dpo.recipe``, ``lmf.train.rm``, ``lmf.train.kto``), with ``build_objective(cfg, inputs) -> Objective``
(its config rules: :mod:`lmf.config.rules`). ``build_objective`` may replace ``inputs.train_dataset`` /
``inputs.eval_dataset`` (DPO does, to attach precomputed reference log-probs).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from lmf.config.stages import STAGES
from lmf.extras.errors import ConfigError

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig
    from lmf.dist.plan import ParallelPlan
    from lmf.dist.runtime import DistInfo


@dataclass
class RecipeInputs:
    """What a recipe's ``build_objective`` gets: the config, runtime, parallelism plan, tokenizer, template, model and
    datasets."""

    cfg: "LmfConfig"
    runtime: "DistInfo"
    plan: "ParallelPlan"
    tokenizer: Any
    template: Any
    model: Any
    train_dataset: Any
    eval_dataset: Optional[Any]
    media: Any = None  # the vision plugin of a vision-language model's data (lmf.data.media.plugins)

    def collate(self, collator):
        """``collator``, adding the pixel inputs of the batch's images for a vision-language model."""
        if self.media is None:
            return collator
        from lmf.data.media.collator import MediaCollator

        return MediaCollator(collator, self.media)

    @property
    def pad_to_multiple_of(self) -> Optional[int]:
        """Pad batch lengths to a multiple of 8 on CUDA (tensor cores); exact lengths elsewhere."""
        return 8 if self.runtime.device.type == "cuda" else None


def recipe_of(stage: str):
    """The recipe module of ``stage``."""
    if stage not in STAGES:
        raise ConfigError(f"config key 'stage': {stage!r} cannot be trained by lmf")
    return importlib.import_module(STAGES[stage].recipe)


def load_tokenizer_and_data(cfg: "LmfConfig", stage: str):
    """Tokenizer (fixed by the template), the template and the tokenized datasets of ``stage``."""
    from lmf.data.loader import get_dataset
    from lmf.data.template import template_from_args
    from lmf.model.loader import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    template = template_from_args(cfg.data, tokenizer)  # template + default_system/enable_thinking from the config
    template.fix_tokenizer(tokenizer)
    media = load_media_plugin(cfg, template, tokenizer)
    data = get_dataset(cfg, tokenizer, template, stage=stage, media=media)
    data.media = media
    return tokenizer, template, data


def load_media_plugin(cfg: "LmfConfig", template, tokenizer):
    """The vision plugin for the model and template (None for a text model)."""
    from lmf.data.media.plugins import media_plugin_for
    from lmf.model.loader import _trust_remote_code

    path = cfg.model.model_name_or_path
    return media_plugin_for(template, path, tokenizer, cfg.data, _trust_remote_code(cfg.model, path))


def run_training(cfg: "LmfConfig") -> None:
    """Train ``cfg``'s stage end to end with its recipe; only rank 0 writes."""
    from lmf.dist.runtime import destroy_distributed
    from lmf.train.allocator import limit_heap_fragmentation, threshold_bytes
    from lmf.train.output_lock import hold_output_dir
    from lmf.train.process import setup_runtime

    recipe = recipe_of(cfg.finetuning.stage)
    limit_heap_fragmentation(threshold_bytes(cfg.model.malloc_mmap_threshold_mb))  # opt-in
    runtime = setup_runtime(cfg)
    try:
        with hold_output_dir(cfg.training.output_dir, runtime):  # one run per output_dir, for its whole life
            _train_locked(cfg, recipe, runtime)
    finally:
        destroy_distributed()


def _train_locked(cfg: "LmfConfig", recipe, runtime: "DistInfo") -> None:
    """What :func:`run_training` does once the process group is up and ``output_dir`` is locked."""
    from lmf.config.world import apply_world_size
    from lmf.dist.plan import plan_parallelism
    from lmf.model.loader import load_model
    from lmf.train.resume import plan_resume
    from lmf.train.process import set_seed
    from lmf.train.state import installed_hooks
    from lmf.train.trainer import Trainer

    apply_world_size(cfg, runtime.world_size)  # global_batch_size, dp_size: known now, the same on every rank
    if cfg.model.rope_scaling:  # LLaMA-Factory's training length: the RoPE is scaled for cutoff_len (lmf.model.rope)
        cfg.model.model_max_length = cfg.data.cutoff_len
    plan = plan_parallelism(cfg, runtime.world_size)  # once; refuses what cannot run before data or model is loaded
    if runtime.is_main:
        from lmf.train.trackers import resolve_trackers, swanlab_needs_login

        resolve_trackers(cfg.training.report_to, swanlab_needs_login(cfg))  # a missing package: stop now, pip line
    resume = plan_resume(cfg, runtime)
    set_seed(cfg.training.seed, cfg.training.full_determinism)
    tokenizer, template, data = load_tokenizer_and_data(cfg, cfg.finetuning.stage)
    # a quantized base is quantized where it trains; other models load on CPU and are placed by the trainer
    model = load_model(cfg, tokenizer, is_trainable=True, plan=plan,
                       device=runtime.device if cfg.model.quantization_bit is not None else None,
                       # init_on_rank0: rank 0 reads the weights; init_on_meta: each rank its shards, once sharded
                       on_meta="parameters" if plan.from_checkpoint else plan.from_rank0 and runtime.rank != 0)
    inputs = RecipeInputs(cfg, runtime, plan, tokenizer, template, model, data.train_dataset, data.eval_dataset,
                          data.media)
    objective = recipe.build_objective(cfg, inputs)
    trainer = Trainer(cfg, inputs.model, tokenizer, objective, inputs.train_dataset, runtime,
                      eval_dataset=inputs.eval_dataset, resume=resume, hooks=installed_hooks(), plan=plan)
    trainer.train()
