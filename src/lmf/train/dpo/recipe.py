"""The DPO recipe (``lmf dpo``): the reference (model, disabled adapter, or precomputed log-probs) and the DPO
objective as a stage of the shared workflow (:mod:`lmf.train.workflow`)."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Callable, Optional

from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger
from lmf.train.dpo.losses import uses_reference_model
from lmf.train.dpo.objective import DPOObjective
from lmf.train.dpo.reference import WithReferenceLogps, needs_separate_reference, precompute_reference_logps

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


class DPOStage:
    """Pairwise collator (+ precomputed reference columns) and the DPO objective for the shared Trainer."""

    name = "dpo"

    def __init__(self, cfg: "LmfConfig", collator: Callable, loss_opts: Optional[dict] = None, ref_model=None):
        ft = cfg.finetuning
        self.collator = collator if isinstance(collator, WithReferenceLogps) else WithReferenceLogps(collator)
        self.objective = DPOObjective(
            loss_type=ft.pref_loss, beta=ft.pref_beta, label_smoothing=ft.dpo_label_smoothing,
            simpo_gamma=ft.simpo_gamma, ftx=ft.pref_ftx, loss_opts=dict(loss_opts or {}), ref_model=ref_model,
        )

    def compute_loss(self, model, batch: dict):
        return self.objective.compute_loss(model, batch)


def check_dpo_config(cfg: "LmfConfig") -> None:
    """Reject preference settings that cannot work, naming the key."""
    ft = cfg.finetuning
    if ft.pref_beta <= 0:
        raise ConfigError(f"config key 'pref_beta' must be > 0 (got {ft.pref_beta})")
    if not 0.0 <= ft.dpo_label_smoothing < 0.5:
        raise ConfigError(f"config key 'dpo_label_smoothing' must be in [0, 0.5) (got {ft.dpo_label_smoothing})")
    if ft.dpo_label_smoothing and ft.pref_loss != "sigmoid":
        raise ConfigError(f"config key 'dpo_label_smoothing' only applies to pref_loss: sigmoid (got {ft.pref_loss})")
    if ft.pref_ftx < 0:
        raise ConfigError(f"config key 'pref_ftx' must be >= 0 (got {ft.pref_ftx})")


def disable_dropout(model) -> None:
    """Set every dropout probability to 0 (policy and reference must score the same sequence alike)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _free(device) -> None:
    gc.collect()
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.empty_cache()


DATA_STAGE = "dpo"


def check_config(cfg: "LmfConfig") -> None:
    """Checks of the recipe, before anything is loaded."""
    check_dpo_config(cfg)


def build_stage(cfg: "LmfConfig", setup) -> DPOStage:
    """Reference model (or precomputed reference log-probs on the datasets) and the DPO stage."""
    from lmf.data.collator import PairwiseCollator
    from lmf.train.dpo.reference import load_reference_model, shard_reference
    from lmf.dist.plan import plan_parallelism
    from lmf.train.sft import resolve_loss_kwargs

    model, runtime = setup.model, setup.runtime
    disable_dropout(model)
    loss_opts = resolve_loss_kwargs(cfg, model)
    ref_model = None
    if needs_separate_reference(cfg, model):
        shard = plan_parallelism(cfg, runtime.world_size, announce=False).mode == "fsdp"
        ref_model = load_reference_model(cfg, setup.tokenizer, device=None if shard else runtime.device)
        disable_dropout(ref_model)
        if shard:
            ref_model = shard_reference(ref_model, runtime.device)
            logger.info("reference model sharded with FSDP2 across %d ranks", runtime.world_size)
    elif not uses_reference_model(cfg.finetuning.pref_loss):
        logger.info("pref_loss %s is reference-free: no reference model", cfg.finetuning.pref_loss)
    else:
        logger.info("reference model: the base model with the LoRA adapters disabled")

    collator = WithReferenceLogps(setup.collate(PairwiseCollator(setup.tokenizer, setup.pad_to_multiple_of)))
    if cfg.finetuning.precompute_ref_log_probs and uses_reference_model(cfg.finetuning.pref_loss):
        model.to(runtime.device)
        kwargs = dict(batch_size=cfg.training.per_device_eval_batch_size, device=runtime.device, loss_opts=loss_opts)
        setup.train_dataset = precompute_reference_logps(setup.train_dataset, collator, model, ref_model, **kwargs)
        if isinstance(setup.eval_dataset, dict):
            setup.eval_dataset = {name: precompute_reference_logps(ds, collator, model, ref_model, **kwargs)
                                  for name, ds in setup.eval_dataset.items()}
        elif setup.eval_dataset is not None:
            setup.eval_dataset = precompute_reference_logps(setup.eval_dataset, collator, model, ref_model, **kwargs)
        ref_model = None  # every batch now carries its reference log-probs
        _free(runtime.device)
    return DPOStage(cfg, collator, loss_opts, ref_model)
