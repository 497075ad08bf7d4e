"""Tokenize normalized records into model inputs with label masks (LLaMA-Factory semantics).

- supervised: every assistant turn is a label (``mask_history`` keeps only the last one); prompt tokens
  are IGNORE_INDEX unless ``train_on_prompt``; the end-of-turn/eos token after each response is a label.
- pairwise: prompt + chosen and prompt + rejected, prompt masked.
- pretrain: text + eos, long documents split into ``cutoff_len`` chunks, every token a label.

Truncation to ``cutoff_len`` follows LLaMA-Factory's ``infer_seqlen`` budget split between prompt and
response; input_ids and labels are always cut together, so they stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmf.data.template import encode_text

IGNORE_INDEX = -100


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """How many prompt and response tokens to keep so that they fit ``cutoff_len``.

    A short response is kept whole (the prompt is cut); a short prompt is kept whole (the response
    is cut); otherwise both are cut in proportion to their lengths.
    """
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def _records(batch: dict[str, list]):
    """(prompt, response, system, tools) per record of a normalized batch."""
    return zip(batch["_prompt"], batch["_response"], batch["_system"], batch["_tools"])


def _conversation(prompt: list[dict], response: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in list(prompt) + list(response)]


@dataclass
class SupervisedProcessor:
    """Batched ``datasets.map`` function for sft."""

    tokenizer: Any
    template: Any
    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False
    _piece_cache: dict = field(default_factory=dict, repr=False, compare=False)  # prefix/system prompt ids

    def encode(self, prompt: list[dict], response: list[dict], system: str,
               tools: str) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, truncated) of one conversation."""
        tpl, tok = self.template, self.tokenizer
        pairs = tpl.encode_multiturn(tok, _conversation(prompt, response), system or None, tools or None,
                                     cache=self._piece_cache)
        total = sum(len(s) + len(t) for s, t in pairs)
        eos = tok.eos_token_id
        budget_used = 1 if tpl.efficient_eos else 0
        input_ids: list[int] = []
        labels: list[int] = []
        order = list(reversed(pairs)) if self.mask_history else pairs
        for turn, (source, target) in enumerate(order):
            if budget_used >= self.cutoff_len:
                break
            src_len, tgt_len = infer_seqlen(len(source), len(target), self.cutoff_len - budget_used)
            source, target = source[:src_len], target[:tgt_len]
            budget_used += src_len + tgt_len
            if self.train_on_prompt:
                source_labels = list(source)
            elif tpl.efficient_eos and turn != 0 and src_len:
                source_labels = [eos] + [IGNORE_INDEX] * (src_len - 1)
            else:
                source_labels = [IGNORE_INDEX] * src_len
            target_labels = [IGNORE_INDEX] * tgt_len if (self.mask_history and turn != 0) else list(target)
            if self.mask_history:  # turns were visited last-first
                input_ids = source + target + input_ids
                labels = source_labels + target_labels + labels
            else:
                input_ids += source + target
                labels += source_labels + target_labels
        if tpl.efficient_eos:
            input_ids.append(eos)
            labels.append(eos)
        return input_ids, labels, len(input_ids) < total + (1 if tpl.efficient_eos else 0)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "_truncated": []}
        for prompt, response, system, tools in _records(batch):
            input_ids, labels, truncated = self.encode(prompt, response, system, tools)
            out["input_ids"].append(input_ids)
            out["attention_mask"].append([1] * len(input_ids))
            out["labels"].append(labels)
            out["_truncated"].append(truncated)
        return out


@dataclass
class PairwiseProcessor:
    """Batched ``datasets.map`` function for dpo/rm: chosen_* and rejected_* columns."""

    tokenizer: Any
    template: Any
    cutoff_len: int
    _piece_cache: dict = field(default_factory=dict, repr=False, compare=False)  # prefix/system prompt ids

    def encode(self, prompt: list[dict], response: list[dict], system: str, tools: str) -> dict[str, Any]:
        tpl, tok = self.template, self.tokenizer
        system, tools = system or None, tools or None
        cache = self._piece_cache
        prompt_ids, chosen_ids = tpl.encode_oneturn(tok, _conversation(prompt, response[:1]), system, tools, cache)
        _, rejected_ids = tpl.encode_oneturn(tok, _conversation(prompt, response[1:2]), system, tools, cache)
        if tpl.efficient_eos:
            chosen_ids = chosen_ids + [tok.eos_token_id]
            rejected_ids = rejected_ids + [tok.eos_token_id]
        src_len, tgt_len = infer_seqlen(len(prompt_ids), max(len(chosen_ids), len(rejected_ids)), self.cutoff_len)
        truncated = src_len < len(prompt_ids) or tgt_len < max(len(chosen_ids), len(rejected_ids))
        prompt_ids, chosen_ids, rejected_ids = prompt_ids[:src_len], chosen_ids[:tgt_len], rejected_ids[:tgt_len]
        chosen = prompt_ids + chosen_ids
        rejected = prompt_ids + rejected_ids
        return {
            "chosen_input_ids": chosen,
            "chosen_attention_mask": [1] * len(chosen),
            "chosen_labels": [IGNORE_INDEX] * src_len + chosen_ids,
            "rejected_input_ids": rejected,
            "rejected_attention_mask": [1] * len(rejected),
            "rejected_labels": [IGNORE_INDEX] * src_len + rejected_ids,
            "_truncated": truncated,
        }

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        keys = ("chosen_input_ids", "chosen_attention_mask", "chosen_labels", "rejected_input_ids",
                "rejected_attention_mask", "rejected_labels", "_truncated")
        out: dict[str, list] = {k: [] for k in keys}
        for prompt, response, system, tools in _records(batch):
            row = self.encode(prompt, response, system, tools)
            for k in keys:
                out[k].append(row[k])
        return out


@dataclass
class PretrainProcessor:
    """Batched ``datasets.map`` function for pt: text + eos, split into chunks of at most ``cutoff_len``."""

    tokenizer: Any
    template: Any
    cutoff_len: int

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        tok = self.tokenizer
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "_truncated": []}
        bos = [tok.bos_token_id] if any(getattr(p, "attr", None) == "bos_token" for p in self.template.prefix) \
            and tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        for prompt in batch["_prompt"]:
            ids = bos + encode_text(tok, prompt[0]["content"]) + eos
            for start in range(0, len(ids), self.cutoff_len):
                chunk = ids[start:start + self.cutoff_len]
                out["input_ids"].append(chunk)
                out["attention_mask"].append([1] * len(chunk))
                out["labels"].append(list(chunk))
                out["_truncated"].append(False)
        return out


def make_processor(stage: str, tokenizer, template, data_args):
    """The map function for ``stage`` (sft, pt, dpo, rm)."""
    if stage == "sft":
        return SupervisedProcessor(tokenizer, template, data_args.cutoff_len, data_args.train_on_prompt,
                                   data_args.mask_history)
    if stage in ("dpo", "rm"):
        return PairwiseProcessor(tokenizer, template, data_args.cutoff_len)
    if stage == "pt":
        return PretrainProcessor(tokenizer, template, data_args.cutoff_len)
    raise ValueError(f"no data processor for stage {stage!r}")
