"""Reward modelling: a scalar value head trained with the pairwise Bradley-Terry loss.

The reward of a sequence is the value head's output at its last non-pad token; for a pair the loss
is ``-logsigmoid(r_chosen - r_rejected)``. Batches come from ``PairwiseCollator`` (rows ``[0:B]``
chosen, ``[B:2B]`` rejected), so both answers go through one forward.
"""

from __future__ import annotations

import torch

from lmf.config.parser import split_list
from lmf.model.value_head import last_token_index, token_values


def pairwise_scores(model, batch: dict):
    """``(chosen_scores [B], rejected_scores [B])`` from one concatenated forward."""
    mask = batch["attention_mask"]
    values = token_values(model, batch["input_ids"], mask, batch.get("position_ids"), batch.get("mm_inputs"))
    scores = values.gather(1, last_token_index(mask).unsqueeze(1)).squeeze(1)
    half = scores.size(0) // 2
    return scores[:half], scores[half:]


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-pair ``-log sigmoid(chosen - rejected)`` ``[B]``."""
    return -torch.nn.functional.logsigmoid(chosen_scores.float() - rejected_scores.float())


class PairwiseRMObjective:
    """What ``lmf rm`` plugs into the shared loop (:class:`lmf.train.state.Objective`): the pairwise ``collator``,
    the Bradley-Terry ``compute_loss(model, batch) -> (loss_sum, num_pairs, metrics)``, and the value head saved
    beside the adapter or model (``save_extra``) and restored on resume (``load_extra``)."""

    name = "rm"

    def __init__(self, collator=None):
        self.collator = collator

    def __call__(self, model, batch: dict):
        return self.compute_loss(model, batch)

    def compute_loss(self, model, batch: dict):
        chosen, rejected = pairwise_scores(model, batch)
        losses = bradley_terry_loss(chosen, rejected)
        c, r = chosen.detach().float(), rejected.detach().float()
        metrics = {
            "accuracy": (c > r).float().mean().item(),
            "scores/chosen": c.mean().item(),
            "scores/rejected": r.mean().item(),
            "scores/margins": (c - r).mean().item(),
        }
        return losses.sum(), torch.tensor(losses.size(0), device=losses.device), metrics

    def save_extra(self, out_dir: str, state_dict: dict) -> dict:
        """Write the value head next to the adapter/model; return the state dict without it."""
        from lmf.model.value_head import VALUE_HEAD_PREFIX, save_value_head_state, strip_value_head

        head = {k[k.index(VALUE_HEAD_PREFIX):]: v for k, v in state_dict.items() if VALUE_HEAD_PREFIX in k}
        save_value_head_state(head, out_dir)
        return strip_value_head(state_dict)

    def load_extra(self, model, checkpoint_dir: str) -> set:
        """Restore the value head of a checkpoint (in place); the parameter names it restored."""
        from lmf.model.value_head import load_value_head

        load_value_head(model, checkpoint_dir)
        return {n for n, _ in model.named_parameters() if "v_head." in n}


def freeze_unused_lm_head(model) -> None:
    """The reward never uses the LM head: stop training it (DDP would wait for its gradients)."""
    from lmf.model.forward import unwrap_causal_lm

    causal_lm = unwrap_causal_lm(model)
    head, embed = causal_lm.get_output_embeddings(), causal_lm.get_input_embeddings()
    if head is not None and (embed is None or head.weight is not embed.weight):
        head.requires_grad_(False)


def build_objective(cfg, inputs) -> PairwiseRMObjective:
    """The ``lmf rm`` recipe: a value head (+ LoRA/full/freeze) trained on pairwise data; saved as
    value_head.safetensors next to the adapter or model."""
    from lmf.data.collator import PairwiseCollator

    prepare_value_head(cfg, inputs.model)
    return PairwiseRMObjective(inputs.collate(PairwiseCollator(inputs.tokenizer, inputs.pad_to_multiple_of)))


def prepare_value_head(cfg, model) -> None:
    """Freeze the unused LM head; continue the value head of the adapter/model when it has one, else add a new one."""
    from lmf.extras.logging import get_logger
    from lmf.model.value_head import add_value_head, has_value_head, load_value_head

    logger = get_logger(__name__)
    freeze_unused_lm_head(model)
    adapters = split_list(cfg.model.adapter_name_or_path)
    if adapters and has_value_head(adapters[-1]) and not cfg.finetuning.create_new_adapter:
        load_value_head(model, adapters[-1])
        logger.info("continuing the value head of %s", adapters[-1])
    elif has_value_head(cfg.model.model_name_or_path):
        load_value_head(model, cfg.model.model_name_or_path)
        logger.info("continuing the value head of %s", cfg.model.model_name_or_path)
    else:
        add_value_head(model, seed=cfg.training.seed)
    model.v_head.requires_grad_(True)
