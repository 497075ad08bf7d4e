"""The SFT recipe (``lmf sft``, and ``stage: pt``): next-token cross-entropy on the label tokens (or, with
``use_dft_loss`` / ``use_eaft_loss``, a token-weighted cross-entropy, :mod:`lmf.loss.dft`)."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Callable

from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


def resolve_loss_kwargs(cfg: "LmfConfig", model) -> dict:
    """``causal_lm_loss`` options from the config; the plain path when ``lmf.loss.chunked`` is absent."""
    from lmf.loss import loss_kwargs

    opts = loss_kwargs(cfg.model, model)
    if opts.get("chunk_size") and importlib.util.find_spec("lmf.loss.chunked") is None:
        logger.warning("use_chunked_loss: lmf.loss.chunked is not available; using the plain loss")
        opts["chunk_size"] = None
    return opts


class SFTObjective:
    """What ``lmf sft`` (and ``stage: pt``) plugs into the shared loop (:class:`lmf.train.state.Objective`): the
    collator and the summed token cross-entropy."""

    name = "sft"

    def __init__(self, cfg: "LmfConfig", model, collator: Callable, reference=None):
        self.collator = collator
        self.asft_alpha = cfg.finetuning.asft_alpha if cfg.finetuning.use_asft_loss else None
        self.ref_model = reference  # ASFT: a frozen copy, or None (the policy with its adapters disabled)
        if self.asft_alpha is not None:
            logger.info("use_asft_loss: the DFT loss plus %g x KL(reference || policy) at each label token",
                        self.asft_alpha)
        self.loss_opts = resolve_loss_kwargs(cfg, model)
        self.compute_accuracy = cfg.finetuning.compute_accuracy  # token accuracy of evaluations (eval_accuracy)
        self.use_dft_loss = cfg.finetuning.use_dft_loss
        self.eaft_alpha = cfg.finetuning.eaft_alpha if cfg.finetuning.use_eaft_loss else None
        if self.eaft_alpha is not None:
            logger.info("use_eaft_loss: each label token's cross-entropy is weighted by (top-20 entropy / 3) ^ %g",
                        self.eaft_alpha)
        self.label_smoothing = cfg.training.label_smoothing_factor  # rules: not with use_dft_loss
        if self.use_dft_loss:
            logger.info("use_dft_loss: each label token's cross-entropy is weighted by its detached probability")

    def compute_loss(self, model, batch: dict):
        from lmf.loss import causal_lm_loss
        from lmf.loss.dft import asft_loss, dft_loss, eaft_loss
        from lmf.model.forward import decoder_hidden_states, lm_head_of

        hidden = decoder_hidden_states(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                                       batch.get("mm_inputs"))
        if self.asft_alpha is not None:
            ref_hidden, ref_head = self._reference_hidden(model, batch)
            loss_sum, num_tokens = asft_loss(hidden, lm_head_of(model), batch["labels"], ref_hidden, ref_head,
                                             self.asft_alpha, **self.loss_opts)
        elif self.use_dft_loss:
            loss_sum, num_tokens = dft_loss(hidden, lm_head_of(model), batch["labels"], **self.loss_opts)
        elif self.eaft_alpha is not None:
            loss_sum, num_tokens = eaft_loss(hidden, lm_head_of(model), batch["labels"], **self.loss_opts,
                                             alpha=self.eaft_alpha)
        else:
            loss_sum, num_tokens = causal_lm_loss(hidden, lm_head_of(model), batch["labels"], **self.loss_opts,
                                                  label_smoothing=self.label_smoothing)
        metrics = {}
        if self.compute_accuracy and not model.training:
            from lmf.loss.metrics import token_accuracy_counts

            correct, total = token_accuracy_counts(hidden, lm_head_of(model), batch["labels"],
                                                   self.loss_opts.get("chunk_size") or 1024)
            metrics["accuracy"] = float(correct) / max(float(total), 1.0)  # the trainer weights it by num_tokens
        return loss_sum, num_tokens, metrics

    def _reference_hidden(self, model, batch: dict):
        """ASFT: the frozen reference's last hidden states of the batch and its LM head (no gradients)."""
        import torch

        from lmf.model.forward import decoder_hidden_states, lm_head_of
        from lmf.train.reference import reference_target

        target, context = reference_target(model, self.ref_model)
        with torch.no_grad(), context:
            hidden = decoder_hidden_states(target, batch["input_ids"], batch.get("attention_mask"),
                                           batch.get("position_ids"), batch.get("mm_inputs"))
        return hidden, lm_head_of(target)


def build_objective(cfg: "LmfConfig", inputs) -> SFTObjective:
    """The ``lmf sft`` recipe (also ``stage: pt``): next-token cross-entropy on the label tokens; with
    ``use_asft_loss``, the frozen reference (:mod:`lmf.train.reference`) it anchors to."""
    from lmf.data.collator import SFTCollator

    collator = SFTCollator(inputs.tokenizer, pad_to_multiple_of=inputs.pad_to_multiple_of)
    if not cfg.data.ignore_pad_token_for_loss:  # LLaMA-Factory: the padding is trained, batches padded to 8s
        collator.pad_to_multiple_of, collator.label_pad_id = 8, collator.pad_id
        logger.info("ignore_pad_token_for_loss: false: padded positions are labelled with the pad token %d and "
                    "trained (batches padded to a multiple of 8)", collator.pad_id)
    reference = None
    if cfg.finetuning.use_asft_loss:
        from lmf.extras.errors import ConfigError
        from lmf.train.reference import build_reference, needs_separate_reference

        separate = needs_separate_reference(cfg, inputs.model)
        if separate and inputs.plan.mode == "fsdp":
            raise ConfigError("config key 'use_asft_loss' with a separate reference model (full / freeze tuning, or "
                              "ref_model) under FSDP sharding is not implemented; use LoRA (its reference is the "
                              "disabled adapters) or DDP")
        reference = build_reference(cfg, inputs, separate=separate)
    return SFTObjective(cfg, inputs.model, inputs.collate(collator), reference)
