"""Losses computed from decoder hidden states and the LM head weight (the forward pass is
:mod:`lmf.model.forward`): :mod:`lmf.loss.ce` (cross-entropy, sequence log-probs), :mod:`lmf.loss.chunked`
(the memory-lean path), :mod:`lmf.loss.liger` (liger-kernel on CUDA), :mod:`lmf.loss.metrics`."""

from lmf.extras.constants import IGNORE_INDEX
from lmf.loss.ce import causal_lm_loss, loss_kwargs, sequence_logps
from lmf.loss.liger import liger_available

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "liger_available", "loss_kwargs", "sequence_logps"]
