"""Optimizer (AdamW, fused on CUDA) and learning-rate schedule (with warmup)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

if TYPE_CHECKING:
    import torch

    from lmf.config.args import TrainingArguments


def _no_decay(name: str, param) -> bool:
    """Biases and norm weights (1-D tensors) get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: "torch.nn.Module", args: "TrainingArguments", ft=None, exclude: frozenset = frozenset(),
                 allow_empty: bool = False) -> list[dict]:
    """Trainable parameters in groups: with / without weight decay, and for LoRA+ (``loraplus_lr_ratio``) the
    B matrices at ``learning_rate x ratio`` and embedding B matrices at ``loraplus_lr_embedding``. Parameters
    whose ``id`` is in ``exclude`` are left out (another optimizer takes them)."""
    ratio = getattr(ft, "loraplus_lr_ratio", None)
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        no_decay = _no_decay(name, p)
        lr = args.learning_rate
        if ratio is not None:
            if "lora_embedding_B" in name:
                lr = ft.loraplus_lr_embedding
            elif "lora_B" in name:
                lr = args.learning_rate * ratio
        groups.setdefault((lr, no_decay), []).append(p)
    if not groups and allow_empty:
        return []
    if not groups:
        raise ConfigError("nothing to train: no parameter requires grad (check finetuning_type and its keys)")
    # the base learning rate's decay / no-decay groups first (what a checkpoint's optimizer state expects)
    order = sorted(groups, key=lambda k: (k[0] != args.learning_rate, k[0], k[1]))
    return [{"params": groups[k], "lr": k[0], "weight_decay": 0.0 if k[1] else args.weight_decay} for k in order]


def create_optimizer(model: "torch.nn.Module", args: "TrainingArguments", ft=None) -> "torch.optim.Optimizer":
    """AdamW (or SGD) over :func:`param_groups`; GaLore, APOLLO, BAdam, Adam-mini or Muon when one is on
    (:mod:`lmf.train.optimizer_plugins`)."""
    import torch

    from lmf.train.optimizer_plugins import create_special_optimizer, special_optimizer_of

    if ft is not None and special_optimizer_of(ft):
        return create_special_optimizer(model, args, ft)
    from lmf.config.values import BNB_ADAMW, parse_optim_args

    groups = param_groups(model, args, ft)
    extra = parse_optim_args(args.optim_args, args.optim)  # optim_args
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate, **extra)
    if args.optim in BNB_ADAMW:
        return _bitsandbytes_adamw(groups, args, *BNB_ADAMW[args.optim])
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    fused = on_cuda and args.optim in ("adamw_torch", "adamw_torch_fused", "adamw", "adamw_hf")
    return torch.optim.AdamW(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=fused or None,
        **extra,
    )


def _bitsandbytes_adamw(groups: list[dict], args: "TrainingArguments", bits: int, paged: bool):
    """transformers' bitsandbytes AdamW (``optim: adamw_8bit``, ``paged_adamw_8bit`` ...): ``bits``-bit state, paged
    or not; tensors under 4096 elements keep a 32-bit state (bitsandbytes' rule)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise NotAvailableError(f"optim: {args.optim} needs bitsandbytes: pip install 'lmf[qlora]'") from None
    if paged and not all(p.is_cuda for g in groups for p in g["params"]):
        paged = False
        logger.info("optim: %s: paged optimizer state needs CUDA; on this device it stays in memory unpaged",
                    args.optim)
    return bnb.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           eps=args.adam_epsilon, optim_bits=bits, is_paged=paged)


def warmup_steps_for(args: "TrainingArguments", total_steps: int) -> int:
    """warmup_steps when > 0, else ceil(warmup_ratio * total_steps)."""
    if args.warmup_steps > 0:
        return args.warmup_steps
    return math.ceil(args.warmup_ratio * total_steps)


def create_scheduler(optimizer, args: "TrainingArguments", total_steps: int):
    """transformers' schedule ``lr_scheduler_type`` (linear, cosine, constant, ... with warmup)."""
    from transformers import get_scheduler

    kwargs = dict(args.lr_scheduler_kwargs or {})
    name = args.lr_scheduler_type
    if name == "cosine_with_min_lr" and not ({"min_lr", "min_lr_rate"} & set(kwargs)):
        kwargs["min_lr_rate"] = 0.1
    if name == "warmup_stable_decay":
        kwargs.setdefault("num_decay_steps", max(1, total_steps // 10))
    try:
        return get_scheduler(
            name, optimizer, num_warmup_steps=warmup_steps_for(args, total_steps), num_training_steps=total_steps,
            scheduler_specific_kwargs=kwargs or None,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key 'lr_scheduler_kwargs': {kwargs!r} does not fit lr_scheduler_type {name!r}: {exc}") from exc
