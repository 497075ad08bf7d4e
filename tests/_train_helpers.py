"""Helpers for the trainer tests: a small hand-made tokenized SFT dataset and a padding collator."""

from __future__ import annotations

import json
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE_INDEX = -100


def tokenized_sft_rows(tokenizer, n: int = 24, max_len: int = 64) -> list[dict]:
    """Prompt/response pairs from the bundled alpaca demo, tokenized; prompt tokens masked in labels."""
    with open(os.path.join(REPO_ROOT, "examples", "data", "alpaca_en_demo.json"), encoding="utf-8") as fh:
        records = json.load(fh)[:n]
    rows = []
    for r in records:
        prompt = tokenizer(f"<|im_start|>user\n{r['instruction']} {r['input']}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        answer = tokenizer(f"{r['output']}<|im_end|>\n")["input_ids"]
        ids = (prompt + answer)[:max_len]
        labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_len]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


class PadCollator:
    """Right-pads input_ids/attention_mask/labels to the longest row."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            out["input_ids"].append(r["input_ids"] + [self.pad_id] * pad)
            out["attention_mask"].append(r["attention_mask"] + [0] * pad)
            out["labels"].append(r["labels"] + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def make_config(model_dir: str, output_dir: str, **overrides):
    """A validated LmfConfig for a short CPU run on the tiny model."""
    from lmf.config.parser import build_config

    raw = dict(
        model_name_or_path=model_dir, output_dir=output_dir, finetuning_type="lora", max_steps=6,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-3, logging_steps=1,
        save_steps=100, disable_tqdm=True, seed=42, lr_scheduler_type="linear",
    )
    raw.update(overrides)
    return build_config(raw)


def train_tiny(cfg, rows=None, n_rows: int = 20):
    """Run the real loader + Trainer + SFT stage on hand-made rows; return (trainer, state)."""
    from lmf.model.loader import load_model, load_tokenizer
    from lmf.train.sft import SFTObjective
    from lmf.train.resume import plan_resume
    from lmf.train.process import set_seed, setup_runtime
    from lmf.train.trainer import Trainer

    runtime = setup_runtime(cfg)
    resume = plan_resume(cfg, runtime)
    set_seed(cfg.training.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg, tokenizer, is_trainable=True)
    rows = rows if rows is not None else tokenized_sft_rows(tokenizer, n=n_rows)
    stage = SFTObjective(cfg, model, PadCollator(tokenizer.pad_token_id))
    trainer = Trainer(cfg, model, tokenizer, stage, rows, runtime, resume=resume)
    state = trainer.train()
    return trainer, state


def losses(state) -> list[float]:
    return [h["loss"] for h in state.log_history if "loss" in h]
