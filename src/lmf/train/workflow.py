"""What ``lmf sft|dpo|rm|kto|train CONFIG`` runs: the config, the stage's recipe, the shared set-up, the loop.

:func:`run_exp` parses the config and checks the command against its ``stage``; :func:`run_training`
does: process group and device -> resume plan -> seed -> tokenizer, template and tokenized data ->
trainable model -> the recipe's stage -> the shared :class:`~lmf.train.trainer.Trainer` -> tear-down.

A recipe (:data:`RECIPES`: ``lmf.train.sft``, ``lmf.train.dpo.recipe``, ``lmf.train.rm``, ``lmf.train.kto``) is a module with
``build_stage(cfg, setup) -> Stage``, ``DATA_STAGE`` (the data layout; None: the config's stage) and an
optional ``check_config(cfg)``. ``build_stage`` may replace ``setup.train_dataset`` / ``setup.eval_dataset``
(DPO does, to attach precomputed reference log-probs).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from lmf.extras.errors import ConfigError

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig
    from lmf.dist.runtime import DistInfo

#: stage -> its recipe module.
RECIPES = {"sft": "lmf.train.sft", "pt": "lmf.train.sft", "dpo": "lmf.train.dpo.recipe", "rm": "lmf.train.rm",
           "kto": "lmf.train.kto"}
#: command -> the stage it runs ("train" follows the config).
COMMAND_STAGES = {"sft": "sft", "dpo": "dpo", "rm": "rm", "kto": "kto", "train": None}


@dataclass
class StageSetup:
    """What a recipe's ``build_stage`` gets: the config, runtime, tokenizer, template, model and datasets."""

    cfg: "LmfConfig"
    runtime: "DistInfo"
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


def config_for_command(argv: list[str], command: str = "sft") -> "LmfConfig":
    """Parse ``argv`` (config + overrides) and check that ``command`` runs the config's stage."""
    from lmf.config import get_config

    if command not in COMMAND_STAGES:
        raise ConfigError(f"unknown training command {command!r}; choose one of {', '.join(COMMAND_STAGES)}")
    cfg = get_config(argv, command_stage=COMMAND_STAGES[command])  # v1 configs take their stage from the command
    wanted, stage = COMMAND_STAGES[command], cfg.finetuning.stage
    if wanted is not None and stage != wanted and not (wanted == "sft" and stage == "pt"):
        raise ConfigError(
            f"`lmf {command}` runs stage {wanted!r} but the config says stage: {stage}; "
            f"use `lmf {stage if stage in COMMAND_STAGES else 'train'}` or `lmf train`"
        )
    return cfg


def run_exp(argv: list[str], command: str = "sft") -> None:
    """Parse ``argv`` (config + overrides) and train the stage the command names (``train``: the config's)."""
    cfg = config_for_command(argv, command)
    if not cfg.training.do_train:
        raise ConfigError("config key 'do_train' is false: nothing to do (evaluation-only runs are not implemented)")
    run_training(cfg)


def recipe_of(stage: str):
    """The recipe module of ``stage``."""
    if stage not in RECIPES:
        raise ConfigError(f"config key 'stage': {stage!r} cannot be trained by lmf")
    return importlib.import_module(RECIPES[stage])


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
    from lmf.train.runtime import setup_runtime

    recipe = recipe_of(cfg.finetuning.stage)
    if hasattr(recipe, "check_config"):
        recipe.check_config(cfg)
    limit_heap_fragmentation(threshold_bytes(cfg.model.malloc_mmap_threshold_mb))  # opt-in
    runtime = setup_runtime(cfg)
    try:
        with hold_output_dir(cfg.training.output_dir, runtime):  # one run per output_dir, for its whole life
            _train_locked(cfg, recipe, runtime)
    finally:
        destroy_distributed()


def _train_locked(cfg: "LmfConfig", recipe, runtime: "DistInfo") -> None:
    """What :func:`run_training` does once the process group is up and ``output_dir`` is locked."""
    from lmf.dist.fault_injection import hooks_from_env
    from lmf.dist.plan import plan_parallelism
    from lmf.model.loader import load_model
    from lmf.train.runtime import set_seed
    from lmf.train.state import TrainHooks
    from lmf.train.trainer import Trainer, resolve_resume_checkpoint

    plan = plan_parallelism(cfg, runtime.world_size)  # refuses what cannot run before data or model is loaded
    if runtime.is_main:
        from lmf.train.reporting import resolve_trackers

        resolve_trackers(cfg.training.report_to)  # a missing tracker package: stop now, with the pip line
    resume = resolve_resume_checkpoint(cfg, runtime)
    set_seed(cfg.training.seed)
    tokenizer, template, data = load_tokenizer_and_data(cfg, recipe.DATA_STAGE or cfg.finetuning.stage)
    # a quantized base is quantized where it trains; other models load on CPU and are placed by the trainer
    model = load_model(cfg, tokenizer, is_trainable=True,
                       device=runtime.device if cfg.model.quantization_bit is not None else None,
                       # init_on_rank0: rank 0 reads the weights; init_on_meta: each rank its shards, once sharded
                       on_meta="parameters" if plan.from_checkpoint else plan.from_rank0 and runtime.rank != 0)
    setup = StageSetup(cfg, runtime, tokenizer, template, model, data.train_dataset, data.eval_dataset, data.media)
    stage = recipe.build_stage(cfg, setup)
    trainer = Trainer(cfg, setup.model, tokenizer, stage, setup.train_dataset, runtime,
                      eval_dataset=setup.eval_dataset, resume=resume, hooks=TrainHooks(**hooks_from_env()))
    trainer.train()
