"""Rules of the preference stages (DPO, KTO): what their losses take (the numeric ranges of ``pref_beta``,
``pref_ftx``, ``dpo_label_smoothing`` and the KTO weights are in :data:`lmf.config.args.BOUNDS`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.config.rules import rule
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


@rule("dpo_label_smoothing", "pref_loss", "stage")
def label_smoothing_is_for_sigmoid(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning
    if ft.stage == "dpo" and ft.dpo_label_smoothing and ft.pref_loss != "sigmoid":
        raise ConfigError(f"config key 'dpo_label_smoothing' only applies to pref_loss: sigmoid (got {ft.pref_loss})")


@rule("precompute_ref_log_probs", "stage")
def kto_scores_its_reference_every_batch(cfg: "LmfConfig") -> None:
    if cfg.finetuning.stage == "kto" and cfg.finetuning.precompute_ref_log_probs:
        raise ConfigError("config key 'precompute_ref_log_probs' is not implemented for stage kto (the KL term "
                          "needs the reference on every batch)")


@rule("pref_loss", "dpo_label_smoothing", "simpo_gamma", "stage")
def dpo_loss_keys_have_no_effect_on_kto(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning
    if ft.stage == "kto" and (ft.pref_loss != "sigmoid" or ft.dpo_label_smoothing or ft.simpo_gamma != 0.5):
        logger.warning("pref_loss / dpo_label_smoothing / simpo_gamma have no effect with stage kto (as in "
                       "LLaMA-Factory): the KTO loss is used")
