"""The set-up every training stage shares, in one place.

``run_training`` does: process group and device -> resume point -> seed -> tokenizer, template and
tokenized data -> trainable model -> the stage's own pieces (``build_stage``) -> the shared
:class:`~lmf.train.trainer.Trainer` -> tear-down. A stage (SFT, DPO, RM) only supplies
``build_stage(setup) -> stage``, which may also replace ``setup.train_dataset`` /
``setup.eval_dataset`` (DPO does, to attach precomputed reference log-probs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig
    from lmf.dist.runtime import DistInfo


@dataclass
class StageSetup:
    """What a stage builder gets: the config, runtime, tokenizer, template, model and datasets."""

    cfg: "LmfConfig"
    runtime: "DistInfo"
    tokenizer: Any
    template: Any
    model: Any
    train_dataset: Any
    eval_dataset: Optional[Any]

    @property
    def pad_to_multiple_of(self) -> Optional[int]:
        """Pad batch lengths to a multiple of 8 on CUDA (tensor cores); exact lengths elsewhere."""
        return 8 if self.runtime.device.type == "cuda" else None


def load_tokenizer_and_data(cfg: "LmfConfig", stage: str):
    """Tokenizer (fixed by the template), the template and the tokenized datasets of ``stage``."""
    from lmf.data.loader import get_dataset
    from lmf.data.template import template_from_args
    from lmf.model.loader import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    template = template_from_args(cfg.data, tokenizer)  # template + default_system/enable_thinking from the config
    template.fix_tokenizer(tokenizer)
    data = get_dataset(cfg, tokenizer, template, stage=stage)
    return tokenizer, template, data


def run_training(cfg: "LmfConfig", data_stage: str, build_stage: Callable[[StageSetup], Any]) -> None:
    """Train one stage end to end; only rank 0 writes. ``data_stage`` picks the data layout (sft/pt/dpo/rm)."""
    from lmf.dist.runtime import destroy_distributed
    from lmf.model.loader import load_model
    from lmf.train.allocator import limit_heap_fragmentation, threshold_bytes
    from lmf.train.trainer import Trainer, resolve_resume_checkpoint, set_seed, setup_runtime

    limit_heap_fragmentation(threshold_bytes(cfg.model.malloc_mmap_threshold_mb))  # opt-in
    runtime = setup_runtime(cfg)
    try:
        resume = resolve_resume_checkpoint(cfg, runtime)
        set_seed(cfg.training.seed)
        tokenizer, template, data = load_tokenizer_and_data(cfg, data_stage)
        model = load_model(cfg, tokenizer, is_trainable=True)
        setup = StageSetup(cfg, runtime, tokenizer, template, model, data.train_dataset, data.eval_dataset)
        stage = build_stage(setup)
        trainer = Trainer(cfg, setup.model, tokenizer, stage, setup.train_dataset, runtime,
                          eval_dataset=setup.eval_dataset, resume=resume)
        trainer.train()
    finally:
        destroy_distributed()
