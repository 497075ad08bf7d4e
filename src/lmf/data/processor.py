"""Tokenize normalized records into model inputs with label masks (LLaMA-Factory semantics).

- supervised: every assistant turn is a label (``mask_history`` keeps only the last one); prompt tokens
  are IGNORE_INDEX unless ``train_on_prompt``; the end-of-turn/eos token after each response is a label.
- pairwise: prompt + chosen and prompt + rejected, prompt masked.
- feedback (KTO): prompt + answer with its ``kto_tags`` (desirable or not), and a mismatched pair for the KL
  term: the prompt with the answer of the previous record of the map batch (LLaMA-Factory's pairing).
- pretrain: text + eos, long documents split into ``cutoff_len`` chunks, every token a label.
- generate (prediction with ``predict_with_generate``): the prompt up to the assistant prefix as input,
  the reference answer as ``labels`` (LLaMA-Factory's unsupervised processor, same truncation).

Truncation to ``cutoff_len``: LLaMA-Factory's ``infer_seqlen`` budget split; input_ids and labels are cut together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmf.data.columns import EOS_THEN_MASKED, LABELLED, MASKED, media_columns, rows_table, token_table
from lmf.data.fork_share import ForkSharedTokenizer
from lmf.data.layout import GENERATE, layout_of
from lmf.data.media import MEDIA_COLUMNS
from lmf.data.template import encode_many
from lmf.extras.constants import IGNORE_INDEX
from lmf.extras.errors import DataError



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


def _images_of(batch: dict[str, list]) -> list[tuple[list[str], ...]]:
    """(images, videos, audios) of every record of a normalized batch."""
    empty = [[] for _ in batch["_prompt"]]
    columns = [batch.get("_" + kind) or empty for kind in MEDIA_COLUMNS]
    return [tuple(list(files or []) for files in row) for row in zip(*columns)]


def expand_media(media, messages: list[dict], media_files: tuple) -> tuple[list[dict], int]:
    """(messages with their ``<image>`` / ``<video>`` / ``<audio>`` placeholders expanded into media tokens, media
    tokens expected); ``media_files`` is a record's (images, videos, audios)."""
    if not media_files or not any(media_files):
        return messages, 0
    if media is None:
        raise DataError("the data has images, videos or audio but the model takes text only (its template has no "
                        "media plugin lmf implements, or model_name_or_path has no image processor or audio feature "
                        "extractor, preprocessor_config.json)")
    return media.expand(messages, *media_files)


@dataclass
class SupervisedProcessor(ForkSharedTokenizer):
    """Batched ``datasets.map`` function for sft.

    A batch is tokenized with one :meth:`Template.encode_multiturn_many` call and returned as a
    ``pyarrow.Table`` (``input_ids``, ``attention_mask``, ``labels``, ``_truncated``) built with numpy
    from the flat token ids: no per-token Python work after the tokenizer.
    """

    tokenizer: Any
    template: Any
    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False
    parallel_encode: bool = False  # tokenizers' thread pool for the batch (see template.encode_many)
    media: Any = None  # the vision plugin (lmf.data.media.plugins) of a vision-language model
    _piece_cache: dict = field(default_factory=dict, repr=False, compare=False)  # prefix/system prompt ids

    def segments(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[list[list[int]], list[int], bool]:
        """(token segments in sequence order, label kind of each, truncated) of one conversation's
        (prompt, response) pairs, cut to ``cutoff_len`` (LLaMA-Factory's budget per turn)."""
        efficient_eos = self.template.efficient_eos
        total = sum(len(s) + len(t) for s, t in pairs)
        budget_used = 1 if efficient_eos else 0
        turns: list[tuple[list[int], int, list[int], int]] = []
        for turn, (source, target) in enumerate(reversed(pairs) if self.mask_history else pairs):
            if budget_used >= self.cutoff_len:
                break
            src_len, tgt_len = infer_seqlen(len(source), len(target), self.cutoff_len - budget_used)
            if src_len < len(source):
                source = source[:src_len]
            if tgt_len < len(target):
                target = target[:tgt_len]
            budget_used += src_len + tgt_len
            if self.train_on_prompt:
                source_kind = LABELLED
            elif efficient_eos and turn != 0 and src_len:
                source_kind = EOS_THEN_MASKED
            else:
                source_kind = MASKED
            target_kind = MASKED if (self.mask_history and turn != 0) else LABELLED
            turns.append((source, source_kind, target, target_kind))
        if self.mask_history:  # turns were visited last-first
            turns.reverse()
        segments: list[list[int]] = []
        kinds: list[int] = []
        for source, source_kind, target, target_kind in turns:
            segments += (source, target)
            kinds += (source_kind, target_kind)
        if efficient_eos:
            segments.append([self.tokenizer.eos_token_id])
            kinds.append(LABELLED)
        length = sum(len(s) for s in segments)
        return segments, kinds, length < total + (1 if efficient_eos else 0)

    def encode(self, prompt: list[dict], response: list[dict], system: str,
               tools: str) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, truncated) of one conversation."""
        pairs = self.template.encode_multiturn(self.tokenizer, _conversation(prompt, response), system or None,
                                               tools or None, cache=self._piece_cache)
        segments, kinds, truncated = self.segments(pairs)
        input_ids: list[int] = []
        labels: list[int] = []
        for ids, kind in zip(segments, kinds):
            input_ids += ids
            if kind == LABELLED:
                labels += ids
            elif kind == EOS_THEN_MASKED and ids:
                labels += [self.tokenizer.eos_token_id] + [IGNORE_INDEX] * (len(ids) - 1)
            else:
                labels += [IGNORE_INDEX] * len(ids)
        return input_ids, labels, truncated

    def __call__(self, batch: dict[str, list]):
        images = _images_of(batch)
        conversations, expected = [], []
        for (prompt, response, system, tools), row_images in zip(_records(batch), images):
            messages, n_tokens = expand_media(self.media, _conversation(prompt, response), row_images)
            conversations.append((messages, system or None, tools or None))
            expected.append(n_tokens)
        encoded = self.template.encode_multiturn_many(self.tokenizer, conversations, cache=self._piece_cache,
                                                      parallel=self.parallel_encode)
        segments: list[list[int]] = []
        kinds: list[int] = []
        row_segments: list[int] = []
        truncated: list[bool] = []
        media_cut: list[bool] = []
        for pairs, n_tokens in zip(encoded, expected):
            segs, seg_kinds, cut = self.segments(pairs)
            segments += segs
            kinds += seg_kinds
            row_segments.append(len(segs))
            truncated.append(cut)
            media_cut.append(self.media is not None and sum(map(self.media.count_image_tokens, segs)) != n_tokens)
        table = token_table(segments, kinds, row_segments, truncated, self.tokenizer.eos_token_id,
                            self.media.vision_token_ids if self.media is not None else ())
        return media_columns(table, self.media, images, media_cut)


@dataclass
class PairwiseProcessor(ForkSharedTokenizer):
    """Batched ``datasets.map`` function for dpo/rm: chosen_* and rejected_* columns."""

    tokenizer: Any
    template: Any
    cutoff_len: int
    media: Any = None
    _piece_cache: dict = field(default_factory=dict, repr=False, compare=False)  # prefix/system prompt ids

    def encode(self, prompt: list[dict], response: list[dict], system: str, tools: str,
               images: tuple = ()) -> dict[str, Any]:
        """One record's row (the ``chosen_*`` / ``rejected_*`` values, ``_truncated``, ``_media_cut``)."""
        return self._rows([(prompt, response, system, tools)], [images])[0]

    def _rows(self, records: list[tuple], images: list[tuple]) -> list[dict[str, Any]]:
        """The rows of records: prompt + chosen and prompt + rejected of every record tokenized in one call."""
        conversations, expected = [], []
        for (prompt, response, system, tools), row_images in zip(records, images):
            chosen_msgs, n_tokens = expand_media(self.media, _conversation(prompt, response[:1]), row_images)
            rejected_msgs = chosen_msgs[:-1] + _conversation([], response[1:2])  # the same (expanded) prompt
            conversations += [(chosen_msgs, system or None, tools or None), (rejected_msgs, system or None, tools or None)]
            expected.append(n_tokens)
        encoded = self.template.encode_oneturn_many(self.tokenizer, conversations, self._piece_cache)
        return [self._row(encoded[2 * i], encoded[2 * i + 1][1], n) for i, n in enumerate(expected)]

    def _row(self, chosen_pair: tuple[list[int], list[int]], rejected_ids: list[int], n_tokens: int) -> dict[str, Any]:
        tpl, tok = self.template, self.tokenizer
        prompt_ids, chosen_ids = chosen_pair
        if tpl.efficient_eos:
            chosen_ids = chosen_ids + [tok.eos_token_id]
            rejected_ids = rejected_ids + [tok.eos_token_id]
        src_len, tgt_len = infer_seqlen(len(prompt_ids), max(len(chosen_ids), len(rejected_ids)), self.cutoff_len)
        truncated = src_len < len(prompt_ids) or tgt_len < max(len(chosen_ids), len(rejected_ids))
        prompt_ids, chosen_ids, rejected_ids = prompt_ids[:src_len], chosen_ids[:tgt_len], rejected_ids[:tgt_len]
        chosen = prompt_ids + chosen_ids
        rejected = prompt_ids + rejected_ids
        media_cut = self.media is not None and (self.media.count_image_tokens(chosen) != n_tokens
                                                or self.media.count_image_tokens(rejected) != n_tokens)
        return {
            "_media_cut": media_cut,
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
        images = _images_of(batch)
        rows = self._rows(list(_records(batch)), images)
        out = {k: [row[k] for row in rows] for k in keys}
        return media_columns(rows_table(out, "pairwise"), self.media, images, [row["_media_cut"] for row in rows])


FEEDBACK_COLUMNS = ("input_ids", "attention_mask", "labels", "kl_input_ids", "kl_attention_mask", "kl_labels",
                    "kto_tags", "_truncated")


@dataclass
class FeedbackProcessor(ForkSharedTokenizer):
    """Batched ``datasets.map`` function for kto: the labelled answer and the KL (mismatched) answer."""

    tokenizer: Any
    template: Any
    cutoff_len: int
    _piece_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def _cut(self, prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int], bool]:
        """(input_ids, labels, truncated) of one prompt + answer."""
        if self.template.efficient_eos:
            answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        src_len, tgt_len = infer_seqlen(len(prompt_ids), len(answer_ids), self.cutoff_len)
        truncated = src_len < len(prompt_ids) or tgt_len < len(answer_ids)
        return prompt_ids[:src_len] + answer_ids[:tgt_len], [IGNORE_INDEX] * src_len + answer_ids[:tgt_len], truncated

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in FEEDBACK_COLUMNS}
        responses = batch["_response"]
        kl_responses = [responses[-1]] + responses[:-1]
        conversations, tags = [], []
        for (prompt, response, system, tools), kl_response in zip(_records(batch), kl_responses):
            desirable = bool(response[0]["content"])
            answer = response[0] if desirable else response[1]
            kl_answer = kl_response[0] if kl_response[0]["content"] else kl_response[1]
            system, tools = system or None, tools or None
            conversations += [(_conversation(prompt, [answer]), system, tools),
                              (_conversation(prompt, [kl_answer]), system, tools)]
            tags.append(desirable)
        encoded = self.template.encode_oneturn_many(self.tokenizer, conversations, self._piece_cache)
        for i, desirable in enumerate(tags):
            ids, labels, truncated = self._cut(*encoded[2 * i])
            kl_ids, kl_labels, _ = self._cut(*encoded[2 * i + 1])
            row = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "kl_input_ids": kl_ids,
                   "kl_attention_mask": [1] * len(kl_ids), "kl_labels": kl_labels, "kto_tags": desirable,
                   "_truncated": truncated}
            for k in FEEDBACK_COLUMNS:
                out[k].append(row[k])
        return rows_table(out, "feedback")


@dataclass
class PretrainProcessor(ForkSharedTokenizer):
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
        for text_ids in encode_many(tok, [prompt[0]["content"] for prompt in batch["_prompt"]]):
            ids = bos + text_ids + eos
            for start in range(0, len(ids), self.cutoff_len):
                chunk = ids[start:start + self.cutoff_len]
                out["input_ids"].append(chunk)
                out["attention_mask"].append([1] * len(chunk))
                out["labels"].append(list(chunk))
                out["_truncated"].append(False)
        return rows_table(out, "supervised")


@dataclass
class GenerationProcessor(ForkSharedTokenizer):
    """Batched ``datasets.map`` function for prediction: ``input_ids`` is the prompt (ending with the assistant
    prefix), ``labels`` the reference answer's ids (not aligned with the input), both cut by ``infer_seqlen``."""

    tokenizer: Any
    template: Any
    cutoff_len: int
    media: Any = None
    _piece_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def encode(self, prompt: list[dict], response: list[dict], system: str, tools: str,
               images: tuple = ()) -> tuple[list, list, bool, bool]:
        """(input_ids, labels, truncated, vision tokens not exactly the pictures')."""
        answer = list(response) if len(response) == 1 else [{"role": "assistant", "content": ""}]
        messages, n_tokens = expand_media(self.media, _conversation(prompt, answer), images)
        input_ids, labels = self.template.encode_oneturn(self.tokenizer, messages,
                                                         system or None, tools or None, cache=self._piece_cache)
        if self.template.efficient_eos:
            labels = labels + [self.tokenizer.eos_token_id]
        source_len, target_len = infer_seqlen(len(input_ids), len(labels), self.cutoff_len)
        truncated = source_len < len(input_ids) or target_len < len(labels)
        input_ids = input_ids[:source_len]
        media_cut = self.media is not None and self.media.count_image_tokens(input_ids) != n_tokens
        return input_ids, labels[:target_len], truncated, media_cut

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "_truncated": []}
        images, cut = _images_of(batch), []
        for (prompt, response, system, tools), row_images in zip(_records(batch), images):
            ids, labels, truncated, media_cut = self.encode(prompt, response, system, tools, row_images)
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
            out["_truncated"].append(truncated)
            cut.append(media_cut)
        return media_columns(out, self.media, images, cut)


def make_processor(stage: str, tokenizer, template, data_args, media=None):
    """The map function for ``stage`` (sft, pt, dpo, rm, kto, generate; ``media``: a vision-language model's plugin),
    its tokenizer shared with datasets' fork workers before their pool starts (:mod:`lmf.data.fork_share`)."""
    d, cut, layout = data_args, data_args.cutoff_len, layout_of(stage)
    if layout == "supervised":
        processor = SupervisedProcessor(tokenizer, template, cut, d.train_on_prompt, d.mask_history, media=media)
    elif layout in ("pairwise", GENERATE):
        kind = PairwiseProcessor if layout == "pairwise" else GenerationProcessor
        processor = kind(tokenizer, template, cut, media=media)
    elif layout in ("text", "feedback"):
        processor = (PretrainProcessor if layout == "text" else FeedbackProcessor)(tokenizer, template, cut)
    else:
        raise ValueError(f"no data processor for layout {layout!r}")
    processor.share_tokenizer()
    return processor
