"""Bounded-memory data steps: JSON arrays read one element at a time, token statistics and lengths by chunks, the
bin plan of packing without a Python list per sample, index arrays for the epoch plan. Each is checked against the
plain whole-dataset computation it replaces (bench/bench_data_scale.py measures the memory)."""

from __future__ import annotations

import bisect
import json
import random

import numpy as np
import pytest

from lmf.data import readers
from lmf.extras.constants import IGNORE_INDEX
from lmf.extras.errors import DataError

pytestmark = pytest.mark.version_independent


@pytest.mark.parametrize("window", [1, 7, 1 << 20])
def test_json_array_streamed_equals_json_loads(tmp_path, monkeypatch, window):
    monkeypatch.setattr(readers, "JSON_READ_BYTES", window)
    rng = random.Random(window)
    for trial in range(10):
        records = [{"instruction": "é\n\"" + "x" * rng.randint(0, 200), "n": rng.random(), "big": 12345678901234,
                    "nested": [1, {"z": None}]} for _ in range(rng.randint(0, 30))]
        records.append(7)  # not a record: passed on for the converter to report by index
        path = tmp_path / f"a{trial}.json"
        path.write_text(json.dumps(records, indent=trial % 2 or None, ensure_ascii=trial % 3 == 0), encoding="utf-8")
        assert [rec for _, rec in readers.iter_records(str(path))] == records
    single = tmp_path / "one.json"
    single.write_text('\ufeff {"a": 1} ', encoding="utf-8")
    assert list(readers.iter_records(str(single))) == [(0, {"a": 1})]


@pytest.mark.parametrize("text, where, message", [
    ('[{"a": 1},\n {"b": 2 }\n {"c": 3}]', "line 3, column 2", "Expecting ',' delimiter"),
    ('[{"a": 1},\n\n {"b": tru}]', "line 3, column 8", "Expecting value"),
    ('[{"a": 1}', "line 1, column 10", "Expecting ',' delimiter"),
    ('[1] x', "line 1, column 5", "Extra data"),
])
def test_json_array_errors_name_line_and_column(tmp_path, monkeypatch, text, where, message):
    monkeypatch.setattr(readers, "JSON_READ_BYTES", 4)
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=f"bad.json is not valid JSON \\({where}\\): {message}"):
        list(readers.iter_records(str(path)))
    path.write_bytes(b'[{"a": "ok"},\n {"a": "\xff"}]')
    with pytest.raises(DataError, match="not valid UTF-8: invalid start byte at byte offset 22 \\(line 2\\)"):
        list(readers.iter_records(str(path)))


def _reference_bins(lengths, capacity):
    """First-fit decreasing on Python lists (what the previous implementation did, quadratic in the samples)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    bins = []
    while order:
        current, room = [order.pop()], capacity - sorted_lengths.pop()
        while order and room > 0:
            k = bisect.bisect_right(sorted_lengths, room) - 1
            if k < 0:
                break
            room -= sorted_lengths.pop(k)
            current.append(order.pop(k))
        bins.append(current)
    return bins


def test_bin_plan_equals_list_first_fit_decreasing():
    from lmf.data.packing import plan_bin_members, plan_bins

    rng = random.Random(0)
    for trial in range(100):
        capacity = rng.choice([8, 64, 128])
        lengths = [rng.randint(0, capacity + (4 if trial % 5 == 0 else 0)) for _ in range(rng.randint(0, 200))]
        assert plan_bins(lengths, capacity) == _reference_bins(lengths, capacity)
    members, sizes = plan_bin_members(np.random.default_rng(0).integers(1, 512, 200_000), 512)
    assert members.dtype == np.int32 and sizes.dtype == np.int64 and sorted(members.tolist()) == list(range(200_000))


def _tokenized(layout: str, n: int):
    import datasets

    from lmf.data.layout import features

    rng = random.Random(n)

    def side():
        k = rng.randint(0, 9)
        return {"input_ids": [rng.randrange(100) for _ in range(k)], "attention_mask": [1] * k,
                "labels": [rng.choice([IGNORE_INDEX, 5]) for _ in range(k)]}

    rows = []
    for _ in range(n):
        if layout == "pairwise":
            row = {f"{s}_{k}": v for s in ("chosen", "rejected") for k, v in side().items()}
        else:
            row = side()
        if layout == "feedback":
            row.update({f"kl_{k}": v for k, v in side().items()}, kto_tags=rng.random() < 0.5)
        rows.append(dict(row, _truncated=rng.random() < 0.3))
    return datasets.Dataset.from_list(rows, features=features(layout))


@pytest.mark.parametrize("stage, layout", [("sft", "supervised"), ("dpo", "pairwise"), ("kto", "feedback")])
def test_token_stats_by_chunks_equal_whole_columns(monkeypatch, stage, layout):
    from lmf.data import stats as stats_mod

    ds = _tokenized(layout, 50).select(list(range(49, -1, -2)))  # with an index mapping, as after a select
    prefix = "chosen_" if layout == "pairwise" else ""
    lengths = [len(x) for x in ds[f"{prefix}input_ids"]]
    expected = {"samples": 25, "tokens": sum(lengths), "min_length": min(lengths), "max_length": max(lengths),
                "label_tokens": sum(l != IGNORE_INDEX for x in ds[f"{prefix}labels"] for l in x),
                "mean_length": round(sum(lengths) / 25, 1), "truncated": sum(ds["_truncated"])}
    if layout == "pairwise":
        rejected = sum(len(x) for x in ds["rejected_input_ids"])
        expected.update(rejected_tokens=rejected, rejected_mean_length=round(rejected / 25, 1))
    if layout == "feedback":
        expected.update(desirable=sum(ds["kto_tags"]), undesirable=25 - sum(ds["kto_tags"]))
    monkeypatch.setattr(stats_mod, "ROWS_PER_CHUNK", 4)
    assert stats_mod.token_stats(ds, stage) == expected
    assert stats_mod.list_lengths(ds, f"{prefix}input_ids").tolist() == lengths


def test_epoch_plan_is_index_arrays():
    from lmf.train.batches import ResumableShardedSampler, TokenBudget, token_budget_batches

    lengths = np.random.default_rng(1).integers(1, 64, 101)
    sampler = ResumableShardedSampler(101, 2, 1, shuffle=True, seed=5)
    order = sampler.epoch_order()
    assert order.dtype == np.int64 and order.tolist() == sampler.epoch_indices() and len(order) == 51
    sampler.set_epoch(0, skip=3)
    assert list(sampler) == order[3:].tolist() and all(type(i) is int for i in sampler)
    plans = [TokenBudget(lengths, 128, padded=True).epoch_batches(ResumableShardedSampler(101, 2, r, seed=5))
             for r in (0, 1)]
    cuts = [token_budget_batches(ResumableShardedSampler(101, 2, r, seed=5).epoch_indices(), lengths.tolist(), 128,
                                 True) for r in (0, 1)]
    most = max(map(len, cuts))
    for plan, cut in zip(plans, cuts):
        assert list(plan) == cut + cut[:most - len(cut)]  # the shorter rank repeats its first micro-batches
        assert list(plan[2:]) == list(plan)[2:] and plan[1] == list(plan)[1]
