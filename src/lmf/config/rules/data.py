"""Rules of the data keys: dataset mixing, per-dataset evaluation, packing and batching strategies per stage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.config.rules import rule
from lmf.config.stages import STAGES
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


@rule("ignore_pad_token_for_loss", "stage", "padding_free", "batching_strategy")
def training_on_padding_needs_padding(cfg: "LmfConfig") -> None:
    """``ignore_pad_token_for_loss: false`` trains the padded positions (LLaMA-Factory's SFT collator): batches must
    be padded, so padding-free batching is turned off (said in the log)."""
    d, m, t, stage = cfg.data, cfg.model, cfg.training, cfg.finetuning.stage
    if d.ignore_pad_token_for_loss:
        return
    if stage not in ("sft", "pt"):
        raise ConfigError(f"config keys 'ignore_pad_token_for_loss: false' and 'stage: {stage}': training on padding "
                          "is implemented for sft and pt only")
    if t.batching_strategy in ("padding_free", "dynamic_padding_free"):
        raise ConfigError(f"config keys 'ignore_pad_token_for_loss: false' and 'batching_strategy: "
                          f"{t.batching_strategy}': the first trains the padding the second removes")
    if m.padding_free:
        logger.info("ignore_pad_token_for_loss: false trains the padding: padding_free is turned off")
        m.padding_free = False


@rule("interleave_probs", "mix_strategy", "dataset", "eval_dataset")
def interleave_probs_match_the_datasets(cfg: "LmfConfig") -> None:
    from lmf.config.parser import split_list

    d = cfg.data
    if d.interleave_probs is None:
        return
    if d.mix_strategy == "concat":
        raise ConfigError("config key 'interleave_probs' needs an interleaving mix_strategy "
                          "(interleave_under, interleave_over or interleave_once), not concat")
    count = len(split_list(d.interleave_probs))
    for key in ("dataset", "eval_dataset"):
        names = split_list(getattr(d, key))
        if names and len(names) != count:
            raise ConfigError(f"config key 'interleave_probs': {count} probabilities for {len(names)} "
                              f"datasets in '{key}'")


@rule("eval_on_each_dataset", "eval_dataset")
def each_dataset_needs_eval_datasets(cfg: "LmfConfig") -> None:
    if cfg.data.eval_on_each_dataset and not cfg.data.eval_dataset:
        raise ConfigError("config key 'eval_on_each_dataset' needs 'eval_dataset' (the datasets to evaluate apart)")


@rule("packing", "neat_packing", "stage")
def packing_is_for_token_level_stages(cfg: "LmfConfig") -> None:
    d, ft = cfg.data, cfg.finetuning
    if d.packing and ft.stage in STAGES and not STAGES[ft.stage].token_level:
        raise ConfigError(f"config key '{'neat_packing' if d.neat_packing else 'packing'}' is not implemented for "
                          f"stage {ft.stage} (pairs and KTO examples are scored per sequence); use it with pt or sft")


@rule("batching_strategy", "stage", "packing", "max_steps")
def dynamic_batching_needs_a_budget(cfg: "LmfConfig") -> None:
    """The dynamic strategies fill a token budget: SFT/pt samples, no packing, a fixed number of steps."""
    t, d, ft = cfg.training, cfg.data, cfg.finetuning
    strategy = t.batching_strategy
    if not strategy or not strategy.startswith("dynamic"):
        return
    if ft.stage in STAGES and not STAGES[ft.stage].token_level:
        raise ConfigError(f"config key 'batching_strategy': {strategy} batches SFT/pt samples, not stage {ft.stage}")
    if d.packing:
        raise ConfigError(f"config keys 'batching_strategy: {strategy}' and 'packing' do not combine (a packed "
                          "row is already a full budget)")
    if t.do_train and not t.max_steps > 0:
        raise ConfigError(f"config key 'batching_strategy': {strategy} needs max_steps (the number of "
                          "micro-batches per epoch depends on the order, as in LLaMA-Factory v1)")


@rule("streaming", "max_steps", "packing", "neat_packing", "batching_strategy", "val_size", "tokenized_path",
      "mix_strategy", "eval_strategy", "save_strategy", "precompute_ref_log_probs")
def streaming_runs_by_steps(cfg: "LmfConfig") -> None:
    """Streamed data has no length and no cache: a run of max_steps, and nothing that needs the whole dataset first."""
    d, t, ft = cfg.data, cfg.training, cfg.finetuning
    if not d.streaming:
        return
    if t.do_train and not t.max_steps > 0:
        raise ConfigError("config key 'streaming' needs max_steps (a stream has no length to count epochs in, as in "
                          "LLaMA-Factory)")
    needs_whole = {
        "packing": d.packing or d.neat_packing,
        "batching_strategy": (t.batching_strategy or "").startswith("dynamic"),
        "val_size": bool(d.val_size),
        "tokenized_path": bool(d.tokenized_path),
        "mix_strategy": d.mix_strategy != "concat",
        "eval_strategy": t.eval_strategy == "epoch",
        "save_strategy": t.save_strategy == "epoch",
        "precompute_ref_log_probs": ft.precompute_ref_log_probs,
    }
    why = {"packing": "packing plans bins over the whole dataset",
           "batching_strategy": "dynamic batching cuts micro-batches from the lengths of the whole dataset",
           "val_size": "set eval_dataset instead (it is preprocessed and cached as usual)",
           "tokenized_path": "a stream is tokenized while training and never saved",
           "mix_strategy": "streamed datasets are concatenated (mix_strategy: concat)",
           "eval_strategy": "a stream's epochs have no boundary the loop waits on: use steps",
           "save_strategy": "a stream's epochs have no boundary the loop waits on: use steps",
           "precompute_ref_log_probs": "it scores the whole training set before training"}
    for key, used in needs_whole.items():
        if used:
            raise ConfigError(f"config keys 'streaming' and '{key}' do not combine in lmf: {why[key]}")
