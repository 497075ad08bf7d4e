"""Dataset formats and file types: alpaca (history/system/ranking), sharegpt (system/tools), OpenAI messages,
v1 YAML registry with the pair converter, json/jsonl/csv/parquet/txt files, folders, num_samples."""

from __future__ import annotations

import csv
import json

import pytest

from lmf.config.parser import build_config
from lmf.testing.char_tokenizer import build_char_tokenizer
from lmf.data.loader import get_dataset
from lmf.data.processor import IGNORE_INDEX
from lmf.data.template import get_template


@pytest.fixture()
def tok():
    return build_char_tokenizer()


def write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_info(data_dir, info):
    (data_dir / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")


def load(tmp_path, tok, stage="sft", template="chatml", **kw):
    raw = dict(model_name_or_path="unused", dataset_dir=str(tmp_path / "data"), template=template, cutoff_len=512,
               preprocessing_cache_dir=str(tmp_path / "cache"), stage=stage)
    raw.update(kw)
    cfg = build_config(raw)
    return get_dataset(cfg, tok, get_template(template, tok), stage)


def text(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def labelled(tok, row, prefix=""):
    return text(tok, [t for t, l in zip(row[prefix + "input_ids"], row[prefix + "labels"]) if l != IGNORE_INDEX])


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


def test_alpaca_with_input_history_and_system(tmp_path, data_dir, tok):
    write_json(data_dir / "a.json", [{
        "instruction": "Add", "input": "1 2", "output": "3", "system": "Math.",
        "history": [["Hi", "Hello"], ["Ready?", "Yes"]],
    }])
    write_info(data_dir, {"a": {"file_name": "a.json", "columns": {"prompt": "instruction", "query": "input",
                                                                    "response": "output", "system": "system",
                                                                    "history": "history"}}})
    row = load(tmp_path, tok, dataset="a").train_dataset[0]
    assert text(tok, row["input_ids"]) == (
        "<|im_start|>system\nMath.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nReady?<|im_end|>\n<|im_start|>assistant\nYes<|im_end|>\n"
        "<|im_start|>user\nAdd\n1 2<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n")
    assert labelled(tok, row) == "Hello<|im_end|>\nYes<|im_end|>\n3<|im_end|>\n"


def test_sharegpt_system_message_and_tools(tmp_path, data_dir, tok):
    tools = [{"name": "add", "description": "Add", "parameters": {"type": "object", "properties": {}}}]
    write_json(data_dir / "s.json", [{"conversations": [
        {"from": "system", "value": "Sys"},
        {"from": "human", "value": "1+2?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 1}})},
        {"from": "observation", "value": "3"},
        {"from": "gpt", "value": "It is 3"},
    ], "tools": json.dumps(tools)}])
    write_info(data_dir, {"s": {"file_name": "s.json", "formatting": "sharegpt",
                                "columns": {"messages": "conversations", "tools": "tools"}}})
    row = load(tmp_path, tok, template="qwen", dataset="s", cutoff_len=4096).train_dataset[0]
    full = text(tok, row["input_ids"])
    assert full.startswith("<|im_start|>system\nSys\n\n# Tools")
    assert labelled(tok, row) == ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n'
                                  "It is 3<|im_end|>\n")
    assert "<tool_response>\n3\n</tool_response>" in full


def test_openai_messages_with_tool_calls(tmp_path, data_dir, tok):
    lines = [{"messages": [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": "{\"c\": \"P\"}"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]},
    ]}]
    (data_dir / "o.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    write_info(data_dir, {"o": {"file_name": "o.jsonl", "formatting": "openai"}})
    row = load(tmp_path, tok, template="qwen", dataset="o", cutoff_len=4096).train_dataset[0]
    assert labelled(tok, row) == ('<tool_call>\n{"name": "w", "arguments": {"c": "P"}}\n</tool_call><|im_end|>\n'
                                  "Sunny.<|im_end|>\n")
    assert text(tok, row["input_ids"]).startswith("<|im_start|>system\nSys<|im_end|>\n")


def test_unregistered_files_are_detected(tmp_path, data_dir, tok):
    """A dataset name that is a path: jsonl (openai), csv (alpaca), parquet (alpaca) and a folder."""
    (data_dir / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Q"},
                                                                  {"role": "assistant", "content": "A"}]}) + "\n")
    with open(data_dir / "t.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerow({"instruction": "Say x", "input": "", "output": "x"})
        w.writerow({"instruction": "Say y", "input": "", "output": "y"})
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": ["P1", "P2", "P3"], "output": ["R1", "R2", "R3"]}), data_dir / "t.parquet")
    folder = data_dir / "shards"
    folder.mkdir()
    for i in range(2):
        write_json(folder / f"part{i}.json", [{"instruction": f"I{i}", "output": f"O{i}"}])
    module = load(tmp_path, tok, dataset="chat.jsonl,t.csv,t.parquet,shards")
    assert module.stats["train"]["records"] == {"chat.jsonl": 1, "t.csv": 2, "t.parquet": 3, "shards": 2}
    outputs = [labelled(tok, r) for r in module.train_dataset]
    assert outputs == [f"{x}<|im_end|>\n" for x in ["A", "x", "y", "R1", "R2", "R3", "O0", "O1"]]


def test_plain_text_pretraining(tmp_path, data_dir, tok):
    (data_dir / "corpus.txt").write_text("first doc\n\nsecond doc that is long\n", encoding="utf-8")
    write_info(data_dir, {"c": {"file_name": "corpus.txt", "columns": {"prompt": "text"}}})
    module = load(tmp_path, tok, stage="pt", dataset="c", cutoff_len=10, packing=False)
    rows = module.train_dataset
    assert [text(tok, r["input_ids"]) for r in rows] == ["first doc<|im_end|>", "second doc", " that is l",
                                                         "ong<|im_end|>"]
    assert all(r["labels"] == r["input_ids"] for r in rows)


def test_alpaca_ranking_columns_for_dpo(tmp_path, data_dir, tok):
    write_json(data_dir / "p.json", [{"instruction": "Q", "chosen": "good", "rejected": "bad"}])
    write_info(data_dir, {"p": {"file_name": "p.json", "ranking": True,
                                "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}})
    row = load(tmp_path, tok, stage="rm", dataset="p").train_dataset[0]
    prompt = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert text(tok, row["chosen_input_ids"]) == prompt + "good<|im_end|>\n"
    assert text(tok, row["rejected_input_ids"]) == prompt + "bad<|im_end|>\n"
    n_prompt = len(tok.encode(prompt, add_special_tokens=False))
    assert n_prompt == 20  # 3 special tokens + "user\nQ" + "\n" + "assistant\n"
    for side in ("chosen", "rejected"):
        assert row[f"{side}_labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert row[f"{side}_labels"][n_prompt:] == row[f"{side}_input_ids"][n_prompt:]
    assert labelled(tok, row, "chosen_") == "good<|im_end|>\n"
    assert labelled(tok, row, "rejected_") == "bad<|im_end|>\n"


def test_v1_yaml_registry_pair_and_alpaca(tmp_path, data_dir, tok):
    pair = [{"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]}]
    write_json(data_dir / "pair.json", pair)
    write_json(data_dir / "alp.json", [{"instruction": "I", "output": "O"}, {"instruction": "J", "output": "P"}])
    (data_dir / "v1_dpo.yaml").write_text("prefs:\n  path: pair.json\n  source: local\n  converter: pair\n")
    dpo = load(tmp_path, tok, stage="dpo", dataset="v1_dpo.yaml").train_dataset[0]
    assert labelled(tok, dpo, "chosen_") == "good<|im_end|>\n" and labelled(tok, dpo, "rejected_") == "bad<|im_end|>\n"
    (data_dir / "v1_sft.yaml").write_text("sft:\n  path: alp.json\n  source: local\n  converter: alpaca\n  size: 5\n")
    sft = load(tmp_path, tok, dataset="v1_sft.yaml", seed=3)
    assert len(sft.train_dataset) == 5  # size 5 from 2 records: every record once, then sampled with replacement
    outs = sorted(labelled(tok, r) for r in sft.train_dataset)
    assert {"O<|im_end|>\n", "P<|im_end|>\n"} == set(outs)


def test_num_samples_and_max_samples(tmp_path, data_dir, tok):
    write_json(data_dir / "a.json", [{"instruction": f"q{i}", "output": f"r{i}"} for i in range(10)])
    write_info(data_dir, {"a": {"file_name": "a.json", "num_samples": 4}, "b": {"file_name": "a.json"}})
    assert len(load(tmp_path, tok, dataset="a").train_dataset) == 4
    assert len(load(tmp_path, tok, dataset="b", max_samples=3).train_dataset) == 3
    # max_samples keeps the first records, in file order
    rows = load(tmp_path, tok, dataset="b", max_samples=3).train_dataset
    assert [labelled(tok, r) for r in rows] == [f"r{i}<|im_end|>\n" for i in range(3)]


def test_parallel_preprocessing_matches_single_process(tmp_path, data_dir, tok):
    write_json(data_dir / "a.json", [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(40)])
    write_info(data_dir, {"a": {"file_name": "a.json"}})
    one = load(tmp_path, tok, dataset="a", preprocessing_num_workers=1).train_dataset
    two = load(tmp_path, tok, dataset="a", preprocessing_num_workers=2, overwrite_cache=True).train_dataset
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]


# ---- fields a user wrote that the entry's columns do not map: trained without them (as LLaMA-Factory), one warning

@pytest.fixture()
def registry_warnings():
    """Warnings of lmf.data.registry inside the test."""
    from conftest import log_records

    with log_records("lmf.data.registry") as records:
        yield records


SEED_EXAMPLE = {"instruction": "Add", "input": "1 2", "output": "3", "system": "Math.", "history": [["Hi", "Hello"]]}


def test_unmapped_alpaca_fields_warn_once_and_keep_the_tokens(tmp_path, data_dir, tok, registry_warnings):
    write_json(data_dir / "my_example.json", [SEED_EXAMPLE, SEED_EXAMPLE])
    write_json(data_dir / "plain.json", [{k: SEED_EXAMPLE[k] for k in ("instruction", "input", "output")}])
    write_info(data_dir, {"my_example": {"file_name": "my_example.json"}, "plain": {"file_name": "plain.json"}})
    row = load(tmp_path, tok, dataset="my_example", eval_dataset="my_example").train_dataset[0]
    plain = load(tmp_path, tok, dataset="plain").train_dataset[0]
    assert row["input_ids"] == plain["input_ids"] and row["labels"] == plain["labels"]  # LLaMA-Factory's tokens
    load(tmp_path, tok, dataset="my_example")
    messages = [r.getMessage() for r in registry_warnings if r.levelname == "WARNING"]
    assert len(messages) == 1, messages
    assert messages[0].startswith("dataset 'my_example': records have fields system, history that its entry in ")
    assert messages[0].endswith('add "columns": {"system": "system", "history": "history"} to use them')


def test_unmapped_fields_of_other_formats_and_files(tmp_path, data_dir, tok, registry_warnings):
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    (data_dir / "s.jsonl").write_text(json.dumps({"conversations": conv, "system": "S", "tools": "[]"}) + "\n")
    write_json(data_dir / "m.json", [{"instruction": "q", "output": "a", "images": [], "history": []}])
    write_json(data_dir / "mapped.json", [SEED_EXAMPLE])
    write_info(data_dir, {
        "s": {"file_name": "s.jsonl", "formatting": "sharegpt"},
        "m": {"file_name": "m.json", "columns": {"prompt": "instruction"}},
        "mapped": {"file_name": "mapped.json", "columns": {"system": "system", "history": "history"}},
    })
    from lmf.data.registry import resolve_datasets

    resolve_datasets("s,m,mapped", str(data_dir))
    messages = sorted(r.getMessage() for r in registry_warnings)
    assert len(messages) == 2, messages
    assert messages[0].startswith("dataset 'm': records have fields history, images") and messages[0].endswith(
        'set "columns": {"prompt": "instruction", "history": "history", "images": "images"} to use them')
    assert messages[1].startswith("dataset 's': records have fields system, tools") and messages[1].endswith(
        'add "columns": {"system": "system", "tools": "tools"} to use them')
