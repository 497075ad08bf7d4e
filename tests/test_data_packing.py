"""Truncation (cutoff_len keeps input_ids/labels aligned) and packing (bins, position ids, waste report)."""

from __future__ import annotations

import json
import random

import pytest

from lmf.config.parser import build_config
from lmf.testing.char_tokenizer import build_char_tokenizer
from lmf.data.collator import SFTCollator
from lmf.data.loader import get_dataset
from lmf.data.packing import padding_waste, plan_bins
from lmf.data.processor import IGNORE_INDEX, PairwiseProcessor, SupervisedProcessor, infer_seqlen
from lmf.data.template import get_template

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs


@pytest.fixture()
def tok():
    return build_char_tokenizer()


@pytest.mark.parametrize("source, target, cutoff, expected", [
    (10, 5, 100, (10, 5)),     # fits
    (300, 20, 100, (80, 20)),  # short response kept whole, prompt cut
    (20, 300, 100, (20, 80)),  # short prompt kept whole, response cut
    (200, 200, 100, (50, 50)),  # both cut in proportion
    (300, 100, 100, (75, 25)),  # response budget int(100 * 100 / 400) = 25
])
def test_infer_seqlen(source, target, cutoff, expected):
    assert infer_seqlen(source, target, cutoff) == expected
    assert sum(infer_seqlen(source, target, cutoff)) <= cutoff


def test_truncation_keeps_labels_aligned(tok):
    template = get_template("chatml", tok)
    conv_prompt = [{"role": "user", "content": "u" * 50}, {"role": "assistant", "content": "a" * 50},
                   {"role": "user", "content": "v" * 50}]
    response = [{"role": "assistant", "content": "b" * 50}]
    full_ids, full_labels, truncated = SupervisedProcessor(tok, template, 10_000).encode(conv_prompt, response, "", "")
    assert not truncated
    for cutoff in (40, 90, 150, 230):
        ids, labels, truncated = SupervisedProcessor(tok, template, cutoff).encode(conv_prompt, response, "", "")
        assert truncated and len(ids) == len(labels) <= cutoff
        # every kept token keeps the label it has in the untruncated sequence at the same turn position
        assert all(l in (IGNORE_INDEX, t) for t, l in zip(ids, labels))
        assert any(l != IGNORE_INDEX for l in labels)
    # the first turn is kept intact when the budget allows it, truncation starts in later turns
    ids, labels, _ = SupervisedProcessor(tok, template, 150).encode(conv_prompt, response, "", "")
    assert ids[:80] == full_ids[:80] and labels[:80] == full_labels[:80]


def test_pairwise_truncation(tok):
    template = get_template("chatml", tok)
    proc = PairwiseProcessor(tok, template, cutoff_len=60)
    row = proc.encode([{"role": "user", "content": "q" * 100}], [{"role": "assistant", "content": "good"},
                                                                 {"role": "assistant", "content": "bad" * 30}], "", "")
    for side in ("chosen", "rejected"):
        assert len(row[f"{side}_input_ids"]) == len(row[f"{side}_labels"]) <= 60
    n_prompt = row["chosen_labels"].count(IGNORE_INDEX)
    assert row["chosen_input_ids"][:n_prompt] == row["rejected_input_ids"][:n_prompt]
    assert row["_truncated"]


def test_plan_bins_is_a_partition_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = plan_bins(lengths, 128)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound * 1.1 + 1  # first-fit decreasing is close to optimal
    assert plan_bins([128, 1], 128) == [[0], [1]]
    assert padding_waste([64, 128], 128) == 0.25


def _reference_pack(rows: list[dict], bins: list[list[int]]) -> list[dict]:
    """Packing written out row by row: what pack_dataset's column arithmetic must equal."""
    out = []
    for members in bins:
        packed = {"input_ids": [], "attention_mask": [], "labels": [], "position_ids": []}
        for i in members:
            ids, labels = rows[i]["input_ids"], rows[i]["labels"]
            packed["input_ids"] += ids
            packed["attention_mask"] += [1] * len(ids)
            packed["labels"] += [IGNORE_INDEX] + labels[1:]
            packed["position_ids"] += list(range(len(ids)))
        out.append(packed)
    return out


@pytest.mark.parametrize("batch_tokens", [1 << 26, 300])  # one written batch, or many
@pytest.mark.parametrize("on_disk", [False, True])
def test_pack_dataset_equals_row_by_row_packing(tmp_path, monkeypatch, batch_tokens, on_disk):
    import datasets

    from lmf.data import packing

    monkeypatch.setattr(packing, "PACK_BATCH_TOKENS", batch_tokens)
    rng = random.Random(1)
    rows = []
    for _ in range(300):
        n = rng.randint(1, 120)
        rows.append({"input_ids": [rng.randrange(50_000) for _ in range(n)],
                     "attention_mask": [1] * n,
                     "labels": [rng.choice([IGNORE_INDEX, rng.randrange(50_000)]) for _ in range(n)]})
    dataset = datasets.Dataset.from_list(rows)
    packed, stats = packing.pack_dataset(dataset, 128, cache_dir=str(tmp_path / "packed") if on_disk else None)
    bins = plan_bins([len(r["input_ids"]) for r in rows], 128)
    assert packed.to_list() == _reference_pack(rows, bins)
    assert [str(packed.features[k].feature.dtype) for k in packed.column_names] == ["int32", "int8", "int32", "int32"]
    assert stats["packed_sequences"] == len(bins) == len(packed)
    assert stats["padding_waste_packed"] == round(padding_waste([len(r["input_ids"]) for r in packed], 128), 4)


def test_packed_dataset_positions_labels_and_waste(tmp_path, tok):
    data = tmp_path / "data"
    data.mkdir()
    records = [{"instruction": "q" * (i % 7 + 1), "output": "a" * (i % 5 + 1)} for i in range(30)]
    (data / "a.json").write_text(json.dumps(records))
    (data / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.json"}}))
    base = dict(model_name_or_path="unused", dataset_dir=str(data), template="chatml", cutoff_len=128,
                preprocessing_cache_dir=str(tmp_path / "cache"), dataset="a")
    template = get_template("chatml", tok)
    plain = get_dataset(build_config(base), tok, template, "sft").train_dataset
    module = get_dataset(build_config(dict(base, packing=True)), tok, template, "sft")
    packed = module.train_dataset
    assert set(packed.column_names) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert len(packed) < len(plain)
    # unpack each row at position-id resets: the samples are exactly the unpacked ones
    samples = []
    for row in packed:
        assert len(row["input_ids"]) <= 128
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == IGNORE_INDEX  # a sample's first token is never a target
            samples.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a + 1:b])))
    assert sorted(samples) == sorted((tuple(ids), tuple(labels[1:])) for ids, labels in zip(plain["input_ids"],
                                                                                           plain["labels"]))
    pack = module.stats["train"]["packing"]
    assert pack["packed_sequences"] == len(packed)
    assert pack["padding_waste_packed"] < pack["padding_waste_unpacked"]
    batch = SFTCollator(tok)([packed[0], packed[1]])
    assert batch["position_ids"].shape == batch["input_ids"].shape
    neat = get_dataset(build_config(dict(base, neat_packing=True)), tok, template, "sft").train_dataset
    assert neat["input_ids"] == packed["input_ids"]
