"""``lmf expand``: LLaMA-Pro block expansion (LLaMA-Factory's ``scripts/llama_pro.py`` / ``expand.sh``).

    lmf expand --model_name_or_path PATH --output_dir OUT --num_expand N

After every ``L / N`` decoder layers a copy of the last one is inserted whose ``o_proj`` and ``down_proj``
are zero: an identity block (its attention and MLP add nothing to the residual stream), so the expanded
model computes exactly what the original did. Train only the copies with ``finetuning_type: freeze``,
``freeze_trainable_layers: N`` and ``use_llama_pro: true``. Unlike LLaMA-Factory's script, configs with
per-layer ``layer_types`` (Qwen2/3, Gemma, ...) get the copies' types inserted too. The folder is written
to a temporary folder and renamed; an existing non-empty ``output_dir`` is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile

from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

#: Weights of a copied layer that are zeroed, so that the copy is an identity block.
ZEROED = ("o_proj", "down_proj")


def expanded_layer_ids(num_layers: int, num_expand: int) -> list[int]:
    """Indices, in the expanded model, of the inserted copies (what ``use_llama_pro`` trains)."""
    stride = (num_layers + num_expand) // num_expand
    return list(range(stride - 1, num_layers + num_expand, stride))


def expand_state_dict(state: dict, num_layers: int, num_expand: int) -> dict:
    """The expanded model's weights (see the module docstring)."""
    import torch

    split = num_layers // num_expand
    pattern = re.compile(r"\.layers\.(\d+)\.")
    by_layer: dict[int, dict] = {}
    out = {}
    for key, value in state.items():
        match = pattern.search(key)
        if match is None:
            out[key] = value
        else:
            by_layer.setdefault(int(match.group(1)), {})[key] = value
    new_index = 0
    for i in range(num_layers):
        layer = by_layer.get(i, {})
        for key, value in layer.items():
            out[key.replace(f".layers.{i}.", f".layers.{new_index}.")] = value
        new_index += 1
        if (i + 1) % split == 0:
            for key, value in layer.items():
                copy = torch.zeros_like(value) if any(z in key for z in ZEROED) else value.clone()
                out[key.replace(f".layers.{i}.", f".layers.{new_index}.")] = copy
            new_index += 1
    return out


def expand_config(config: dict, num_expand: int) -> dict:
    """``num_hidden_layers`` grown by ``num_expand``; a ``layer_types`` list gets each copy's type."""
    num_layers = config["num_hidden_layers"]
    new = dict(config, num_hidden_layers=num_layers + num_expand)
    if isinstance(config.get("layer_types"), list):
        split = num_layers // num_expand
        types = []
        for i, kind in enumerate(config["layer_types"]):
            types.append(kind)
            if (i + 1) % split == 0:
                types.append(kind)
        new["layer_types"] = types
    return new


def run_expand(argv: list[str]) -> int:
    """The ``lmf expand`` command."""
    parser = argparse.ArgumentParser(prog="lmf expand", description="LLaMA-Pro block expansion of a model.")
    parser.add_argument("--model_name_or_path", "--model", required=True, help="the model folder to expand")
    parser.add_argument("--output_dir", required=True, help="where to write the expanded model (new or empty)")
    parser.add_argument("--num_expand", type=int, required=True, help="how many identity blocks to insert")
    parser.add_argument("--shard_size", default="5GB", help="maximum size of one safetensors file")
    args = parser.parse_args(argv)
    expand_model(args.model_name_or_path, args.output_dir, args.num_expand, args.shard_size)
    print("train the new blocks with: finetuning_type: freeze, freeze_trainable_layers: "
          f"{args.num_expand}, use_llama_pro: true, model_name_or_path: {args.output_dir}")
    return 0


def expand_model(model_dir: str, output_dir: str, num_expand: int, shard_size: str = "5GB") -> str:
    """Write the expanded model of ``model_dir`` into ``output_dir``; returns its absolute path."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(f"--model_name_or_path: {model_dir!r} holds no config.json (a local model folder is needed)")
    with open(config_file, encoding="utf-8") as fh:
        config = json.load(fh)
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_expand < 1 or num_layers % num_expand:
        raise ConfigError(f"--num_expand: {num_expand} must be >= 1 and divide the model's {num_layers} layers")
    target = os.path.abspath(output_dir)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ConfigError(f"--output_dir: {output_dir!r} exists and is not empty; choose a new folder")
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ConfigError(f"--model_name_or_path: {model_dir!r} holds no .safetensors weights")
    state: dict = {}
    for name in files:
        state.update(load_file(os.path.join(model_dir, name)))
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    expanded = expand_state_dict(state, num_layers, num_expand)
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target) or ".")
    try:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(expand_config(config, num_expand), fh, indent=2, sort_keys=True)
        split = split_torch_state_dict_into_shards(expanded, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=shard_size)
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: expanded[k].contiguous() for k in keys}, os.path.join(tmp, filename),
                      metadata={"format": "pt"})
        if split.is_sharded:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
                json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, fh, indent=2,
                          sort_keys=True)
        for extra in ("generation_config.json",):
            if os.path.isfile(os.path.join(model_dir, extra)):
                shutil.copy2(os.path.join(model_dir, extra), tmp)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
        if os.path.isdir(target):
            os.rmdir(target)  # empty (checked above)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("expanded %s: %d -> %d layers (identity copies at %s) in %s", model_dir, num_layers,
                num_layers + num_expand, expanded_layer_ids(num_layers, num_expand), target)
    return target
