"""mixture_of_depths: a routed layer changes exactly its routed positions, as ``x + w (layer(x) - x)`` over the routed
sub-row at its own positions, never padding while a real position is left; LLaMA-Factory's example trains unchanged
but for the model, saves its routers, and ``load`` serves the trained model; what it does not combine with is refused
naming the keys."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")  # pretrained: its loss falls within a few steps
DATA = os.path.join(REPO_ROOT, "examples", "data")
LF_EXAMPLE = os.path.join(REPO_ROOT, "..", "shared", "lf-examples", "extras", "mod", "llama3_full_sft.yaml")


def _converted(path):
    from transformers import AutoModelForCausalLM

    from lmf.model.mixture_of_depths import convert

    torch.manual_seed(0)
    return convert(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)).train()


def _by_hand(layer, rope, x, index, mask=None):
    """The paper's formula on the routed sub-row, through the layer's class forward (not the routed one)."""
    model_positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    sub = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    pos = model_positions.gather(1, index)
    out = type(layer).forward(layer, sub, attention_mask=mask, position_ids=pos,
                              position_embeddings=rope(sub, pos))
    weight = layer.mod_router(sub)
    expected = x.clone()
    for b in range(x.shape[0]):
        expected[b, index[b]] += weight[b] * (out[b] - sub[b])
    return expected


def test_a_routed_layer_changes_exactly_its_routed_positions_by_the_papers_formula(tiny_llama_dir):
    model = _converted(tiny_llama_dir)
    assert json.loads(model.config.to_json_string())["lmf_mixture_of_depths"] == {"capacity": 0.125, "layers": [1]}
    layer = model.model.layers[1]
    x = torch.randn(2, 32, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32)[None].expand(2, -1)
    with torch.no_grad():
        got = layer(x, position_ids=positions, position_embeddings=model.model.rotary_emb(x, positions))
        routed = layer.mod_router(x).squeeze(-1).topk(4, dim=1).indices.sort(dim=1).values  # int(0.125 * 32) = 4
        torch.testing.assert_close(got, _by_hand(layer, model.model.rotary_emb, x, routed))
    changed = (got != x).any(-1)
    assert changed.sum(1).tolist() == [4, 4] and all(changed[b, routed[b]].all() for b in range(2))
    assert not hasattr(model.model.layers[0], "mod_router")  # layers 1, 3, ...: the package's choice


def test_padding_is_routed_only_when_the_row_has_too_few_real_positions(tiny_llama_dir):
    model = _converted(tiny_llama_dir)
    layer = model.model.layers[1]
    hidden = model.config.hidden_size
    x = torch.randn(2, 32, hidden, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.mod_router.weight.fill_(1.0 / hidden)
        layer.mod_router.bias.zero_()
    keep = torch.ones(2, 32, dtype=torch.bool)
    keep[1, 10:] = False  # row 1: 10 real positions, then padding
    x[1, 10:] += 5.0  # which the router would rank first
    mask = (torch.ones(32, 32, dtype=torch.bool).tril() & keep[:, None, :])[:, None]  # what sdpa_mask builds
    positions = torch.arange(32)[None].expand(2, -1)
    with torch.no_grad():
        got = layer(x, attention_mask=mask, position_ids=positions,
                    position_embeddings=model.model.rotary_emb(x, positions))
    assert torch.equal(got[1, 10:], x[1, 10:]) and (got[1, :10] != x[1, :10]).any(-1).sum() == 4
    with torch.no_grad():
        real_ranked = layer.mod_router(x[1, :10]).squeeze(-1).topk(4).indices.sort().values
    with torch.no_grad():
        real = _by_hand(layer, model.model.rotary_emb, x[1:, :10], real_ranked[None])
    torch.testing.assert_close(got[1:], torch.cat([real, x[1:, 10:]], 1))


@pytest.mark.skipif(not os.path.isfile(LF_EXAMPLE), reason="../shared/lf-examples is not here")
def test_llamafactorys_example_trains_saves_its_routers_and_load_serves_it(tmp_path):
    import yaml
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lmf.chat import create_engine
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.train.workflow import run_training

    with open(LF_EXAMPLE, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    out = tmp_path / "out"
    raw.update(model_name_or_path=DEMO_MODEL, output_dir=str(out), dataset_dir=DATA, max_samples=8, num_train_epochs=4,
               gradient_accumulation_steps=1, per_device_train_batch_size=4, learning_rate=1e-3, warmup_ratio=0,
               cutoff_len=64, preprocessing_num_workers=1, dataloader_num_workers=0, disable_tqdm=True,
               save_steps=100, logging_steps=1, plot_loss=False, preprocessing_cache_dir=str(tmp_path / "c"))
    run_training(build_config(raw))
    history = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert sum(history[-2:]) < sum(history[:2]) - 0.5, history
    config = json.loads((out / "config.json").read_text())
    assert config["lmf_mixture_of_depths"] == {"capacity": 0.125, "layers": [1]}
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        routers = {k: fh.get_tensor(k) for k in fh.keys() if "mod_router" in k}
    assert sorted(routers) == ["model.layers.1.mod_router.bias", "model.layers.1.mod_router.weight"]

    from lmf.model.mixture_of_depths import routes_positions

    with pytest.raises(ConfigError, match=r"convert would replace the trained routers"):
        again = build_config({"model_name_or_path": str(out), "template": "llama3", "finetuning_type": "full",
                              "mixture_of_depths": "convert"})
        load_model(again, load_tokenizer(again.model), is_trainable=True)
    plain = build_config({"model_name_or_path": str(out), "template": "llama3"})
    assert not routes_positions(load_model(plain, load_tokenizer(plain.model), is_trainable=False).config)
    serve = {"model_name_or_path": str(out), "template": "llama3", "mixture_of_depths": "load"}
    cfg = build_config(serve)
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=False)
    torch.testing.assert_close(model.model.layers[1].mod_router.weight.float(),
                               routers["model.layers.1.mod_router.weight"].float())
    dense = AutoModelForCausalLM.from_pretrained(str(out), dtype=model.dtype).eval()  # read as the dense model
    ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-4)
    engine = create_engine(build_config({**serve, "do_sample": False}))
    hello = [{"role": "user", "content": "Who are you?"}]
    reply = engine.chat(hello, max_new_tokens=6)
    ids = torch.tensor([engine.encode(hello)])
    with torch.no_grad():  # greedy by hand, the whole row again at each token (what a routed layer needs)
        for _ in range(reply.completion_tokens):
            ids = torch.cat([ids, engine.model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    generated = ids[0, -reply.completion_tokens:].tolist()
    assert engine.tokenizer.decode(generated, skip_special_tokens=True).strip() == reply.text.strip()


@pytest.mark.parametrize("keys, message", [
    ({"finetuning_type": "lora"}, r"'mixture_of_depths: convert' with finetuning_type lora is not implemented"),
    ({"stage": "dpo"}, r"'mixture_of_depths: convert' with stage dpo is not implemented"),
    ({"stage": "pt"}, r"'mixture_of_depths' and 'packing' / 'neat_packing' do not combine"),
    ({"infer_backend": "vllm"}, r"'mixture_of_depths' and 'infer_backend: vllm'"),
    ({"flash_attn": "fa2"}, r"'mixture_of_depths' and 'flash_attn: fa2'"),
    ({"init_on_meta": True}, r"'init_on_meta' and 'mixture_of_depths: convert' do not combine"),
])
def test_combinations_are_refused_naming_both_keys(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", "mixture_of_depths": "convert", "finetuning_type": "full", **keys})


def test_the_padding_mask_reaches_routed_layers_and_a_sliding_window_hides_no_real_position(tiny_llama_dir):
    from lmf.model.forward import decoder_hidden_states
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.model.mixture_of_depths import _valid_keys

    cfg = build_config({"model_name_or_path": tiny_llama_dir, "template": "qwen", "finetuning_type": "full",
                        "mixture_of_depths": "convert", "disable_gradient_checkpointing": True})
    model = load_model(cfg, load_tokenizer(cfg.model), is_trainable=True)  # padding-free off: one sample per row
    seen = []
    model.model.layers[1].register_forward_pre_hook(lambda m, a, k: seen.append(k.get("attention_mask")),
                                                    with_kwargs=True)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    keep = torch.ones(2, 24, dtype=torch.long)
    keep[1, 10:] = 0  # right padding on CPU: lmf drops this mask for dense models, not for routed ones
    with torch.no_grad():
        decoder_hidden_states(model, ids, attention_mask=keep)
    assert seen and seen[0] is not None
    assert _valid_keys(seen[0], 2, 24).tolist() == keep.bool().tolist()
    pos = torch.arange(32)
    sliding = ((pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < 8))[None, None]
    assert _valid_keys(sliding, 1, 32).all()  # the last row sees 8 keys; every real key is seen by some row


def test_convert_is_for_training_and_load_needs_a_model_trained_so(tiny_llama_dir):
    from lmf.model.loader import load_model, load_tokenizer

    for mode, trainable, message in (("convert", False, r"convert starts new \(untrained\) routers"),
                                     ("load", True, r"load: .* was not trained with mixture_of_depths")):
        cfg = build_config({"model_name_or_path": tiny_llama_dir, "template": "qwen", "mixture_of_depths": mode,
                            "finetuning_type": "full"})
        with pytest.raises(ConfigError, match=message):
            load_model(cfg, load_tokenizer(cfg.model), is_trainable=trainable)


def test_a_kv_cache_and_weights_outside_safetensors_are_refused_naming_the_key(tiny_llama_dir, tmp_path):
    from transformers import DynamicCache

    from lmf.extras.errors import NotAvailableError
    from lmf.model.mixture_of_depths import _router_tensors

    model = _converted(tiny_llama_dir).eval()
    ids = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NotAvailableError, match=r"mixture_of_depths: generation with a KV cache is not implemented"):
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, past_key_values=DynamicCache(config=model.config))
    with pytest.raises(ConfigError, match=r"'mixture_of_depths': load reads the routers from safetensors files"):
        _router_tensors(str(tmp_path))  # e.g. a pytorch_model.bin checkpoint
