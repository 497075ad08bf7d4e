"""streaming / buffer_size: the training split read and tokenized while training, sharded by rank, resumable."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from lmf.config.parser import build_config
from lmf.data.loader import get_dataset
from lmf.data.template import get_template
from lmf.extras.errors import ConfigError
from lmf.testing.char_tokenizer import build_char_tokenizer


def _cfg(data_dir, tmp_path, **overrides):
    raw = dict(model_name_or_path="unused", dataset_dir=data_dir, dataset="alpaca_en_demo", template="chatml",
               cutoff_len=96, max_samples=23, preprocessing_cache_dir=str(tmp_path / "cache"), max_steps=5,
               preprocessing_batch_size=4, streaming=True, buffer_size=6)
    raw.update(overrides)
    return build_config(raw)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.mark.parametrize("stage, dataset", [("sft", "alpaca_en_demo"), ("dpo", "dpo_en_demo"),
                                            ("kto", "kto_en_demo")])
def test_shards_partition_the_records_with_the_cached_tokens(demo_data_dir, tmp_path, tok, stage, dataset):
    template = get_template("chatml", tok)
    cached = get_dataset(_cfg(demo_data_dir, tmp_path, streaming=False, dataset=dataset,
                              preprocessing_batch_size=1000), tok, template, stage).train_dataset.to_list()
    streamed = get_dataset(_cfg(demo_data_dir, tmp_path, dataset=dataset, disable_shuffling=True), tok, template,
                           stage).train_dataset
    shards = [list(streamed.shard(rank, 3).rows(epoch=0)) for rank in range(3)]
    assert sum(map(len, shards)) == len(cached) == 23
    if stage != "kto":  # KTO pairs each answer with another record's in its tokenization batch (the KL term)
        interleaved = [shards[i % 3][i // 3] for i in range(23)]  # record i belongs to rank i % 3
        assert interleaved == [{k: v for k, v in row.items() if k in interleaved[0]} for row in cached]
    else:
        for key in ("input_ids", "labels", "kto_tags"):
            assert sorted(map(str, (r[key] for s in shards for r in s))) == sorted(str(r[key]) for r in cached)


def test_buffer_shuffle_is_seeded_per_epoch_and_skips_exactly(demo_data_dir, tmp_path, tok):
    template = get_template("chatml", tok)
    streamed = get_dataset(_cfg(demo_data_dir, tmp_path), tok, template, "sft").train_dataset
    key = lambda rows: [tuple(r["input_ids"]) for r in rows]  # noqa: E731
    epoch0, epoch1 = key(streamed.rows(0)), key(streamed.rows(1))
    in_order = key(get_dataset(_cfg(demo_data_dir, tmp_path, disable_shuffling=True), tok, template,
                               "sft").train_dataset.rows(0))
    assert sorted(epoch0) == sorted(epoch1) == sorted(in_order) and epoch0 != epoch1 != in_order
    assert key(streamed.rows(0)) == epoch0  # the same seed: the same order
    assert key(streamed.rows(1, skip=9)) == epoch1[9:]
    other_seed = get_dataset(_cfg(demo_data_dir, tmp_path, data_seed=7), tok, template, "sft").train_dataset
    assert key(other_seed.rows(0)) != epoch0


@pytest.mark.parametrize("prefetch", [0, 2])
def test_stream_position_resumes_the_same_micro_batches(demo_data_dir, tmp_path, tok, prefetch):
    from lmf.train.stream_batches import StreamedBatchStream

    template = get_template("chatml", tok)
    streamed = get_dataset(_cfg(demo_data_dir, tmp_path, max_samples=10), tok, template, "sft").train_dataset.shard(1, 2)
    collate = lambda rows: [tuple(r["input_ids"]) for r in rows]  # noqa: E731
    ref = StreamedBatchStream(streamed, collate, 2, prefetch=prefetch)
    expected = [next(ref) for _ in range(8)]  # 5 rows an epoch: micro-batches cross the epoch boundaries
    ref.close()
    assert ref.epoch == 3 and sorted(expected[0] + expected[1] + expected[2][:1]) == sorted(
        expected[2][1:] + expected[3] + expected[4])  # each epoch is the same 5 rows, shuffled anew
    part = StreamedBatchStream(streamed, collate, 2, prefetch=prefetch)
    assert [next(part) for _ in range(3)] == expected[:3]
    position = part.position()
    part.close()
    assert position == [1, 1, 1]  # epoch 1, one row of it taken (by the 3rd micro-batch)
    resumed = StreamedBatchStream(streamed, collate, 2, prefetch=prefetch)
    resumed.restore([[0, 0, 0], position], rank=1, world_size=2)
    assert [next(resumed) for _ in range(5)] == expected[3:]
    resumed.close()
    other_world = StreamedBatchStream(streamed, collate, 2)
    other_world.restore([[1, 3, 1], [1, 1, 1], [2, 0, 0]], rank=0, world_size=2)  # 3 processes -> 2
    assert other_world.position() == [1, 2, 0]


def test_streaming_refuses_what_needs_the_whole_dataset(demo_data_dir, tmp_path):
    with pytest.raises(ConfigError, match="'streaming' needs max_steps"):
        _cfg(demo_data_dir, tmp_path, max_steps=-1, do_train=True)
    for key, value in (("packing", True), ("val_size", 0.1), ("tokenized_path", str(tmp_path / "t")),
                       ("mix_strategy", "interleave_under"), ("save_strategy", "epoch"),
                       ("batching_strategy", "dynamic_batching")):
        with pytest.raises(ConfigError, match=f"config keys 'streaming' and '{key}' do not combine"):
            _cfg(demo_data_dir, tmp_path, **{key: value})


def test_malformed_and_image_records_name_file_and_index(tmp_path, tok):
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(data / "x.png")
    (data / "a.jsonl").write_text('{"instruction": "q", "output": "a"}\n{"instruction": 5}\n'
                                  '{"instruction": "<image>q", "output": "a", "images": ["x.png"]}\n')
    (data / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.jsonl", "columns": {
        "prompt": "instruction", "response": "output", "images": "images"}}}))
    template = get_template("chatml", tok)
    streamed = get_dataset(_cfg(str(data), tmp_path, dataset="a"), tok, template, "sft").train_dataset
    with pytest.raises(Exception, match="a.jsonl: record 1: "):
        list(streamed.rows(0))
    from lmf.train.stream_batches import StreamedBatchStream

    prefetching = StreamedBatchStream(streamed, lambda rows: rows, 1, prefetch=2)
    with pytest.raises(Exception, match="a.jsonl: record 1: "):  # met by the producer thread, raised in the loop
        next(prefetching)
    prefetching.close()
    skipping = get_dataset(_cfg(str(data), tmp_path, dataset="a", skip_bad_records=True), tok, template,
                           "sft").train_dataset
    with pytest.raises(Exception, match="a.jsonl: record 2 has images, videos or audio"):
        list(skipping.rows(0))


def test_streamed_training_resumes_exactly(tiny_model_dir, demo_data_dir, tmp_path):
    """A streamed LoRA SFT run of 6 steps == 2 steps + resume; the checkpoint keeps each rank's stream position."""
    from lmf.train.workflow import run_training

    def config(out, **kw):
        return build_config(dict(model_name_or_path=tiny_model_dir, output_dir=str(out), dataset_dir=demo_data_dir,
                                 dataset="alpaca_en_demo", template="qwen", cutoff_len=64, max_samples=12,
                                 streaming=True, buffer_size=4, max_steps=6, save_steps=2, logging_steps=1,
                                 per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=5e-3,
                                 dataloader_num_workers=1, disable_tqdm=True, report_to="none",
                                 preprocessing_cache_dir=str(tmp_path / "cache"), **kw))

    def history(out):
        with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as fh:
            return [(h["step"], h["loss"]) for h in json.load(fh)["log_history"] if "loss" in h]

    full, part = tmp_path / "full", tmp_path / "part"
    run_training(config(full))
    with open(full / "checkpoint-4" / "trainer_state.json", encoding="utf-8") as fh:
        saved = json.load(fh)
    assert saved["stream_positions"] == [[1, 4, 2]]  # 16 rows taken: 12 of epoch 0, 4 of epoch 1
    os.makedirs(part)
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    run_training(config(part, resume_from_checkpoint=True))
    assert history(part) == history(full) and len(history(full)) == 6


def test_data_check_shows_a_streamed_split(demo_data_dir, tmp_path, tok):
    import io

    from lmf.data_check import print_report

    template = get_template("chatml", tok)
    module = get_dataset(_cfg(demo_data_dir, tmp_path), tok, template, "sft")
    out = io.StringIO()
    print_report(module, tok, template, "sft", out)
    text = out.getvalue()
    assert "cutoff_len: 96" in text and "cache: streamed" in text and "shuffle buffer 6 rows" in text
    assert "--- sample 0 (" in text and "[[" in text


def test_sampling_registry_entries_are_refused_when_streamed(tmp_path, tok):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    (data / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.jsonl", "num_samples": 5}}))
    with pytest.raises(ConfigError, match="'streaming': dataset 'a' samples its records"):
        get_dataset(_cfg(str(data), tmp_path, dataset="a"), tok, get_template("chatml", tok), "sft")
