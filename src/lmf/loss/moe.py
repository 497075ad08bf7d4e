"""The router auxiliary (load-balancing) loss of mixture-of-experts models (``moe_aux_loss_coef``)."""

from __future__ import annotations

import torch



def load_balancing_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss over all MoE layers' router logits ([tokens, experts] each):
    ``num_experts * sum_e(fraction of tokens routed to e * mean router probability of e)`` (transformers'
    ``load_balancing_loss_func`` without a padding mask: padding-free batches hold no padding)."""
    logits = torch.cat([layer.float() for layer in router_logits if layer is not None], dim=0)
    probs = logits.softmax(dim=-1)
    _, selected = probs.topk(top_k, dim=-1)
    routed = torch.nn.functional.one_hot(selected, num_experts).float()  # [tokens, top_k, experts]
    tokens_per_expert = routed.mean(dim=0)
    prob_per_expert = probs.mean(dim=0)
    return (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum() * num_experts
