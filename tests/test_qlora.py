"""QLoRA: LoRA on a 4-bit (NF4/FP4) or 8-bit bitsandbytes base, on CPU: SFT and DPO train, the adapter reloads
onto a freshly quantized base and generates, resume is exact, export merges in full precision."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("bitsandbytes")

from lmf.config.parser import build_config  # noqa: E402
from lmf.extras.errors import ConfigError, NotAvailableError  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")  # pre-trained on the demo data: LoRA losses fall


def _raw(out: str, **overrides) -> dict:
    raw = dict(model_name_or_path=DEMO_MODEL, dataset_dir=os.path.join(REPO_ROOT, "examples", "data"),
               dataset="identity", template="qwen", cutoff_len=128, max_samples=32, output_dir=out, max_steps=8,
               logging_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-3,
               finetuning_type="lora", quantization_bit=4, save_steps=100, disable_tqdm=True,
               preprocessing_cache_dir=os.path.join(os.path.dirname(out), "cache"))
    raw.update(overrides)
    return raw


def _train(out: str, **overrides) -> list[float]:
    from lmf.train.workflow import run_training

    run_training(build_config(_raw(out, **overrides)))
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]


@pytest.mark.parametrize("extra", [{}, {"quantization_type": "fp4", "double_quantization": False},
                                   {"quantization_bit": 8}, {"use_dora": True}],
                         ids=["nf4", "fp4", "int8", "dora"])
def test_qlora_sft_trains_and_saves_a_peft_adapter(tmp_path, extra):
    out = str(tmp_path / "out")
    losses = _train(out, **extra)
    assert losses[-1] < losses[0] - 0.3, losses
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as fh:
        adapter = json.load(fh)
    assert adapter["peft_type"] == "LORA" and adapter["use_dora"] == bool(extra.get("use_dora"))
    assert set(adapter["target_modules"]) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_quantized_layers_get_peft_forward_not_the_fused_one(tmp_path):
    import bitsandbytes as bnb

    from lmf.model.fused_lora import fused_forward
    from lmf.model.loader import load_model, load_tokenizer

    cfg = build_config(_raw(str(tmp_path / "o")))
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14  # 7 linears x 2 layers, all adapted
    assert not any(getattr(vars(m).get("forward"), "__func__", None) is fused_forward for m in model.modules())
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 and not p.requires_grad for p in norms)


def test_adapter_reloads_onto_a_freshly_quantized_base_and_generates(tmp_path):
    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config

    out = str(tmp_path / "out")
    _train(out)
    engine = create_engine(load_serving_config(["--model", DEMO_MODEL, "--adapter", out, "--template", "qwen",
                                                "quantization_bit=4", "max_new_tokens=8", "do_sample=false"]))
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in engine.model.modules())
    reply = engine.chat([{"role": "user", "content": "hi"}])
    assert reply.completion_tokens > 0


def test_qlora_resume_is_exact(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    reference = _train(full, save_steps=4, lora_dropout=0.1)
    os.makedirs(part)
    shutil.copytree(os.path.join(full, "checkpoint-4"), os.path.join(part, "checkpoint-4"))
    resumed = _train(part, save_steps=4, lora_dropout=0.1)
    assert resumed == reference


def test_an_eval_pass_does_not_change_the_training_gradients(tmp_path):
    """A reference or evaluation forward (eval mode, no grad) must leave the 4-bit weights trainable: on CPUs with
    AVX512-BF16, bitsandbytes would repack them for an inference kernel that has no backward."""
    from lmf.model.loader import load_model, load_tokenizer

    cfg = build_config(_raw(str(tmp_path / "o")))
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)
    ids = torch.randint(0, 1000, (2, 12))

    def grads():
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:1, :1])
    after = grads()
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


def test_qlora_dpo_trains(tmp_path):
    from lmf.train.workflow import run_training

    out = str(tmp_path / "dpo")
    run_training(build_config(_raw(out, stage="dpo", dataset="dpo_en_demo", max_samples=16, cutoff_len=256,
                                   per_device_train_batch_size=2, max_steps=6, learning_rate=5e-3)))
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        history = json.load(fh)["log_history"]
    margins = [h["rewards/margins"] for h in history if "rewards/margins" in h]
    assert len(margins) == 6 and margins[-1] > margins[0]
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


def test_export_merges_in_full_precision_and_refuses_quantization_bit(tmp_path):
    from lmf.export import run_export

    out = str(tmp_path / "out")
    _train(out, max_steps=2)
    with pytest.raises(ConfigError, match="full precision"):
        run_export(["--model", DEMO_MODEL, "--adapter", out, "--template", "qwen", f"export_dir={tmp_path / 'm'}",
                    "quantization_bit=4"])
    assert run_export(["--model", DEMO_MODEL, "--adapter", out, "--template", "qwen",
                       f"export_dir={tmp_path / 'merged'}"]) == 0
    from safetensors.torch import load_file

    weights = load_file(os.path.join(tmp_path / "merged", "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())  # the base's own dtype, not quantized


QOFT_EXAMPLE = os.path.join(REPO_ROOT, "..", "shared", "lf-examples", "extras", "qoft", "llama3_oft_sft_bnb_npu.yaml")


@pytest.mark.skipif(not os.path.isfile(QOFT_EXAMPLE), reason="../shared/lf-examples is not here")
def test_qoft_llamafactorys_example_trains_oft_on_the_4_bit_base_and_reloads_onto_one(tmp_path):
    """OFT on a bitsandbytes-quantized base, through peft's OFT layers over Linear4bit (its 'npu' name aside, the
    example needs no NPU)."""
    import bitsandbytes as bnb
    import yaml
    from peft.tuners.oft.layer import OFTLayer

    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config

    with open(QOFT_EXAMPLE, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    out = str(tmp_path / "out")
    raw.update(_raw(out, max_samples=16, learning_rate=1e-2, cutoff_len=64), dataset=raw["dataset"],
               template=raw["template"], finetuning_type="oft", oft_block_size=raw["oft_block_size"])
    from lmf.train.workflow import run_training

    run_training(build_config(raw))
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        losses = [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.3, losses
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["peft_type"] == "OFT"
    engine = create_engine(load_serving_config(["--model", DEMO_MODEL, "--adapter", out, "--template", "llama3",
                                                "quantization_bit=4", "max_new_tokens=8", "do_sample=false"]))
    adapted = [m for m in engine.model.modules() if isinstance(m, OFTLayer)]
    assert adapted and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in adapted)
    assert engine.chat([{"role": "user", "content": "hi"}]).completion_tokens > 0


def test_configs_that_cannot_work_are_refused():
    from lmf.dist.plan import plan_parallelism

    with pytest.raises(ConfigError, match="finetuning_type: lora"):
        build_config({"model_name_or_path": "m", "quantization_bit": 4, "finetuning_type": "full"})
    with pytest.raises(ConfigError, match="FSDP"):
        plan_parallelism(build_config({"model_name_or_path": "m", "quantization_bit": 4, "fsdp": "full_shard"}), 2)
    with pytest.raises(ConfigError, match="quantization_bit"):
        build_config({"model_name_or_path": "m", "quantization_bit": 3})
    with pytest.raises(ConfigError, match="'quantization_method': hqq is not implemented"):
        build_config({"model_name_or_path": "m", "quantization_bit": 4, "quantization_method": "hqq"})


def test_without_bitsandbytes_the_error_says_what_to_install(monkeypatch):
    import importlib.util

    from lmf.model.quantization import quantization_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(NotAvailableError, match=r"pip install 'lmf\[qlora\]'"):
        quantization_config(build_config({"model_name_or_path": "m", "quantization_bit": 4}), torch.float32)


@pytest.mark.slow
def test_qlora_under_ddp_two_processes(tmp_path):
    from test_e2e_sft import run_lmf

    out = tmp_path / "ddp"
    proc = run_lmf("sft", "examples/demo_lora_sft.yaml", f"output_dir={out}", "quantization_bit=4", "max_steps=4",
                   "max_samples=16", "logging_steps=1", env_extra={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "parallel=ddp" in proc.stderr and "QLoRA" in proc.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["world_size"] == 2


def test_a_checkpoint_saved_in_4bit_trains_when_quantization_bit_names_its_bits(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    saved = str(tmp_path / "nf4")
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), device_map={"": "cpu"})
    model.save_pretrained(saved)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO_MODEL, name), saved)
    with pytest.raises(ConfigError, match=r"saved quantized by bitsandbytes in 4-bit; set quantization_bit: 4"):
        _train(str(tmp_path / "no-bit"), model_name_or_path=saved, quantization_bit=None)
    losses = _train(str(tmp_path / "out"), model_name_or_path=saved)
    assert losses[-1] < losses[0] - 0.3, losses


def test_checkpoints_quantized_by_other_methods_are_refused_by_name(tmp_path):
    saved = tmp_path / "gptq"
    shutil.copytree(DEMO_MODEL, saved)
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotAvailableError, match=r"pre-quantized gptq checkpoint.*not implemented.*quantization_bit: 4"):
        _train(str(tmp_path / "out"), model_name_or_path=str(saved), quantization_bit=None)


def test_qlora_reward_model_trains(tmp_path):
    from lmf.train.workflow import run_training

    out = str(tmp_path / "rm")
    run_training(build_config(_raw(out, stage="rm", dataset="dpo_en_demo", max_samples=16, cutoff_len=256,
                                   per_device_train_batch_size=2, max_steps=6, learning_rate=5e-3)))
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        history = json.load(fh)["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3, losses
    assert all(os.path.isfile(os.path.join(out, f)) for f in ("adapter_model.safetensors", "value_head.safetensors"))


def test_a_full_dpo_run_scores_with_a_4_bit_reference(tmp_path, caplog):
    import logging

    from lmf.model.loader import load_tokenizer
    from lmf.train.reference import load_reference_model
    from lmf.train.workflow import run_training

    out = str(tmp_path / "dpo")
    raw = _raw(out, stage="dpo", dataset="dpo_en_demo", max_samples=8, cutoff_len=128, max_steps=2,
               finetuning_type="full", quantization_bit=None, learning_rate=1e-4, ref_model_quantization_bit=4)
    cfg = build_config(raw)
    ref = load_reference_model(cfg, load_tokenizer(cfg.model), device=torch.device("cpu"))
    assert {type(m).__name__ for m in ref.modules()} >= {"Linear4bit"}
    with caplog.at_level(logging.INFO, logger="lmf"):
        run_training(cfg)
    assert "loading the frozen reference model from" in caplog.text and "in 4 bits" in caplog.text
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        logged = [h for h in json.load(fh)["log_history"] if "loss" in h]
    assert len(logged) == 2 and all(h["loss"] == h["loss"] for h in logged)
    # a 4-bit reference is not the policy: the first step's rewards are not all zero, as they are with an exact copy
    assert any(abs(h.get("rewards/chosen", 0.0)) > 0 for h in logged[:1])


@pytest.mark.parametrize("keys, message", [
    ({"finetuning_type": "lora"}, r"'ref_model_quantization_bit' and 'finetuning_type'.*set ref_model"),
    ({"stage": "sft"}, r"'ref_model_quantization_bit' quantizes the reference model of dpo and kto"),
    ({"pref_loss": "simpo"}, r"'ref_model_quantization_bit' and 'pref_loss': simpo uses no reference"),
])
def test_a_quantized_reference_without_a_separate_reference_is_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", "stage": "dpo", "finetuning_type": "full",
                      "ref_model_quantization_bit": 4, **keys})
