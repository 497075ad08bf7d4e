"""Config keys that used to be accepted and ignored, now implemented: per-dataset eval, token accuracy, early
stopping, pure_bf16, upcast_layernorm, tf32, fsdp_config, generation max_length."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

torch.set_num_threads(1)


@pytest.fixture()
def lmf_logs(caplog):
    logger = logging.getLogger("lmf")
    old = logger.propagate
    logger.propagate = True
    with caplog.at_level(logging.INFO, logger="lmf"):
        yield caplog
    logger.propagate = old


def _run_sft(tiny_model_dir, demo_data_dir, tmp_path, **overrides) -> dict:
    from lmf.train.workflow import run_training

    raw = dict(model_name_or_path=tiny_model_dir, dataset_dir=demo_data_dir, dataset="alpaca_en_demo", template="qwen",
               cutoff_len=128, max_samples=24, output_dir=str(tmp_path / "out"), max_steps=4, logging_steps=1,
               per_device_train_batch_size=4, learning_rate=5e-3, save_steps=100, disable_tqdm=True,
               preprocessing_cache_dir=str(tmp_path / "cache"), per_device_eval_batch_size=4)
    raw.update(overrides)
    run_training(build_config(raw))
    with open(tmp_path / "out" / "trainer_state.json", encoding="utf-8") as fh:
        return json.load(fh)


def test_eval_on_each_dataset_and_token_accuracy(tiny_model_dir, demo_data_dir, tmp_path):
    state = _run_sft(tiny_model_dir, demo_data_dir, tmp_path, eval_dataset="identity,alpaca_en_demo",
                     eval_on_each_dataset=True, compute_accuracy=True, eval_strategy="steps", eval_steps=2,
                     max_samples=16)
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for entry in evals:
        per_set = [entry["eval_identity_loss"], entry["eval_alpaca_en_demo_loss"]]
        assert entry["eval_loss"] == pytest.approx(sum(per_set) / 2, abs=1e-5)
        assert 0.0 <= entry["eval_identity_accuracy"] <= 1.0 and 0.0 <= entry["eval_alpaca_en_demo_accuracy"] <= 1.0
    assert evals[-1]["eval_identity_loss"] != evals[-1]["eval_alpaca_en_demo_loss"]


def test_token_accuracy_counts_equal_the_full_logits_argmax(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lmf.model.forward import decoder_hidden_states, lm_head_of
    from lmf.loss.metrics import token_accuracy_counts

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 2000, (3, 17), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 10:] = -100
    with torch.no_grad():
        hidden = decoder_hidden_states(model, ids)
        correct, total = token_accuracy_counts(hidden, lm_head_of(model), labels, chunk_size=4)
        predicted = model(input_ids=ids).logits.argmax(-1)[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    assert int(total) == int(mask.sum())
    assert int(correct) == int(((predicted == target) & mask).sum())


def test_early_stopping_stops_when_eval_loss_stops_improving(tiny_model_dir, demo_data_dir, tmp_path, lmf_logs):
    # learning_rate 0: the eval loss never improves on the first evaluation, so patience 2 stops after step 3
    state = _run_sft(tiny_model_dir, demo_data_dir, tmp_path, max_steps=10, learning_rate=0.0, val_size=4,
                     eval_strategy="steps", eval_steps=1, early_stopping_steps=2)
    assert state["global_step"] == 3 and state["early_stopped"] is True and state["finished"] is True
    assert "early stopping at step 3" in lmf_logs.text
    assert os.path.isfile(tmp_path / "out" / "adapter_model.safetensors")


def test_pure_bf16_trains_bf16_weights_on_cpu(tiny_model_dir, tmp_path):
    from _train_helpers import losses, make_config, train_tiny

    trainer, state = train_tiny(make_config(tiny_model_dir, str(tmp_path / "pure"), pure_bf16=True, max_steps=6,
                                            learning_rate=2e-2))
    dtypes = {p.dtype for p in trainer.model.parameters()}
    assert dtypes == {torch.bfloat16}
    curve = losses(state)
    assert curve[-1] < curve[0]


def test_upcast_layernorm_upcasts_only_the_norm_weights(tiny_model_dir, lmf_logs):
    from transformers import AutoModelForCausalLM

    from lmf.model.loader import _apply_upcasts

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    _apply_upcasts(build_config({"model_name_or_path": tiny_model_dir, "upcast_layernorm": True,
                                 "upcast_lmhead_output": True}), model)
    for name, p in model.named_parameters():
        expected = torch.float32 if (p.ndim == 1 and "norm" in name) else torch.bfloat16
        assert p.dtype == expected, name
    assert "norm weight(s) upcast to float32" in lmf_logs.text
    assert "always compute the LM head's logits in float32" in lmf_logs.text


def test_tf32_on_cpu_says_it_changes_nothing(lmf_logs):
    from lmf.train.process import apply_tf32

    before = torch.backends.cuda.matmul.allow_tf32
    apply_tf32(True, torch.device("cpu"))
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert "tf32: True has no effect on cpu" in lmf_logs.text


def test_fsdp_options_and_config():
    from lmf.dist.plan import plan_parallelism, read_fsdp_config
    from lmf.train.parallel import _check_layer_classes

    def plan(world=4, **kw):
        return plan_parallelism(build_config({"model_name_or_path": "m", **kw}), world, announce=False)

    assert plan(fsdp="full_shard auto_wrap").mode == "fsdp"
    assert plan(fsdp="hybrid_shard", fsdp_config={"hybrid_shard_size": 2}).shard_size == 2
    assert plan(fsdp="hybrid_shard_zero2", fsdp_config={"hybrid_shard_size": 1}).reshard_after_forward is False
    assert plan(fsdp="full_shard", fsdp_config={"fsdp_reshard_after_forward": False}).reshard_after_forward is False
    with pytest.raises(ConfigError, match="one sharding strategy"):
        plan(fsdp="full_shard hybrid_shard")
    with pytest.raises(ConfigError, match="cannot form shard groups of 3"):
        plan(fsdp="hybrid_shard", fsdp_config={"hybrid_shard_size": 3})
    with pytest.raises(ConfigError, match="backward_prefetch not implemented"):
        read_fsdp_config({"backward_prefetch": "backward_pre"})
    with pytest.raises(ConfigError, match="FSDP2 only"):
        read_fsdp_config({"fsdp_version": 1})
    with pytest.raises(ConfigError, match="needs FSDP sharding"):
        plan(fsdp_config={"reshard_after_forward": True})

    class Qwen3DecoderLayer(torch.nn.Module):
        pass

    _check_layer_classes([Qwen3DecoderLayer()], ("Qwen3DecoderLayer",))
    with pytest.raises(ConfigError, match="LlamaDecoderLayer is not the model's decoder layer"):
        _check_layer_classes([Qwen3DecoderLayer()], ("LlamaDecoderLayer",))


def test_generation_max_length_applies_when_max_new_tokens_is_off():
    from lmf.chat.engine import GenerationSettings, MessageError

    assert GenerationSettings(max_new_tokens=64, max_length=100).reply_budget(90) == 64
    assert GenerationSettings(max_new_tokens=0, max_length=100).reply_budget(90) == 10
    with pytest.raises(MessageError, match="max_length 100"):
        GenerationSettings(max_new_tokens=0, max_length=100).reply_budget(100)
    with pytest.raises(ConfigError):
        GenerationSettings().updated(max_new_tokens=0, max_length=0)
