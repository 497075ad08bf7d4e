"""Rules of the preference stages (DPO, KTO): what their losses take (the numeric ranges of ``pref_beta``,
``pref_ftx``, ``dpo_label_smoothing`` and the KTO weights are in :data:`lmf.config.values.BOUNDS`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.config.rules import rule
from lmf.config.stages import REFERENCE_FREE_LOSSES
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


@rule("ref_model_quantization_bit", "stage", "pref_loss", "finetuning_type", "ref_model")
def a_quantized_reference_is_a_separate_one(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning
    if ft.ref_model_quantization_bit is None:
        return
    if ft.stage not in ("dpo", "kto"):
        raise ConfigError(f"config key 'ref_model_quantization_bit' quantizes the reference model of dpo and kto; "
                          f"stage {ft.stage} has none")
    if ft.stage == "dpo" and ft.pref_loss in REFERENCE_FREE_LOSSES:
        raise ConfigError(f"config keys 'ref_model_quantization_bit' and 'pref_loss': {ft.pref_loss} uses no "
                          "reference model")
    if ft.finetuning_type in ("lora", "oft") and not ft.ref_model:
        raise ConfigError(f"config keys 'ref_model_quantization_bit' and 'finetuning_type': with "
                          f"{ft.finetuning_type} the reference is the policy with its adapters disabled, nothing "
                          "loaded apart to quantize; set ref_model to load a separate (quantized) reference")


@rule("ld_alpha", "stage")
def ld_dpo_is_a_dpo_loss(cfg: "LmfConfig") -> None:
    if cfg.finetuning.ld_alpha is not None and cfg.finetuning.stage != "dpo":
        raise ConfigError(f"config key 'ld_alpha' (LD-DPO) weighs DPO's answers; it does not apply to stage "
                          f"{cfg.finetuning.stage}")


@rule("pref_bco_weight", "stage", "pref_loss")
def bco_mixes_into_dpo_with_a_reference(cfg: "LmfConfig") -> None:
    ft = cfg.finetuning
    if not ft.pref_bco_weight:
        return
    if ft.stage != "dpo" or ft.pref_loss in REFERENCE_FREE_LOSSES:
        raise ConfigError(f"config key 'pref_bco_weight' mixes BCO into DPO with a reference model; it does not "
                          f"apply to stage {ft.stage} with pref_loss {ft.pref_loss}")
