"""Data layouts: how a stage's records become examples (the stage registry, :mod:`lmf.config.stages`, names each
stage's layout; prediction has its own, :data:`GENERATE`: sft records, prompt-only inputs), and the Arrow features of
what the data pipeline writes for each: normalized records, tokenized rows (supervised, pairwise, feedback) and
packed rows."""

from __future__ import annotations

from lmf.config.stages import STAGES
from lmf.extras.errors import ConfigError

#: The data layout of prediction (``do_predict`` + ``predict_with_generate``): sft records, prompt-only inputs.
GENERATE = "generate"


def layout_of(stage: str) -> str:
    """``text``, ``supervised``, ``pairwise``, ``feedback`` (:data:`lmf.config.stages.LAYOUTS`) or ``generate``."""
    if stage == GENERATE:
        return GENERATE
    if stage not in STAGES:
        raise ConfigError(f"config key 'stage': {stage!r} has no data pipeline; choose one of: {', '.join(STAGES)}")
    return STAGES[stage].layout


def features(kind: str, media: bool = False):
    """Arrow features of a normalized or tokenized split; ``media``: with the ``images`` paths (and ``_media_cut``)
    of a vision-language model's data."""
    import datasets

    feats = _base_features(kind)
    if media and kind != "normalized":
        from lmf.data.media import MEDIA_COLUMNS

        for column in MEDIA_COLUMNS:
            feats[column] = datasets.List(datasets.Value("string"))
        feats["_media_cut"] = datasets.Value("bool")
    return feats


def _base_features(kind: str):
    import datasets

    ids = datasets.List(datasets.Value("int32"))
    mask = datasets.List(datasets.Value("int8"))
    if kind == "normalized":
        msg = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
        paths = datasets.List(datasets.Value("string"))
        return datasets.Features({"_prompt": msg, "_response": msg, "_system": datasets.Value("string"),
                                  "_tools": datasets.Value("string"), "_images": paths, "_videos": paths,
                                  "_audios": paths})
    if kind == "feedback":
        cols = {"input_ids": ids, "attention_mask": mask, "labels": ids, "kl_input_ids": ids,
                "kl_attention_mask": mask, "kl_labels": ids, "kto_tags": datasets.Value("bool"),
                "_truncated": datasets.Value("bool")}
        return datasets.Features(cols)
    if kind == "pairwise":
        cols = {}
        for side in ("chosen", "rejected"):
            cols.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": ids})
        cols["_truncated"] = datasets.Value("bool")
        return datasets.Features(cols)
    if kind == "packed":
        return datasets.Features({"input_ids": ids, "attention_mask": mask, "labels": ids, "position_ids": ids})
    return datasets.Features({"input_ids": ids, "attention_mask": mask, "labels": ids,
                              "_truncated": datasets.Value("bool")})
