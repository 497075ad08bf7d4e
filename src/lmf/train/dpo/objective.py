"""The DPO training objective: one concatenated forward of chosen+rejected, reference log-probs, loss.

Batches come from ``lmf.data.collator.PairwiseCollator``: rows ``[0:B]`` are the chosen answers and
``[B:2B]`` the rejected ones (same prompts). Reference log-probs come, in order of preference, from
precomputed columns in the batch (``ref_chosen_logps``/``ref_rejected_logps``), or the reference of
:mod:`lmf.train.reference` (a frozen model, or the policy itself with its LoRA adapters disabled).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from lmf.train.dpo.losses import BCOBaseline, preference_loss, reward_metrics, uses_reference_model
from lmf.train.reference import paired_logps, reference_logps

REF_CHOSEN = "ref_chosen_logps"
REF_REJECTED = "ref_rejected_logps"


@dataclass
class DPOObjective:
    """What ``lmf dpo`` plugs into the shared loop (:class:`lmf.train.state.Objective`): the pairwise ``collator``
    and ``compute_loss(model, batch) -> (loss_sum, num_pairs, metrics)``.

    ``loss_sum`` is the sum of per-pair losses and ``num_pairs`` the pair count, so the loop's
    sum/count normalisation yields the mean over pairs. ``metrics`` are per-batch means.
    """

    name = "dpo"

    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    ftx: float = 0.0
    ld_alpha: Optional[float] = None  # LD-DPO: the policy's log-probs only, as in LLaMA-Factory
    bco_weight: float = 0.0  # BCO: its baseline is checkpointed (persistent_state)
    bco_baseline: BCOBaseline = field(default_factory=BCOBaseline)
    loss_opts: dict = field(default_factory=dict)
    ref_model: Optional[torch.nn.Module] = None
    collator: Optional[Callable] = None

    @property
    def persistent_state(self) -> dict:
        """What a checkpoint keeps of the objective and a resume restores (the trainer's TrainState holds it)."""
        return {"bco_baseline": self.bco_baseline.state} if self.bco_weight else {}

    @property
    def use_reference(self) -> bool:
        return uses_reference_model(self.loss_type)

    def __call__(self, model, batch: dict):
        return self.compute_loss(model, batch)

    def compute_loss(self, model, batch: dict):
        pi_c, pi_r, len_c, len_r = paired_logps(model, batch, ld_alpha=self.ld_alpha, **self.loss_opts)
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
            bco_weight=self.bco_weight, bco_baseline=self.bco_baseline, bco_update=model.training,
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
