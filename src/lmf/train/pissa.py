"""PiSSA outputs (``pissa_convert``), in LLaMA-Factory's layout.

A PiSSA adapter trains on the *residual* base ``W - s*B0@A0`` (``A0, B0``: the principal components it was
initialised with), so on the original base it is only right once converted: with ``A' = [A; A0]``,
``B' = [B, -B0]`` and the rank doubled, ``W + s*(B@A - B0@A0)`` is exactly the trained model. lmf writes
``output_dir/pissa_init`` (the initial adapter) before the first step and ``output_dir/pissa_converted``
with the final adapter; ``output_dir`` itself holds the PiSSA-form adapter, as in LLaMA-Factory. Both
folders are written to a temporary folder and renamed; ``pissa_init`` of an earlier run is kept on resume.
"""

from __future__ import annotations

import json
import math
import os
import shutil

from lmf.extras.logging import get_logger

logger = get_logger(__name__)

INIT_DIR, CONVERTED_DIR = "pissa_init", "pissa_converted"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def save_initial_adapter(model, output_dir: str) -> None:
    """Write the adapter as initialised (``model.pissa_initial_state``) to ``output_dir/pissa_init`` (rank 0)."""
    target = os.path.join(output_dir, INIT_DIR)
    if os.path.isfile(os.path.join(target, ADAPTER_WEIGHTS)):
        logger.info("PiSSA: keeping the initial adapter of this run in %s", target)
        return
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=model.pissa_initial_state, safe_serialization=True)
    os.replace(tmp, target)
    logger.info("PiSSA: initial adapter saved to %s", target)


def write_converted_adapter(pissa_dir: str, output_dir: str) -> str:
    """Convert the PiSSA adapter in ``pissa_dir`` (with ``output_dir/pissa_init``) into a plain LoRA adapter in
    ``output_dir/pissa_converted``; returns that path."""
    from safetensors.torch import load_file, save_file

    init_dir = os.path.join(output_dir, INIT_DIR)
    trained, initial = load_file(os.path.join(pissa_dir, ADAPTER_WEIGHTS)), load_file(os.path.join(init_dir, ADAPTER_WEIGHTS))
    with open(os.path.join(pissa_dir, ADAPTER_CONFIG), encoding="utf-8") as fh:
        config = json.load(fh)
    converted = convert_state_dict(trained, initial)
    target = os.path.join(output_dir, CONVERTED_DIR)
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(converted, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as fh:
        json.dump(convert_config(config), fh, indent=2, sort_keys=True)
    for name in os.listdir(pissa_dir):  # README, tokenizer files
        if name not in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) and os.path.isfile(os.path.join(pissa_dir, name)):
            shutil.copy2(os.path.join(pissa_dir, name), tmp)
    if os.path.isdir(target):
        shutil.rmtree(target)  # the converted form of an earlier final adapter of this same run
    os.replace(tmp, target)
    logger.info("PiSSA: adapter converted to a plain LoRA for the original base model in %s", target)
    return target


def convert_state_dict(trained: dict, initial: dict) -> dict:
    """``lora_A -> [A; A0]``, ``lora_B -> [B, -B0]``; other weights (modules_to_save) as trained."""
    import torch

    out = {}
    for key, value in trained.items():
        if ".lora_A." in key:
            out[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0).contiguous()
        elif ".lora_B." in key:
            out[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1).contiguous()
        else:
            out[key] = value.contiguous()
    return out


def convert_config(config: dict) -> dict:
    """Rank doubled; alpha scaled so that the LoRA scale stays (x2, or x sqrt 2 with rsLoRA); plain init."""
    factor = math.sqrt(2.0) if config.get("use_rslora") else 2.0
    new = dict(config, r=config["r"] * 2, lora_alpha=config["lora_alpha"] * factor, init_lora_weights=True)
    new["rank_pattern"] = {k: v * 2 for k, v in (config.get("rank_pattern") or {}).items()}
    new["alpha_pattern"] = {k: v * factor for k, v in (config.get("alpha_pattern") or {}).items()}
    return new
