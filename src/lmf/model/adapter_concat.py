"""Several LoRA adapters as one: what a server that applies one adapter per request (vLLM) needs for
``adapter_name_or_path: a,b``.

LoRA adapters on the same base add: applying ``a`` then ``b`` (or merging both, as the huggingface backend does)
gives ``W + s_a B_a A_a + s_b B_b A_b`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). Stacking the
ranks, ``A = [A_a; A_b]`` and ``B = [s_a B_a, s_b B_b]`` with scale 1 (``lora_alpha = r = r_a + r_b``), is the
same sum exactly; a module one adapter does not adapt gets zeros in its block. Adapters that are not plain LoRA
(DoRA, ``modules_to_save``, embedding LoRA, per-module rank or alpha patterns, biases) are refused with the key
to change.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from lmf.extras.errors import ConfigError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _read(path: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG), encoding="utf-8") as fh:
        config = json.load(fh)
    weights_path = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights_path):
        raise ConfigError(f"config key 'adapter_name_or_path': {path!r} has no {WEIGHTS}")
    return config, load_file(weights_path)


def _check_plain_lora(path: str, config: dict, weights: dict) -> None:
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')}")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora)")
    if config.get("modules_to_save"):
        problems.append("modules_to_save (additional_target)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module rank_pattern / alpha_pattern")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config.get('bias')!r}")
    other = [k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if other:
        problems.append(f"weights other than lora_A / lora_B ({other[0]})")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "eva")):
        problems.append(f"init_lora_weights {init!r} (its base model is changed too)")
    for key in ("lora_bias", "trainable_token_indices", "layers_to_transform", "exclude_modules", "layer_replication"):
        if config.get(key):
            problems.append(key)
    if problems:
        raise ConfigError(f"config key 'adapter_name_or_path': {path!r} cannot be served together with other adapters "
                          f"({', '.join(problems)}); merge the adapters first with `lmf export`")


def _scale(config: dict) -> float:
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _modules(weights: dict) -> set[str]:
    return {k[: -len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")}


def concatenate_lora_adapters(paths: list[str], out_dir: str) -> str:
    """Write one LoRA adapter to ``out_dir`` equal to the sum of the adapters at ``paths``; returns ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    read = [(p, *_read(p)) for p in paths]
    bases = {c.get("base_model_name_or_path") for _, c, _ in read}
    for path, config, weights in read:
        _check_plain_lora(path, config, weights)
    if len({os.path.basename(os.path.normpath(b)) for b in bases if b}) > 1:
        raise ConfigError(f"config key 'adapter_name_or_path': the adapters were trained on different base models "
                          f"({', '.join(sorted(b for b in bases if b))}); they cannot be served together")
    modules = sorted(set().union(*(_modules(w) for _, _, w in read)))
    ranks = [c["r"] for _, c, _ in read]
    total = sum(ranks)
    merged: dict[str, torch.Tensor] = {}
    for module in modules:
        shapes = next((w[f"{module}.lora_A.weight"].shape[1], w[f"{module}.lora_B.weight"].shape[0], w[f"{module}.lora_A.weight"].dtype)
                      for _, _, w in read if f"{module}.lora_A.weight" in w)
        in_features, out_features, dtype = shapes
        blocks_a, blocks_b = [], []
        for (_, config, weights), r in zip(read, ranks):
            a, b = weights.get(f"{module}.lora_A.weight"), weights.get(f"{module}.lora_B.weight")
            if a is None:
                a, b = torch.zeros(r, in_features, dtype=dtype), torch.zeros(out_features, r, dtype=dtype)
            blocks_a.append(a)
            blocks_b.append((b.double() * _scale(config)).to(b.dtype))
        merged[f"{module}.lora_A.weight"] = torch.cat(blocks_a, dim=0).contiguous()
        merged[f"{module}.lora_B.weight"] = torch.cat(blocks_b, dim=1).contiguous()
    targets = sorted(set().union(*(_targets(c) for _, c, _ in read)))
    config = dict(read[0][1], r=total, lora_alpha=total, use_rslora=False, target_modules=targets,
                  rank_pattern={}, alpha_pattern={}, lora_dropout=0.0)
    if len(bases) == 1:
        config["base_model_name_or_path"] = bases.pop()
    os.makedirs(out_dir, exist_ok=True)
    save_file(merged, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return out_dir


def _targets(config: dict) -> set[str]:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise ConfigError(f"an adapter with a regular-expression target_modules ({targets!r}) cannot be combined; "
                          "merge the adapters first with `lmf export`")
    return set(targets)


def combined_adapter(paths: list[str], work_dir: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``(adapter path, temporary folder to delete or None)``: the one adapter, or the adapters stacked into a
    temporary one."""
    if len(paths) == 1:
        return paths[0], None
    import tempfile

    import shutil

    tmp = tempfile.mkdtemp(prefix="lmf-adapters-", dir=work_dir)
    try:
        return concatenate_lora_adapters(paths, os.path.join(tmp, "combined")), tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def lora_rank(path: str) -> int:
    """``r`` of the adapter at ``path``."""
    with open(os.path.join(path, CONFIG), encoding="utf-8") as fh:
        return int(json.load(fh).get("r", 0))
