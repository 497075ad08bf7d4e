"""Defaults that depend on other keys, applied in one place before any check runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.config.stages import REFERENCE_FREE_LOSSES, STAGES

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig


def apply_defaults(cfg: "LmfConfig") -> None:
    """Every derived default, in order."""
    t, d, ft, m = cfg.training, cfg.data, cfg.finetuning, cfg.model
    if t.evaluation_strategy is not None:  # transformers' older name wins when given
        t.eval_strategy = t.evaluation_strategy
    if ft.lora_alpha is None:
        ft.lora_alpha = ft.lora_rank * 2
    if isinstance(t.report_to, str):
        t.report_to = [r.strip() for r in t.report_to.split(",") if r.strip() and r.strip() != "none"]
    else:
        t.report_to = [r for r in t.report_to if r != "none"]
    if t.batching_strategy is not None:
        m.padding_free = t.batching_strategy in ("padding_free", "dynamic_padding_free")
    if d.packing is None:  # raw text packs by default, unless a dynamic batching strategy fills the batches
        dynamic = bool(t.batching_strategy and t.batching_strategy.startswith("dynamic"))
        d.packing = STAGES[ft.stage].layout == "text" if ft.stage in STAGES and not dynamic else False
    if d.neat_packing:
        d.packing = True
    if t.data_seed is None:
        t.data_seed = t.seed
    metric = t.metric_for_best_model or "loss"  # transformers' rules: eval_ prefixed, loss lower is better
    t.metric_for_best_model = metric if metric.startswith("eval_") else f"eval_{metric}"
    if t.greater_is_better is None:
        t.greater_is_better = not t.metric_for_best_model.endswith("loss")
    if not t.eval_steps:  # unset or 0: every logging_steps, as in transformers
        t.eval_steps = t.logging_steps
    if t.gradient_checkpointing is None:  # LLaMA-Factory turns it on unless disable_gradient_checkpointing is set
        t.gradient_checkpointing = not m.disable_gradient_checkpointing
    if ft.pref_loss in REFERENCE_FREE_LOSSES and ft.stage == "dpo":
        ft.ref_model = None  # reference-free losses
