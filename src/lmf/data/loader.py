"""get_dataset: registry -> raw records -> normalized -> tokenized (-> packed) Arrow datasets, cached.

Pipeline per split (train from ``dataset``, eval from ``eval_dataset``):

1. resolve names in ``dataset_info.json`` (or file paths / a v1 YAML registry);
2. read each file record by record, convert to the normalized shape (:mod:`lmf.data.normalize`);
3. ``max_samples`` / ``num_samples`` per dataset, datasets concatenated or interleaved;
4. tokenize with ``datasets.map`` (``preprocessing_num_workers`` processes);
5. optional packing; statistics (both by bounded chunks: memory does not grow with the dataset).

The result is saved in the preprocessing cache and memory-mapped back; a second run with the same
inputs loads it (unless ``overwrite_cache``). Local rank 0 builds first (``main_process_first``).
``val_size`` splits the train set afterwards (seeded). With ``streaming`` the training split is instead read and
tokenized while training (:mod:`lmf.data.streaming`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from lmf.config.parser import split_list
from lmf.data import cache as cache_mod
from lmf.data.layout import GENERATE, layout_of
from lmf.data.layout import features as _features
from lmf.data.media.dataset import check_images_for_stage, drop_media_cuts
from lmf.data.mixing import merge_datasets
from lmf.data.processor import make_processor
from lmf.data.normalize import MAX_REPORTED_PROBLEMS, BadRecords, check_attr_for_stage, convert_dataset
from lmf.data.registry import DatasetAttr, resolve_datasets
from lmf.data.stats import token_stats
from lmf.extras.errors import ConfigError, DataError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)

@dataclass
class DatasetModule:
    """What the trainers consume: Arrow datasets with python-list columns, and preprocessing statistics."""

    train_dataset: Any
    eval_dataset: Optional[Any]
    stats: dict = field(default_factory=dict)
    media: Any = None  # the vision plugin the data was built with (images go through the collator)


@contextlib.contextmanager
def progress_bars(on: bool):
    """Show or hide datasets' progress bars inside the block; restores the previous state."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if on else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_on else datasets.disable_progress_bars)()


@contextlib.contextmanager
def frozen_heap():
    """Keep the objects alive at entry (modules, tokenizer, model) out of the garbage collector's passes inside
    the block: preprocessing allocates millions of short lists, and every full pass would walk them all
    (``gc.freeze``: half of a 1-worker run on real data; fork workers then also share those pages)."""
    import gc

    caller_froze = gc.get_freeze_count() > 0  # then leave everything frozen: unfreeze would undo theirs too
    gc.freeze()
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], 10_000), *old[1:])  # fewer passes over the young lists too
    try:
        yield
    finally:
        gc.set_threshold(*old)
        if not caller_froze:
            gc.unfreeze()


def build_split(attrs: list[DatasetAttr], stage: str, tokenizer, template, data_args, work_dir: str,
                seed: int, media=None) -> tuple[Any, dict[str, Any]]:
    """Convert, tokenize and (optionally) pack a list of datasets into one Arrow dataset; ``media``: the vision
    plugin of a vision-language model."""

    bad = BadRecords()
    parts, per_dataset = [], {}
    record_stage = "sft" if stage == GENERATE else stage
    for attr in attrs:
        check_attr_for_stage(attr, record_stage)
        ds = convert_dataset(attr, record_stage, data_args, bad, work_dir, seed)
        per_dataset[attr.name] = len(ds)
        parts.append(ds)
    if bad.problems:
        logger.warning("skipped %d malformed record(s) (skip_bad_records: true): %s", len(bad.problems), bad.describe())
    normalized = merge_datasets(parts, data_args, seed)
    if len(normalized) == 0:
        names = ", ".join(a.name for a in attrs)
        raise DataError(f"dataset(s) {names}: no usable records" + (f" ({len(bad.problems)} skipped as malformed)"
                                                                    if bad.problems else ""))
    check_images_for_stage(normalized, stage, media)
    layout = layout_of(stage)
    processor = make_processor(stage, tokenizer, template, data_args, media)
    num_proc = data_args.preprocessing_num_workers
    num_proc = min(num_proc, len(normalized)) if num_proc and num_proc > 1 else None
    with progress_bars(len(normalized) >= 20000):
        tokenized = normalized.map(
            processor, batched=True, batch_size=data_args.preprocessing_batch_size, num_proc=num_proc,
            remove_columns=normalized.column_names,
            features=_features(layout if layout in ("pairwise", "feedback") else "supervised",
                               media=media is not None and layout not in ("text", "feedback")),
            load_from_cache_file=False, desc="Tokenizing",
            # lmf's own cache key covers what the tokens depend on; without a fingerprint given, datasets would
            # dill-pickle the processor (tokenizer included) just to name its temporary files: ~0.2 s per run
            new_fingerprint=uuid.uuid4().hex,
        )
    tokenized, media_cut, media_cut_examples = drop_media_cuts(tokenized, data_args.cutoff_len)
    examples = [f"{p}: record {i}: {m}" for p, i, m in bad.problems[:MAX_REPORTED_PROBLEMS]]
    stats: dict[str, Any] = {"records": per_dataset, "skipped_records": len(bad.problems), "skipped_examples": examples}
    if media_cut:
        stats.update(media_cut=media_cut, media_cut_examples=media_cut_examples)
    stats.update(token_stats(tokenized, stage))
    tokenized = tokenized.remove_columns(["_truncated"])
    if layout == "feedback" and (stats["desirable"] == 0 or stats["undesirable"] == 0):
        logger.warning("KTO data has only %s answers: the loss then has no %s term",
                       "desirable" if stats["undesirable"] == 0 else "undesirable",
                       "undesirable" if stats["undesirable"] == 0 else "desirable")
    packable = layout in ("text", "supervised")
    if data_args.packing and packable and "images" in tokenized.column_names:
        logger.info("packing: off for a vision-language model's data (its M-RoPE positions and image inputs are "
                    "per sample; packed rows would not be exact)")
    elif data_args.packing and packable:
        from lmf.data.packing import pack_dataset

        with progress_bars(False):
            tokenized, pack_stats = pack_dataset(tokenized, data_args.cutoff_len,
                                                 cache_dir=os.path.join(work_dir, "packed"))
        stats["packing"] = pack_stats
    return tokenized, stats


def _is_local_main() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _load_or_build(cfg, tokenizer, template, stage: str, media=None) -> tuple[Any, Any, dict]:
    with progress_bars(False), frozen_heap():
        return _load_or_build_inner(cfg, tokenizer, template, stage, media)


def _load_or_build_inner(cfg, tokenizer, template, stage: str, media=None) -> tuple[Any, Any, dict]:
    """(train, eval, stats); for :data:`GENERATE` the "train" slot holds the prediction set (``eval_dataset``)."""
    d = cfg.data
    seed = cfg.training.data_seed if cfg.training.data_seed is not None else cfg.training.seed
    if stage == GENERATE:
        train_attrs, eval_attrs = resolve_datasets(d.eval_dataset, d.dataset_dir, key="eval_dataset"), []
        if not train_attrs:
            raise ConfigError("do_predict needs config key 'eval_dataset' (the datasets to generate answers for)")
    else:
        if d.tokenized_path and cache_mod.is_complete(d.tokenized_path):
            logger.info("loading tokenized dataset from tokenized_path %s", d.tokenized_path)
            train, eval_, stats = cache_mod.load_tokenized_path(d.tokenized_path)
            return train, eval_, dict(stats, cache="tokenized_path")
        train_attrs = resolve_datasets(d.dataset, d.dataset_dir, key="dataset")
        eval_attrs = resolve_datasets(d.eval_dataset, d.dataset_dir, key="eval_dataset")
        if not train_attrs:
            raise ConfigError("config key 'dataset' is required (comma-separated names from dataset_info.json)")
    key = cache_mod.cache_key(stage, template, tokenizer, d, train_attrs, eval_attrs, seed, media)
    entry = os.path.join(cache_mod.cache_root(d), key)
    # only local rank 0 rebuilds on overwrite_cache; the other ranks then reuse what it just built
    overwrite = d.overwrite_cache and _is_local_main()
    hit = cache_mod.load_entry(entry) if cache_mod.is_complete(entry) and not overwrite else None
    if hit and (gone := cache_mod.missing_media(hit[0], hit[1])):
        logger.warning("the cached dataset %s refers to %s, which no longer exists; preprocessing again", entry, gone)
        hit, overwrite = None, True  # the rebuilt entry replaces the stale one
    if hit:
        logger.info("reusing preprocessed dataset from cache %s", entry)
        train, eval_, stats = hit[0], hit[1], dict(hit[2], cache="hit", cache_path=entry)
    else:
        build_dir = cache_mod.new_build_dir(entry)
        work_dir = os.path.join(build_dir, "_work")
        try:
            train, train_stats = build_split(train_attrs, stage, tokenizer, template, d, work_dir, seed, media)
            eval_, eval_stats = (None, None)
            if eval_attrs and d.eval_on_each_dataset:  # one eval set per dataset, evaluated and logged apart
                built = {a.name: build_split([a], stage, tokenizer, template, d, work_dir, seed, media)
                         for a in eval_attrs}
                eval_ = {name: ds for name, (ds, _) in built.items()}
                eval_stats = {name: st for name, (_, st) in built.items()}
            elif eval_attrs:
                eval_, eval_stats = build_split(eval_attrs, stage, tokenizer, template, d, work_dir, seed, media)
            stats = {"stage": stage, "template": template.name, "cutoff_len": d.cutoff_len,
                     "train": train_stats, "eval": eval_stats}
            cache_mod.save_entry(build_dir, train, eval_, stats)
            del train, eval_
            shutil.rmtree(work_dir, ignore_errors=True)
            if not cache_mod.publish(build_dir, entry, replace=overwrite):
                logger.info("another process published %s first; using it", entry)
        finally:
            if os.path.isdir(build_dir):
                shutil.rmtree(build_dir, ignore_errors=True)
        train, eval_, stats = cache_mod.load_entry(entry)
        stats = dict(stats, cache="built", cache_path=entry)
    if d.tokenized_path and _is_local_main() and stage != GENERATE:
        build_dir = cache_mod.new_build_dir(d.tokenized_path)
        try:
            cache_mod.save_entry(build_dir, train, eval_, {k: v for k, v in stats.items() if k != "cache"})
            cache_mod.publish(build_dir, d.tokenized_path)
        finally:
            if os.path.isdir(build_dir):
                shutil.rmtree(build_dir, ignore_errors=True)
        logger.info("tokenized dataset saved to tokenized_path %s", d.tokenized_path)
    return train, eval_, stats


def split_validation(train, val_size: float, seed: int):
    """(train, eval) with ``val_size`` (fraction < 1 or absolute count) of ``train`` held out, seeded."""
    size = int(val_size) if val_size >= 1 else val_size
    if isinstance(size, int) and size >= len(train):
        raise ConfigError(f"config key 'val_size': {val_size} leaves no training samples (dataset has {len(train)})")
    if len(train) < 2:
        raise ConfigError(f"config key 'val_size': the dataset has {len(train)} sample(s); cannot split")
    import numpy as np

    n_eval = size if isinstance(size, int) else max(1, int(round(len(train) * size)))
    if n_eval >= len(train):
        raise ConfigError(f"config key 'val_size': {val_size} leaves no training samples (dataset has {len(train)})")
    order = np.random.default_rng(seed).permutation(len(train))
    eval_idx, train_idx = np.sort(order[:n_eval]), order[n_eval:]  # index arrays: 8 bytes a sample
    return train.select(train_idx, keep_in_memory=True), train.select(eval_idx, keep_in_memory=True)


def _apply_data_args(template, data_args):
    """The config's ``default_system`` / ``enable_thinking`` win over a template built without them."""
    from dataclasses import replace

    changes = {}
    if data_args.default_system is not None and template.default_system != data_args.default_system:
        changes["default_system"] = data_args.default_system
    if template.reasoning and template.enable_thinking != data_args.enable_thinking:
        changes["enable_thinking"] = data_args.enable_thinking
    return replace(template, **changes) if changes else template


def get_dataset(cfg, tokenizer, template, stage: str, media=None) -> DatasetModule:
    """Tokenized train (and eval) datasets for ``stage`` (pt, sft, dpo, rm); see the module docstring. ``media``:
    the vision plugin of a vision-language model (:func:`lmf.data.media.plugins.media_plugin_for`)."""
    from lmf.dist.runtime import main_process_first

    layout_of(stage)  # a stage without a data pipeline stops here
    template = _apply_data_args(template, cfg.data)
    if cfg.data.streaming:
        return _streamed_module(cfg, tokenizer, template, stage, media)
    with main_process_first(local=True):
        train, eval_, stats = _load_or_build(cfg, tokenizer, template, stage, media)
    d = cfg.data
    seed = cfg.training.data_seed if cfg.training.data_seed is not None else cfg.training.seed
    if d.val_size and eval_ is None:
        train, eval_ = split_validation(train, d.val_size, seed)
        stats = dict(stats, val_size=d.val_size)
    eval_samples = (sum(len(v) for v in eval_.values()) if isinstance(eval_, dict) else len(eval_)) \
        if eval_ is not None else 0
    stats = dict(stats, train_samples=len(train), eval_samples=eval_samples)
    tr = stats.get("train") or {}
    logger.info("dataset ready (%s): %d train / %d eval samples, %d tokens (%d labelled), %d skipped, %d truncated%s",
                stats.get("cache"), stats["train_samples"], stats["eval_samples"], tr.get("tokens", 0),
                tr.get("label_tokens", 0), tr.get("skipped_records", 0), tr.get("truncated", 0),
                f", packing waste {tr['packing']['padding_waste_packed']:.1%}" if tr.get("packing") else
                f", {tr['desirable']} desirable / {tr['undesirable']} undesirable" if "desirable" in tr else "")
    return DatasetModule(train_dataset=train, eval_dataset=eval_, stats=stats)


def _streamed_module(cfg, tokenizer, template, stage: str, media) -> DatasetModule:
    """``streaming``: the training split as a :class:`~lmf.data.streaming.StreamedDataset` (read and tokenized while
    training); an ``eval_dataset`` is preprocessed and cached as usual (an evaluation pass needs its length)."""
    from dataclasses import replace

    from lmf.data.streaming import StreamedDataset
    from lmf.dist.runtime import main_process_first

    d = cfg.data
    attrs = resolve_datasets(d.dataset, d.dataset_dir, key="dataset")
    if not attrs:
        raise ConfigError("config key 'dataset' is required (comma-separated names from dataset_info.json)")
    for attr in attrs:
        check_attr_for_stage(attr, stage)
        if attr.num_samples is not None or attr.sample_weight is not None:
            raise ConfigError(f"config key 'streaming': dataset {attr.name!r} samples its records (num_samples / "
                              "weight in its registry entry), which needs all of them first; remove one of them")
    if media is not None:
        raise ConfigError("config key 'streaming' with a vision-language model's data is not implemented in lmf "
                          "(its images are checked and counted over the whole dataset); set streaming: false")
    seed = cfg.training.data_seed if cfg.training.data_seed is not None else cfg.training.seed
    train = StreamedDataset(attrs, stage, make_processor(stage, tokenizer, template, d, None), d, seed,
                            shuffle=not cfg.finetuning.disable_shuffling)
    eval_, stats = None, {"stage": stage, "template": template.name, "cutoff_len": d.cutoff_len, "cache": "streamed",
                          "buffer_size": d.buffer_size}
    if d.eval_dataset:
        eval_cfg = replace(cfg, data=replace(d, dataset=d.eval_dataset, eval_dataset=None, streaming=False))
        with main_process_first(local=True):
            if d.eval_on_each_dataset:
                eval_ = {name: _load_or_build(replace(eval_cfg, data=replace(eval_cfg.data, dataset=name)), tokenizer,
                                              template, stage, media)[0] for name in split_list(d.eval_dataset)}
            else:
                eval_ = _load_or_build(eval_cfg, tokenizer, template, stage, media)[0]
    eval_samples = (sum(map(len, eval_.values())) if isinstance(eval_, dict) else len(eval_)) if eval_ else 0
    logger.info("dataset ready (streamed): %s read and tokenized while training, shuffled through a buffer of %d "
                "rows%s; %d eval samples", ", ".join(a.name for a in attrs), d.buffer_size,
                " (disable_shuffling: in file order)" if cfg.finetuning.disable_shuffling else "", eval_samples)
    return DatasetModule(train_dataset=train, eval_dataset=eval_, stats=dict(stats, eval_samples=eval_samples))


def get_prediction_dataset(cfg, tokenizer, template, media=None):
    """The tokenized prediction set of ``eval_dataset`` (:class:`~lmf.data.processor.GenerationProcessor` rows:
    prompt ``input_ids``, reference answer ``labels``), cached like the training data; returns (dataset, stats)."""
    from lmf.dist.runtime import main_process_first

    template = _apply_data_args(template, cfg.data)
    with main_process_first(local=True):
        dataset, _, stats = _load_or_build(cfg, tokenizer, template, GENERATE, media)
    tr = stats.get("train") or {}
    logger.info("prediction set ready (%s): %d samples, %d prompt tokens, %d truncated", stats.get("cache"),
                len(dataset), tr.get("tokens", 0), tr.get("truncated", 0))
    return dataset, stats
