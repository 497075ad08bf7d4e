"""Rules of the training methods: LoRA-only keys, PiSSA, LLaMA-Pro, OFT, LoRA+, the DFT loss, and the
memory-saving optimizers (one at a time, on the methods they work with)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.config.rules import rule
from lmf.config.stages import STAGES
from lmf.config.values import BNB_ADAMW
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)

#: Keys that only mean something for LoRA, with the value that leaves them off.
LORA_ONLY = {"use_dora": False, "use_rslora": False, "pissa_init": False, "pissa_convert": False}
#: The memory-saving optimizers' switches (one at a time; lmf.train.optimizer_plugins builds them).
OPTIMIZER_SWITCHES = ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon")


@rule("finetuning_type", *LORA_ONLY)
def lora_keys_need_lora(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning
    if ft.finetuning_type != "lora":
        for key, off in LORA_ONLY.items():
            if getattr(ft, key) != off:
                raise ConfigError(f"config key {key!r} needs finetuning_type: lora, got {ft.finetuning_type}")


@rule("pissa_init", "pissa_convert", "pissa_iter", "quantization_bit", "use_dora", "stage", "finetuning_type",
      "adapter_name_or_path", "create_new_adapter")
def pissa_applies(cfg: "LmfConfig") -> None:
    ft, m = cfg.finetuning, cfg.model
    if ft.pissa_convert and not ft.pissa_init:
        raise ConfigError("config key 'pissa_convert' needs pissa_init: true (it converts a PiSSA adapter)")
    if not ft.pissa_init:
        return
    if ft.pissa_iter < -1 or ft.pissa_iter == 0:
        raise ConfigError(f"config key 'pissa_iter': -1 (exact SVD) or >= 1, got {ft.pissa_iter}")
    if m.quantization_bit is not None:
        raise ConfigError("config keys 'pissa_init' and 'quantization_bit': PiSSA on a quantized base is not "
                          "implemented (the SVD needs the full-precision weights)")
    if ft.use_dora:
        raise ConfigError("config keys 'pissa_init' and 'use_dora' do not combine (peft initialises one or the "
                          "other)")
    if _scores_against_reference(ft) and ft.finetuning_type == "lora":
        raise ConfigError(f"config key 'pissa_init' with {'use_asft_loss' if ft.use_asft_loss else f'stage {ft.stage}'}"
                          ": the reference model is the base without the adapter, which PiSSA replaces by its "
                          "residual; not implemented")
    if m.adapter_name_or_path and not ft.create_new_adapter:
        raise ConfigError("config keys 'pissa_init' and 'adapter_name_or_path': PiSSA initialises a new adapter;"
                          " set create_new_adapter: true to add one on top of the loaded adapters")


@rule("use_llama_pro", "finetuning_type", "freeze_trainable_layers")
def llama_pro_trains_expanded_blocks(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning
    if ft.use_llama_pro and ft.finetuning_type == "full":
        raise ConfigError("config key 'use_llama_pro' needs finetuning_type freeze, lora or oft (it trains only the "
                          "expanded blocks), got full")
    if ft.use_llama_pro and ft.freeze_trainable_layers < 1:
        raise ConfigError("config key 'use_llama_pro': freeze_trainable_layers must be the number of expanded "
                          f"blocks (>= 1), got {ft.freeze_trainable_layers}")


@rule("finetuning_type", "oft_rank", "oft_block_size", "quantization_bit")
def oft_has_one_size(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning
    if ft.finetuning_type != "oft":
        return
    if (ft.oft_rank == 0) == (ft.oft_block_size == 0):
        raise ConfigError(f"config keys 'oft_rank' ({ft.oft_rank}) and 'oft_block_size' ({ft.oft_block_size}): "
                          "set exactly one of them (the other 0)")


@rule("use_dft_loss", "use_eaft_loss", "use_asft_loss", "stage")
def token_weighted_losses_are_sft_losses(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning
    on = [key for key in ("use_dft_loss", "use_eaft_loss", "use_asft_loss") if getattr(ft, key)]
    for key in on:
        if not (ft.stage in STAGES and STAGES[ft.stage].token_level):
            raise ConfigError(f"config key {key!r} is an SFT loss; it does not apply to stage {ft.stage}")
    if len(on) > 1:
        raise ConfigError(f"config keys {on[0]!r} and {on[1]!r}: two token weightings of the loss (ASFT is DFT with a "
                          "KL anchor); set one")


def _scores_against_reference(ft) -> bool:
    """Whether the run scores against a frozen reference model: its stage does (dpo, kto), or the ASFT loss."""
    return bool(ft.stage in STAGES and STAGES[ft.stage].uses_reference or ft.use_asft_loss)


@rule("ref_model", "ref_model_adapters", "stage", "use_asft_loss")
def reference_keys_need_a_reference(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning
    if _scores_against_reference(ft):
        return
    for key in ("ref_model", "ref_model_adapters"):
        if getattr(ft, key):
            logger.warning("config key %r has no effect with stage %s (only dpo, kto and use_asft_loss score "
                           "against a reference model)", key, ft.stage)


@rule("adapter_name_or_path", "finetuning_type")
def adapters_need_an_adapter_method(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning.finetuning_type
    if cfg.model.adapter_name_or_path and ft not in ("lora", "oft"):
        raise ConfigError(f"config key 'adapter_name_or_path' needs finetuning_type: lora or oft (got {ft})")


@rule("loraplus_lr_ratio", "finetuning_type")
def loraplus_needs_lora(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning
    if ft.loraplus_lr_ratio is not None and ft.finetuning_type != "lora":
        raise ConfigError(f"config key 'loraplus_lr_ratio' needs finetuning_type: lora, got {ft.finetuning_type}")


@rule(*OPTIMIZER_SWITCHES, "loraplus_lr_ratio", "finetuning_type", "optim", "galore_layerwise", "apollo_layerwise",
      "gradient_accumulation_steps", "fp16", "max_grad_norm", "badam_switch_interval", "badam_mode")
def one_special_optimizer_that_can_run(cfg: "LmfConfig") -> None:
    """One special optimizer at a time, on the methods it works with, with the settings it can run."""
    t, ft = cfg.training, cfg.finetuning
    on = [k for k in OPTIMIZER_SWITCHES if getattr(ft, k)] + (["loraplus_lr_ratio"] if ft.loraplus_lr_ratio else [])
    if len(on) > 1:
        raise ConfigError(f"config keys {' and '.join(repr(k) for k in on)}: choose one optimizer")
    _warn_family_keys_without_switch(ft)
    if not on or on == ["loraplus_lr_ratio"]:
        return
    switch = on[0]
    if switch in ("use_galore", "use_apollo", "use_badam", "use_adam_mini") and ft.finetuning_type in ("lora", "oft"):
        raise ConfigError(f"config key {switch!r} needs finetuning_type full or freeze (it replaces Adam on whole "
                          f"weights), got {ft.finetuning_type}")
    if t.optim == "sgd":
        raise ConfigError(f"config keys {switch!r} and 'optim: sgd' do not combine: {switch} is an Adam variant")
    if t.optim in BNB_ADAMW:
        raise ConfigError(f"config keys {switch!r} and 'optim: {t.optim}' do not combine: {switch} brings its own "
                          "optimizer")
    layerwise = ft.galore_layerwise if switch == "use_galore" else ft.apollo_layerwise if switch == "use_apollo" \
        else False
    if layerwise:
        key = "galore_layerwise" if switch == "use_galore" else "apollo_layerwise"
        if t.gradient_accumulation_steps != 1:
            raise ConfigError(f"config key {key!r} steps every weight during backward: it needs "
                              f"gradient_accumulation_steps: 1, got {t.gradient_accumulation_steps}")
        if t.fp16:
            raise ConfigError(f"config keys {key!r} and 'fp16': loss scaling cannot unscale gradients that were "
                              "already applied; use bf16")
        if t.max_grad_norm and t.max_grad_norm > 0:
            logger.warning("config key %r: gradients are applied weight by weight during backward, so the global "
                           "gradient norm is never known: max_grad_norm (%s) is not applied and grad_norm logs 0 "
                           "(as in LLaMA-Factory)", key, t.max_grad_norm)
    if switch == "use_badam" and ft.badam_switch_interval < 1:
        raise ConfigError(f"config key 'badam_switch_interval': {ft.badam_switch_interval} (never switch blocks) is "
                          "not implemented; use a number of steps >= 1")
    if switch == "use_badam" and ft.badam_mode == "ratio":
        raise ConfigError("config key 'badam_mode': ratio is not implemented (its sparse gradients bypass the loop's "
                          "normalisation and clipping); use badam_mode: layer")


@rule("optim_target_modules", "use_galore", "use_apollo", "galore_target", "apollo_target")
def optim_target_modules_are_galore_or_apollo_targets(cfg: "LmfConfig") -> None:
    """transformers' ``optim_target_modules`` names the modules its GaLore / APOLLO optimizers project: lmf's
    ``galore_target`` / ``apollo_target``."""
    t, ft = cfg.training, cfg.finetuning
    if t.optim_target_modules is None:
        return
    names = t.optim_target_modules
    names = ",".join(str(n) for n in names) if isinstance(names, list) else str(names)
    family = "galore" if ft.use_galore else "apollo" if ft.use_apollo else None
    if family is None:
        raise ConfigError("config key 'optim_target_modules' names the modules of GaLore or APOLLO; set use_galore "
                          "or use_apollo (LLaMA-Factory's keys), or remove it")
    key = f"{family}_target"
    if getattr(ft, key) not in ("all", names):
        raise ConfigError(f"config keys 'optim_target_modules' and {key!r} name different modules; set one")
    setattr(ft, key, names)


def _warn_family_keys_without_switch(ft) -> None:
    """galore_*/apollo_*/badam_* keys set while their optimizer is off do nothing: say so."""
    import dataclasses

    for family in ("galore", "apollo", "badam"):
        if getattr(ft, f"use_{family}"):
            continue
        for f in dataclasses.fields(ft):
            if f.name.startswith(f"{family}_") and getattr(ft, f.name) != f.default:
                logger.warning("config key %r has no effect without use_%s: true", f.name, family)
