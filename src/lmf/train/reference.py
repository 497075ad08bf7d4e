"""The frozen reference model of the preference stages (DPO, KTO) and the coming RL stages: one home.

A reference scores the same batch as the policy, without gradients. It is, in order of preference: the policy
itself with its LoRA adapters disabled (no second copy in memory), or a frozen copy loaded from ``ref_model``
(default: the base model; ``ref_model_adapters`` merged), placed on the device or sharded with FSDP2 like the
policy. Batches are two halves (``[0:B]`` and ``[B:2B]``: chosen/rejected for DPO, answer/mismatched answer for
KTO), scored in one forward by :func:`paired_logps`.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Optional

import torch

from lmf.extras.constants import IGNORE_INDEX
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger
from lmf.loss import sequence_logps
from lmf.model.forward import decoder_hidden_states, lm_head_of

logger = get_logger(__name__)


def paired_logps(model, batch: dict, ld_alpha: Optional[float] = None, **loss_opts):
    """``(first_logps, second_logps, first_lengths, second_lengths)``, each ``[B]``, of a two-half batch, from one
    forward. ``loss_opts`` are :func:`lmf.loss.sequence_logps` options (``chunk_size``, ``softcap``). ``ld_alpha``
    (LD-DPO): :func:`ld_sequence_logps` instead of plain sums."""
    hidden = decoder_hidden_states(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                                   batch.get("mm_inputs"))
    if ld_alpha is None:
        logps, lengths = sequence_logps(hidden, lm_head_of(model), batch["labels"], **loss_opts)
    else:
        logps, lengths = ld_sequence_logps(hidden, lm_head_of(model), batch["labels"], ld_alpha, **loss_opts)
    half = batch["input_ids"].size(0) // 2
    return logps[:half], logps[half:], lengths[:half], lengths[half:]


def ld_sequence_logps(hidden, lm_head, labels, ld_alpha: float, chunk_size=None, softcap=None, use_liger=False):
    """LD-DPO's log-probabilities (LLaMA-Factory's ``get_batch_logps`` with ``ld_alpha``): in each answer of a pair
    (rows ``i`` and ``i + B/2``), the label tokens past the shorter answer's count weigh ``ld_alpha``; the others 1.
    LLaMA-Factory cuts at a position (the first label's plus that count): the same tokens where an answer's labels
    are contiguous, as they are in pairwise data. Returns the sums ``[B]`` and label counts ``[B]``."""
    from lmf.loss.dft import token_logps

    token = token_logps(hidden, lm_head, labels, chunk_size, softcap)  # [N], label tokens in row-major order
    mask = labels[:, 1:] != IGNORE_INDEX
    row = mask.nonzero(as_tuple=True)[0]
    index_in_answer = (mask.cumsum(1) - 1)[mask]
    lengths = mask.sum(-1)
    half = labels.size(0) // 2
    shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
    weight = torch.where(index_in_answer < shared[row], 1.0, ld_alpha).to(token.dtype)
    sums = torch.zeros(labels.size(0), dtype=token.dtype, device=token.device).index_add(0, row, token * weight)
    return sums, lengths


def has_adapters(model) -> bool:
    """Whether ``model`` is PEFT-wrapped (its adapters can be switched off: the reference comes for free)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def disable_dropout(model) -> None:
    """Set every dropout probability to 0 (policy and reference must score the same sequence alike)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class ReferenceScorer(torch.nn.Module):
    """A frozen reference as a module whose ``forward(batch)`` scores a two-half batch.

    FSDP2 shards it with this module as the root, so the root's hooks gather the embeddings, final norm and LM head
    around the whole scoring pass (:func:`shard_reference`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict, loss_opts: Optional[dict] = None):
        first, second, _, _ = paired_logps(self.model, batch, **(loss_opts or {}))
        return first, second


def reference_target(model, ref_model=None):
    """(what scores as the reference, the context to score in): ``ref_model``, or ``model`` with its adapters
    disabled."""
    if ref_model is not None:
        return ref_model, nullcontext()
    if has_adapters(model):
        return model, model.disable_adapter()
    raise ValueError("no reference model: full fine-tuning needs ref_model, the base model or precomputed log-probs")


@torch.no_grad()
def reference_logps(model, batch: dict, ref_model=None, loss_opts: Optional[dict] = None):
    """Reference ``(first_logps, second_logps)`` sums ``[B]``: ``ref_model``, or ``model`` without its adapters."""
    target, context = reference_target(model, ref_model)
    was_training = target.training
    target.eval()  # no dropout in the reference
    try:
        with context:
            if isinstance(target, ReferenceScorer):
                first, second = target(batch, loss_opts)
            else:
                first, second, _, _ = paired_logps(target, batch, **(loss_opts or {}))
    finally:
        target.train(was_training)
    return first.detach(), second.detach()


def load_reference_model(cfg, tokenizer, device=None):
    """The frozen reference: ``ref_model`` (+ ``ref_model_adapters``), default the base model, in eval mode."""
    from lmf.model.loader import load_model

    ft = cfg.finetuning
    # quantized only by ref_model_quantization_bit (LLaMA-Factory: a QLoRA policy's reference is unquantized)
    ref_model_args = dataclasses.replace(cfg.model, model_name_or_path=ft.ref_model or cfg.model.model_name_or_path,
                                         adapter_name_or_path=ft.ref_model_adapters,
                                         quantization_bit=ft.ref_model_quantization_bit)
    # adapters of the reference are merged for inference, which the loader allows for LoRA configs only
    finetuning = dataclasses.replace(ft, finetuning_type="lora") if ft.ref_model_adapters else ft
    ref_cfg = dataclasses.replace(cfg, model=ref_model_args, finetuning=finetuning)
    logger.info("loading the frozen reference model from %s%s", ref_model_args.model_name_or_path,
                f" in {ft.ref_model_quantization_bit} bits" if ft.ref_model_quantization_bit else "")
    model = load_model(ref_cfg, tokenizer, is_trainable=False, device=device)
    model.requires_grad_(False)
    return model.eval()


def shard_reference(ref_model, device) -> ReferenceScorer:
    """Shard a frozen reference with FSDP2 like the policy (each rank keeps 1/world of its weights).

    Call it on a model still on the CPU: only the local shards are moved to ``device``.
    """
    from torch.distributed.fsdp import fully_shard

    from lmf.train.parallel import decoder_layers

    scorer = ReferenceScorer(ref_model)
    for layer in decoder_layers(ref_model):
        fully_shard(layer)
    fully_shard(scorer)
    scorer.to(device)
    return scorer.eval()


def build_reference(cfg, inputs, *, separate: bool):
    """The reference of a run: None when the policy's disabled adapters serve (``separate`` false), else a frozen
    copy, sharded when the policy is (``inputs.plan``). Dropout is turned off in both."""
    disable_dropout(inputs.model)
    if not separate:
        logger.info("reference model: the base model with the LoRA adapters disabled")
        return None
    shard = inputs.plan.mode == "fsdp"
    if shard and cfg.finetuning.ref_model_quantization_bit:
        raise ConfigError("config key 'ref_model_quantization_bit' under FSDP sharding is not implemented (the "
                          "reference is sharded like the policy, which bitsandbytes weights are not); remove one")
    ref_model = load_reference_model(cfg, inputs.tokenizer, device=None if shard else inputs.runtime.device)
    disable_dropout(ref_model)
    if shard:
        ref_model = shard_reference(ref_model, inputs.runtime.device)
        logger.info("reference model sharded with FSDP2 across %d ranks", inputs.runtime.world_size)
    return ref_model


def needs_separate_reference(cfg, model) -> bool:
    """A frozen copy is needed for full/freeze tuning (no adapters to switch off) or an explicit ``ref_model``."""
    return bool(cfg.finetuning.ref_model) or not has_adapters(model)
