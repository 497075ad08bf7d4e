"""Preference losses on per-sequence log-probs (pure functions, no model).

Definitions follow LLaMA-Factory's ``CustomDPOTrainer`` (itself after TRL):

- ``sigmoid`` (DPO, cDPO with ``label_smoothing``):
  ``-(1-ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h)``,
  ``h = (pi_c - pi_r) - (ref_c - ref_r)``.
- ``hinge`` (RSO): ``relu(1 - beta * h)``.
- ``ipo``: ``(h - 1 / (2 * beta)) ** 2``, on *length-averaged* log-probs.
- ``orpo`` (reference-free, length-averaged): ``-pi_c + beta * -logsigmoid(log_odds)``,
  ``log_odds = (pi_c - pi_r) - (log(1 - exp(pi_c)) - log(1 - exp(pi_r)))``.
- ``simpo`` (reference-free, length-averaged): ``-logsigmoid(beta * (pi_c - pi_r) - gamma)``.

Rewards: ``beta * (policy - ref)`` with a reference model, ``beta * policy`` without one.
``ftx`` adds ``ftx * -(chosen logps / chosen length)`` (an SFT term on the chosen answer).

BCO (``pref_bco_weight`` w, with a reference): ``(loss + w * bco) / (1 + w)``, ``bco = -logsigmoid(r_c - delta)
- logsigmoid(-(r_r - delta))`` with the rewards ``r`` and ``delta`` the running mean of the batches' mean reward
(:class:`BCOBaseline`, TRL's ``RunningMoments``), before ``ftx``, as LLaMA-Factory combines them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from lmf.config.stages import REFERENCE_FREE_LOSSES

if TYPE_CHECKING:
    import torch

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "orpo", "simpo")
#: losses computed on log-probs averaged over the answer's tokens.
LENGTH_NORMALISED = ("ipo", "orpo", "simpo")


def uses_reference_model(loss_type: str) -> bool:
    """Whether ``loss_type`` compares against a reference model."""
    return loss_type not in REFERENCE_FREE_LOSSES


def _log1m_exp(x: "torch.Tensor") -> "torch.Tensor":
    """``log(1 - exp(x))`` for ``x < 0``, stable near 0 (clamped just below 0)."""
    import torch

    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


def _average(logps, lengths, name: str):
    if lengths is None:
        raise ValueError(f"{name} is required for length-normalised preference losses {LENGTH_NORMALISED}")
    return logps / lengths.to(logps.dtype).clamp(min=1)


class BCOBaseline:
    """The running mean of the batches' mean reward (TRL's ``RunningMoments``: mean 0, variance 1 and count 1e-24 to
    start; each update merges the values of every rank). ``state`` is what a checkpoint keeps."""

    def __init__(self) -> None:
        self.state = {"mean": 0.0, "var": 1.0, "count": 1e-24}

    def update(self, mean_reward: "torch.Tensor") -> float:
        """Merge this batch's mean reward (one value per rank) and return the new running mean."""
        import torch

        from lmf.dist.runtime import is_dist

        xs = mean_reward.detach().float().reshape(1)
        if is_dist():
            import torch.distributed as dist

            gathered = [torch.zeros_like(xs) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, xs)
            xs = torch.cat(gathered)
        st = self.state
        n = xs.numel()
        var, mean = torch.var_mean(xs, unbiased=False)
        delta, total = mean.item() - st["mean"], st["count"] + n
        old_sum = st["var"] * st["count"] + delta ** 2 * st["count"] * n / total
        st["mean"] += delta * n / total
        st["var"] = (old_sum + var.item() * n) / total
        st["count"] = total
        return st["mean"]


def preference_loss(
    policy_chosen_logps: "torch.Tensor",
    policy_rejected_logps: "torch.Tensor",
    ref_chosen_logps: Optional["torch.Tensor"] = None,
    ref_rejected_logps: Optional["torch.Tensor"] = None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    chosen_lengths: Optional["torch.Tensor"] = None,
    rejected_lengths: Optional["torch.Tensor"] = None,
    ftx: float = 0.0,
    bco_weight: float = 0.0,
    bco_baseline: Optional[BCOBaseline] = None,
    bco_update: bool = True,
):
    """Per-pair preference losses and rewards.

    Log-probs are per-sequence *sums* over answer tokens ``[B]``; ``*_lengths`` are the answer
    token counts ``[B]`` (needed for ipo/orpo/simpo and for ``ftx``). Returns
    ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are detached.
    """
    import torch
    import torch.nn.functional as F

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown pref_loss {loss_type!r}; expected one of {LOSS_TYPES}")
    pi_c, pi_r = policy_chosen_logps.float(), policy_rejected_logps.float()
    needs_ref = uses_reference_model(loss_type)
    if needs_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"pref_loss {loss_type!r} needs reference log-probs")
    ref_c = ref_chosen_logps.float() if needs_ref else None
    ref_r = ref_rejected_logps.float() if needs_ref else None

    if loss_type in LENGTH_NORMALISED:
        pi_c = _average(pi_c, chosen_lengths, "chosen_lengths")
        pi_r = _average(pi_r, rejected_lengths, "rejected_lengths")
        if needs_ref:
            ref_c = _average(ref_c, chosen_lengths, "chosen_lengths")
            ref_r = _average(ref_r, rejected_lengths, "rejected_lengths")

    if needs_ref:
        h = (pi_c - pi_r) - (ref_c - ref_r)
        if loss_type == "sigmoid":
            losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        elif loss_type == "hinge":
            losses = F.relu(1.0 - beta * h)
        else:  # ipo
            losses = (h - 1.0 / (2.0 * beta)) ** 2
        chosen_rewards = beta * (pi_c - ref_c).detach()
        rejected_rewards = beta * (pi_r - ref_r).detach()
        if bco_weight > 0.0 and bco_baseline is not None:
            rewards = torch.cat((chosen_rewards, rejected_rewards)).mean()
            delta = bco_baseline.update(rewards) if bco_update else bco_baseline.state["mean"]  # eval: as it stands
            bco = -F.logsigmoid(beta * (pi_c - ref_c) - delta) - F.logsigmoid(-(beta * (pi_r - ref_r) - delta))
            losses = (losses + bco_weight * bco) / (1.0 + bco_weight)
    else:
        if loss_type == "orpo":
            log_odds = (pi_c - pi_r) - (_log1m_exp(pi_c) - _log1m_exp(pi_r))
            losses = -pi_c - beta * F.logsigmoid(log_odds)
        else:  # simpo
            losses = -F.logsigmoid(beta * (pi_c - pi_r) - simpo_gamma)
        chosen_rewards = beta * pi_c.detach()
        rejected_rewards = beta * pi_r.detach()

    if ftx > 0.0:
        sft = -_average(policy_chosen_logps.float(), chosen_lengths, "chosen_lengths")
        losses = losses + ftx * sft
    return losses, chosen_rewards, rejected_rewards


def reward_metrics(chosen_rewards: "torch.Tensor", rejected_rewards: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """Per-pair tensors ``[B]`` of the logged reward statistics (mean them over pairs)."""
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
    }
