"""Every bad-data path: an error naming file + record index + field, or (skip_bad_records) a counted warning."""

from __future__ import annotations

import json
import logging

import pytest

from lmf.config.parser import build_config
from lmf.testing.char_tokenizer import build_char_tokenizer
from lmf.data.loader import get_dataset
from lmf.data.template import get_template
from lmf.extras.errors import ConfigError, DataError


@pytest.fixture()
def tok():
    return build_char_tokenizer()


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


def setup(data_dir, records, entry=None, name="d.json"):
    (data_dir / name).write_text(json.dumps(records) if not isinstance(records, str) else records, encoding="utf-8")
    (data_dir / "dataset_info.json").write_text(json.dumps({"d": {"file_name": name, **(entry or {})}}))


def load(tmp_path, tok, stage="sft", **kw):
    raw = dict(model_name_or_path="unused", dataset_dir=str(tmp_path / "data"), template="chatml", cutoff_len=256,
               preprocessing_cache_dir=str(tmp_path / "cache"), stage=stage, dataset="d")
    raw.update(kw)
    return get_dataset(build_config(raw), tok, get_template("chatml", tok), stage)


GOOD = {"instruction": "q", "output": "a"}
SHAREGPT = {"formatting": "sharegpt"}


@pytest.mark.parametrize("records, entry, pattern", [
    ([GOOD, {"instruction": "q"}], None, r"d\.json: record 1: field 'output' is missing"),
    ([GOOD, GOOD, {"output": "a"}], None, r"d\.json: record 2: field 'instruction' is missing"),
    ([{"instruction": "q", "output": "   "}], None, r"d\.json: record 0: field 'output': empty response"),
    ([{"instruction": "q", "output": ["x"]}], None, r"record 0: field 'output' must be a string"),
    ([{"instruction": "q", "output": "a", "history": [["only one"]]}], {"columns": {"history": "history"}},
     r"record 0: field 'history'\[0\] must be a \[query, response\] pair"),
    ([{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}], SHAREGPT,
     r"record 0: field 'conversations': wrong role order at message 0: 'assistant'"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}], SHAREGPT,
     r"record 0: field 'conversations': wrong role order at message 1"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}], SHAREGPT,
     r"record 0: field 'conversations': empty response"),
    ([{"conversations": [{"from": "human", "value": "q"}]}], SHAREGPT,
     r"record 0: field 'conversations': the conversation must end with an assistant turn"),
    ([{"conversations": [{"from": "robot", "value": "q"}, {"from": "gpt", "value": "a"}]}], SHAREGPT,
     r"record 0: field conversations\[0\]\.from is 'robot'"),
    ([{"conversations": "not a list"}], SHAREGPT, r"record 0: field 'conversations' must be a list"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{bad"}],
     {"formatting": "sharegpt", "columns": {"tools": "tools"}}, r"record 0: field 'tools' is not valid JSON"),
    ([GOOD, "just a string"], None, r"record 1: expected a JSON object"),
])
def test_malformed_record_raises_with_location(tmp_path, data_dir, tok, records, entry, pattern):
    setup(data_dir, records, entry)
    with pytest.raises(DataError, match=pattern) as info:
        load(tmp_path, tok)
    assert "skip_bad_records" in str(info.value)


def test_preference_errors(tmp_path, data_dir, tok):
    setup(data_dir, [{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}}],
          {"formatting": "sharegpt", "ranking": True, "columns": {"messages": "conversations", "chosen": "chosen",
                                                                  "rejected": "rejected"}})
    with pytest.raises(DataError, match=r"record 0: field 'chosen'/'rejected' is missing"):
        load(tmp_path, tok, stage="dpo")
    setup(data_dir, [{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"},
                      "rejected": {"from": "gpt", "value": "b"}}],
          {"formatting": "sharegpt", "ranking": True, "columns": {"chosen": "chosen", "rejected": "rejected"}})
    with pytest.raises(DataError, match=r"record 0: field 'chosen': role 'user'; expected an assistant message"):
        load(tmp_path, tok, stage="dpo")
    setup(data_dir, [{"instruction": "q", "chosen": "a", "rejected": ""}], {"ranking": True})
    with pytest.raises(DataError, match=r"record 0: field 'rejected': empty response"):
        load(tmp_path, tok, stage="rm")


def test_skip_bad_records_counts_and_warns(tmp_path, data_dir, tok, caplog):
    setup(data_dir, [GOOD, {"instruction": "q"}, GOOD, {"output": "x"}, GOOD])
    with caplog.at_level(logging.WARNING, logger="lmf"):
        logging.getLogger("lmf").propagate = True
        try:
            module = load(tmp_path, tok, skip_bad_records=True)
        finally:
            logging.getLogger("lmf").propagate = False
    assert len(module.train_dataset) == 3
    stats = module.stats["train"]
    assert stats["skipped_records"] == 2
    assert stats["skipped_examples"][0].endswith("d.json: record 1: field 'output' is missing")
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped 2 malformed record(s)" in warning and "record 3: field 'instruction' is missing" in warning


def test_all_records_bad_is_an_error_even_when_skipping(tmp_path, data_dir, tok):
    setup(data_dir, [{"instruction": "q"}])
    with pytest.raises(DataError, match=r"no usable records \(1 skipped as malformed\)"):
        load(tmp_path, tok, skip_bad_records=True)


def test_bad_json_line_names_line(tmp_path, data_dir, tok):
    setup(data_dir, json.dumps(GOOD) + "\n{broken\n" + json.dumps(GOOD) + "\n", name="d.jsonl")
    with pytest.raises(DataError, match=r"d\.jsonl: record 1: line 2 is not valid JSON"):
        load(tmp_path, tok)
    module = load(tmp_path, tok, skip_bad_records=True)
    assert len(module.train_dataset) == 2 and module.stats["train"]["skipped_records"] == 1


def test_invalid_json_file(tmp_path, data_dir, tok):
    setup(data_dir, '[{"instruction": "q", "output": "a"},')
    with pytest.raises(DataError, match=r"d\.json is not valid JSON \(line 1"):
        load(tmp_path, tok)


def test_registry_errors(tmp_path, data_dir, tok):
    setup(data_dir, [GOOD])
    with pytest.raises(DataError, match=r"dataset 'dd' is not registered in .*dataset_info\.json.*did you mean 'd'"):
        load(tmp_path, tok, dataset="dd")
    (data_dir / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "missing.json"}}))
    with pytest.raises(DataError, match=r"dataset 'd': file not found: .*missing\.json"):
        load(tmp_path, tok)
    (data_dir / "dataset_info.json").write_text(json.dumps({"d": {"hf_hub_url": "org/name"}}))
    with pytest.raises(DataError, match=r"dataset 'd' is a hub dataset \(org/name\).*file_name"):
        load(tmp_path, tok)
    (data_dir / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", "colums": {}}}))
    with pytest.raises(DataError, match=r"dataset 'd' has unknown key 'colums'; did you mean 'columns'"):
        load(tmp_path, tok)
    (data_dir / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json", "formatting": "chatml"}}))
    with pytest.raises(DataError, match=r"formatting 'chatml' is not one of alpaca, sharegpt"):
        load(tmp_path, tok)
    (data_dir / "dataset_info.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset_info\.json is not valid JSON"):
        load(tmp_path, tok)


def test_stage_and_data_kind_must_match(tmp_path, data_dir, tok):
    setup(data_dir, [GOOD])
    with pytest.raises(DataError, match=r"dataset 'd' is not preference data.*stage 'dpo'"):
        load(tmp_path, tok, stage="dpo")
    setup(data_dir, [{"instruction": "q", "chosen": "a", "rejected": "b"}], {"ranking": True})
    with pytest.raises(DataError, match=r"dataset 'd' is preference data \(ranking: true\)"):
        load(tmp_path, tok, stage="sft")


def test_missing_dataset_key(tmp_path, data_dir, tok):
    setup(data_dir, [GOOD])
    with pytest.raises(ConfigError, match="config key 'dataset' is required"):
        load(tmp_path, tok, dataset=None)


def test_val_size_too_large(tmp_path, data_dir, tok):
    setup(data_dir, [GOOD, GOOD])
    with pytest.raises(ConfigError, match="config key 'val_size'"):
        load(tmp_path, tok, val_size=5)


# ---- files that are not UTF-8: one line naming the file and the byte offset; a bad JSON line is one bad record ----

LATIN1 = '{"instruction": "caf\xe9", "output": "a"}'.encode("latin-1")  # \xe9 alone is not UTF-8


def test_non_utf8_json_file_names_file_and_byte_offset(tmp_path, data_dir, tok):
    first = b'[{"instruction": "q", "output": "a"},\n'
    (data_dir / "d.json").write_bytes(first + LATIN1 + b"]")
    (data_dir / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    offset = len(first) + LATIN1.index(b"\xe9")
    with pytest.raises(DataError, match=rf"d\.json is not valid UTF-8: .* at byte offset {offset} \(line 2\)"):
        load(tmp_path, tok)
    with pytest.raises(DataError, match=r"d\.json is not valid UTF-8"):
        load(tmp_path, tok, skip_bad_records=True)  # a .json array is parsed whole: no record to skip


def test_non_utf8_dataset_info_names_file_and_byte_offset(tmp_path, data_dir, tok):
    setup(data_dir, [GOOD])
    (data_dir / "dataset_info.json").write_bytes(b'{"d": {"file_name": "d.json", "x": "\xff"}}')
    with pytest.raises(DataError, match=r"dataset_info\.json is not valid UTF-8: invalid start byte at byte offset 36 "
                                        r"\(line 1\)"):
        load(tmp_path, tok)


def test_non_utf8_jsonl_line_is_a_bad_record(tmp_path, data_dir, tok):
    good = json.dumps(GOOD).encode()
    (data_dir / "d.jsonl").write_bytes(good + b"\n" + LATIN1 + b"\n" + good + b"\n")
    (data_dir / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.jsonl"}}))
    offset = len(good) + 1 + LATIN1.index(b"\xe9")
    with pytest.raises(DataError, match=rf"d\.jsonl: record 1: line 2 is not valid UTF-8: invalid continuation byte "
                                        rf"at byte offset {offset} of the file.*skip_bad_records"):
        load(tmp_path, tok)
    logger = logging.getLogger("lmf.data.loader")
    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        module = load(tmp_path, tok, skip_bad_records=True)
    finally:
        logger.removeHandler(handler)
    assert len(module.train_dataset) == 2 and module.stats["train"]["skipped_records"] == 1
    assert any("skipped 1 malformed record(s)" in r.getMessage() and "line 2 is not valid UTF-8" in r.getMessage()
               for r in records)
