"""The stage registry is the one home of a stage: every place that depends on the stage reads it from there."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from lmf.config.args import FinetuningArguments
from lmf.config.parser import build_config
from lmf.config.rules import RULES, rules_of
from lmf.config.stages import LAYOUTS, STAGES, TRAIN_COMMANDS, UNIMPLEMENTED_STAGES, command_runs, command_stage
from lmf.extras.errors import ConfigError

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs


def test_every_stage_names_a_layout_and_a_recipe_that_builds_an_objective():
    for name, spec in STAGES.items():
        assert spec.layout in LAYOUTS, name
        assert callable(importlib.import_module(spec.recipe).build_objective), name
        assert spec.command in TRAIN_COMMANDS and command_runs(spec.command, name) and command_runs("train", name)


def test_the_stage_key_the_commands_and_the_help_derive_from_the_registry():
    from lmf.launcher import USAGE

    field = next(f for f in dataclasses.fields(FinetuningArguments) if f.name == "stage")
    assert field.metadata["choices"] == (*STAGES, *UNIMPLEMENTED_STAGES)
    assert TRAIN_COMMANDS == ("train", "sft", "rm", "dpo", "kto")
    for spec in STAGES.values():  # pt runs under `lmf sft`, whose line says so
        assert spec.summary in USAGE or (spec.name == "pt" and "stage: pt also runs here" in USAGE)
    assert command_stage("train") is None and command_stage("dpo") == "dpo"
    assert not command_runs("dpo", "sft") and command_runs("sft", "pt")
    with pytest.raises(ConfigError, match="'ppo' — PPO is not implemented"):
        build_config({"model_name_or_path": "m", "stage": "ppo"})


def test_the_data_layout_of_each_stage():
    from lmf.data.layout import GENERATE, layout_of

    assert [layout_of(s) for s in ("pt", "sft", "dpo", "rm", "kto")] == [
        "text", "supervised", "pairwise", "pairwise", "feedback"]
    assert layout_of(GENERATE) == GENERATE
    with pytest.raises(ConfigError, match="'ppo' has no data pipeline"):
        layout_of("ppo")


def test_every_rule_is_found_from_its_keys_and_reads_real_keys():
    from lmf.config.parser import KEY_INDEX

    build_config({"model_name_or_path": "m"})  # loads the rule modules
    assert len(RULES) > 20
    for r in RULES:
        assert r.keys and all(k in KEY_INDEX for k in r.keys), (r.name, r.keys)
    assert "training.one_half_precision" in rules_of("fp16")
    assert "data.packing_is_for_token_level_stages" in rules_of("packing")


def test_defaults_come_first_then_the_checks():
    cfg = build_config({"model_name_or_path": "m", "stage": "pt", "lora_rank": 4, "logging_steps": 7})
    assert cfg.data.packing and cfg.finetuning.lora_alpha == 8 and cfg.training.eval_steps == 7
    dynamic = build_config({"model_name_or_path": "m", "stage": "pt", "batching_strategy": "dynamic_batching",
                            "max_steps": 3})
    assert dynamic.data.packing is False  # an explicit batching strategy wins over the pt packing default
    with pytest.raises(ConfigError, match="'packing' is not implemented for stage dpo"):
        build_config({"model_name_or_path": "m", "stage": "dpo", "packing": True})
