"""lmf says at save time what vLLM's LoRA loader would refuse in the adapter it just wrote."""

from __future__ import annotations

import logging
import os

from lmf.config.parser import build_config
from lmf.model.vllm_compat import vllm_lora_warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plain_lora_serves_as_saved():
    assert vllm_lora_warnings({"peft_type": "LORA", "r": 8, "lora_alpha": 16}) == []


def test_each_unsupported_feature_is_named():
    lines = vllm_lora_warnings({"peft_type": "LORA", "r": 64, "use_dora": True, "modules_to_save": ["lm_head"]})
    text = "\n".join(lines)
    assert "DoRA" in text and "modules_to_save" in text and "--max-lora-rank 64" in text
    assert "OFT" in vllm_lora_warnings({"peft_type": "OFT"})[0]
    assert "--max-lora-rank 32" in vllm_lora_warnings({"peft_type": "LORA", "r": 8, "rank_pattern": {"q": 24}})[0]


def test_training_warns_at_save(tmp_path, caplog):
    from lmf.train.workflow import run_training

    raw = dict(model_name_or_path=os.path.join(REPO_ROOT, "examples", "tiny-qwen3"),
               dataset_dir=os.path.join(REPO_ROOT, "examples", "data"), dataset="identity", template="qwen",
               cutoff_len=64, max_samples=8, output_dir=str(tmp_path / "out"), max_steps=1, lora_rank=32,
               save_steps=100, disable_tqdm=True, preprocessing_cache_dir=str(tmp_path / "c"))
    logging.getLogger("lmf").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="lmf"):
            run_training(build_config(raw))
    finally:
        logging.getLogger("lmf").propagate = False
    assert any("serving this adapter with vLLM: rank 32" in r.getMessage() for r in caplog.records)
