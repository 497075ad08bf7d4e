"""Config: YAML + key=value overrides, typed validation, LLaMA-Factory example YAMLs, helpful errors."""

from __future__ import annotations

import logging
import os
import re

import pytest

from lmf.config.parser import (
    NO_EFFECT,
    UNSUPPORTED,
    build_config,
    describe_keys,
    get_config,
    parse_override,
    split_cli_args,
    suggest_key,
)
from lmf.extras.errors import ConfigError

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "lf_examples")


@pytest.mark.parametrize("name, stage", [("qwen3_lora_sft.yaml", "sft"), ("qwen3_lora_dpo.yaml", "dpo"),
                                         ("qwen3_lora_reward.yaml", "rm")])
def test_llamafactory_examples_parse_unchanged(name, stage):
    cfg = get_config([os.path.join(FIXTURES, name)])
    assert cfg.finetuning.stage == stage
    assert cfg.model.model_name_or_path == "Qwen/Qwen3-4B-Instruct-2507"
    assert cfg.model.trust_remote_code is True
    assert cfg.finetuning.finetuning_type == "lora" and cfg.finetuning.lora_rank == 8
    assert cfg.finetuning.lora_alpha == 16  # LLaMA-Factory default: 2 * rank
    assert cfg.data.template == "qwen3_nothink" and cfg.data.cutoff_len == 2048 and cfg.data.max_samples == 1000
    assert cfg.data.preprocessing_num_workers == 16
    assert cfg.training.learning_rate == (5.0e-6 if stage == "dpo" else 1.0e-4)
    assert cfg.training.num_train_epochs == 3.0 and cfg.training.lr_scheduler_type == "cosine"
    assert cfg.training.bf16 is True and cfg.training.ddp_timeout == 180000000
    assert cfg.training.resume_from_checkpoint is None
    assert cfg.training.report_to == []  # "none"
    assert cfg.data.packing is False  # default off except for pt
    if stage == "dpo":
        assert cfg.finetuning.pref_beta == 0.1 and cfg.finetuning.pref_loss == "sigmoid"


def test_overrides_win_in_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model_name_or_path: m\nlearning_rate: 1.0e-4\nmax_steps: 10\n")
    cfg = get_config([str(cfg_file), "learning_rate=2e-5", "max_steps=20", "max_steps=30", "--seed", "7",
                      "--bf16", "--logging_steps=3"])
    assert cfg.training.learning_rate == 2e-5 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.max_steps == 30
    assert cfg.training.seed == 7 and cfg.training.data_seed == 7
    assert cfg.training.bf16 is True and cfg.training.logging_steps == 3


def test_value_coercion():
    cfg = build_config({"model_name_or_path": "m", "learning_rate": "1e-4", "per_device_train_batch_size": "4",
                        "do_train": "false", "num_train_epochs": 2, "val_size": "0.1", "lora_target": "q_proj,v_proj",
                        "report_to": "tensorboard,wandb", "max_samples": 5.0})
    assert cfg.training.learning_rate == 1e-4
    assert cfg.training.per_device_train_batch_size == 4
    assert cfg.training.do_train is False
    assert cfg.training.num_train_epochs == 2.0
    assert cfg.data.val_size == 0.1
    assert cfg.training.report_to == ["tensorboard", "wandb"]
    assert cfg.data.max_samples == 5
    assert parse_override("max_steps=10") == ("max_steps", 10)
    assert parse_override("learning_rate=1e-4") == ("learning_rate", "1e-4")  # typed by the field: float
    assert get_config(["learning_rate=1e-4", "dataset=1e5"], require_model=False).data.dataset == "1e5"
    assert parse_override("--dataset=a,b") == ("dataset", "a,b")
    assert parse_override("template=") == ("template", None)


@pytest.mark.parametrize("raw, pattern", [
    ({"learning_rte": 1e-4}, r"unknown config key 'learning_rte'; did you mean 'learning_rate'\?"),
    ({"lora_rnk": 8}, r"unknown config key 'lora_rnk'; did you mean 'lora_rank'\?"),
    ({"xyzzy_quux": 1}, r"unknown config key 'xyzzy_quux'; see `lmf help config`"),
    ({"finetuning_type": "qlora"},
     r"config key 'finetuning_type': 'qlora' is not allowed; choose one of: lora, freeze, full"),
    ({"stage": "grpo"}, r"config key 'stage': 'grpo' is not allowed; choose one of: pt, sft, rm, dpo"),
    ({"lr_scheduler_type": "cosine_restarts"}, r"config key 'lr_scheduler_type'.*choose one of: linear, cosine"),
    ({"per_device_train_batch_size": "four"},
     r"config key 'per_device_train_batch_size': expected an integer, got 'four'"),
    ({"bf16": "maybe"}, r"config key 'bf16': expected true or false, got 'maybe'"),
    ({"learning_rate": [1, 2]}, r"config key 'learning_rate': expected a number"),
    ({"bf16": True, "fp16": True}, r"'bf16' and 'fp16' are both true"),
    ({"cutoff_len": 0}, r"config key 'cutoff_len': 0 is out of range \(must be >= 1\)"),
    ({"val_size": -0.1}, r"config key 'val_size': -0.1 is out of range \(must be >= 0\)"),
    ({"report_to": "comet_ml"}, r"config key 'report_to': 'comet_ml' is not supported"),
])
def test_bad_keys_and_values(raw, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config({"model_name_or_path": "m", **raw})


def test_accepted_but_not_implemented_says_so(caplog):
    with pytest.raises(ConfigError, match=r"'push_to_hub' is accepted for LLaMA-Factory compatibility "
                                          r"but .*pushing to the hub is not possible offline"):
        build_config({"model_name_or_path": "m", "push_to_hub": True})
    with pytest.raises(ConfigError, match=r"'stage': 'ppo' — PPO is not implemented"):
        build_config({"model_name_or_path": "m", "stage": "ppo"})
    # setting such a key to its default is fine (LLaMA-Factory YAMLs often spell defaults out)
    build_config({"model_name_or_path": "m", "use_galore": False, "quantization_bit": None})
    logging.getLogger("lmf").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="lmf"):
            build_config({"model_name_or_path": "m", "remove_unused_columns": True})
    finally:
        logging.getLogger("lmf").propagate = False
    assert any("'remove_unused_columns' has no effect" in r.getMessage() for r in caplog.records)
    text = describe_keys()
    for key in UNSUPPORTED:
        assert f"  {key} = " in text
    assert "push_to_hub = False [not implemented]" in text
    assert all(f"{key} = " in text for key in NO_EFFECT)


def test_cross_field_defaults():
    pt = build_config({"model_name_or_path": "m", "stage": "pt"})
    assert pt.data.packing is True
    sft = build_config({"model_name_or_path": "m", "neat_packing": True})
    assert sft.data.packing is True
    assert build_config({"model_name_or_path": "m", "evaluation_strategy": "steps"}).training.eval_strategy == "steps"
    assert build_config({"model_name_or_path": "m", "lora_rank": 4, "lora_alpha": 32}).finetuning.lora_alpha == 32
    assert build_config({"model_name_or_path": "m"}).training.gradient_checkpointing is True
    orpo = build_config({"model_name_or_path": "m", "stage": "dpo", "pref_loss": "orpo", "ref_model": "r"})
    assert orpo.finetuning.ref_model is None


def test_cli_argument_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        get_config(["nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        get_config([str(bad)])
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        get_config([str(listy)])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        split_cli_args(["stray"])
    with pytest.raises(ConfigError, match="config key 'model_name_or_path' is required"):
        get_config(["learning_rate=1"])
    assert get_config(["learning_rate=1"], require_model=False).training.learning_rate == 1.0


def test_suggest_and_hash_are_stable():
    assert suggest_key("cutof_len") == "cutoff_len"
    a = build_config({"model_name_or_path": "m", "learning_rate": 1e-4})
    b = build_config({"learning_rate": "1e-4", "model_name_or_path": "m"})
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != build_config({"model_name_or_path": "m", "learning_rate": 2e-4}).config_hash()
    assert a.to_dict()["learning_rate"] == 1e-4


def test_config_is_import_light():
    import subprocess
    import sys

    code = ("import sys, lmf.config, lmf.config.parser; "
            "print(','.join(m for m in ('torch', 'transformers', 'datasets', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == ""


# ---- numeric ranges (values.BOUNDS), checked at parse time ----

@pytest.mark.parametrize("key, value, shown", [
    ("lora_rank", 0, "0 is out of range (must be >= 1)"),
    ("lora_rank", -1, "-1 is out of range (must be >= 1)"),
    ("learning_rate", -1, "-1.0 is out of range (must be >= 0)"),
    ("learning_rate", "nan", "nan is out of range (must be >= 0)"),
    ("num_train_epochs", -1, "-1.0 is out of range (must be >= 0)"),
    ("adam_epsilon", 0, "0.0 is out of range (must be > 0)"),
    ("lora_dropout", 1.0, "1.0 is out of range (must be in [0, 1))"),
    ("adam_beta2", 1, "1.0 is out of range (must be in [0, 1))"),
    ("warmup_ratio", 1.5, "1.5 is out of range (must be in [0, 1])"),
    ("max_steps", -2, "-2 is out of range (must be >= -1)"),
    ("per_device_train_batch_size", 0, "0 is out of range (must be >= 1)"),
    ("save_steps", -1, "-1.0 is out of range (must be >= 0)"),
    ("eval_steps", -1, "-1.0 is out of range (must be >= 0)"),
    ("max_samples", 0, "0 is out of range (must be >= 1)"),
])
def test_out_of_range_values_name_key_value_and_range(key, value, shown):
    with pytest.raises(ConfigError) as info:
        build_config({"model_name_or_path": "m", key: value})
    assert str(info.value) == f"config key {key!r}: {shown}"


@pytest.mark.parametrize("keys, message", [
    ({"num_train_epochs": 0}, "config key 'num_train_epochs': 0.0 trains nothing"),
    ({"save_steps": 0}, "config key 'save_steps': 0 with save_strategy: steps saves nothing"),
])
def test_zero_values_that_do_nothing_are_refused_where_they_are_used(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", **keys})


def test_zero_values_are_fine_where_transformers_ignores_them():
    cfg = build_config({"model_name_or_path": "m", "num_train_epochs": 0, "max_steps": 5, "save_steps": 0,
                        "save_strategy": "no", "eval_steps": 0, "logging_steps": 7, "max_grad_norm": -1})
    assert cfg.training.eval_steps == 7 and cfg.training.max_grad_norm == -1


def test_in_range_edges_and_sentinels_pass():
    cfg = build_config({"model_name_or_path": "m", "max_steps": -1, "learning_rate": 0, "warmup_ratio": 1.0,
                        "lora_dropout": 0.0, "max_grad_norm": 0, "max_samples": None, "pissa_iter": -1})
    assert cfg.training.max_steps == -1 and cfg.data.max_samples is None


def test_bounds_table_names_numeric_keys_whose_defaults_fit():
    import dataclasses

    from lmf.config.values import BOUNDS
    from lmf.config.parser import KEY_INDEX
    from lmf.config.values import _within

    for key, spec in BOUNDS.items():
        assert key in KEY_INDEX, key
        f = KEY_INDEX[key][1]
        assert "int" in str(f.type) or "float" in str(f.type), key
        if f.default is not None and f.default is not dataclasses.MISSING:
            assert _within(f.default, spec), (key, f.default, spec)
    assert "lora_rank = 8" in describe_keys() and "(range: >= 1)" in describe_keys()


def test_out_of_range_on_the_command_line_exits_2_before_loading_anything(tmp_path):
    from lmf.testing.cli import run_lmf

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    proc = run_lmf("sft", "examples/demo_lora_sft.yaml", "lora_rank=0", f"output_dir={out}", cwd=repo)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "lmf: error: command line: config key 'lora_rank': 0 is out of range (must be >= 1)"]
    assert not out.exists()


# ---- every message about one key names where it was given ----

@pytest.mark.parametrize("key, value, message", [
    ("rope_scaling", "ntk", "config key 'rope_scaling': 'ntk' is not allowed"),
    ("use_kt", True, "config key 'use_kt' is accepted for LLaMA-Factory compatibility but not"),
    ("lora_rnk", 8, "unknown config key 'lora_rnk'"),
    ("lora_rank", "abc", "config key 'lora_rank': expected an integer, got 'abc'"),
    ("lora_rank", 0, "config key 'lora_rank': 0 is out of range"),
    ("push_to_hub", True, "config key 'push_to_hub' is accepted for LLaMA-Factory compatibility but"),
    ("stage", "ppo", "config key 'stage': 'ppo' — PPO is not implemented"),
])
@pytest.mark.parametrize("given_in", ["yaml", "command line"])
def test_key_messages_name_their_true_source(tmp_path, key, value, message, given_in):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model_name_or_path: m\nlearning_rate: 1.0e-4\n"
                         + (f"{key}: {value}\n" if given_in == "yaml" else ""))
    argv = [str(yaml_file)] + ([f"{key}={value}"] if given_in == "command line" else [])
    with pytest.raises(ConfigError) as info:
        get_config(argv)
    where = str(yaml_file) if given_in == "yaml" else "command line"
    assert str(info.value).startswith(f"{where}: {message}"), str(info.value)


def test_an_override_of_a_yaml_key_is_reported_as_the_command_line(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model_name_or_path: m\nlora_rank: 0\n")
    with pytest.raises(ConfigError, match="^" + re.escape(f"{yaml_file}: config key 'lora_rank'")):
        get_config([str(yaml_file)])
    with pytest.raises(ConfigError, match=r"^command line: config key 'lora_rank': -1 is out"):
        get_config([str(yaml_file), "lora_rank=-1"])
    assert get_config([str(yaml_file), "lora_rank=4"]).finetuning.lora_rank == 4
