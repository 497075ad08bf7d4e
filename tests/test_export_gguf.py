"""export_gguf: the exported model as a GGUF file, read back with the gguf package (llama.cpp's reader) and compared
with the Hugging Face weights, vocabulary and chat template; the Ollama Modelfile beside it; GPTQ refused saying why."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.torch import load_file

from lmf.config.parser import build_config
from lmf.export import run_export
from lmf.extras.errors import ConfigError

gguf = pytest.importorskip("gguf")


def _rope(x: np.ndarray, interleaved: bool, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Rotary embedding of ``x`` [positions, head_dim]: pairs (i, i + d/2) as Hugging Face rotates them, or (2i, 2i+1)
    as llama.cpp's non-NeoX rope does."""
    d = x.shape[-1]
    angles = positions[:, None] * base ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    a, b = (x[:, 0::2], x[:, 1::2]) if interleaved else (x[:, : d // 2], x[:, d // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if interleaved:
        out[:, 0::2], out[:, 1::2] = ra, rb
    else:
        out[:, : d // 2], out[:, d // 2:] = ra, rb
    return out


def _tensor(reader, name: str) -> np.ndarray:
    t = next(t for t in reader.tensors if t.name == name)
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    done = {}
    for arch, model, template in (("qwen3", tiny_model_dir, "qwen"), ("llama", tiny_llama_dir, "llama3")):
        for kind in ("f32", "q8_0"):
            target = out / f"{arch}-{kind}"
            assert run_export(["--model", model, "--template", template, f"export_dir={target}",
                               f"export_gguf={kind}"]) == 0
            done[arch, kind] = target
    return done


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_gguf_holds_the_exported_weights(exports, arch):
    config = json.loads((exports[arch, "f32"] / "config.json").read_text())
    hf = load_file(str(exports[arch, "f32"] / "model.safetensors"))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN3,
                                        config["num_hidden_layers"])
    for kind, tolerance in (("f32", 0.0), ("q8_0", 1 / 100)):
        reader = gguf.GGUFReader(str(exports[arch, kind] / f"model-{kind}.gguf"))
        assert len(reader.tensors) == len(hf)
        for name, weight in hf.items():
            ours = _tensor(reader, name_map.get_name(name, try_suffixes=(".weight", ".bias")))
            expected = weight.float().numpy()
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                assert not np.allclose(ours, expected)  # permuted for llama.cpp's rotary layout (below)
                continue
            scale = float(np.abs(expected).max()) or 1.0
            assert np.abs(ours - expected).max() <= tolerance * scale, (kind, name)


def test_llama_query_key_permutation_keeps_the_attention_scores(exports):
    """llama.cpp rotates interleaved pairs: with the permuted q/k rows its scores equal Hugging Face's."""
    config = json.loads((exports["llama", "f32"] / "config.json").read_text())
    hf = load_file(str(exports["llama", "f32"] / "model.safetensors"))
    reader = gguf.GGUFReader(str(exports["llama", "f32"] / "model-f32.gguf"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    d = config["hidden_size"] // heads
    x = np.random.default_rng(0).standard_normal((5, config["hidden_size"])).astype(np.float32)
    positions = np.arange(5, dtype=np.float64)
    scores = {}
    for side, (q_name, k_name) in {"hf": ("model.layers.0.self_attn.q_proj.weight",
                                          "model.layers.0.self_attn.k_proj.weight"),
                                   "gguf": ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}.items():
        wq, wk = (hf[q_name].float().numpy(), hf[k_name].float().numpy()) if side == "hf" else \
            (_tensor(reader, q_name), _tensor(reader, k_name))
        q = (x @ wq.T).reshape(5, heads, d)
        k = (x @ wk.T).reshape(5, kv_heads, d)
        interleaved = side == "gguf"
        scores[side] = np.stack([_rope(q[:, h], interleaved, positions) @ _rope(k[:, h * kv_heads // heads],
                                                                               interleaved, positions).T
                                 for h in range(heads)])
    np.testing.assert_allclose(scores["gguf"], scores["hf"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_gguf_metadata_vocabulary_and_chat_template(exports, arch):
    from transformers import AutoTokenizer

    folder = exports[arch, "q8_0"]
    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    reader = gguf.GGUFReader(str(folder / "model-q8_0.gguf"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    gguf_arch = "llama" if arch == "llama" else "qwen3"
    assert field("general.architecture") == gguf_arch
    assert field(f"{gguf_arch}.block_count") == config["num_hidden_layers"]
    assert field(f"{gguf_arch}.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(f"{gguf_arch}.embedding_length") == config["hidden_size"]
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    tokens = field("tokenizer.ggml.tokens")
    vocab = tokenizer.get_vocab()
    assert len(tokens) == config["vocab_size"] and all(tokens[i] == t for t, i in vocab.items() if i < len(tokens))
    types = field("tokenizer.ggml.token_type")
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types[vocab[tokens[300]]] == gguf.TokenType.NORMAL
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.ggml.pre") == "gpt-2"  # the tiny models' tokenizers split as GPT-2 does
    assert len(field("tokenizer.ggml.merges")) > 100
    assert field("tokenizer.chat_template") == tokenizer.chat_template  # lmf's template, as training rendered it
    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile and f'PARAMETER stop "{tokenizer.eos_token}"' in modelfile


@pytest.mark.parametrize("style, name", [("qwen2", "qwen2"), ("llama3", "llama-bpe"), ("gpt2", "gpt-2")])
def test_pre_tokenizer_is_named_by_its_pattern(style, name):
    from lmf.export.gguf import pre_tokenizer_name
    from lmf.testing.tiny import build_tokenizer

    tokenizer = build_tokenizer(vocab_size=300, style=style)
    assert pre_tokenizer_name(json.loads(tokenizer.backend_tokenizer.to_str())) == name


def test_refusals_name_what_is_missing(exports, tmp_path):
    from lmf.export.gguf import pre_tokenizer_name, write_gguf

    folder = tmp_path / "other"
    folder.mkdir()
    config = json.loads((exports["qwen3", "f32"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architectures=["GemmaForCausalLM"])))
    with pytest.raises(ConfigError, match="GGUF export of GemmaForCausalLM is not implemented.*convert_hf_to_gguf"):
        write_gguf(str(folder), str(folder / "m.gguf"), "f16", "m")
    assert not (folder / "m.gguf").exists() and not (folder / "m.gguf.partial").exists()
    odd = {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[a-z]+"}}}
    with pytest.raises(ConfigError, match="pattern llama.cpp has no name for lmf knows"):
        pre_tokenizer_name(odd)
    with pytest.raises(ConfigError, match="'export_gguf': 'q4' is not allowed"):
        build_config({"model_name_or_path": "m", "export_gguf": "q4"})
    with pytest.raises(ConfigError, match="GPTQ quantizes on a CUDA GPU only.*export_gguf: q8_0"):
        build_config({"model_name_or_path": "m", "export_quantization_bit": 4})


def test_modelfile_without_gguf_points_at_the_folder(exports, tiny_model_dir, tmp_path):
    run_export(["--model", tiny_model_dir, "--template", "qwen", f"export_dir={tmp_path / 'hf'}"])
    text = (tmp_path / "hf" / "Modelfile").read_text()
    assert "\nFROM .\n" in text and not any(p.endswith(".gguf") for p in os.listdir(tmp_path / "hf"))
    assert text.endswith("PARAMETER num_ctx 4096\n") and 'SYSTEM """You are Qwen, created by Alibaba Cloud.' in text


def test_modelfile_equals_llamafactory_for_every_template():
    """The Modelfile text of LLaMA-Factory 0.9.5's export for each of its templates (bench/lf_modelfile_golden.py),
    but for the comment line; ChatGLM3 and Yuan, where its export stops ("Dict is not supported."), get the named
    tokens' text; phi_small keeps its prefix token (lmf's template registry keeps it in training too)."""
    from transformers import AutoTokenizer

    from lmf.data.template import TEMPLATES, get_template
    from lmf.data.template.ollama import ollama_modelfile

    with open(os.path.join(os.path.dirname(__file__), "fixtures", "lf_golden", "ollama_modelfiles.json"),
              encoding="utf-8") as fh:
        golden = json.load(fh)
    tokenizer_dir = os.path.join(os.path.dirname(os.path.dirname(__file__)), golden["tokenizer"])
    compared = 0
    for name, expected in golden["templates"].items():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        ours = ollama_modelfile(get_template(name, tokenizer), tokenizer)
        if isinstance(expected, dict):
            assert "Dict is not supported" in expected["error"] and ("[gMASK]" in ours or "<eod>" in ours), name
            continue
        if name == "phi_small":  # its prefix token, which LLaMA-Factory drops and lmf trains with (template registry)
            expected = expected.replace('TEMPLATE """', 'TEMPLATE """<|endoftext|>', 1)
        assert ours.split("\n", 1)[1] == expected.split("\n", 1)[1], name
        compared += 1
    assert compared == len(golden["templates"]) - 2 and set(golden["templates"]) <= set(TEMPLATES)
