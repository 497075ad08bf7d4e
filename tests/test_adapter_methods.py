"""PiSSA (pissa_init / pissa_iter / pissa_convert) and OFT (finetuning_type: oft): what each is for, LF's
example YAMLs unchanged but for the model path, adapters that peft loads and ``lmf export`` merges."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")
DATA = os.path.join(REPO_ROOT, "examples", "data")
LF_EXTRAS = os.path.join(REPO_ROOT, "..", "shared", "lf-examples", "extras")


def _raw(out, **overrides) -> dict:
    raw = dict(model_name_or_path=DEMO_MODEL, dataset_dir=DATA, dataset="identity", template="qwen", cutoff_len=128,
               max_samples=32, output_dir=str(out), max_steps=6, logging_steps=1, per_device_train_batch_size=4,
               gradient_accumulation_steps=2, learning_rate=5e-3, finetuning_type="lora", lora_target="all",
               save_steps=100, disable_tqdm=True, preprocessing_cache_dir=os.path.join(os.path.dirname(str(out)), "c"))
    raw.update(overrides)
    return raw


def _losses(out) -> list[float]:
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
        return [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]


def _base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL).eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _with_adapter(path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(), str(path)).eval()


IDS = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))


def _lf_example(path: str, out, **overrides) -> dict:
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw.update(model_name_or_path=DEMO_MODEL, output_dir=str(out), dataset_dir=DATA, max_samples=16, max_steps=4,
               preprocessing_num_workers=1, per_device_train_batch_size=4, gradient_accumulation_steps=1,
               bf16=False, report_to="none", plot_loss=False, save_steps=100, logging_steps=1, disable_tqdm=True,
               preprocessing_cache_dir=os.path.join(os.path.dirname(str(out)), "c"))
    raw.update(overrides)
    return raw


# ---------------------------------------------------------------------------------------------------- PiSSA
def test_pissa_starts_at_the_base_model_and_trains_the_principal_components(tmp_path):
    from lmf.model.loader import load_model, load_tokenizer

    cfg = build_config(_raw(tmp_path / "o", pissa_init=True, pissa_iter=-1))
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True).eval()
    # residual base + B0 A0 = the original weights: the model starts exactly where the base is
    torch.testing.assert_close(_logits(model, IDS), _logits(_base(), IDS), atol=1e-4, rtol=1e-4)
    a = next(p for n, p in model.named_parameters() if "q_proj.lora_A" in n)
    assert float(a.abs().sum()) > 0  # not LoRA's zero-product start: A and B both hold singular vectors
    b = next(p for n, p in model.named_parameters() if "q_proj.lora_B" in n)
    assert float(b.abs().sum()) > 0


@pytest.mark.parametrize("pissa_iter", [-1, 4])
def test_pissa_convert_gives_a_plain_lora_that_reproduces_the_trained_model(tmp_path, pissa_iter):
    from _train_helpers import make_config, tokenized_sft_rows, train_tiny
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    rows = tokenized_sft_rows(AutoTokenizer.from_pretrained(DEMO_MODEL), n=8)
    cfg = make_config(DEMO_MODEL, str(out), pissa_init=True, pissa_iter=pissa_iter, pissa_convert=True,
                      lora_target="all", max_steps=4)
    trainer, state = train_tiny(cfg, rows=rows)
    trainer.model.eval()
    trained = _logits(trainer.model, IDS)
    for sub in ("pissa_init", "pissa_converted"):
        assert os.path.isfile(out / sub / "adapter_model.safetensors"), sub
    with open(out / "pissa_converted" / "adapter_config.json", encoding="utf-8") as fh:
        converted_cfg = json.load(fh)
    assert converted_cfg["r"] == 16 and converted_cfg["lora_alpha"] == 32 and converted_cfg["init_lora_weights"] is True
    converted = _with_adapter(out / "pissa_converted")
    torch.testing.assert_close(_logits(converted, IDS), trained, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(trained, _logits(_base(), IDS), atol=1e-3)  # it did train


def test_raw_randomised_pissa_adapters_are_refused_where_they_would_be_wrong(tmp_path):
    from lmf.export import run_export
    from lmf.train.workflow import run_training

    out = tmp_path / "out"
    run_training(build_config(_raw(out, pissa_init=True, pissa_iter=2, pissa_convert=True, max_steps=2)))
    with pytest.raises(ConfigError, match="PiSSA adapter.*pissa_converted"):
        run_export(["--model", DEMO_MODEL, "--adapter", str(out), "--template", "qwen",
                    f"export_dir={tmp_path / 'bad'}"])
    assert not (tmp_path / "bad").exists()
    assert run_export(["--model", DEMO_MODEL, "--adapter", str(out / "pissa_converted"), "--template", "qwen",
                       f"export_dir={tmp_path / 'merged'}"]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(_logits(merged, IDS), _logits(_with_adapter(out / "pissa_converted"), IDS),
                               atol=1e-4, rtol=1e-4)


def test_pissa_resume_rebuilds_the_same_residual(tmp_path):
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.train.process import set_seed

    cfg = build_config(_raw(tmp_path / "o", pissa_init=True, pissa_iter=4))
    states = []
    for _ in range(2):
        set_seed(cfg.training.seed)  # what run_training does before loading the model
        model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_llamafactory_pissa_example_runs(tmp_path):
    from lmf.train.workflow import run_training

    out = tmp_path / "lf"
    run_training(build_config(_lf_example(os.path.join(LF_EXTRAS, "pissa", "llama3_lora_sft.yaml"), out,
                                          learning_rate=5e-3)))
    assert (out / "pissa_converted" / "adapter_model.safetensors").is_file()
    losses = _losses(out)
    assert losses[-1] < losses[0]


def test_pissa_refusals():
    base = {"model_name_or_path": "m", "pissa_init": True}
    for change, message in (({"quantization_bit": 4}, "quantized base"), ({"stage": "dpo"}, "reference model"),
                            ({"stage": "kto"}, "reference model"), ({"use_dora": True}, "use_dora"),
                            ({"pissa_iter": 0}, "pissa_iter"), ({"finetuning_type": "full"}, "needs finetuning_type"),
                            ({"adapter_name_or_path": "a"}, "create_new_adapter")):
        with pytest.raises(ConfigError, match=message):
            build_config({**base, **change})
    with pytest.raises(ConfigError, match="pissa_convert' needs pissa_init"):
        build_config({"model_name_or_path": "m", "pissa_convert": True})


# ---------------------------------------------------------------------------------------------------- OFT
def test_oft_trains_an_orthogonal_adapter_that_peft_loads_and_export_merges(tmp_path):
    from lmf.export import run_export
    from lmf.train.workflow import run_training

    out = tmp_path / "oft"
    run_training(build_config(_raw(out, finetuning_type="oft", oft_block_size=16, oft_target="all",
                                   learning_rate=2e-2, max_steps=8)))
    losses = _losses(out)
    assert losses[-1] < losses[0] - 0.1, losses
    with open(out / "adapter_config.json", encoding="utf-8") as fh:
        adapter = json.load(fh)
    assert adapter["peft_type"] == "OFT" and adapter["oft_block_size"] == 16
    assert set(adapter["target_modules"]) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
    loaded = _with_adapter(out)
    # OFT multiplies the frozen weights by a learned block-diagonal rotation R (peft's Cayley-Neumann series: R is
    # orthogonal up to the series' truncation), which keeps the angles between neurons
    rotation = loaded.base_model.model.model.layers[0].self_attn.q_proj.oft_R["default"].get_weight().detach()
    eye = torch.eye(rotation.shape[-1])
    moved = float((rotation - eye).abs().max())
    off_orthogonal = float((rotation.T @ rotation - eye).abs().max())
    assert moved > 0.05 and off_orthogonal < moved / 3, (moved, off_orthogonal)
    assert run_export(["--model", DEMO_MODEL, "--adapter", str(out), "--template", "qwen",
                       f"export_dir={tmp_path / 'merged'}"]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(_logits(merged, IDS), _logits(loaded, IDS), atol=1e-4, rtol=1e-4)


def test_oft_resumes_from_its_adapter_and_its_llamafactory_example_runs(tmp_path):
    from lmf.train.workflow import run_training

    out = tmp_path / "lf"
    run_training(build_config(_lf_example(os.path.join(LF_EXTRAS, "oft", "llama3_oft_sft.yaml"), out,
                                          learning_rate=2e-2)))
    assert (out / "adapter_model.safetensors").is_file()
    more = tmp_path / "more"
    run_training(build_config(_raw(more, finetuning_type="oft", adapter_name_or_path=str(out), max_steps=2)))
    with open(more / "adapter_config.json", encoding="utf-8") as fh:
        assert json.load(fh)["peft_type"] == "OFT"


def test_oft_refusals():
    with pytest.raises(ConfigError, match="set exactly one"):
        build_config({"model_name_or_path": "m", "finetuning_type": "oft", "oft_rank": 4})
    with pytest.raises(ConfigError, match="use_dora' needs finetuning_type: lora"):
        build_config({"model_name_or_path": "m", "finetuning_type": "oft", "use_dora": True})
    assert build_config({"model_name_or_path": "m", "finetuning_type": "oft", "quantization_bit": 4})  # QOFT
    cfg = build_config({"model_name_or_path": "m", "finetuning_type": "oft", "oft_rank": 4, "oft_block_size": 0})
    assert cfg.finetuning.oft_rank == 4
