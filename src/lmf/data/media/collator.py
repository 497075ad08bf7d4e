"""Batches with images: the text collator's batch plus ``mm_inputs`` (pixel values, grids, token types)."""

from __future__ import annotations

from typing import Any, Callable


class MediaCollator:
    """Wraps a text collator; images and videos are decoded here, a batch at a time (never held for the whole
    dataset).

    Pairwise and KTO batches have two rows per sample (rows ``[0:B]`` and ``[B:2B]``, the same prompt): their images
    are given twice, in row order.
    """

    def __init__(self, collator: Callable, media) -> None:
        self.collator = collator
        self.media = media

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        paths = [p for f in features for p in (f.get("images") or [])]
        videos = [p for f in features for p in (f.get("videos") or [])]
        if batch["input_ids"].size(0) == 2 * len(features):
            paths, videos = paths * 2, videos * 2
        batch["mm_inputs"] = self.media.model_inputs(paths, batch["input_ids"], tuple(videos))
        self._check_tokens(batch, paths, videos)
        return batch

    def _check_tokens(self, batch: dict, paths: list[str], videos: list[str]) -> None:
        """The batch's vision tokens (counted at preprocessing time, from the files as they were then) must be what
        its pictures give now: a file replaced since then would make the model fail with a shape error."""
        expected = self.media.expected_tokens(batch["mm_inputs"], len(paths) + len(videos))
        if expected is None:
            return
        found = sum(self.media.count_image_tokens(row.tolist()) for row in batch["input_ids"])
        if found != expected:
            from lmf.extras.errors import DataError

            raise DataError(f"the vision tokens of a batch ({found}) are not what its images/videos give now "
                            f"({expected}): one of {', '.join(sorted(set(paths + videos))[:4])} changed since the data "
                            "was preprocessed; set overwrite_cache: true to preprocess it again")

    def __getattr__(self, name: str):  # pad ids and options of the wrapped collator
        return getattr(self.collator, name)
