"""Finetuning methods: LoRA (peft), full, freeze (train the last N decoder layers).

``init_adapter(cfg, model)`` decides which parameters train; ``load_adapters_for_inference``
merges ``adapter_name_or_path`` into the base model for chat/api/export.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import TYPE_CHECKING, Optional

from lmf.config.parser import split_list
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger
from lmf.model.vision import check_vision_keys, freeze_frozen_parts, is_vision_config, vision_lora_targets

if TYPE_CHECKING:
    from torch import nn

    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


#: nn.Linear subclasses that LoRA may adapt: plain linears and the quantized ones of bitsandbytes.
LORA_LINEAR_CLASSES = ("Linear", "Linear4bit", "Linear8bitLt")


def modules_to_save(cfg: "LmfConfig", model) -> Optional[list[str]]:
    """Modules trained in full and saved with the adapter: ``additional_target``; with ``resize_vocab`` and none
    given, the input and output embeddings (LLaMA-Factory's rule: the new rows must train and reach the adapter)."""
    if cfg.finetuning.additional_target:
        return split_list(cfg.finetuning.additional_target)
    if not cfg.model.resize_vocab:
        return None
    wanted = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    names = sorted({name.split(".")[-1] for name, module in model.named_modules() if id(module) in wanted})
    logger.warning("resize_vocab: the embeddings (%s) train in full and are saved with the adapter", ", ".join(names))
    return names

def find_all_linear_modules(model: "nn.Module") -> list[str]:
    """Leaf names of every linear layer LoRA can adapt (lora_target: all): not the output head, and not the
    ``nn.Linear`` subclasses with a forward of their own (MoE routers and gates return tuples), which
    LLaMA-Factory leaves out too."""
    from torch import nn

    head = model.get_output_embeddings()
    names: set[str] = set()
    skipped: set[str] = set()
    for full_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        leaf = full_name.split(".")[-1]
        if type(module).__name__ in LORA_LINEAR_CLASSES:
            names.add(leaf)
        else:
            skipped.add(f"{leaf} ({type(module).__name__})")
    if skipped:
        logger.info("lora_target all: not adapting %s (not plain linear layers)", ", ".join(sorted(skipped)))
    head_names = {n.split(".")[-1] for n, m in model.named_modules() if m is head}
    return sorted(names - head_names - {s.split(" ")[0] for s in skipped})


def check_not_raw_pissa(path: str) -> None:
    """Refuse a PiSSA-form adapter trained with the randomised SVD: peft would rebuild the residual base with a
    new random SVD when loading it, silently giving another model; its converted adapter is exact."""
    import json

    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
        init = json.load(fh).get("init_lora_weights")
    if isinstance(init, str) and init.startswith("pissa_niter"):
        raise ConfigError(f"adapter {path!r} is a PiSSA adapter (init_lora_weights: {init}): loading it re-runs a "
                          "randomised SVD of the base and would not reproduce the trained model; use the plain "
                          "LoRA written by pissa_convert: true (its pissa_converted folder)")


def _adapter_paths(cfg: "LmfConfig") -> list[str]:
    paths = split_list(cfg.model.adapter_name_or_path)
    for path in paths:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ConfigError(f"config key 'adapter_name_or_path': {path!r} holds no adapter_config.json")
    return paths


def _merge_adapters(model, paths: list[str]):
    from peft import PeftModel

    for path in paths:
        with warnings.catch_warnings():  # peft probes transformers' deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        logger.info("merged adapter %s", path)
    return model


def load_adapters_for_inference(cfg: "LmfConfig", model):
    """Merge every adapter of ``adapter_name_or_path`` (in order) into the base model."""
    paths = _adapter_paths(cfg)
    for path in paths:
        check_not_raw_pissa(path)
    if paths and cfg.model.quantization_bit is not None:  # never merge into quantized weights: keep it beside
        if len(paths) > 1:
            raise ConfigError("config key 'adapter_name_or_path': a quantized base takes one adapter (merging "
                              "several would write them into quantized weights); export and merge them first")
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, paths[0])
        logger.info("adapter %s on the quantized base model (not merged)", paths[0])
        return model
    return _merge_adapters(model, paths) if paths else model


def _cast_trainable_to_fp32(model) -> None:
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def _init_lora(cfg: "LmfConfig", model):
    from peft import LoraConfig, PeftModel, get_peft_model

    ft = cfg.finetuning
    paths = _adapter_paths(cfg)
    if paths and not ft.create_new_adapter:
        model = _merge_adapters(model, paths[:-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, paths[-1], is_trainable=True,
                                              autocast_adapter_dtype=not ft.pure_bf16)
        logger.info("resumed training of adapter %s", paths[-1])
        _fuse(cfg, model)
        return model
    model = _merge_adapters(model, paths)
    targets = _only_expanded_blocks(cfg, model, resolve_targets(model, ft.lora_target, "lora_target"))
    leaves = targets
    if is_vision_config(model.config):
        if ft.use_llama_pro:
            raise ConfigError("config key 'use_llama_pro' on a vision-language model is not implemented")
        targets = vision_lora_targets(model, ft, targets)
        leaves = sorted({t.split(".")[-1] for t in targets})
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=ft.lora_rank,
        lora_alpha=ft.lora_alpha,
        lora_dropout=ft.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save(cfg, model),
        use_rslora=ft.use_rslora,
        use_dora=ft.use_dora,
        init_lora_weights=pissa_init_value(ft.pissa_iter) if ft.pissa_init else True,
    )
    with warnings.catch_warnings():  # peft probes transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        # pure_bf16: the adapter stays in the base model's bf16 (peft would otherwise make it fp32)
        model = get_peft_model(model, lora_config, autocast_adapter_dtype=not ft.pure_bf16)
    logger.info("LoRA rank=%d alpha=%s on %s", ft.lora_rank, ft.lora_alpha, ",".join(leaves))
    if ft.pissa_init:
        # the adapter as initialised (principal components): what pissa_init/ holds and the conversion subtracts
        model.pissa_initial_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        logger.info("PiSSA: LoRA initialised from the principal singular vectors (%s); the base holds the "
                    "residual", "exact SVD" if ft.pissa_iter == -1 else f"randomised SVD, {ft.pissa_iter} iterations")
    else:
        _fuse(cfg, model)
    return model


def pissa_init_value(pissa_iter: int) -> str:
    """peft's ``init_lora_weights`` for PiSSA: the exact SVD (-1) or the randomised one with N iterations."""
    return "pissa" if pissa_iter == -1 else f"pissa_niter_{pissa_iter}"


def resolve_targets(model, value: str, key: str) -> list[str]:
    """Module names of ``value`` (comma-separated, or ``all``: every linear but the head), checked present."""
    targets = split_list(value)
    if targets == ["all"]:
        return find_all_linear_modules(model)
    if "all" in targets:
        raise ConfigError(f"config key {key!r}: 'all' cannot be combined with module names")
    present = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(f"config key {key!r}: no module named {', '.join(missing)} in the model")
    return targets


def _init_oft(cfg: "LmfConfig", model):
    """OFT (orthogonal fine-tuning, peft's ``OFTConfig``) on ``oft_target``; loaded adapters are resumed as for
    LoRA. LLaMA-Factory reads the targets from lora_target (a bug: oft_target is ignored there); lmf uses
    oft_target, so LF's examples (both 'all') train the same modules."""
    from peft import OFTConfig, PeftModel, get_peft_model

    ft = cfg.finetuning
    paths = _adapter_paths(cfg)
    if paths and not ft.create_new_adapter:
        model = _merge_adapters(model, paths[:-1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, paths[-1], is_trainable=True)
        logger.info("resumed training of adapter %s", paths[-1])
        return model
    model = _merge_adapters(model, paths)
    targets = _only_expanded_blocks(cfg, model, resolve_targets(model, ft.oft_target, "oft_target"))
    if is_vision_config(model.config):  # the vision tower and projector stay frozen, as for LoRA
        targets = vision_lora_targets(model, ft, targets)
    config = OFTConfig(task_type="CAUSAL_LM", r=ft.oft_rank, oft_block_size=ft.oft_block_size,
                       module_dropout=ft.module_dropout, target_modules=targets,
                       modules_to_save=modules_to_save(cfg, model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(model, config)
    logger.info("OFT %s on %s", f"rank {ft.oft_rank}" if ft.oft_rank else f"block size {ft.oft_block_size}",
                ",".join(targets))
    return model


def _fuse(cfg: "LmfConfig", model) -> None:
    """One autograd node per LoRA linear (``lmf.model.fused_lora``; config key ``fused_lora: false`` turns it off)."""
    if not cfg.model.fused_lora:
        return
    from lmf.model.fused_lora import fuse_lora_layers

    count = fuse_lora_layers(model)
    if count:
        logger.debug("fused LoRA forward on %d linear layers", count)


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def llama_pro_layer_ids(num_layers: int, num_expanded: int) -> list[int]:
    """The blocks ``lmf expand`` inserted into a model of ``num_layers`` (LLaMA-Factory's stride rule)."""
    if num_layers % num_expanded:
        raise ConfigError(f"config key 'use_llama_pro': freeze_trainable_layers ({num_expanded}, the number of "
                          f"expanded blocks) must divide the model's {num_layers} layers")
    stride = num_layers // num_expanded
    return list(range(stride - 1, num_layers + stride - 1, stride))


def _only_expanded_blocks(cfg: "LmfConfig", model, targets: list[str]) -> list[str]:
    """With ``use_llama_pro``, the full names of the ``targets`` modules inside the expanded blocks."""
    if not cfg.finetuning.use_llama_pro:
        return targets
    ids = set(llama_pro_layer_ids(model.config.get_text_config().num_hidden_layers, cfg.finetuning.freeze_trainable_layers))
    names = [n for n, _ in model.named_modules()
             if _layer_index(n + ".") in ids and n.split(".")[-1] in targets]
    logger.info("LLaMA-Pro: adapting %d modules of the expanded blocks %s", len(names), sorted(ids))
    return names


def _init_freeze(cfg: "LmfConfig", model) -> None:
    ft = cfg.finetuning
    num_layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if not num_layers:
        raise ConfigError("finetuning_type: freeze needs a model config with num_hidden_layers")
    n = ft.freeze_trainable_layers
    if n == 0 or abs(n) > num_layers:
        raise ConfigError(f"config key 'freeze_trainable_layers': {n} is invalid for a model with {num_layers} layers")
    if ft.use_llama_pro:
        layer_ids = set(llama_pro_layer_ids(num_layers, n))
    else:
        layer_ids = set(range(num_layers - n, num_layers)) if n > 0 else set(range(-n))
    modules = split_list(ft.freeze_trainable_modules)
    extra = split_list(ft.freeze_extra_modules)
    matched_extra: set[str] = set()
    for name, p in model.named_parameters():
        idx = _layer_index(name)
        trainable = idx in layer_ids and (modules == ["all"] or any(f".{m}." in f".{name}." for m in modules))
        for m in extra:
            if f".{m}." in f".{name}.":
                trainable = True
                matched_extra.add(m)
        p.requires_grad_(trainable)
    missing = set(extra) - matched_extra
    if missing:
        raise ConfigError(f"config key 'freeze_extra_modules': no module named {', '.join(sorted(missing))}")
    logger.info("freeze: training layers %s", sorted(layer_ids))


def init_adapter(cfg: "LmfConfig", model):
    """Apply ``finetuning_type`` (lora | oft | full | freeze): set requires_grad, wrap with peft for adapters."""
    ftype = cfg.finetuning.finetuning_type
    check_vision_keys(model.config, cfg.finetuning)
    if ftype == "lora":
        model = _init_lora(cfg, model)
    elif ftype == "oft":
        model = _init_oft(cfg, model)
    elif ftype == "full":
        model.requires_grad_(True)
        freeze_frozen_parts(model, cfg.finetuning)
    elif ftype == "freeze":
        _init_freeze(cfg, model)
        freeze_frozen_parts(model, cfg.finetuning)
    else:  # the parser checks choices; keep a clear error for programmatic configs
        raise ConfigError(f"config key 'finetuning_type': unknown value {ftype!r}")
    if not cfg.finetuning.pure_bf16 and not cfg.finetuning.use_badam:  # BAdam keeps fp32 copies of its block
        _cast_trainable_to_fp32(model)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def log_param_counts(model) -> None:
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / max(total, 1)
    logger.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}", pct)
