"""get_dataset on LLaMA-Factory's demo data: columns, masks, mixing, val split, caching, collators."""

from __future__ import annotations

import json
import os

import pytest

from lmf.config.parser import build_config
from lmf.data.collator import PairwiseCollator, SFTCollator
from lmf.data.loader import get_dataset
from lmf.data.processor import IGNORE_INDEX
from lmf.data.template import get_template


@pytest.fixture(scope="module")
def tokenizer():
    from lmf.testing.tiny import build_tokenizer

    return build_tokenizer()


def make_cfg(tmp_path, demo_data_dir, **kw):
    raw = dict(model_name_or_path="unused", dataset_dir=demo_data_dir, template="qwen", cutoff_len=256,
               preprocessing_cache_dir=str(tmp_path / "cache"))
    raw.update(kw)
    return build_config(raw)


def _label_text(tok, row, prefix=""):
    return tok.decode([t for t, l in zip(row[prefix + "input_ids"], row[prefix + "labels"]) if l != IGNORE_INDEX],
                      skip_special_tokens=False)


def test_sft_mixed_datasets(tmp_path, demo_data_dir, tokenizer):
    cfg = make_cfg(tmp_path, demo_data_dir, dataset="identity,alpaca_en_demo", max_samples=20)
    template = get_template("qwen", tokenizer)
    module = get_dataset(cfg, tokenizer, template, "sft")
    train = module.train_dataset
    assert module.eval_dataset is None
    assert len(train) == 40
    assert module.stats["train"]["records"] == {"identity": 20, "alpaca_en_demo": 20}
    assert set(train.column_names) == {"input_ids", "attention_mask", "labels"}
    row = train[0]
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) <= 256
    with open(os.path.join(demo_data_dir, "identity.json"), encoding="utf-8") as fh:
        first = json.load(fh)[0]
    # placeholders are kept as-is; the response ends with the end-of-turn token
    assert _label_text(tokenizer, row) == first["output"] + "<|im_end|>\n"
    assert "{{name}}" in _label_text(tokenizer, row)
    first_label = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    prompt = tokenizer.decode(row["input_ids"][:first_label])
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_dpo_sharegpt_preference(tmp_path, demo_data_dir, tokenizer):
    cfg = make_cfg(tmp_path, demo_data_dir, stage="dpo", dataset="dpo_en_demo", template="qwen3_nothink",
                   cutoff_len=1024, max_samples=8)
    template = get_template("qwen3_nothink", tokenizer)
    module = get_dataset(cfg, tokenizer, template, "dpo")
    row = module.train_dataset[0]
    with open(os.path.join(demo_data_dir, "dpo_en_demo.json"), encoding="utf-8") as fh:
        rec = json.load(fh)[0]
    n_prompt = sum(1 for l in row["chosen_labels"] if l == IGNORE_INDEX)
    assert row["chosen_input_ids"][:n_prompt] == row["rejected_input_ids"][:n_prompt]
    assert _label_text(tokenizer, row, "chosen_").startswith(rec["chosen"]["value"][:200])
    assert _label_text(tokenizer, row, "rejected_").startswith(rec["rejected"]["value"][:200])
    batch = PairwiseCollator(tokenizer)([module.train_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 6
    assert batch["input_ids"][0].tolist()[: len(row["chosen_input_ids"])] == row["chosen_input_ids"]
    assert batch["input_ids"][3].tolist()[: len(row["rejected_input_ids"])] == row["rejected_input_ids"]


def test_val_size_split_is_seeded(tmp_path, demo_data_dir, tokenizer):
    cfg = make_cfg(tmp_path, demo_data_dir, dataset="alpaca_en_demo", max_samples=50, val_size=0.2)
    template = get_template("qwen", tokenizer)
    a = get_dataset(cfg, tokenizer, template, "sft")
    b = get_dataset(cfg, tokenizer, template, "sft")
    assert len(a.train_dataset) == 40 and len(a.eval_dataset) == 10
    assert a.eval_dataset["input_ids"] == b.eval_dataset["input_ids"]
    cfg_abs = make_cfg(tmp_path, demo_data_dir, dataset="alpaca_en_demo", max_samples=50, val_size=7)
    assert len(get_dataset(cfg_abs, tokenizer, template, "sft").eval_dataset) == 7


def test_cache_reused_then_rebuilt(tmp_path, demo_data_dir, tokenizer, monkeypatch):
    cfg = make_cfg(tmp_path, demo_data_dir, dataset="alpaca_en_demo", max_samples=30)
    template = get_template("qwen", tokenizer)
    first = get_dataset(cfg, tokenizer, template, "sft")
    assert first.stats["cache"] == "built"

    import lmf.data.loader as loader

    def boom(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(loader, "build_split", boom)
    second = get_dataset(cfg, tokenizer, template, "sft")
    assert second.stats["cache"] == "hit"
    assert second.train_dataset["input_ids"] == first.train_dataset["input_ids"]
    monkeypatch.undo()
    # a different cutoff is a different key; overwrite_cache forces a rebuild of the same key
    assert get_dataset(make_cfg(tmp_path, demo_data_dir, dataset="alpaca_en_demo", max_samples=30, cutoff_len=64),
                       tokenizer, template, "sft").stats["cache"] == "built"
    cfg_overwrite = make_cfg(tmp_path, demo_data_dir, dataset="alpaca_en_demo", max_samples=30, overwrite_cache=True)
    rebuilt = get_dataset(cfg_overwrite, tokenizer, template, "sft")
    assert rebuilt.stats["cache"] == "built"


def test_sft_collator_pads_right(tokenizer):
    collate = SFTCollator(tokenizer, pad_to_multiple_of=8)
    batch = collate([
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [9], "attention_mask": [1], "labels": [9]},
    ])
    assert batch["input_ids"].shape == (2, 8)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"][1].tolist() == [9] + [pad] * 7
    assert batch["attention_mask"][1].tolist() == [1] + [0] * 7
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 5
    assert "position_ids" not in batch
    packed = collate([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3],
                       "position_ids": [0, 1, 0]}])
    assert packed["position_ids"].tolist() == [[0, 1, 0, 0, 0, 0, 0, 0]]


def test_config_default_system_and_thinking_apply(tmp_path, demo_data_dir, tokenizer):
    template = get_template("qwen3", tokenizer)
    cfg = make_cfg(tmp_path, demo_data_dir, dataset="identity", max_samples=2, template="qwen3",
                   default_system="Be terse.", enable_thinking=False)
    row = get_dataset(cfg, tokenizer, template, "sft").train_dataset[0]
    text = tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nBe terse.<|im_end|>\n")
    assert "<think>\n\n</think>\n\n" in text and "<think>" not in _label_text(tokenizer, row)


def test_changed_data_file_invalidates_cache(tmp_path, tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    (data / "d.json").write_text(json.dumps([{"instruction": "q", "output": "first"}]))
    cfg = make_cfg(tmp_path, str(data), dataset="d")
    template = get_template("qwen", tokenizer)
    assert get_dataset(cfg, tokenizer, template, "sft").stats["cache"] == "built"
    (data / "d.json").write_text(json.dumps([{"instruction": "q", "output": "second"}]))
    module = get_dataset(cfg, tokenizer, template, "sft")
    assert module.stats["cache"] == "built"
    assert _label_text(tokenizer, module.train_dataset[0]) == "second<|im_end|>\n"


def test_eval_dataset(tmp_path, demo_data_dir, tokenizer):
    cfg = make_cfg(tmp_path, demo_data_dir, dataset="identity", eval_dataset="alpaca_en_demo", max_samples=6,
                   val_size=0.5)
    module = get_dataset(cfg, tokenizer, get_template("qwen", tokenizer), "sft")
    assert len(module.train_dataset) == 6 and len(module.eval_dataset) == 6  # val_size ignored with eval_dataset
    assert module.stats["eval"]["records"] == {"alpaca_en_demo": 6}


DIST_SCRIPT = """
import json, os, sys, hashlib
from lmf.dist.runtime import init_distributed, destroy_distributed
from lmf.config.parser import build_config
from lmf.testing.char_tokenizer import build_char_tokenizer
from lmf.data.template import get_template
from lmf.data.loader import get_dataset
info = init_distributed(60, use_cpu=True)
tok = build_char_tokenizer()
cfg = build_config(dict(model_name_or_path="u", dataset_dir=sys.argv[1], dataset="alpaca_en_demo", template="chatml",
                        max_samples=50, cutoff_len=256, preprocessing_cache_dir=sys.argv[2],
                        overwrite_cache=sys.argv[4] == "1"))
m = get_dataset(cfg, tok, get_template("chatml", tok), "sft")
digest = hashlib.sha256(json.dumps(list(m.train_dataset["input_ids"])).encode()).hexdigest()
with open(os.path.join(sys.argv[3], f"rank{info.rank}.json"), "w") as fh:
    json.dump({"cache": m.stats["cache"], "digest": digest, "n": len(m.train_dataset)}, fh)
destroy_distributed()
"""


@pytest.mark.slow
def test_two_ranks_build_once_and_agree(tmp_path, demo_data_dir):
    import subprocess
    import sys

    script = tmp_path / "dist_data.py"
    script.write_text(DIST_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for overwrite in ("0", "1"):  # overwrite_cache: only local rank 0 rebuilds, rank 1 reuses its result
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
        proc = subprocess.run(launcher + [str(script), demo_data_dir, str(tmp_path / "cache"), str(out), overwrite],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["cache"] for r in results] == ["built", "hit"]
        assert results[0]["digest"] == results[1]["digest"] and results[0]["n"] == 50


def test_tokenizer_fingerprint_follows_the_files_and_every_in_memory_change(tmp_path, tiny_model_dir):
    """The cache key's tokenizer part: equal for two loads of one folder, different when the folder's
    tokenizer.json differs, when a token is added or a special token changes in memory, and the same as a full
    serialization would decide for a tokenizer that was not read from a local folder."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from lmf.data.cache import tokenizer_fingerprint

    a, b = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.add_tokens(["<new_token>"])
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    c = AutoTokenizer.from_pretrained(tiny_model_dir)
    c.eos_token = c.pad_token
    assert tokenizer_fingerprint(c) != tokenizer_fingerprint(a)

    edited = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, edited)
    spec = json.loads((edited / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, same settings: only the file says
    (edited / "tokenizer.json").write_text(json.dumps(spec))
    d = AutoTokenizer.from_pretrained(str(edited))
    assert d.backend_tokenizer.get_vocab_size() == a.backend_tokenizer.get_vocab_size()
    assert tokenizer_fingerprint(d) != tokenizer_fingerprint(a)

    a.name_or_path = "some-org/not-a-local-folder"  # no files to stand for the vocabulary: the full serialization
    e = AutoTokenizer.from_pretrained(tiny_model_dir)
    e.name_or_path = "some-org/not-a-local-folder"
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(e) != tokenizer_fingerprint(b)


def test_frozen_heap_restores_the_collector_and_keeps_a_callers_freeze():
    import gc

    from lmf.data.loader import frozen_heap

    threshold = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] >= 10_000
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == threshold
    gc.freeze()  # an embedding program froze its own objects: still frozen afterwards
    try:
        with frozen_heap():
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_cache_entry_published_meanwhile_is_kept_and_never_vanishes(tmp_path):
    """Two processes (or nodes on one filesystem) build the same entry: the second keeps the first's, whose path a
    reader never sees disappear; overwrite_cache replaces it."""
    from lmf.data import cache as cache_mod

    target = tmp_path / "entry"
    first, second = cache_mod.new_build_dir(str(target)), cache_mod.new_build_dir(str(target))
    for build, tag in ((first, "first"), (second, "second")):
        os.makedirs(os.path.join(build, "train"))
        with open(os.path.join(build, "stats.json"), "w") as fh:
            fh.write(tag)
    assert cache_mod.publish(first, str(target), replace=False)
    inode = os.stat(target).st_ino
    assert not cache_mod.publish(second, str(target), replace=False)
    assert os.stat(target).st_ino == inode and (target / "stats.json").read_text() == "first"
    assert cache_mod.publish(second, str(target), replace=True)
    assert (target / "stats.json").read_text() == "second"
