"""The DPO recipe (``lmf dpo``): the reference (model, disabled adapter, or precomputed log-probs) and the DPO
objective for the shared workflow (:mod:`lmf.train.workflow`)."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

from lmf.extras.logging import get_logger
from lmf.train.dpo.losses import uses_reference_model
from lmf.train.dpo.objective import DPOObjective
from lmf.train.dpo.precompute import WithReferenceLogps, precompute_reference_logps
from lmf.train.reference import build_reference, disable_dropout, needs_separate_reference

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


def _free(device) -> None:
    from lmf.train.process import release_cached_memory

    gc.collect()
    release_cached_memory(device)


def build_objective(cfg: "LmfConfig", inputs) -> DPOObjective:
    """The reference (:mod:`lmf.train.reference`) or reference log-probs precomputed on the datasets, and the DPO
    objective with its pairwise collator."""
    from lmf.data.collator import PairwiseCollator
    from lmf.train.sft import resolve_loss_kwargs

    ft, model, runtime = cfg.finetuning, inputs.model, inputs.runtime
    loss_opts = resolve_loss_kwargs(cfg, model)
    if uses_reference_model(ft.pref_loss):
        ref_model = build_reference(cfg, inputs, separate=needs_separate_reference(cfg, model))
    else:
        disable_dropout(model)
        ref_model = None
        logger.info("pref_loss %s is reference-free: no reference model", ft.pref_loss)
    collator = WithReferenceLogps(inputs.collate(PairwiseCollator(inputs.tokenizer, inputs.pad_to_multiple_of)))
    if ft.precompute_ref_log_probs and uses_reference_model(ft.pref_loss):
        model.to(runtime.device)
        kwargs = dict(batch_size=cfg.training.per_device_eval_batch_size, device=runtime.device, loss_opts=loss_opts)
        inputs.train_dataset = precompute_reference_logps(inputs.train_dataset, collator, model, ref_model, **kwargs)
        if isinstance(inputs.eval_dataset, dict):
            inputs.eval_dataset = {name: precompute_reference_logps(ds, collator, model, ref_model, **kwargs)
                                   for name, ds in inputs.eval_dataset.items()}
        elif inputs.eval_dataset is not None:
            inputs.eval_dataset = precompute_reference_logps(inputs.eval_dataset, collator, model, ref_model, **kwargs)
        ref_model = None  # every batch now carries its reference log-probs
        _free(runtime.device)
    return DPOObjective(loss_type=ft.pref_loss, beta=ft.pref_beta, label_smoothing=ft.dpo_label_smoothing,
                        simpo_gamma=ft.simpo_gamma, ftx=ft.pref_ftx, ld_alpha=ft.ld_alpha,
                        bco_weight=ft.pref_bco_weight, loss_opts=loss_opts, ref_model=ref_model, collator=collator)
