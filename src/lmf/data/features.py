"""Arrow features of the datasets the data pipeline writes: normalized records, tokenized rows per stage."""

from __future__ import annotations


def features(kind: str, media: bool = False):
    """Arrow features of a normalized or tokenized split; ``media``: with the ``images`` paths (and ``_media_cut``)
    of a vision-language model's data."""
    import datasets

    feats = _base_features(kind)
    if media and kind != "normalized":
        feats["images"] = datasets.List(datasets.Value("string"))
        feats["videos"] = datasets.List(datasets.Value("string"))
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
                                  "_tools": datasets.Value("string"), "_images": paths, "_videos": paths})
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
    return datasets.Features({"input_ids": ids, "attention_mask": mask, "labels": ids,
                              "_truncated": datasets.Value("bool")})
