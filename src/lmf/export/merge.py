"""``lmf export``: merge LoRA adapter(s) into the base model and write a standalone HF model folder.

``lmf export CONFIG.yaml`` (or ``--model PATH --adapter PATH --template NAME export_dir=OUT``).
The folder holds safetensors shards of at most ``export_size`` GB, config.json, a
generation_config.json whose eos ids are the template's stop tokens, and the tokenizer with a
chat template that renders prompts exactly as training did, an Ollama ``Modelfile`` and, with ``export_gguf``, a GGUF
file (:mod:`lmf.export.gguf`). It is written to a temporary folder
next to ``export_dir``, fsynced and renamed into place; a non-empty ``export_dir`` is refused unless
``export_overwrite: true``.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

from lmf.config.parser import split_list
from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


def check_export_target(export_dir: str | None, overwrite: bool) -> str:
    """Absolute path of ``export_dir``; refuses a non-empty folder (unless ``overwrite``) or a file."""
    if not export_dir:
        raise ConfigError("config key 'export_dir' is required: where to write the merged model")
    target = os.path.abspath(export_dir)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(f"config key 'export_dir': {export_dir!r} is a file, expected a directory")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise ConfigError(f"config key 'export_dir': {export_dir!r} is not empty; "
                          "set export_overwrite: true to replace it")
    return target


def check_adapter_paths(adapter_name_or_path: str | None) -> list[str]:
    """The adapter folders, each checked for an adapter_config.json (errors name the path)."""
    paths = split_list(adapter_name_or_path)
    for path in paths:
        if not os.path.isdir(path):
            raise ConfigError(f"config key 'adapter_name_or_path': adapter directory {path!r} does not exist")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ConfigError(f"config key 'adapter_name_or_path': {path!r} holds no adapter_config.json")
    return paths


def export_dtype(cfg: "LmfConfig"):
    """Dtype of the exported weights: infer_dtype when set, else the base model's own dtype (float32 if unknown)."""
    import torch

    from lmf.model.loader import read_model_config

    if cfg.model.infer_dtype != "auto":
        return getattr(torch, cfg.model.infer_dtype)
    raw = read_model_config(cfg.model.model_name_or_path) if os.path.isdir(cfg.model.model_name_or_path) else {}
    name = raw.get("dtype") or raw.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _replace_dir(src: str, target: str) -> None:
    """Move the finished folder ``src`` to ``target``, replacing what is there (same file system)."""
    if not os.path.exists(target):
        os.replace(src, target)
        return
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
    os.rmdir(trash)
    os.replace(target, trash)
    try:
        os.replace(src, target)
    except OSError:
        os.replace(trash, target)  # put the old export back
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _stop_generation_config(model, tokenizer, stop_ids: list[int]) -> None:
    """eos = the template's stop tokens, pad = the tokenizer's pad, so plain ``generate`` stops like lmf chat."""
    gen = model.generation_config
    gen.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
    if tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id


def export_model(cfg: "LmfConfig") -> str:
    """Merge, then write the standalone model folder; returns its path."""
    import torch

    from lmf.data.template import get_template
    from lmf.data.template.ollama import ollama_modelfile
    from lmf.data.media.plugins import copy_processor_files
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.train.durable import fsync_tree

    m = cfg.model
    if m.quantization_bit is not None:
        raise ConfigError("config key 'quantization_bit': lmf export merges a (Q)LoRA adapter into the base model in "
                          "full precision, never into quantized weights; remove quantization_bit")
    target = check_export_target(m.export_dir, m.export_overwrite)
    if m.export_size <= 0:
        raise ConfigError(f"config key 'export_size': must be positive (GB), got {m.export_size}")
    adapters = check_adapter_paths(m.adapter_name_or_path)
    save_kwargs: dict = {"max_shard_size": max(int(m.export_size * 10**9), 1)}
    if m.export_legacy_format:
        from transformers import PreTrainedModel

        if "safe_serialization" not in inspect.signature(PreTrainedModel.save_pretrained).parameters:
            raise NotAvailableError("config key 'export_legacy_format': this transformers version only writes "
                                    "safetensors; unset export_legacy_format")
        save_kwargs["safe_serialization"] = False

    tokenizer = load_tokenizer(m)
    template = get_template(cfg.data.template, tokenizer, default_system=cfg.data.default_system,
                            enable_thinking=cfg.data.enable_thinking)
    tokenizer.chat_template = template.jinja_template(tokenizer)
    device = torch.device("cuda", 0) if m.export_device == "auto" and torch.cuda.is_available() else torch.device("cpu")
    if adapters:
        logger.info("merging %d adapter(s) into the base model loaded in full precision (a QLoRA adapter too: its "
                    "base is never merged in quantized form)", len(adapters))
    model = load_model(cfg, tokenizer, is_trainable=False, device=device)  # adapters merged, in order
    if hasattr(model, "merge_and_unload"):  # a loader that keeps the PeftModel wrapper
        model = model.merge_and_unload()
    dtype = export_dtype(cfg)
    model = model.to(device="cpu", dtype=dtype)
    model.config.use_cache = True
    _stop_generation_config(model, tokenizer, template.stop_token_ids(tokenizer))

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp, **save_kwargs)
        tokenizer.save_pretrained(tmp)
        if os.path.isdir(m.model_name_or_path):
            copied = copy_processor_files(m.model_name_or_path, tmp)
            if copied:
                logger.info("export: the base model's processor files %s copied", ", ".join(copied))
        source = "."
        if m.export_gguf:
            from lmf.export.gguf import write_gguf

            source = f"model-{m.export_gguf}.gguf"
            info = write_gguf(tmp, os.path.join(tmp, source), m.export_gguf, os.path.basename(target))
            logger.info("export: %s written (%s, %d tensors, %.1f MB)", source, info["architecture"], info["tensors"],
                        info["bytes"] / 1e6)
            source = f"./{source}"
        with open(os.path.join(tmp, "Modelfile"), "w", encoding="utf-8") as fh:  # `ollama create NAME -f Modelfile`
            fh.write(ollama_modelfile(template, tokenizer, source))
        fsync_tree(tmp)  # on disk before it is renamed into place
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shards = sorted(f for f in os.listdir(target) if f.endswith((".safetensors", ".bin")))
    logger.info("exported %s%s to %s (%s, %d weight file(s), template %s)", m.model_name_or_path,
                f" + {', '.join(adapters)}" if adapters else "", target, str(dtype).replace("torch.", ""),
                len(shards), template.name)
    return target


def run_export(argv: list[str]) -> int:
    """Entry point of ``lmf export``."""
    from lmf.chat.options import load_serving_config

    cfg = load_serving_config(argv)
    path = export_model(cfg)
    print(f"lmf export: wrote {path}")
    return 0
