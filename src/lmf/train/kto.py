"""The KTO recipe (``lmf kto``, ``stage: kto``): Kahneman-Tversky optimisation on answers labelled desirable
or undesirable (``kto_tag``), after Ethayarajh et al. (2024) as TRL and LLaMA-Factory implement it.

Per example, with ``r = log pi(y|x) - log ref(y|x)`` (sums over the answer's tokens) and the KL estimate
``z = max(0, mean over the batch and ranks of [log pi(y'|x) - log ref(y'|x)])`` on mismatched answers ``y'``
(the previous record's, see :class:`lmf.data.processor.FeedbackProcessor`), detached:

    desirable:    kto_chosen_weight   * (1 - sigmoid(beta * (r - z)))
    undesirable:  kto_rejected_weight * (1 - sigmoid(beta * (z - r)))

``pref_ftx`` adds ``pref_ftx * -(log pi(y|x) / |y|)`` for desirable answers. The reference is the policy with
its LoRA adapters disabled, or a frozen copy (full/freeze tuning, ``ref_model``), sharded like DPO's under FSDP.
Logged: ``rewards/chosen``, ``rewards/rejected`` (``beta * r`` averaged over that kind of answer),
``rewards/margins``, ``kl``, ``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

from lmf.loss import sequence_logps
from lmf.model.forward import decoder_hidden_states, lm_head_of
from lmf.train.reference import reference_logps
from lmf.train.metrics import Difference, Ratio

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig


def kto_losses(policy_logps, ref_logps, desirable, kl, *, beta: float, chosen_weight: float = 1.0,
               rejected_weight: float = 1.0):
    """Per-example KTO losses ``[B]`` and rewards ``beta * (policy - ref)`` ``[B]`` (detached).

    ``policy_logps`` / ``ref_logps``: answer log-prob sums ``[B]``; ``desirable``: bool ``[B]``; ``kl``: the
    (detached, non-negative) KL estimate.
    """
    ratio = policy_logps.float() - ref_logps.float()
    kl = kl.detach().float() if torch.is_tensor(kl) else torch.tensor(float(kl))
    chosen = chosen_weight * (1.0 - torch.sigmoid(beta * (ratio - kl)))
    rejected = rejected_weight * (1.0 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, chosen, rejected), beta * ratio.detach()


def kl_estimate(policy_kl_logps, ref_kl_logps):
    """``max(0, mean(policy - ref))`` over the mismatched answers, averaged over ranks (TRL's estimate)."""
    import torch.distributed as dist

    kl = (policy_kl_logps.float() - ref_kl_logps.float()).mean().detach()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        kl = kl.clone()
        dist.all_reduce(kl)
        kl = kl / dist.get_world_size()
    return kl.clamp(min=0)


def _answer_logps(model, batch: dict, rows: slice, loss_opts: dict):
    hidden = decoder_hidden_states(model, batch["input_ids"][rows], batch["attention_mask"][rows],
                                   batch.get("position_ids")[rows] if batch.get("position_ids") is not None else None)
    return sequence_logps(hidden, lm_head_of(model), batch["labels"][rows], **loss_opts)


@dataclass
class KTOObjective:
    """What ``lmf kto`` plugs into the shared loop (:class:`lmf.train.state.Objective`): the feedback ``collator``
    and ``compute_loss(model, batch) -> (loss_sum, examples, metrics)``."""

    name = "kto"

    beta: float = 0.1
    chosen_weight: float = 1.0
    rejected_weight: float = 1.0
    ftx: float = 0.0
    loss_opts: dict = field(default_factory=dict)
    ref_model: Optional[torch.nn.Module] = None
    collator: Optional[Callable] = None

    def compute_loss(self, model, batch: dict):
        desirable = batch["kto_tags"].to(batch["input_ids"].device)
        n = desirable.size(0)
        pi, lengths = _answer_logps(model, batch, slice(0, n), self.loss_opts)
        with torch.no_grad():
            pi_kl, _ = _answer_logps(model, batch, slice(n, 2 * n), self.loss_opts)
        ref, ref_kl = reference_logps(model, batch, self.ref_model, self.loss_opts)
        kl = kl_estimate(pi_kl, ref_kl.to(pi_kl.device))
        losses, rewards = kto_losses(pi, ref.to(pi.device), desirable, kl, beta=self.beta,
                                     chosen_weight=self.chosen_weight, rejected_weight=self.rejected_weight)
        if self.ftx > 0:
            losses = losses + self.ftx * torch.where(desirable, -pi.float() / lengths.clamp(min=1), 0.0)
        undesirable = ~desirable
        chosen_n, rejected_n = float(desirable.sum()), float(undesirable.sum())
        logps = pi.detach().float()
        metrics = {
            "rewards/chosen": Ratio(float(rewards[desirable].sum()), chosen_n),
            "rewards/rejected": Ratio(float(rewards[undesirable].sum()), rejected_n),
            "rewards/margins": Difference("rewards/chosen", "rewards/rejected"),
            "logps/chosen": Ratio(float(logps[desirable].sum()), chosen_n),
            "logps/rejected": Ratio(float(logps[undesirable].sum()), rejected_n),
            "kl": float(kl),
        }
        return losses.sum(), torch.tensor(n, device=losses.device), metrics


def build_objective(cfg: "LmfConfig", inputs) -> KTOObjective:
    """The reference (:mod:`lmf.train.reference`: disabled adapters, or a frozen, possibly sharded copy) and the KTO
    objective with its feedback collator."""
    from lmf.data.collator import FeedbackCollator
    from lmf.train.reference import build_reference, needs_separate_reference
    from lmf.train.sft import resolve_loss_kwargs

    ft, model = cfg.finetuning, inputs.model
    ref_model = build_reference(cfg, inputs, separate=needs_separate_reference(cfg, model))
    return KTOObjective(beta=ft.pref_beta, chosen_weight=ft.kto_chosen_weight, rejected_weight=ft.kto_rejected_weight,
                        ftx=ft.pref_ftx, loss_opts=resolve_loss_kwargs(cfg, model), ref_model=ref_model,
                        collator=FeedbackCollator(inputs.tokenizer, inputs.pad_to_multiple_of))
