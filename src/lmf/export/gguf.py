"""GGUF export (``export_gguf: f32 | f16 | bf16 | q8_0``): the exported Hugging Face folder converted into one GGUF
file for llama.cpp and Ollama, with the ``gguf`` package (llama.cpp's own writer, tensor-name maps and quantizers).

What llama.cpp's ``convert_hf_to_gguf.py`` does for these families, done here for the decoders lmf trains most:
Llama / Mistral (architecture ``llama``: the query and key rows permuted from Hugging Face's half-split rotary
layout into llama.cpp's interleaved one), Qwen2 and Qwen3 (``qwen2`` / ``qwen3``: no permutation). Hyper-parameters
from config.json; the byte-level BPE vocabulary with token types (control tokens, user-defined added tokens, padding
rows), merges, special token ids and the chat template through ``gguf.SpecialVocab``; the pre-tokenizer named by its
regular expression (Qwen2's, Llama 3's or GPT-2's), since llama.cpp splits text by that name. 1-D tensors stay
float32 as llama.cpp keeps them. Tensors are read one at a time from the safetensors shards and written as they are
converted: memory is the largest tensor, not the model. Another architecture or tokenizer is refused by name. The file
is written into the export's temporary folder, which ``lmf export`` fsyncs and renames into place.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

#: Hugging Face architecture -> (GGUF architecture name, whether q/k rows are permuted for llama.cpp's rotary layout)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}

#: The split patterns of the byte-level BPE pre-tokenizers llama.cpp knows, by the name it gives them.
PRE_TOKENIZERS = {
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise NotAvailableError("config key 'export_gguf' needs the gguf package (llama.cpp's GGUF writer): "
                                "pip install 'lmf[gguf]'") from None
    return gguf


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name of a byte-level BPE tokenizer's pre-tokenizer, or a ConfigError naming what it is."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part.get("type") == "Split":
            pattern = (part.get("pattern") or {}).get("Regex")
            for name, known in PRE_TOKENIZERS.items():
                if pattern == known:
                    return name
            raise ConfigError("config key 'export_gguf': the tokenizer splits text with a pattern llama.cpp has no "
                              f"name for lmf knows ({pattern!r}); convert the exported folder with llama.cpp's "
                              "convert_hf_to_gguf.py, which lists every pre-tokenizer it supports")
    if any(part.get("type") == "ByteLevel" and part.get("use_regex", True) for part in parts):
        return "gpt-2"
    raise ConfigError("config key 'export_gguf': the tokenizer is not a byte-level BPE tokenizer with a pre-tokenizer "
                      "llama.cpp names (Qwen2, Llama 3, GPT-2); convert the exported folder with llama.cpp's "
                      "convert_hf_to_gguf.py")


def _permute(weights, n_head: int):
    """Hugging Face's rotary halves -> llama.cpp's interleaved pairs (llama.cpp's ``LlamaModel.permute``)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _add_vocabulary(writer, gguf, folder: str, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as fh:
        tokenizer_json = json.load(fh)
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer_json.get("decoder") or {}).get(
            "type") != "ByteLevel":
        raise ConfigError("config key 'export_gguf': lmf writes byte-level BPE vocabularies (Llama 3, Qwen, GPT-2 "
                          "style); this tokenizer is another kind: convert the exported folder with llama.cpp's "
                          "convert_hf_to_gguf.py")
    pre = pre_tokenizer_name(tokenizer_json)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))  # merges, special ids, chat template
    special.add_to_gguf(writer)


def _add_hyper_parameters(writer, config: dict, file_type) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)


def write_gguf(folder: str, out_path: str, gguf_type: str, model_name: str) -> dict[str, Any]:
    """Convert the Hugging Face model ``folder`` into ``out_path`` (``gguf_type`` weights); returns what was written
    (architecture, tensor count, file size)."""
    import numpy as np
    import torch
    from safetensors import safe_open

    from lmf.model.loader import safetensors_files

    gguf = _require_gguf()
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"config key 'export_gguf': GGUF export of {architecture} is not implemented in lmf (it "
                          f"writes {', '.join(sorted(ARCHITECTURES))}); convert the exported folder with llama.cpp's "
                          "convert_hf_to_gguf.py")
    arch, permute = ARCHITECTURES[architecture]
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    quant = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    plain_types = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}

    def plan(hf_name: str, shape: tuple):
        """(GGUF name, ggml type) of one tensor."""
        target = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(f"config key 'export_gguf': {architecture} weight {hf_name!r} has no GGUF name")
        kind = quant if len(shape) > 1 else gguf.GGMLQuantizationType.F32
        if kind == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
            kind = gguf.GGMLQuantizationType.F16  # llama.cpp's fallback for rows that are not whole blocks
        return target, kind

    def converted(hf_name: str, tensor, kind):
        """The tensor as written: permuted where llama.cpp's rotary layout needs it, in ``kind``."""
        data = tensor.to(torch.float32).numpy()
        if permute and hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif permute and hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        if kind in plain_types:
            return data.astype(plain_types[kind], copy=False)
        return gguf.quants.quantize(data, kind)

    files = safetensors_files(folder)
    tensors = []  # (file, Hugging Face name, shape, GGUF name, ggml type) in file order: the header comes first
    for path in files:
        with safe_open(path, framework="pt") as fh:
            for hf_name in fh.keys():
                if not hf_name.endswith("rotary_emb.inv_freq"):
                    shape = tuple(fh.get_slice(hf_name).get_shape())
                    tensors.append((path, hf_name, shape, *plan(hf_name, shape)))
    writer = gguf.GGUFWriter(out_path, arch)  # inside the export's temporary folder, renamed with it
    try:
        writer.add_name(model_name)
        _add_hyper_parameters(writer, config, file_type)
        _add_vocabulary(writer, gguf, folder, config["vocab_size"])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for _, _, shape, target, kind in tensors:
            if kind in plain_types:
                dtype = np.dtype(plain_types[kind])
                writer.add_tensor_info(target, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
                writer.add_tensor_info(target, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for path in files:  # the data, one tensor at a time, each file opened once
            with safe_open(path, framework="pt") as fh:
                for _, hf_name, _, _, kind in (t for t in tensors if t[0] == path):
                    writer.write_tensor_data(converted(hf_name, fh.get_tensor(hf_name), kind))
    finally:
        writer.close()
    return {"architecture": arch, "tensors": len(tensors), "bytes": os.path.getsize(out_path), "type": gguf_type}
