"""Reference model for DPO: none (LoRA: adapters disabled; orpo/simpo: reference-free), a frozen
copy, or log-probs precomputed once over the dataset (``precompute_ref_log_probs``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from lmf.extras.logging import get_logger
from lmf.train.dpo.losses import uses_reference_model
from lmf.train.batches import sharded_index_batches
from lmf.train.dpo.objective import REF_CHOSEN, REF_REJECTED, ReferenceScorer, has_adapters, reference_logps

logger = get_logger(__name__)


def needs_separate_reference(cfg, model) -> bool:
    """Whether DPO needs a second, frozen model (full/freeze tuning, or an explicit ``ref_model``)."""
    ft = cfg.finetuning
    if not uses_reference_model(ft.pref_loss):
        return False
    return bool(ft.ref_model) or not has_adapters(model)


def load_reference_model(cfg, tokenizer, device=None):
    """The frozen reference: ``ref_model`` (+ ``ref_model_adapters``), default the base model, in eval mode."""
    from lmf.model.loader import load_model

    ft = cfg.finetuning
    ref_model_args = dataclasses.replace(cfg.model, model_name_or_path=ft.ref_model or cfg.model.model_name_or_path,
                                         adapter_name_or_path=ft.ref_model_adapters)
    # adapters of the reference are merged for inference, which the loader allows for LoRA configs only
    finetuning = dataclasses.replace(ft, finetuning_type="lora") if ft.ref_model_adapters else ft
    ref_cfg = dataclasses.replace(cfg, model=ref_model_args, finetuning=finetuning)
    logger.info("loading the frozen DPO reference model from %s", ref_model_args.model_name_or_path)
    model = load_model(ref_cfg, tokenizer, is_trainable=False, device=device)
    model.requires_grad_(False)
    return model.eval()


def shard_reference(ref_model, device) -> ReferenceScorer:
    """Shard a frozen reference with FSDP2 like the policy (each rank keeps 1/world of its weights).

    Call it on a model still on the CPU: only the local shards are moved to ``device``.
    """
    from torch.distributed.fsdp import fully_shard

    from lmf.train.parallel import decoder_layers

    scorer = ReferenceScorer(ref_model)
    for layer in decoder_layers(ref_model):
        fully_shard(layer)
    fully_shard(scorer)
    scorer.to(device)
    return scorer.eval()


class WithReferenceLogps:
    """Wraps a pairwise collator: carries precomputed ``ref_*_logps`` columns into the batch as tensors."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict:
        refs = None
        if features and REF_CHOSEN in features[0]:
            refs = ([f[REF_CHOSEN] for f in features], [f[REF_REJECTED] for f in features])
            features = [{k: v for k, v in f.items() if k not in (REF_CHOSEN, REF_REJECTED)} for f in features]
        batch = self.collator(features)
        if refs is not None:
            batch[REF_CHOSEN] = torch.tensor(refs[0], dtype=torch.float32)
            batch[REF_REJECTED] = torch.tensor(refs[1], dtype=torch.float32)
        return batch


@torch.no_grad()
def precompute_reference_logps(dataset, collator, model, ref_model=None, *, batch_size: int = 4,
                               device=None, loss_opts: Optional[dict] = None):
    """``dataset`` with ``ref_chosen_logps``/``ref_rejected_logps`` columns (one pass, no gradients).

    Under torch.distributed each rank scores a strided shard and the results are all-gathered,
    so every rank ends with the same columns.
    """
    import torch.distributed as dist

    if REF_CHOSEN in dataset.column_names:
        return dataset
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = device if device is not None else next(model.parameters()).device
    batches, num_real = sharded_index_batches(len(dataset), world, rank, batch_size)
    if not isinstance(ref_model, ReferenceScorer):  # only a sharded reference needs every rank in every forward
        batches = batches[:num_real]
    results: dict[int, tuple[float, float]] = {}
    for b, idx in enumerate(batches):
        batch = collator([dataset[i] for i in idx])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        chosen, rejected = reference_logps(model, batch, ref_model, loss_opts)
        if b < num_real:  # past that: a filler batch that keeps the collectives in step
            for i, c, r in zip(idx, chosen.tolist(), rejected.tolist()):
                results[i] = (c, r)
    if distributed:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, results)
        for part in gathered:
            results.update(part)
    ordered = [results[i] for i in range(len(dataset))]
    dataset = dataset.add_column(REF_CHOSEN, [c for c, _ in ordered])
    dataset = dataset.add_column(REF_REJECTED, [r for _, r in ordered])
    logger.info("precomputed reference log-probs for %d pairs", len(dataset))
    return dataset
