"""``lmf data check CONFIG.yaml [key=value ...]`` and ``lmf data templates``.

``check`` runs the real pipeline (registry, conversion, template, tokenization, packing, cache) for
the config's stage and prints record counts, skipped records, token statistics and one rendered
sample with its label mask (trained-on tokens between ``[[`` and ``]]``).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO

from lmf.extras.errors import ConfigError

USAGE = """Usage:
  lmf data check CONFIG.yaml [key=value ...]   load, convert and tokenize the datasets; print statistics
  lmf data templates                           list the chat templates: family, tool format, notes
"""


def render_with_mask(tokenizer, input_ids: list[int], labels: list[int], ignore_index: int = -100) -> str:
    """Decoded text with trained-on (label) spans wrapped in ``[[ ]]``."""
    parts: list[str] = []
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] != ignore_index) != (labels[start] != ignore_index):
            text = tokenizer.decode(input_ids[start:i], skip_special_tokens=False)
            parts.append(f"[[{text}]]" if labels[start] != ignore_index else text)
            start = i
    return "".join(parts)


def _print_split(name: str, stats: Optional[dict], out: TextIO) -> None:
    if not stats:
        return
    print(f"{name}:", file=out)
    for dataset, count in stats.get("records", {}).items():
        print(f"  dataset {dataset}: {count} records", file=out)
    print(f"  skipped malformed records: {stats.get('skipped_records', 0)}", file=out)
    for example in stats.get("skipped_examples", []):
        print(f"    {example}", file=out)
    print(f"  samples: {stats['samples']}  tokens: {stats['tokens']}  label tokens: {stats['label_tokens']}", file=out)
    print(f"  length min/mean/max: {stats['min_length']} / {stats['mean_length']} / {stats['max_length']}"
          f"  truncated to cutoff_len: {stats.get('truncated', 0)}", file=out)
    if "rejected_tokens" in stats:
        print(f"  rejected tokens: {stats['rejected_tokens']}  rejected mean length: {stats['rejected_mean_length']}",
              file=out)
    pack = stats.get("packing")
    if pack:
        print(f"  packing: {pack['packed_sequences']} sequences, {pack['samples_per_sequence']} samples/sequence, "
              f"padding waste {pack['padding_waste_packed']:.1%} packed vs {pack['padding_waste_unpacked']:.1%} "
              "unpacked (padded to cutoff_len)", file=out)


def print_report(module, tokenizer, template, stage: str, out: Optional[TextIO] = None) -> None:
    """Human-readable report of a DatasetModule."""
    out = out or sys.stdout
    stats: dict[str, Any] = module.stats
    print(f"stage: {stage}  template: {template.name}  cutoff_len: {stats.get('cutoff_len')}", file=out)
    print(f"cache: {stats.get('cache')} {stats.get('cache_path', '')}".rstrip(), file=out)
    _print_split("train", stats.get("train"), out)
    eval_stats = stats.get("eval")
    if eval_stats and "samples" not in eval_stats:  # eval_on_each_dataset: stats per eval dataset
        for name, split in eval_stats.items():
            _print_split(f"eval ({name})", split, out)
    else:
        _print_split("eval", eval_stats, out)
    if getattr(module.train_dataset, "streamed", False):  # nothing is counted before training reads it
        print(f"train: streamed (read and tokenized while training; shuffle buffer {stats.get('buffer_size')} rows)  "
              f"eval samples: {stats.get('eval_samples')}", file=out)
        row = module.train_dataset.first_row()
        if row is None:
            return
    else:
        print(f"train samples: {stats.get('train_samples')}  eval samples: {stats.get('eval_samples')}", file=out)
        if len(module.train_dataset) == 0:
            return
        row = module.train_dataset[0]
    if "chosen_input_ids" in row:
        for side in ("chosen", "rejected"):
            n_tokens = len(row[side + "_input_ids"])
            print(f"--- sample 0 ({side}, {n_tokens} tokens; [[...]] = label tokens) ---", file=out)
            print(render_with_mask(tokenizer, row[side + "_input_ids"], row[side + "_labels"]), file=out)
    else:
        n_labels = sum(1 for l in row["labels"] if l != -100)
        print(f"--- sample 0 ({len(row['input_ids'])} tokens, {n_labels} label tokens; [[...]] = label tokens) ---",
              file=out)
        print(render_with_mask(tokenizer, row["input_ids"], row["labels"]), file=out)


def run_data_command(argv: list[str]) -> int:
    """Entry point of ``lmf data ...``."""
    if not argv or argv[0] in ("help", "-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    sub, rest = argv[0], argv[1:]
    if sub == "templates":
        from lmf.data.template import TEMPLATES

        print(f"{'template':<26} {'family':<10} {'tools':<9} notes")
        print(f"{'auto':<26} {'-':<10} {'-':<9} the tokenizer's own chat template")
        for name in sorted(TEMPLATES):
            t = TEMPLATES[name]
            notes = [n for n, on in (("reasoning", t.reasoning), ("efficient eos", t.efficient_eos),
                                     (f"multimodal ({t.mm_plugin})", t.mm_plugin)) if on]
            print(f"{name:<26} {t.family:<10} {t.tool_format:<9} {', '.join(notes)}")
        return 0
    if sub != "check":
        raise ConfigError(f"unknown data command {sub!r}; use `lmf data check CONFIG.yaml` or `lmf data templates`")
    from lmf.config.parser import get_config
    from lmf.data.loader import get_dataset
    from lmf.data.template import template_from_args
    from lmf.model.loader import load_tokenizer

    cfg = get_config(rest)
    tokenizer = load_tokenizer(cfg.model)
    template = template_from_args(cfg.data, tokenizer)
    stage = cfg.finetuning.stage
    from lmf.train.workflow import load_media_plugin

    module = get_dataset(cfg, tokenizer, template, stage, media=load_media_plugin(cfg, template, tokenizer))
    print_report(module, tokenizer, template, stage)
    return 0
