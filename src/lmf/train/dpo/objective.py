"""The DPO training objective: one concatenated forward of chosen+rejected, reference log-probs, loss.

Batches come from ``lmf.data.collator.PairwiseCollator``: rows ``[0:B]`` are the chosen answers and
``[B:2B]`` the rejected ones (same prompts). Reference log-probs come, in order of preference, from
precomputed columns in the batch (``ref_chosen_logps``/``ref_rejected_logps``), a frozen reference
model, or the policy itself with its LoRA adapters disabled (no second copy in memory).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch

from lmf.loss import sequence_logps
from lmf.model.forward import decoder_hidden_states, lm_head_of
from lmf.train.dpo.losses import preference_loss, reward_metrics, uses_reference_model

REF_CHOSEN = "ref_chosen_logps"
REF_REJECTED = "ref_rejected_logps"


def concatenated_logps(model, batch: dict, **loss_opts):
    """``(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths)``, each ``[B]``, from one forward.

    ``loss_opts`` are :func:`lmf.loss.sequence_logps` options (``chunk_size``, ``softcap``).
    """
    hidden = decoder_hidden_states(model, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"),
                                   batch.get("mm_inputs"))
    logps, lengths = sequence_logps(hidden, lm_head_of(model), batch["labels"], **loss_opts)
    half = batch["input_ids"].size(0) // 2
    return logps[:half], logps[half:], lengths[:half], lengths[half:]


def has_adapters(model) -> bool:
    """Whether ``model`` is PEFT-wrapped (its adapters can be switched off)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class ReferenceScorer(torch.nn.Module):
    """A frozen reference as a module whose ``forward(batch)`` scores a pairwise batch.

    FSDP2 shards it with this module as the root, so the root's hooks gather the embeddings,
    final norm and LM head around the whole scoring pass (see ``lmf.train.dpo.reference.shard_reference``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict, loss_opts: Optional[dict] = None):
        chosen, rejected, _, _ = concatenated_logps(self.model, batch, **(loss_opts or {}))
        return chosen, rejected


@torch.no_grad()
def reference_logps(model, batch: dict, ref_model=None, loss_opts: Optional[dict] = None):
    """Reference ``(chosen_logps, rejected_logps)`` sums ``[B]``: ``ref_model``, or ``model`` without adapters."""
    if ref_model is not None:
        target, context = ref_model, nullcontext()
    elif has_adapters(model):
        target, context = model, model.disable_adapter()
    else:
        raise ValueError("no reference model: full fine-tuning needs ref_model, the base model or precomputed log-probs")
    was_training = target.training
    target.eval()  # no dropout in the reference
    try:
        with context:
            if isinstance(target, ReferenceScorer):
                chosen, rejected = target(batch, loss_opts)
            else:
                chosen, rejected, _, _ = concatenated_logps(target, batch, **(loss_opts or {}))
    finally:
        target.train(was_training)
    return chosen.detach(), rejected.detach()


@dataclass
class DPOObjective:
    """``compute_loss(model, batch) -> (loss_sum, num_pairs, metrics)`` for the shared training loop.

    ``loss_sum`` is the sum of per-pair losses and ``num_pairs`` the pair count, so the loop's
    sum/count normalisation yields the mean over pairs. ``metrics`` are per-batch means.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    ftx: float = 0.0
    loss_opts: dict = field(default_factory=dict)
    ref_model: Optional[torch.nn.Module] = None

    @property
    def use_reference(self) -> bool:
        return uses_reference_model(self.loss_type)

    def __call__(self, model, batch: dict):
        return self.compute_loss(model, batch)

    def compute_loss(self, model, batch: dict):
        pi_c, pi_r, len_c, len_r = concatenated_logps(model, batch, **self.loss_opts)
        ref_c = ref_r = None
        if self.use_reference:
            if REF_CHOSEN in batch:
                ref_c, ref_r = batch[REF_CHOSEN].to(pi_c.device), batch[REF_REJECTED].to(pi_c.device)
            else:
                ref_c, ref_r = reference_logps(model, batch, self.ref_model, self.loss_opts)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            pi_c, pi_r, ref_c, ref_r,
            loss_type=self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma, chosen_lengths=len_c, rejected_lengths=len_r, ftx=self.ftx,
        )
        metrics = {k: v.mean().item() for k, v in reward_metrics(chosen_rewards, rejected_rewards).items()}
        metrics["logps/chosen"] = pi_c.detach().mean().item()
        metrics["logps/rejected"] = pi_r.detach().mean().item()
        if self.loss_type == "orpo":
            sft = -(pi_c.detach() / len_c.clamp(min=1))
            metrics["sft_loss"] = sft.mean().item()
            metrics["odds_ratio_loss"] = ((losses.detach() - sft - self._ftx_term(pi_c, len_c)) / self.beta).mean().item()
        num_pairs = torch.tensor(losses.size(0), device=losses.device)
        return losses.sum(), num_pairs, metrics

    def _ftx_term(self, pi_c, len_c):
        return self.ftx * -(pi_c.detach() / len_c.clamp(min=1)) if self.ftx > 0 else 0.0
