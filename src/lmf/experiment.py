"""What a training command runs in a process: ``lmf sft|dpo|kto|rm|train CONFIG [key=value ...]``.

:func:`run_experiment` parses the config, checks that the command runs its ``stage`` (the stage registry:
:mod:`lmf.config.stages`), then trains (``do_train``: :func:`lmf.train.workflow.run_training`) and predicts
(``do_predict``: :func:`lmf.predict.runner.run_prediction`) with what it just trained. The CLI
(:mod:`lmf.launcher`), a torchrun worker (:mod:`lmf.worker`) and a Ray worker (:mod:`lmf.ray_launcher`) all call it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lmf.config.stages import STAGES, TRAIN_COMMANDS, command_runs, command_stage
from lmf.extras.errors import ConfigError

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig


def config_for_command(argv: list[str], command: str = "sft") -> "LmfConfig":
    """Parse ``argv`` (config + overrides) and check that ``command`` runs the config's stage."""
    from lmf.config import get_config

    if command not in TRAIN_COMMANDS:
        raise ConfigError(f"unknown training command {command!r}; choose one of {', '.join(TRAIN_COMMANDS)}")
    wanted = command_stage(command)
    cfg = get_config(argv, command_stage=wanted)  # v1 configs take their stage from the command
    stage = cfg.finetuning.stage
    if not command_runs(command, stage):
        right = STAGES[stage].command if stage in STAGES else "train"
        raise ConfigError(f"`lmf {command}` runs stage {wanted!r} but the config says stage: {stage}; "
                          f"use `lmf {right}` or `lmf train`")
    return cfg


def run_experiment(argv: list[str], command: str = "sft") -> None:
    """Training (``do_train``), then prediction (``do_predict``) with the model training just saved."""
    from lmf.predict.runner import check_outputs_writable, run_prediction
    from lmf.train.workflow import run_training

    cfg = config_for_command(argv, command)
    t = cfg.training
    if not t.do_train and not t.do_predict:
        raise ConfigError("config keys 'do_train' and 'do_predict' are false: nothing to do "
                          "(evaluation-only runs are not implemented)")
    if t.do_predict:
        check_outputs_writable(cfg)  # before hours of training, not after
    if t.do_train:
        run_training(cfg)
    if t.do_predict:
        run_prediction(config_after_training(cfg) if t.do_train else cfg)


def config_after_training(cfg: "LmfConfig") -> "LmfConfig":
    """The config that predicts with what training just saved in ``output_dir``: the adapter (LoRA/OFT) on
    the base model, or the full/freeze-tuned model itself."""
    from lmf.extras.constants import ADAPTER_TYPES

    out = cfg.training.output_dir
    if cfg.finetuning.finetuning_type in ADAPTER_TYPES:
        model = dataclasses.replace(cfg.model, adapter_name_or_path=out)
    else:
        model = dataclasses.replace(cfg.model, model_name_or_path=out, adapter_name_or_path=None)
    return dataclasses.replace(cfg, model=model)
