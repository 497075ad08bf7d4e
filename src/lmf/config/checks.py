"""Rules between config keys (defaults that depend on other keys, combinations that cannot work); run by
:func:`lmf.config.parser.build_config` once every key is valid on its own (type, choices, range:
:mod:`lmf.config.values`). Errors name the keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.config.args import GeneratingArguments
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger("lmf.config.parser")


def apply_cross_key_rules(cfg: "LmfConfig") -> None:
    """Cross-key defaults and checks, after every key was validated on its own."""
    from lmf.config.parser import split_paths
    t, d, ft, m = cfg.training, cfg.data, cfg.finetuning, cfg.model
    if t.evaluation_strategy is not None:
        t.eval_strategy = t.evaluation_strategy
    if t.bf16 and t.fp16:
        raise ConfigError("config keys 'bf16' and 'fp16' are both true; choose one")
    if ft.lora_alpha is None:
        ft.lora_alpha = ft.lora_rank * 2
    if isinstance(t.report_to, str):
        t.report_to = [r.strip() for r in t.report_to.split(",") if r.strip() and r.strip() != "none"]
    else:
        t.report_to = [r for r in t.report_to if r != "none"]
    for r in t.report_to:
        if r not in ("tensorboard", "wandb", "mlflow", "all"):
            raise ConfigError(f"config key 'report_to': {r!r} is not supported; choose none, tensorboard, wandb, "
                              "mlflow or all")
    if d.interleave_probs is not None:
        if d.mix_strategy == "concat":
            raise ConfigError("config key 'interleave_probs' needs an interleaving mix_strategy "
                              "(interleave_under, interleave_over or interleave_once), not concat")
        count = len(split_paths(d.interleave_probs))
        for key in ("dataset", "eval_dataset"):
            names = split_paths(getattr(d, key))
            if names and len(names) != count:
                raise ConfigError(f"config key 'interleave_probs': {count} probabilities for {len(names)} "
                                  f"datasets in '{key}'")
    if d.eval_on_each_dataset and not d.eval_dataset:
        raise ConfigError("config key 'eval_on_each_dataset' needs 'eval_dataset' (the datasets to evaluate apart)")
    _check_prediction(cfg)
    _check_adapter_methods(cfg)
    _check_optimizers(cfg)
    _apply_batching_strategy(cfg)
    if m.init_on_rank0:
        if ft.stage not in ("sft", "pt"):
            raise ConfigError(f"config key 'init_on_rank0' with stage {ft.stage} is not implemented (its reference "
                              "model or value head loads on every rank); use it for sft/pt")
        if m.quantization_bit is not None:
            raise ConfigError("config keys 'init_on_rank0' and 'quantization_bit' do not combine (a quantized base "
                              "is not sharded)")
    if m.init_on_meta:
        if m.init_on_rank0:
            raise ConfigError("config keys 'init_on_meta' and 'init_on_rank0' are two ways to load a sharded model; "
                              "set one")
        if ft.finetuning_type not in ("full", "freeze"):
            raise ConfigError(f"config key 'init_on_meta' with finetuning_type {ft.finetuning_type} is not implemented "
                              "(its adapter weights are not in the checkpoint; LLaMA-Factory v1 refuses it too): use "
                              "init_on_rank0")
        if ft.stage not in ("sft", "pt"):
            raise ConfigError(f"config key 'init_on_meta' with stage {ft.stage} is not implemented; use it for sft/pt")
        if m.quantization_bit is not None or m.train_from_scratch:
            raise ConfigError("config key 'init_on_meta' reads the sharded weights from the checkpoint: it does not "
                              "combine with quantization_bit or train_from_scratch")
        if m.resize_vocab or m.add_tokens or m.add_special_tokens:
            raise ConfigError("config key 'init_on_meta' reads the checkpoint's tensors as they are: it does not combine "
                              "with resized embeddings (resize_vocab, add_tokens, add_special_tokens); use init_on_rank0")
    if ft.use_dft_loss and ft.stage not in ("sft", "pt"):
        raise ConfigError(f"config key 'use_dft_loss' is an SFT loss; it does not apply to stage {ft.stage}")
    if ft.loraplus_lr_ratio is not None and ft.finetuning_type != "lora":
        raise ConfigError(f"config key 'loraplus_lr_ratio' needs finetuning_type: lora, got {ft.finetuning_type}")
    if m.quantization_method != "bnb":
        raise ConfigError(f"config key 'quantization_method': {m.quantization_method} is not implemented; use bnb "
                          "(bitsandbytes)")
    if m.quantization_bit is not None:
        if ft.finetuning_type != "lora":
            raise ConfigError(f"config key 'quantization_bit' needs finetuning_type: lora (QLoRA), got "
                              f"{ft.finetuning_type}")
        if m.train_from_scratch:
            raise ConfigError("config keys 'quantization_bit' and 'train_from_scratch': a quantized base must be "
                              "loaded from trained weights")
        if ft.pure_bf16:
            raise ConfigError("config keys 'quantization_bit' and 'pure_bf16' do not combine; use bf16: true")
    has_eval = bool(d.val_size or d.eval_dataset)
    if ft.early_stopping_steps is not None:
        if not has_eval or (t.eval_strategy == "no" and t.evaluation_strategy in (None, "no")):
            raise ConfigError("config key 'early_stopping_steps' needs evaluations: set eval_strategy (steps or "
                              "epoch) and an eval set (val_size or eval_dataset)")
    if m.upcast_layernorm and ft.pure_bf16:
        raise ConfigError("config keys 'upcast_layernorm' and 'pure_bf16': fp32 norm weights need mixed-precision "
                          "autocast, which pure_bf16 turns off; use bf16: true with upcast_layernorm")
    if ft.compute_accuracy and not has_eval:
        logger.warning("config key 'compute_accuracy' has no effect without an eval set (val_size or eval_dataset)")
    if ft.compute_accuracy and ft.stage == "dpo":
        logger.warning("config key 'compute_accuracy' has no effect for DPO, which always logs rewards/accuracies")
    g = cfg.generating
    if g.max_new_tokens > 0 and g.max_length != GeneratingArguments().max_length:
        logger.warning("config key 'max_length' has no effect while max_new_tokens > 0 (as in LLaMA-Factory); set "
                       "max_new_tokens: 0 to limit prompt + reply to max_length instead")
    if d.packing is None:
        d.packing = ft.stage == "pt"
    if d.neat_packing:
        d.packing = True
    if d.packing and ft.stage in ("dpo", "rm", "kto"):
        raise ConfigError(f"config key '{'neat_packing' if d.neat_packing else 'packing'}' is not implemented for "
                          f"stage {ft.stage} (pairs and KTO examples are scored per sequence); use it with pt or sft")
    if t.data_seed is None:
        t.data_seed = t.seed
    if not t.eval_steps:  # unset or 0: every logging_steps, as in transformers
        t.eval_steps = t.logging_steps
    if t.save_strategy == "steps" and not t.save_steps:
        raise ConfigError("config key 'save_steps': 0 with save_strategy: steps saves nothing; set a number of steps "
                          "(or a fraction < 1 of the run), or save_strategy: no")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        raise ConfigError(f"config key 'num_train_epochs': {t.num_train_epochs} trains nothing; set it > 0 or "
                          "max_steps > 0")
    if t.gradient_checkpointing is None:
        # LLaMA-Factory turns gradient checkpointing on unless disable_gradient_checkpointing is set.
        t.gradient_checkpointing = not m.disable_gradient_checkpointing
    elif m.disable_gradient_checkpointing and t.gradient_checkpointing:
        raise ConfigError("config keys 'gradient_checkpointing' and 'disable_gradient_checkpointing' are both true")
    if ft.pref_loss in ("orpo", "simpo") and ft.stage == "dpo":
        ft.ref_model = None  # reference-free losses
    if t.deepspeed and t.do_train:
        from lmf.config.deepspeed import read_deepspeed_config

        read_deepspeed_config(cfg)  # every section mapped, checked against these keys, or refused


def _check_prediction(cfg: "LmfConfig") -> None:
    """``do_predict`` generates answers for ``eval_dataset``; what it needs and what it cannot do."""
    t, d, ft = cfg.training, cfg.data, cfg.finetuning
    if t.predict_with_generate and not t.do_predict:
        raise ConfigError("config key 'predict_with_generate' during evaluation (do_eval) is not implemented; "
                          "it applies to do_predict: true")
    if not t.do_predict:
        return
    if not t.predict_with_generate:
        raise ConfigError("config key 'do_predict' without 'predict_with_generate' (teacher-forced logits) is not "
                          "implemented; set predict_with_generate: true")
    if ft.stage != "sft":
        raise ConfigError(f"config key 'do_predict' generates answers for stage sft, not {ft.stage}")
    if not d.eval_dataset:
        raise ConfigError("config key 'do_predict' needs 'eval_dataset' (the datasets to generate answers for)")
    if d.tokenized_path and not t.do_train:
        raise ConfigError("config key 'tokenized_path' with do_predict is not implemented (the prediction set is "
                          "tokenized from eval_dataset and cached in the preprocessing cache)")


#: Keys that only mean something for LoRA, with the value that leaves them off.
_LORA_ONLY = {"use_dora": False, "use_rslora": False, "pissa_init": False, "pissa_convert": False}


def _check_adapter_methods(cfg: "LmfConfig") -> None:
    """LoRA-only keys on other methods, PiSSA's and OFT's own rules."""
    ft, m = cfg.finetuning, cfg.model
    if ft.finetuning_type != "lora":
        for key, off in _LORA_ONLY.items():
            if getattr(ft, key) != off:
                raise ConfigError(f"config key {key!r} needs finetuning_type: lora, got {ft.finetuning_type}")
    if ft.pissa_convert and not ft.pissa_init:
        raise ConfigError("config key 'pissa_convert' needs pissa_init: true (it converts a PiSSA adapter)")
    if ft.pissa_init:
        if ft.pissa_iter < -1 or ft.pissa_iter == 0:
            raise ConfigError(f"config key 'pissa_iter': -1 (exact SVD) or >= 1, got {ft.pissa_iter}")
        if m.quantization_bit is not None:
            raise ConfigError("config keys 'pissa_init' and 'quantization_bit': PiSSA on a quantized base is not "
                              "implemented (the SVD needs the full-precision weights)")
        if ft.use_dora:
            raise ConfigError("config keys 'pissa_init' and 'use_dora' do not combine (peft initialises one or the "
                              "other)")
        if ft.stage in ("dpo", "kto") and ft.finetuning_type == "lora":
            raise ConfigError(f"config key 'pissa_init' with stage {ft.stage}: the reference model is the base "
                              "without the adapter, which PiSSA replaces by its residual; not implemented")
        if m.adapter_name_or_path and not ft.create_new_adapter:
            raise ConfigError("config keys 'pissa_init' and 'adapter_name_or_path': PiSSA initialises a new adapter;"
                              " set create_new_adapter: true to add one on top of the loaded adapters")
    if ft.use_llama_pro and ft.finetuning_type == "full":
        raise ConfigError("config key 'use_llama_pro' needs finetuning_type freeze, lora or oft (it trains only the "
                          "expanded blocks), got full")
    if ft.use_llama_pro and ft.freeze_trainable_layers < 1:
        raise ConfigError("config key 'use_llama_pro': freeze_trainable_layers must be the number of expanded "
                          f"blocks (>= 1), got {ft.freeze_trainable_layers}")
    if ft.finetuning_type == "oft":
        if (ft.oft_rank == 0) == (ft.oft_block_size == 0):
            raise ConfigError(f"config keys 'oft_rank' ({ft.oft_rank}) and 'oft_block_size' ({ft.oft_block_size}): "
                              "set exactly one of them (the other 0)")
        if m.quantization_bit is not None:
            raise ConfigError("config keys 'finetuning_type: oft' and 'quantization_bit': OFT on a quantized base "
                              "(QOFT) is not implemented")


#: The memory-saving optimizers' switches (one at a time; lmf.train.optimizers builds them).
OPTIMIZER_SWITCHES = ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon")


def _check_optimizers(cfg: "LmfConfig") -> None:
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


def _warn_family_keys_without_switch(ft) -> None:
    """galore_*/apollo_*/badam_* keys set while their optimizer is off do nothing: say so."""
    import dataclasses

    for family in ("galore", "apollo", "badam"):
        if getattr(ft, f"use_{family}"):
            continue
        for f in dataclasses.fields(ft):
            if f.name.startswith(f"{family}_") and getattr(ft, f.name) != f.default:
                logger.warning("config key %r has no effect without use_%s: true", f.name, family)


def _apply_batching_strategy(cfg: "LmfConfig") -> None:
    """``batching_strategy`` sets ``padding_free``; the dynamic ones need what a token budget needs."""
    t, d, ft = cfg.training, cfg.data, cfg.finetuning
    strategy = t.batching_strategy
    if strategy is None:
        return
    cfg.model.padding_free = strategy in ("padding_free", "dynamic_padding_free")
    if strategy.startswith("dynamic"):
        if ft.stage not in ("sft", "pt"):
            raise ConfigError(f"config key 'batching_strategy': {strategy} batches SFT/pt samples, not stage {ft.stage}")
        if d.packing:
            raise ConfigError(f"config keys 'batching_strategy: {strategy}' and 'packing' do not combine (a packed "
                              "row is already a full budget)")
        if t.do_train and not t.max_steps > 0:
            raise ConfigError(f"config key 'batching_strategy': {strategy} needs max_steps (the number of "
                              "micro-batches per epoch depends on the order, as in LLaMA-Factory v1)")
