"""init_on_meta: its checkpoint reader, and the keys it refuses (the 2-process runs are in test_v1_configs.py)."""

from __future__ import annotations

import pytest
import torch


def test_safetensors_rows_reads_exactly_the_rows_asked_for(tmp_path):
    """init_on_meta's reader (plain reads, no memory map) returns what safetensors' own loader returns."""
    from safetensors.torch import load_file, save_file

    from lmf.train.parallel import SafetensorsRows

    tensors = {"w": torch.randn(7, 3, 2), "b": torch.randn(5).to(torch.bfloat16), "s": torch.tensor(3.5),
               "i": torch.arange(12, dtype=torch.int64).reshape(4, 3)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path)
    ref = load_file(path)
    reader = SafetensorsRows(path)
    try:
        assert sorted(reader.keys()) == sorted(tensors)
        assert torch.equal(reader.rows("w", 2, 5), ref["w"][2:5])
        assert torch.equal(reader.rows("b", 0, 5), ref["b"]) and reader.rows("b", 0, 5).dtype == torch.bfloat16
        assert torch.equal(reader.rows("s", 0, 1), ref["s"])
        assert torch.equal(reader.rows("i", 3, 4), ref["i"][3:4]) and reader.rows("w", 4, 4).shape == (0, 3, 2)
    finally:
        reader.close()


@pytest.mark.parametrize("keys,message", [
    ({"finetuning_type": "lora"}, "with finetuning_type lora is not implemented"),
    ({"finetuning_type": "full", "init_on_rank0": True}, "set one"),
    ({"finetuning_type": "full", "stage": "dpo"}, "with stage dpo is not implemented"),
    ({"finetuning_type": "full", "train_from_scratch": True}, "does not combine"),
    ({"finetuning_type": "full", "resize_vocab": True}, "resized embeddings"),
])
def test_init_on_meta_refuses_what_it_cannot_load(keys, message):
    from lmf.config.parser import build_config
    from lmf.extras.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_config(dict({"model_name_or_path": "m", "init_on_meta": True}, **keys))
