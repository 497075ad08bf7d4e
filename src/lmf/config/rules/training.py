"""Rules of the training keys: precision, batch size, trackers, evaluation and early stopping, saving, schedule,
gradient checkpointing, DeepSpeed, generation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.config.args import GeneratingArguments
from lmf.config.rules import rule
from lmf.config.rules.methods import OPTIMIZER_SWITCHES
from lmf.config.stages import STAGES
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


@rule("bf16", "fp16", "bf16_full_eval", "fp16_full_eval")
def one_half_precision(cfg: "LmfConfig") -> None:
    for a, b in (("bf16", "fp16"), ("bf16_full_eval", "fp16_full_eval")):
        if getattr(cfg.training, a) and getattr(cfg.training, b):
            raise ConfigError(f"config keys {a!r} and {b!r} are both true; choose one")


@rule("global_batch_size", "gradient_accumulation_steps", "per_device_train_batch_size")
def global_batch_size_fits(cfg: "LmfConfig") -> None:
    """What can be checked before the processes are known (the rest: :mod:`lmf.config.world`)."""
    t = cfg.training
    if t.global_batch_size is None:
        return
    if t.gradient_accumulation_steps != 1:
        raise ConfigError("config keys 'global_batch_size' and 'gradient_accumulation_steps': the first sets the "
                          "second once the processes are known; set one")
    if t.global_batch_size % t.per_device_train_batch_size:
        raise ConfigError(f"config key 'global_batch_size': {t.global_batch_size} is not a multiple of "
                          f"per_device_train_batch_size {t.per_device_train_batch_size}")


@rule("report_to", "use_swanlab")
def known_trackers(cfg: "LmfConfig") -> None:
    t = cfg.training
    for r in t.report_to:
        if r not in ("tensorboard", "wandb", "mlflow", "swanlab", "trackio", "all"):
            raise ConfigError(f"config key 'report_to': {r!r} is not supported; choose none, tensorboard, wandb, "
                              "mlflow, swanlab, trackio or all")
    if cfg.finetuning.use_swanlab and "swanlab" not in t.report_to and "all" not in t.report_to:
        t.report_to = [*t.report_to, "swanlab"]  # LLaMA-Factory's switch for the same tracker


@rule("early_stopping_steps", "eval_strategy", "val_size", "eval_dataset")
def early_stopping_has_evaluations(cfg: "LmfConfig") -> None:
    t, d = cfg.training, cfg.data
    if cfg.finetuning.early_stopping_steps is None:
        return
    if not (d.val_size or d.eval_dataset) or (t.eval_strategy == "no" and t.evaluation_strategy in (None, "no")):
        raise ConfigError("config key 'early_stopping_steps' needs evaluations: set eval_strategy (steps or "
                          "epoch) and an eval set (val_size or eval_dataset)")


@rule("load_best_model_at_end", "eval_strategy", "save_strategy", "save_steps", "eval_steps", "val_size",
      "eval_dataset")
def best_model_needs_a_checkpoint_at_each_evaluation(cfg: "LmfConfig") -> None:
    """As transformers: the best evaluation must have a checkpoint to load."""
    t, d = cfg.training, cfg.data
    if not t.load_best_model_at_end:
        return
    if t.eval_strategy == "no" or not (d.val_size or d.eval_dataset):
        raise ConfigError("config key 'load_best_model_at_end' needs evaluations: set eval_strategy (steps or epoch) "
                          "and an eval set (val_size or eval_dataset)")
    if t.save_strategy != t.eval_strategy:
        raise ConfigError(f"config keys 'load_best_model_at_end', 'save_strategy' and 'eval_strategy': the best "
                          f"model is loaded from a checkpoint saved at an evaluation, so save_strategy "
                          f"({t.save_strategy}) must equal eval_strategy ({t.eval_strategy})")
    eval_steps = t.eval_steps or t.logging_steps
    if t.save_strategy == "steps" and (t.save_steps < 1 or eval_steps < 1 or t.save_steps % eval_steps):
        raise ConfigError(f"config keys 'load_best_model_at_end', 'save_steps' and 'eval_steps': save_steps "
                          f"({t.save_steps:g}) must be a whole multiple of eval_steps ({eval_steps:g}; "
                          "logging_steps when unset), so that every checkpoint has its evaluation")


@rule("label_smoothing_factor", "stage", "use_dft_loss", "use_eaft_loss", "use_asft_loss")
def label_smoothing_is_for_the_token_loss(cfg: "LmfConfig") -> None:
    """transformers smooths the labels of the plain token loss; LLaMA-Factory's preference trainers drop it."""
    ft = cfg.finetuning
    if not cfg.training.label_smoothing_factor:
        return
    if not (ft.stage in STAGES and STAGES[ft.stage].token_level):
        raise ConfigError(f"config keys 'label_smoothing_factor' and 'stage': label smoothing applies to the token "
                          f"loss of sft and pt, not to stage {ft.stage!r} (LLaMA-Factory ignores it there)")
    for key in ("use_dft_loss", "use_eaft_loss", "use_asft_loss"):
        if getattr(ft, key):
            raise ConfigError(f"config keys 'label_smoothing_factor' and {key!r}: that loss has no label smoothing "
                              "in lmf; set one")


@rule("upcast_layernorm", "pure_bf16")
def upcast_layernorm_needs_autocast(cfg: "LmfConfig") -> None:
    if cfg.model.upcast_layernorm and cfg.finetuning.pure_bf16:
        raise ConfigError("config keys 'upcast_layernorm' and 'pure_bf16': fp32 norm weights need mixed-precision "
                          "autocast, which pure_bf16 turns off; use bf16: true with upcast_layernorm")


@rule("compute_accuracy", "val_size", "eval_dataset", "stage")
def accuracy_has_an_effect(cfg: "LmfConfig") -> None:
    ft, d = cfg.finetuning, cfg.data
    if ft.compute_accuracy and not (d.val_size or d.eval_dataset):
        logger.warning("config key 'compute_accuracy' has no effect without an eval set (val_size or eval_dataset)")
    if ft.compute_accuracy and ft.stage == "dpo":
        logger.warning("config key 'compute_accuracy' has no effect for DPO, which always logs rewards/accuracies")


@rule("max_length", "max_new_tokens")
def max_length_has_an_effect(cfg: "LmfConfig") -> None:
    g = cfg.generating
    if g.max_new_tokens > 0 and g.max_length != GeneratingArguments().max_length:
        logger.warning("config key 'max_length' has no effect while max_new_tokens > 0 (as in LLaMA-Factory); set "
                       "max_new_tokens: 0 to limit prompt + reply to max_length instead")


@rule("save_steps", "save_strategy")
def save_steps_save_something(cfg: "LmfConfig") -> None:
    t = cfg.training
    if t.save_strategy == "steps" and not t.save_steps:
        raise ConfigError("config key 'save_steps': 0 with save_strategy: steps saves nothing; set a number of steps "
                          "(or a fraction < 1 of the run), or save_strategy: no")


@rule("num_train_epochs", "max_steps")
def something_to_train(cfg: "LmfConfig") -> None:
    t = cfg.training
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        raise ConfigError(f"config key 'num_train_epochs': {t.num_train_epochs} trains nothing; set it > 0 or "
                          "max_steps > 0")


@rule("gradient_checkpointing", "disable_gradient_checkpointing")
def gradient_checkpointing_agrees(cfg: "LmfConfig") -> None:
    if cfg.model.disable_gradient_checkpointing and cfg.training.gradient_checkpointing:
        raise ConfigError("config keys 'gradient_checkpointing' and 'disable_gradient_checkpointing' are both true")


@rule("deepspeed")
def deepspeed_config_maps(cfg: "LmfConfig") -> None:
    """Every section of the DeepSpeed JSON mapped, checked against the YAML's keys, or refused; read once here."""
    t = cfg.training
    if t.deepspeed and t.do_train:
        from lmf.config.deepspeed import read_deepspeed_config

        cfg.deepspeed = read_deepspeed_config(cfg)


@rule("dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_num_workers")
def dataloader_worker_options_need_workers(cfg: "LmfConfig") -> None:
    t = cfg.training
    for key in ("dataloader_persistent_workers", "dataloader_prefetch_factor"):
        if getattr(t, key) and not t.dataloader_num_workers:
            raise ConfigError(f"config keys {key!r} and 'dataloader_num_workers': the first configures DataLoader "
                              "worker processes; set dataloader_num_workers > 0")


@rule("dataloader_drop_last", "dataloader_persistent_workers", "batching_strategy")
def dynamic_batches_have_no_last_batch(cfg: "LmfConfig") -> None:
    t = cfg.training
    if t.batching_strategy not in ("dynamic_batching", "dynamic_padding_free"):
        return
    for key in ("dataloader_drop_last", "dataloader_persistent_workers"):
        if getattr(t, key):
            raise ConfigError(f"config keys {key!r} and 'batching_strategy: {t.batching_strategy}': not implemented "
                              "together (dynamic micro-batches are packed to a token budget, a new DataLoader per "
                              "epoch)")


@rule("eval_on_start", "eval_delay", "eval_strategy", "val_size", "eval_dataset")
def eval_timing_needs_an_eval_set(cfg: "LmfConfig") -> None:
    t, d = cfg.training, cfg.data
    if t.eval_on_start and not (d.val_size or d.eval_dataset):
        raise ConfigError("config key 'eval_on_start' needs an eval set (val_size or eval_dataset)")
    if t.eval_delay and t.eval_strategy == "no":
        raise ConfigError("config keys 'eval_delay' and 'eval_strategy: no': a delay needs evaluations during "
                          "training (eval_strategy steps or epoch)")


@rule("optim_args", "optim", *OPTIMIZER_SWITCHES)
def optim_args_fit_the_optimizer(cfg: "LmfConfig") -> None:
    from lmf.config.values import parse_optim_args

    t, ft = cfg.training, cfg.finetuning
    if not t.optim_args:
        return
    special = [k for k in OPTIMIZER_SWITCHES if getattr(ft, k)]
    if special:
        raise ConfigError(f"config keys 'optim_args' and {special[0]!r}: {special[0]} is configured by its own keys "
                          f"({special[0][4:]}_*), not optim_args")
    parse_optim_args(t.optim_args, t.optim)  # names a bad pair now rather than when the optimizer is built


@rule("debug")
def debug_options_exist(cfg: "LmfConfig") -> None:
    t = cfg.training
    options = t.debug if isinstance(t.debug, list) else str(t.debug or "").split()
    for option in options:
        if option == "tpu_metrics_debug":
            raise ConfigError("config key 'debug': tpu_metrics_debug reports TPU metrics; lmf does not run on TPUs")
        if option != "underflow_overflow":
            raise ConfigError(f"config key 'debug': {option!r} is not one of underflow_overflow, tpu_metrics_debug")
    t.debug = " ".join(options)


@rule("prediction_loss_only", "compute_accuracy", "do_predict")
def prediction_loss_only_keeps_the_loss(cfg: "LmfConfig") -> None:
    t = cfg.training
    if not t.prediction_loss_only:
        return
    if cfg.finetuning.compute_accuracy:
        raise ConfigError("config keys 'prediction_loss_only' and 'compute_accuracy': the first asks for the loss "
                          "only, the second for the token accuracy too; set one")
    if t.do_predict:
        raise ConfigError("config keys 'prediction_loss_only' and 'do_predict': prediction generates answers, "
                          "it has no loss; set one")


@rule("fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather", "quantization_bit", "fsdp", "deepspeed")
def fp8_trains_unquantized_linears(cfg: "LmfConfig") -> None:
    t = cfg.training
    if t.fp8_enable_fsdp_float8_all_gather and not t.fp8:
        logger.warning("config key 'fp8_enable_fsdp_float8_all_gather' turns fp8 on (as in LLaMA-Factory)")
        t.fp8 = True
    if not t.fp8:
        if t.fp8_backend != "auto":
            logger.warning("config key 'fp8_backend' has no effect without fp8: true")
        return
    if t.fp8_backend in ("te", "msamp"):
        raise ConfigError(f"config key 'fp8_backend': {t.fp8_backend} is not implemented in lmf (Transformer Engine "
                          "and MS-AMP run on NVIDIA GPUs only); auto / torchao trains in FP8 with torchao")
    if cfg.model.quantization_bit is not None:
        raise ConfigError("config keys 'fp8' and 'quantization_bit' do not combine (as in LLaMA-Factory): FP8 "
                          "computes with the unquantized weights")
    if t.fp8_enable_fsdp_float8_all_gather and not (t.fsdp or t.deepspeed):
        logger.warning("config key 'fp8_enable_fsdp_float8_all_gather' has no effect without FSDP sharding")


@rule("auto_find_batch_size", "batching_strategy", "streaming", "galore_layerwise", "apollo_layerwise")
def auto_find_batch_size_can_split_a_step(cfg: "LmfConfig") -> None:
    """A step retried in smaller micro-batches must be re-readable from its first sample and not yet applied."""
    if not cfg.training.auto_find_batch_size:
        return
    ft = cfg.finetuning
    others = {"batching_strategy": (cfg.training.batching_strategy or "").startswith("dynamic"),
              "streaming": cfg.data.streaming,
              "galore_layerwise": ft.use_galore and ft.galore_layerwise,
              "apollo_layerwise": ft.use_apollo and ft.apollo_layerwise}
    for key, on in others.items():
        if on:
            raise ConfigError(f"config keys 'auto_find_batch_size' and {key!r} do not combine in lmf: a step that "
                              "runs out of memory is retried in micro-batches of fewer samples, from its first sample, "
                              "before any weight changes")


@rule("group_by_length", "disable_shuffling", "streaming")
def group_by_length_orders_a_dataset(cfg: "LmfConfig") -> None:
    if not cfg.training.group_by_length:
        return
    if cfg.finetuning.disable_shuffling:
        raise ConfigError("config keys 'group_by_length' and 'disable_shuffling' (train_sampling_strategy: "
                          "sequential) are two orders of the data; choose one")
    if cfg.data.streaming:
        raise ConfigError("config keys 'group_by_length' and 'streaming' do not combine: a stream's lengths are not "
                          "known before it is read")


#: keys that only act with their switch on: switch -> (group, keys)
_SWITCHED = {
    "torch_compile": ("training", ("torch_compile_backend", "torch_compile_mode")),
    "enable_torch_profiler": ("training", ("profiler_output_dir", "profiler_wait_steps", "profiler_warmup_steps",
                                           "profiler_active_steps", "profiler_repeat", "profiler_record_shapes",
                                           "profiler_profile_memory", "profiler_with_stack")),
    "use_eaft_loss": ("finetuning", ("eaft_alpha",)),
    "streaming": ("data", ("buffer_size",)),
}


@rule("torch_compile", "torch_compile_backend", "torch_compile_mode", "enable_torch_profiler", "profiler_output_dir",
      "profiler_wait_steps", "profiler_warmup_steps", "profiler_active_steps", "profiler_repeat",
      "profiler_record_shapes", "profiler_profile_memory", "profiler_with_stack", "use_eaft_loss", "eaft_alpha",
      "streaming", "buffer_size")
def switched_keys_say_when_their_switch_is_off(cfg: "LmfConfig") -> None:
    import dataclasses

    for switch, (group_name, keys) in _SWITCHED.items():
        group = getattr(cfg, group_name)
        if getattr(group, switch):
            continue
        defaults = {f.name: f.default for f in dataclasses.fields(group)}
        for key in keys:
            if getattr(group, key) != defaults[key]:
                logger.warning("config key %r has no effect without %s: true", key, switch)
