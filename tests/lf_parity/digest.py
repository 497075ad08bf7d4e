"""Row digests of a tokenized dataset, computed the same way on both sides (stdlib only)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json

#: The day both sides' tool prompts say it is (Llama-3's "Today Date: ..."): the goldens were recorded on it, and
#: the test and the golden script freeze it, so the parity check does not depend on the day it runs.
GOLDEN_DATE = _dt.datetime(2026, 12, 1, 12, 0, 0)


class FrozenDatetime(_dt.datetime):
    """``datetime`` whose ``now()`` is :data:`GOLDEN_DATE`; put in place of a module's ``datetime`` name."""

    @classmethod
    def now(cls, tz=None):
        return GOLDEN_DATE if tz is None else GOLDEN_DATE.replace(tzinfo=tz)

#: Columns compared per stage (LLaMA-Factory's names, which lmf shares).
COLUMNS = {
    "sft": ("input_ids", "labels"),
    "pt": ("input_ids", "labels"),
    "rm": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
    "dpo": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"),
    "kto": ("input_ids", "labels", "kl_input_ids", "kl_labels", "kto_tags"),
}


def row_digest(row: dict, columns) -> str:
    payload = json.dumps([list(map(int, row[c])) if isinstance(row[c], (list, tuple)) else [int(row[c])]
                          for c in columns]).encode()
    return hashlib.sha256(payload).hexdigest()[:20]


def digest_rows(dataset, stage: str) -> dict:
    """``{"rows", "lengths", "digests"}`` of ``dataset`` (any sequence of dict rows)."""
    columns = COLUMNS[stage]
    lengths, digests = [], []
    for row in dataset:
        lengths.append(len(row[columns[0]]))
        digests.append(row_digest(row, columns))
    return {"rows": len(digests), "columns": list(columns), "lengths": lengths, "digests": digests}
