"""DPO's reference log-probs precomputed once over a dataset (``precompute_ref_log_probs``), carried into the
batches as columns; the reference model itself: :mod:`lmf.train.reference`."""

from __future__ import annotations

from typing import Optional

import torch

from lmf.extras.logging import get_logger
from lmf.train.batches import sharded_index_batches
from lmf.train.dpo.objective import REF_CHOSEN, REF_REJECTED
from lmf.train.reference import ReferenceScorer, reference_logps

logger = get_logger(__name__)


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
