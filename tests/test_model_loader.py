"""Model engine: from_pretrained path, dtype/attention choice, LoRA/full/freeze parameter selection."""

from __future__ import annotations

import logging

import pytest
import torch

from _train_helpers import make_config
from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.model.adapter import count_parameters, find_all_linear_modules
from lmf.model.loader import load_model, load_tokenizer, resolve_attn_implementation, resolve_dtype

torch.set_num_threads(1)
LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _load(model_dir, tmp_path, trainable=True, **kw):
    cfg = make_config(model_dir, str(tmp_path / "out"), **kw)
    return load_model(cfg, load_tokenizer(cfg.model), is_trainable=trainable)


def _trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_lora_all_targets_every_linear_but_the_head(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert find_all_linear_modules(base) == LINEARS
    model = _load(tiny_model_dir, tmp_path, lora_rank=4)
    names = _trainable_names(model)
    assert names and all("lora_" in n for n in names)
    assert not any("lm_head" in n for n in names)
    # rank 4 on 2 layers x (q,k,v,o,gate,up,down): r * (in + out) per adapted linear
    expected = 0
    for name, mod in base.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in LINEARS:
            expected += 4 * (mod.in_features + mod.out_features)
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total == sum(p.numel() for p in base.parameters()) + expected
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_lora_explicit_targets_and_additional_modules(tiny_model_dir, tmp_path):
    model = _load(tiny_model_dir, tmp_path, lora_target="q_proj,v_proj", additional_target="lm_head", lora_dropout=0.05)
    names = _trainable_names(model)
    assert any("lm_head.modules_to_save" in n for n in names)
    assert not any("k_proj" in n or "mlp" in n for n in names)
    with pytest.raises(ConfigError, match="lora_target.*qq_proj"):
        _load(tiny_model_dir, tmp_path, lora_target="q_proj,qq_proj")


def test_freeze_selects_layers_modules_and_extras(tiny_model_dir, tmp_path):
    last = _trainable_names(_load(tiny_model_dir, tmp_path, finetuning_type="freeze", freeze_trainable_layers=1))
    assert last and all(".layers.1." in n for n in last)
    first = _trainable_names(_load(tiny_model_dir, tmp_path, finetuning_type="freeze", freeze_trainable_layers=-1))
    assert first and all(".layers.0." in n for n in first)
    mlp = _trainable_names(_load(tiny_model_dir, tmp_path, finetuning_type="freeze", freeze_trainable_layers=2,
                                 freeze_trainable_modules="mlp", freeze_extra_modules="embed_tokens"))
    assert "model.embed_tokens.weight" in mlp
    assert all(".mlp." in n for n in mlp if n != "model.embed_tokens.weight")
    with pytest.raises(ConfigError, match="freeze_trainable_layers"):
        _load(tiny_model_dir, tmp_path, finetuning_type="freeze", freeze_trainable_layers=5)
    with pytest.raises(ConfigError, match="freeze_extra_modules"):
        _load(tiny_model_dir, tmp_path, finetuning_type="freeze", freeze_extra_modules="nope")


def test_full_trains_everything(tiny_model_dir, tmp_path):
    model = _load(tiny_model_dir, tmp_path, finetuning_type="full")
    trainable, total = count_parameters(model)
    assert trainable == total > 0


def test_gradient_checkpointing_default_on_and_switchable(tiny_model_dir, tmp_path):
    model = _load(tiny_model_dir, tmp_path, finetuning_type="full")
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    off = _load(tiny_model_dir, tmp_path, finetuning_type="full", disable_gradient_checkpointing=True)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in off.model.layers)


def test_bf16_on_cpu_falls_back_to_fp32_with_a_warning(tiny_model_dir, tmp_path):
    records: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Grab()
    logging.getLogger("lmf").addHandler(handler)
    try:
        from lmf.model import loader

        loader._WARNED.discard("cpu-half")
        cfg = make_config(tiny_model_dir, str(tmp_path), bf16=True)
        assert resolve_dtype(cfg, torch.device("cpu"), is_trainable=True) == torch.float32
        assert resolve_dtype(cfg, torch.device("cpu"), is_trainable=True) == torch.float32
    finally:
        logging.getLogger("lmf").removeHandler(handler)
    warnings = [r for r in records if r.levelno == logging.WARNING and "bf16" in r.getMessage()]
    assert len(warnings) == 1 and "float32" in warnings[0].getMessage()
    model = _load(tiny_model_dir, tmp_path, bf16=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_attention_implementation_choice():
    cpu = torch.device("cpu")
    assert resolve_attn_implementation("auto", cpu, torch.float32) == "sdpa"
    assert resolve_attn_implementation("sdpa", cpu, torch.float32) == "sdpa"
    assert resolve_attn_implementation("disabled", cpu, torch.float32) == "eager"
    with pytest.raises(NotAvailableError, match="flash"):
        resolve_attn_implementation("fa2", cpu, torch.bfloat16)


def test_model_path_errors_name_the_key(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="model_name_or_path"):
        _load(str(tmp_path / "does-not-exist"), tmp_path)
    with pytest.raises(ConfigError, match="adapter_name_or_path"):
        _load(tiny_model_dir, tmp_path, trainable=False, adapter_name_or_path=str(tmp_path))


def test_trust_remote_code_needs_auto_map(tiny_model_dir):
    from lmf.config.parser import build_config
    from lmf.model.loader import _trust_remote_code

    args = build_config({"model_name_or_path": tiny_model_dir, "trust_remote_code": True}).model
    assert _trust_remote_code(args, tiny_model_dir) is False  # stock architecture: no custom code runs
    args.trust_remote_code = False
    assert _trust_remote_code(args, tiny_model_dir) is False


def test_inference_load_is_frozen_eval(tiny_model_dir, tmp_path):
    model = _load(tiny_model_dir, tmp_path, trainable=False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_continue_training_an_existing_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from _train_helpers import train_tiny

    first = tmp_path / "first"
    train_tiny(make_config(tiny_model_dir, str(first), max_steps=2, learning_rate=1e-2))
    model = _load(tiny_model_dir, tmp_path, adapter_name_or_path=str(first))
    saved = load_file(str(first / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert count_parameters(model)[0] > 0


def test_llama_architecture_trains(tiny_llama_dir, tmp_path):
    from _train_helpers import losses, train_tiny

    _, state = train_tiny(make_config(tiny_llama_dir, str(tmp_path), max_steps=2))
    assert len(losses(state)) == 2 and (tmp_path / "adapter_model.safetensors").is_file()


def test_reentrant_checkpointing_by_default_except_under_fsdp(tiny_model_dir, tmp_path, monkeypatch, caplog):
    from lmf.model.checkpointing import reentrant_checkpointing as _reentrant_checkpointing

    cfg = make_config(tiny_model_dir, str(tmp_path / "out"))
    assert cfg.model.use_reentrant_gc is True  # LLaMA-Factory's default
    assert _reentrant_checkpointing(cfg)
    assert not _reentrant_checkpointing(make_config(tiny_model_dir, str(tmp_path / "o2"), use_reentrant_gc=False))
    fsdp = make_config(tiny_model_dir, str(tmp_path / "o3"), fsdp="full_shard auto_wrap")
    assert _reentrant_checkpointing(fsdp)  # one process: no sharding
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not _reentrant_checkpointing(fsdp)
    with caplog.at_level(logging.INFO, logger="lmf.model.checkpointing"):
        _load(tiny_model_dir, tmp_path)  # WORLD_SIZE=2 without fsdp: DDP keeps reentrant checkpointing
    assert "use_reentrant=True" in caplog.text


def test_stop_words_a_template_added_get_mean_rows_and_other_new_tokens_need_resize_vocab(tiny_model_dir, tmp_path):
    from lmf.data.template import get_template

    cfg = make_config(tiny_model_dir, str(tmp_path / "o"), template="llama3")
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg, tokenizer, is_trainable=False)
    rows = base.get_input_embeddings().weight.shape[0]
    assert rows == len(tokenizer)  # the tiny model has no spare rows
    get_template("llama3", tokenizer)  # adds <|eot_id|>, <|eom_id|>
    model = load_model(cfg, tokenizer, is_trainable=False)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] >= len(tokenizer) == rows + 2
    for weight, old in ((emb, base.get_input_embeddings().weight), (head, base.get_output_embeddings().weight)):
        torch.testing.assert_close(weight[:rows], old)
        torch.testing.assert_close(weight[rows:], old.mean(0, keepdim=True).expand(weight.shape[0] - rows, -1))
    again = load_model(cfg, tokenizer, is_trainable=False)  # what chat and export load: the same rows
    assert torch.equal(again.get_input_embeddings().weight, emb)

    other = load_tokenizer(cfg.model)
    other.add_special_tokens({"additional_special_tokens": ["<new>"]})  # not from a template
    with pytest.raises(ConfigError, match=r"no row for <new> \(2048\).*set resize_vocab: true"):
        load_model(cfg, other, is_trainable=False)


def test_resize_vocab_trains_the_embeddings_in_the_adapter_as_llamafactory(tiny_model_dir, tmp_path):
    cfg = make_config(tiny_model_dir, str(tmp_path / "o"), resize_vocab=True)
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)
    assert set(model.peft_config["default"].modules_to_save) == {"embed_tokens", "lm_head"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable) and any("lm_head.modules_to_save" in n
                                                                             for n in trainable)
