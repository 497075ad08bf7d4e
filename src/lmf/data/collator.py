"""Batch collators: right-pad lists of token ids into LongTensors."""

from __future__ import annotations

from typing import Any, Optional

from lmf.data.processor import IGNORE_INDEX


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def _target_len(lengths: list[int], multiple: Optional[int]) -> int:
    longest = max(lengths) if lengths else 0
    if multiple and longest % multiple:
        longest += multiple - longest % multiple
    return longest


def _pad_rows(rows: list[list[int]], length: int, value: int):
    import torch

    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


class SFTCollator:
    """list of {input_ids, attention_mask, labels[, position_ids]} -> dict of [B, T] LongTensors.

    Right padding: input_ids with the pad id, attention_mask with 0, labels with IGNORE_INDEX,
    position_ids (packed data) with 0.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: Optional[int] = None, label_pad_id: int = IGNORE_INDEX) -> None:
        self.pad_id = _pad_id(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_id = label_pad_id  # the pad id with ignore_pad_token_for_loss: false (the padding is trained)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids = [list(f["input_ids"]) for f in features]
        length = _target_len([len(x) for x in input_ids], self.pad_to_multiple_of)
        batch = {
            "input_ids": _pad_rows(input_ids, length, self.pad_id),
            "attention_mask": _pad_rows([list(f.get("attention_mask") or [1] * len(f["input_ids"])) for f in features],
                                        length, 0),
            "labels": _pad_rows([list(f.get("labels", f["input_ids"])) for f in features], length, self.label_pad_id),
        }
        if all("position_ids" in f and f["position_ids"] is not None for f in features):
            batch["position_ids"] = _pad_rows([list(f["position_ids"]) for f in features], length, 0)
        return batch


class PairwiseCollator:
    """list of {chosen_*, rejected_*} -> dict of [2B, T] LongTensors: rows [0:B] chosen, [B:2B] rejected."""

    def __init__(self, tokenizer, pad_to_multiple_of: Optional[int] = None) -> None:
        self.pad_id = _pad_id(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = {"input_ids": [], "attention_mask": [], "labels": []}
        for side in ("chosen", "rejected"):
            for f in features:
                ids = list(f[f"{side}_input_ids"])
                rows["input_ids"].append(ids)
                rows["attention_mask"].append(list(f.get(f"{side}_attention_mask") or [1] * len(ids)))
                rows["labels"].append(list(f[f"{side}_labels"]))
        length = _target_len([len(x) for x in rows["input_ids"]], self.pad_to_multiple_of)
        return {
            "input_ids": _pad_rows(rows["input_ids"], length, self.pad_id),
            "attention_mask": _pad_rows(rows["attention_mask"], length, 0),
            "labels": _pad_rows(rows["labels"], length, IGNORE_INDEX),
        }


class FeedbackCollator:
    """list of KTO rows -> dict of [2B, T] LongTensors (rows [0:B] the labelled answers, [B:2B] the KL answers)
    and ``kto_tags`` [B] (bool: desirable)."""

    def __init__(self, tokenizer, pad_to_multiple_of: Optional[int] = None) -> None:
        self.pad_id = _pad_id(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = {"input_ids": [], "attention_mask": [], "labels": []}
        for prefix in ("", "kl_"):
            for f in features:
                ids = list(f[f"{prefix}input_ids"])
                rows["input_ids"].append(ids)
                rows["attention_mask"].append(list(f.get(f"{prefix}attention_mask") or [1] * len(ids)))
                rows["labels"].append(list(f[f"{prefix}labels"]))
        length = _target_len([len(x) for x in rows["input_ids"]], self.pad_to_multiple_of)
        return {
            "input_ids": _pad_rows(rows["input_ids"], length, self.pad_id),
            "attention_mask": _pad_rows(rows["attention_mask"], length, 0),
            "labels": _pad_rows(rows["labels"], length, IGNORE_INDEX),
            "kto_tags": torch.tensor([bool(f["kto_tags"]) for f in features], dtype=torch.bool),
        }
