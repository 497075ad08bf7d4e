"""NEFTune (Jain et al., 2023; ``neftune_noise_alpha``): while training, uniform noise of magnitude
``alpha / sqrt(seq_len x hidden)`` is added to the input embeddings, as transformers' Trainer does."""

from __future__ import annotations

from lmf.extras.logging import get_logger

logger = get_logger(__name__)


def _noise_hook(module, args, output):
    if not module.training:
        return output
    import torch

    magnitude = module.neftune_noise_alpha / torch.sqrt(torch.tensor(output.size(1) * output.size(2)))
    return output + torch.zeros_like(output).uniform_(-float(magnitude), float(magnitude))


def enable_neftune(model, alpha: float):
    """Add the noise hook to ``model``'s input embeddings (a no-op in eval mode); returns the hook handle."""
    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = float(alpha)
    logger.info("NEFTune: noise alpha %g on the input embeddings while training", alpha)
    return embeddings.register_forward_hook(_noise_hook)
