"""Entry point of the training commands: parse the config, check the command against ``stage``, run it."""

from __future__ import annotations

from lmf.config import get_config
from lmf.extras.errors import ConfigError

#: command -> the stage it runs ("train" follows the config).
COMMAND_STAGES = {"sft": "sft", "dpo": "dpo", "rm": "rm", "train": None}


def _runner(stage: str):
    if stage in ("sft", "pt"):
        from lmf.train.sft import run_sft

        return run_sft
    if stage == "dpo":
        from lmf.train.dpo import run_dpo

        return run_dpo
    if stage == "rm":
        from lmf.train.rm import run_rm

        return run_rm
    raise ConfigError(f"config key 'stage': {stage!r} cannot be trained by lmf")


def run_exp(argv: list[str], command: str = "sft") -> None:
    """Parse ``argv`` (config + overrides) and run the stage the command names (``train``: the config's)."""
    if command not in COMMAND_STAGES:
        raise ConfigError(f"unknown training command {command!r}; choose one of {', '.join(COMMAND_STAGES)}")
    cfg = get_config(argv)
    wanted = COMMAND_STAGES[command]
    stage = cfg.finetuning.stage
    if wanted is not None and stage != wanted and not (wanted == "sft" and stage == "pt"):
        raise ConfigError(
            f"`lmf {command}` runs stage {wanted!r} but the config says stage: {stage}; "
            f"use `lmf {stage if stage in COMMAND_STAGES else 'train'}` or `lmf train`"
        )
    if not cfg.training.do_train:
        raise ConfigError("config key 'do_train' is false: nothing to do (evaluation-only runs are not implemented)")
    _runner(stage)(cfg)
