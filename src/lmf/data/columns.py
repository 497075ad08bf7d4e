"""Arrow tables of tokenized rows, built by numpy from whole batches (no Python int per token crosses into Arrow)."""

from __future__ import annotations

from itertools import chain
from typing import Optional

from lmf.data.layout import features
from lmf.extras.constants import IGNORE_INDEX

# Label kinds of a segment of a tokenized conversation.
MASKED, LABELLED, EOS_THEN_MASKED = 0, 1, 2


def rows_table(columns: dict[str, list], kind: str):
    """``pyarrow.Table`` of a processor's batch (``columns``: name -> one value per row) in the types of
    :func:`lmf.data.layout.features` ``kind``: list columns as numpy-filled values + offsets, the rest as is."""
    import numpy as np
    import pyarrow as pa

    schema = features(kind).arrow_schema
    arrays = []
    for field in schema:
        values = columns[field.name]
        if pa.types.is_list(field.type):
            value_type = field.type.value_type
            lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
            offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
            flat = np.fromiter(chain.from_iterable(values), dtype=value_type.to_pandas_dtype(), count=int(lengths.sum()))
            arrays.append(pa.ListArray.from_arrays(offsets, pa.array(flat, type=value_type)))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def token_table(segments: list[list[int]], kinds: list[int], row_segments: list[int], truncated: list[bool],
                eos_token_id: Optional[int] = None, never_labels: tuple = ()):
    """``pyarrow.Table`` of sft rows: row i is the concatenation of its ``row_segments[i]`` segments.

    labels copy the ids of LABELLED segments, are IGNORE_INDEX for MASKED ones, and eos then
    IGNORE_INDEX for EOS_THEN_MASKED ones, and IGNORE_INDEX for the ids in ``never_labels`` (vision tokens,
    even with ``train_on_prompt``); attention_mask is all ones. Columns are list<int32>
    (ids, labels) and list<int8> (mask), as the loader's features declare.
    """
    import numpy as np
    import pyarrow as pa

    seg_lengths = np.fromiter(map(len, segments), dtype=np.int64, count=len(segments))
    total = int(seg_lengths.sum())
    ids = np.fromiter(chain.from_iterable(segments), dtype=np.int32, count=total)
    kind_per_token = np.repeat(np.asarray(kinds, dtype=np.int8), seg_lengths)
    labels = np.where(kind_per_token == LABELLED, ids, np.int32(IGNORE_INDEX)).astype(np.int32, copy=False)
    if EOS_THEN_MASKED in kinds:
        seg_starts = np.concatenate([[0], np.cumsum(seg_lengths)[:-1]])
        firsts = seg_starts[(np.asarray(kinds) == EOS_THEN_MASKED) & (seg_lengths > 0)]
        labels[firsts] = eos_token_id
    if never_labels:
        labels[np.isin(ids, np.asarray(never_labels, dtype=np.int32))] = IGNORE_INDEX
    row_ends = np.cumsum(np.asarray(row_segments, dtype=np.int64))
    seg_ends = np.concatenate([[0], np.cumsum(seg_lengths)])
    offsets = pa.array(seg_ends[np.concatenate([[0], row_ends])].astype(np.int32))
    return pa.Table.from_arrays(
        [pa.ListArray.from_arrays(offsets, pa.array(ids)),
         pa.ListArray.from_arrays(offsets, pa.array(np.ones(total, dtype=np.int8))),
         pa.ListArray.from_arrays(offsets, pa.array(labels)),
         pa.array(truncated, type=pa.bool_())],
        names=["input_ids", "attention_mask", "labels", "_truncated"],
    )


def media_columns(table_or_dict, media, files: list[tuple], cut: list[bool]):
    """Add the ``images``, ``videos`` and ``audios`` columns (paths, for the collator; ``files``: each row's
    (images, videos, audios)) and ``_media_cut`` (the row's media tokens are not exactly its files': cutoff_len cut
    through them, or the text itself holds media tokens) when the data goes to a multimodal model."""
    if media is None:
        return table_or_dict
    from lmf.data.media import MEDIA_COLUMNS

    columns = {kind: [row[k] for row in files] for k, kind in enumerate(MEDIA_COLUMNS)}
    if isinstance(table_or_dict, dict):
        table_or_dict.update(columns, _media_cut=cut)
        return table_or_dict
    import pyarrow as pa

    table = table_or_dict
    for kind, paths in columns.items():
        table = table.append_column(kind, pa.array(paths, type=pa.list_(pa.string())))
    return table.append_column("_media_cut", pa.array(cut, type=pa.bool_()))
