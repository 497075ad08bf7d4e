"""Every config key is read by the code or flagged; every LLaMA-Factory key is known (never "unknown key")."""

from __future__ import annotations

import ast
import glob
import logging
import os

import pytest
import yaml

from lmf.config.compat import ALIASES, LF_NO_EFFECT, NO_EFFECT, UNSUPPORTED, VALUE_MAPPINGS
from lmf.config.lf_keys import LF_KEYS
from lmf.config.parser import KEY_INDEX, build_config
from lmf.extras.errors import ConfigError

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LF_EXAMPLES = os.path.join(os.path.dirname(REPO_ROOT), "shared", "lf-examples")


@pytest.fixture()
def lmf_logs(caplog):
    logger = logging.getLogger("lmf")
    old = logger.propagate
    logger.propagate = True
    with caplog.at_level(logging.INFO, logger="lmf"):
        yield caplog
    logger.propagate = old


def _names_read_by_the_code() -> set[str]:
    """Attribute names and getattr() names used anywhere in src/lmf but the argument definitions."""
    used: set[str] = set()
    for path in glob.glob(os.path.join(REPO_ROOT, "src", "lmf", "**", "*.py"), recursive=True):
        if path.endswith((os.path.join("config", "args.py"), os.path.join("config", "lf_keys.py"))):
            continue
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2
                  and isinstance(node.args[1], ast.Constant)):
                used.add(node.args[1].value)
    return used


def test_every_field_of_every_group_is_read_or_flagged():
    used = _names_read_by_the_code()
    silent = [k for k in KEY_INDEX if k not in used and k not in UNSUPPORTED and k not in NO_EFFECT]
    assert not silent, f"config keys that nothing reads and nothing flags: {silent}"


def test_every_llamafactory_key_is_known():
    for key, (default, _) in LF_KEYS.items():
        raw = {"model_name_or_path": "m", key: default}
        if key in KEY_INDEX or key in ALIASES:
            continue
        build_config(raw)  # LLaMA-Factory's default: accepted
        if key in VALUE_MAPPINGS or key in LF_NO_EFFECT:
            continue
        other = (not default) if isinstance(default, bool) else (7 if isinstance(default, (int, float)) else "x")
        with pytest.raises(ConfigError, match="accepted for LLaMA-Factory compatibility but not implemented") as info:
            build_config({"model_name_or_path": "m", key: other})
        assert key in str(info.value) and "unknown" not in str(info.value)


@pytest.mark.parametrize("key,value,feature", [
    ("ppo_epochs", 2, "PPO"), ("use_audio_in_video", True, "multimodal"),
])
def test_known_features_that_are_not_implemented_say_so(key, value, feature):
    with pytest.raises(ConfigError, match=feature) as info:
        build_config({"model_name_or_path": "m", key: value})
    assert "not implemented" in str(info.value) and key in str(info.value)


def test_refused_values_of_own_keys():
    for raw in ({"push_to_hub": True}, {"export_hub_model_id": "me/model"}):
        with pytest.raises(ConfigError, match="accepted for LLaMA-Factory compatibility but"):
            build_config({"model_name_or_path": "m", **raw})


def test_mappings_and_aliases():
    cfg = build_config({"model_name_or_path": "m", "gradient_checkpointing_kwargs": {"use_reentrant": False},
                        "use_kv_cache": False, "use_liger_kernel": True})
    assert cfg.model.use_reentrant_gc is False and cfg.model.use_cache is False and cfg.model.enable_liger_kernel
    with pytest.raises(ConfigError, match="not implemented"):
        build_config({"model_name_or_path": "m", "gradient_checkpointing_kwargs": {"preserve_rng_state": False}})
    mapped = build_config({"model_name_or_path": "m", "fsdp": "full_shard",
                           "fsdp_transformer_layer_cls_to_wrap": "Qwen3DecoderLayer"})
    assert mapped.training.fsdp_config == {"transformer_layer_cls_to_wrap": "Qwen3DecoderLayer"}


def test_no_effect_keys_warn(lmf_logs):
    build_config({"model_name_or_path": "m", "ms_hub_token": "abc"})
    assert "'ms_hub_token' has no effect" in lmf_logs.text


def test_cross_key_checks(lmf_logs):
    with pytest.raises(ConfigError, match="interleaving mix_strategy"):
        build_config({"model_name_or_path": "m", "dataset": "a,b", "interleave_probs": "0.5,0.5"})
    with pytest.raises(ConfigError, match="2 probabilities for 3"):
        build_config({"model_name_or_path": "m", "dataset": "a,b,c", "interleave_probs": "0.5,0.5",
                      "mix_strategy": "interleave_under"})
    with pytest.raises(ConfigError, match="eval_dataset"):
        build_config({"model_name_or_path": "m", "eval_on_each_dataset": True})
    with pytest.raises(ConfigError, match="needs evaluations"):
        build_config({"model_name_or_path": "m", "early_stopping_steps": 2})
    with pytest.raises(ConfigError, match="pure_bf16"):
        build_config({"model_name_or_path": "m", "upcast_layernorm": True, "pure_bf16": True})
    build_config({"model_name_or_path": "m", "max_length": 4096})
    assert "'max_length' has no effect while max_new_tokens > 0" in lmf_logs.text
    build_config({"model_name_or_path": "m", "compute_accuracy": True})
    assert "'compute_accuracy' has no effect without an eval set" in lmf_logs.text


@pytest.mark.skipif(not os.path.isdir(LF_EXAMPLES), reason="../shared/lf-examples is not here")
def test_llamafactory_example_yamls_never_meet_an_unknown_key():
    """Each training/inference/merge YAML of LLaMA-Factory parses, or names a feature that is not implemented."""
    skipped = ("v1", "accelerate", "megatron", "megatron_bridge", "ktransformers", "deepspeed")
    checked = 0
    for path in sorted(glob.glob(os.path.join(LF_EXAMPLES, "**", "*.yaml"), recursive=True)):
        if os.path.relpath(path, LF_EXAMPLES).split(os.sep)[0] in skipped:
            continue
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
        if not isinstance(raw, dict) or "model_name_or_path" not in raw:
            continue
        checked += 1
        if str(raw.get("deepspeed", "")).startswith("examples/"):  # relative to LLaMA-Factory's checkout
            raw["deepspeed"] = os.path.join(LF_EXAMPLES, raw["deepspeed"][len("examples/"):])
        try:
            build_config(raw, source=path)
        except ConfigError as exc:
            assert "not implemented" in str(exc), (path, str(exc))
    assert checked > 40


@pytest.mark.skipif(not os.path.isdir(LF_EXAMPLES), reason="../shared/lf-examples is not here")
@pytest.mark.parametrize("example", [
    "train_lora/qwen3_lora_kto.yaml", "extras/nlg_eval/llama3_lora_predict.yaml", "extras/loraplus/llama3_lora_sft.yaml",
    "extras/pissa/llama3_lora_sft.yaml", "extras/galore/llama3_full_sft.yaml", "extras/apollo/llama3_full_sft.yaml",
    "extras/badam/llama3_full_sft.yaml", "extras/adam_mini/qwen2_full_sft.yaml", "extras/muon/qwen2_full_sft.yaml",
    "extras/dft/qwen2_full_sft.yaml", "extras/oft/llama3_oft_sft.yaml", "extras/llama_pro/llama3_freeze_sft.yaml",
    "train_lora/qwen3_lora_sft_ray.yaml",
])
def test_the_other_methods_examples_are_accepted_as_they_are(example):
    """Issue 17's LLaMA-Factory examples parse unchanged (each one also trains in its own test file)."""
    with open(os.path.join(LF_EXAMPLES, example), encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    build_config(raw, source=example)


def test_the_lf_keys_report_accounts_for_every_key_and_prints_the_refused_count():
    import subprocess
    import sys

    from lmf.config.compat import lf_key_handling
    from lmf.config.lf_keys import LF_KEYS

    handling = lf_key_handling()
    assert set(handling) == set(LF_KEYS)
    refused = [key for key, (kind, _) in handling.items() if kind == "not implemented"]
    assert "push_to_hub" in refused and "shift_attn" not in refused and "rope_scaling" not in refused and "learning_rate" not in refused and handling["use_kv_cache"][0] == "renamed"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "lf_keys_report.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"refused at any non-default value: {len(refused)} keys" in out.stdout
    assert f"LLaMA-Factory 0.9.5: {len(LF_KEYS)} keys" in out.stdout
    over = subprocess.run([sys.executable, script, "--max-refused", str(len(refused) - 1)], capture_output=True,
                          text=True, timeout=60)
    assert over.returncode == 1 and f"{len(refused)} refused keys" in over.stderr


def test_use_v1_kernels_is_kernel_config_auto_a_logged_no_op_off_npu(lmf_logs):
    cfg = build_config({"model_name_or_path": "m", "use_v1_kernels": True})
    assert not cfg.model.enable_liger_kernel
    assert any("use_v1_kernels: auto applies LLaMA-Factory's NPU kernels only" in r.getMessage()
               for r in lmf_logs.records)
    lmf_logs.clear()
    build_config({"model_name_or_path": "m", "use_v1_kernels": False})
    assert not any("use_v1_kernels" in r.getMessage() for r in lmf_logs.records)


def test_megatron_keys_are_refused_naming_the_megatron_backend():
    with pytest.raises(ConfigError, match=r"command line: config key 'tensor_model_parallel_size' configures the "
                                          r"Megatron backend .* lmf trains with DDP or FSDP2"):
        build_config({"model_name_or_path": "m", "tensor_model_parallel_size": 4}, source="command line")


@pytest.mark.skipif(not os.path.isdir(LF_EXAMPLES), reason="../shared/lf-examples is not here")
@pytest.mark.parametrize("folder", ["megatron", "megatron_bridge"])
def test_llamafactory_megatron_examples_stop_on_the_megatron_backend_not_an_unknown_key(folder):
    paths = sorted(glob.glob(os.path.join(LF_EXAMPLES, folder, "*.yaml")))
    assert paths
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
        with pytest.raises(ConfigError, match="configures the Megatron backend") as exc:
            build_config(raw, source=path)
        assert "unknown config key" not in str(exc.value)


def test_sglang_is_refused_saying_why():
    for raw in ({"infer_backend": "sglang"}, {"sglang_maxlen": 8192}):
        with pytest.raises(ConfigError, match="SGLang") as info:
            build_config({"model_name_or_path": "m", **raw})
        assert "not implemented" in str(info.value)
    with pytest.raises(ConfigError, match="PyPI wheels are CUDA builds.*use infer_backend: vllm"):
        build_config({"model_name_or_path": "m", "infer_backend": "sglang"})
