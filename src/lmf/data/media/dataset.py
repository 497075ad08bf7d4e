"""Dataset-level checks of media data: which stages take images (videos, audio), and samples whose media tokens do
not fit."""

from __future__ import annotations

from typing import Any

from lmf.extras.errors import DataError
from lmf.extras.logging import get_logger
from lmf.data.layout import layout_of
from lmf.data.media import MEDIA_COLUMNS

logger = get_logger(__name__)
MAX_REPORTED = 5


def _records_with_media(normalized) -> int:
    """Records with at least one image, video or audio clip, counted by pyarrow a chunk at a time (no Python object
    per row)."""
    import functools

    import pyarrow as pa
    import pyarrow.compute as pc

    from lmf.data.stats import arrow_chunks

    names = [name for name in ("_" + kind for kind in MEDIA_COLUMNS) if name in normalized.column_names]
    count = 0
    for table in arrow_chunks(normalized, names):
        columns = [table.column(name) for name in names]
        if not all(pa.types.is_list(c.type) or pa.types.is_large_list(c.type) for c in columns):
            count += sum(1 for files in zip(*(c.to_pylist() for c in columns)) if any(files))
            continue
        lengths = [pc.fill_null(pc.list_value_length(c), 0) for c in columns]
        count += int(pc.sum(pc.greater(functools.reduce(pc.add, lengths), 0)).as_py() or 0)
    return count


def check_images_for_stage(normalized, stage: str, media) -> None:
    with_images = _records_with_media(normalized)
    if not with_images:
        return
    if layout_of(stage) in ("text", "feedback"):
        raise DataError(f"{with_images} record(s) have images, videos or audio; stage {stage!r} with them is not "
                        "implemented in lmf (sft, dpo, rm and prediction take them)")
    if media is None:
        raise DataError(f"{with_images} record(s) have images, videos or audio but the model takes text only: its "
                        "template has no media plugin lmf implements, or model_name_or_path has no image processor "
                        "or audio feature extractor (preprocessor_config.json)")


def drop_media_cuts(tokenized, cutoff_len: int) -> tuple[Any, int, list[int]]:
    """Samples whose media tokens ``cutoff_len`` cut through are dropped (the model would fail on them with
    "Image features and image tokens do not match"), counted and reported by index."""
    if "_media_cut" not in tokenized.column_names:
        return tokenized, 0, []
    import numpy as np

    from lmf.data.stats import arrow_chunks

    parts = [chunk["_media_cut"].to_numpy(zero_copy_only=False) for chunk in arrow_chunks(tokenized, ["_media_cut"])]
    is_cut = np.concatenate(parts).astype(bool) if parts else np.zeros(0, dtype=bool)
    cut = np.flatnonzero(is_cut).tolist()
    if cut:
        logger.warning("dropped %d sample(s) whose media tokens do not match their images/videos/audio: cut by "
                       "cutoff_len %d, or media tokens written in the text itself (sample index %s%s); raise "
                       "cutoff_len or lower image_max_pixels to keep cut ones", len(cut), cutoff_len,
                       ", ".join(map(str, cut[:MAX_REPORTED])), " ..." if len(cut) > MAX_REPORTED else "")
        keep = np.flatnonzero(~is_cut)
        if not len(keep):
            raise DataError(f"every sample's media tokens are cut by cutoff_len {cutoff_len}; raise cutoff_len or "
                            "lower image_max_pixels")
        tokenized = tokenized.select(keep)
    return tokenized.remove_columns(["_media_cut"]), len(cut), cut[:MAX_REPORTED]
