"""Batches with media: the text collator's batch plus ``mm_inputs`` (pixel values, grids, token types, audio
features)."""

from __future__ import annotations

from typing import Any, Callable

from lmf.data.media import MEDIA_COLUMNS


class MediaCollator:
    """Wraps a text collator; images, videos and audio are decoded here, a batch at a time (never held for the whole
    dataset).

    Pairwise and KTO batches have two rows per sample (rows ``[0:B]`` and ``[B:2B]``, the same prompt): their images
    are given twice, in row order.
    """

    def __init__(self, collator: Callable, media) -> None:
        self.collator = collator
        self.media = media

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        paths, videos, audios = ([p for f in features for p in (f.get(kind) or [])] for kind in MEDIA_COLUMNS)
        if batch["input_ids"].size(0) == 2 * len(features):
            paths, videos, audios = paths * 2, videos * 2, audios * 2
        batch["mm_inputs"] = self.media.model_inputs(paths, batch["input_ids"], tuple(videos), tuple(audios))
        self._check_tokens(batch, paths + videos + audios)
        return batch

    def _check_tokens(self, batch: dict, files: list[str]) -> None:
        """The batch's media tokens (counted at preprocessing time, from the files as they were then) must be what
        its files give now: a file replaced since then would make the model fail with a shape error."""
        expected = self.media.expected_tokens(batch["mm_inputs"], len(files))
        if expected is None:
            return
        found = sum(self.media.count_image_tokens(row.tolist()) for row in batch["input_ids"])
        if found != expected:
            from lmf.extras.errors import DataError

            raise DataError(f"the media tokens of a batch ({found}) are not what its files give now "
                            f"({expected}): one of {', '.join(sorted(set(files))[:4])} changed since the data "
                            "was preprocessed; set overwrite_cache: true to preprocess it again")

    def __getattr__(self, name: str):  # pad ids and options of the wrapped collator
        return getattr(self.collator, name)
