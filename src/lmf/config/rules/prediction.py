"""Rules of prediction (``do_predict``: generate answers for ``eval_dataset``): what it needs, what it cannot do."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.config.rules import rule
from lmf.extras.errors import ConfigError

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig


@rule("predict_with_generate", "do_predict", "stage", "eval_dataset", "tokenized_path", "do_train")
def prediction_generates_for_sft(cfg: "LmfConfig") -> None:
    t, d, ft = cfg.training, cfg.data, cfg.finetuning
    if t.predict_with_generate and not t.do_predict:
        raise ConfigError("config key 'predict_with_generate' during evaluation (do_eval) is not implemented; "
                          "it applies to do_predict: true")
    if not t.do_predict:
        return
    if not t.predict_with_generate:
        raise ConfigError("config key 'do_predict' without 'predict_with_generate' (teacher-forced logits) is not "
                          "implemented; set predict_with_generate: true")
    if ft.stage != "sft":
        raise ConfigError(f"config key 'do_predict' generates answers for stage sft, not {ft.stage}")
    if not d.eval_dataset:
        raise ConfigError("config key 'do_predict' needs 'eval_dataset' (the datasets to generate answers for)")
    if d.tokenized_path and not t.do_train:
        raise ConfigError("config key 'tokenized_path' with do_predict is not implemented (the prediction set is "
                          "tokenized from eval_dataset and cached in the preprocessing cache)")


@rule("generation_config", "infer_backend")
def generation_config_is_for_transformers(cfg: "LmfConfig") -> None:
    if cfg.generating.generation_config and cfg.model.infer_backend == "vllm":
        raise ConfigError("config keys 'generation_config' and 'infer_backend: vllm': not implemented together; use "
                          "infer_backend: huggingface, or set the generating keys")
