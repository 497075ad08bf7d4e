"""End to end through the real trainer: the memory-lean settings do not change the training curve."""

from __future__ import annotations

import pytest
import torch

from _train_helpers import losses, make_config, train_tiny

torch.set_num_threads(1)


@pytest.mark.parametrize("ftype", ["full", "lora"])
def test_chunked_loss_and_checkpointing_match_plain_training(tiny_model_dir, tmp_path, ftype):
    """Chunked loss (small chunks) + per-layer checkpointing + offload flag vs plain loss, no checkpointing."""
    lean = make_config(tiny_model_dir, str(tmp_path / "lean"), finetuning_type=ftype, max_steps=3, learning_rate=2e-3,
                       use_chunked_loss=True, loss_chunk_size=16, gradient_checkpointing=True, offload_activations=True)
    plain = make_config(tiny_model_dir, str(tmp_path / "plain"), finetuning_type=ftype, max_steps=3, learning_rate=2e-3,
                        use_chunked_loss=False, disable_gradient_checkpointing=True)
    lean_curve = losses(train_tiny(lean, n_rows=12)[1])
    plain_curve = losses(train_tiny(plain, n_rows=12)[1])
    assert len(lean_curve) == 3
    assert lean_curve[-1] != lean_curve[0]  # it trained
    assert lean_curve == pytest.approx(plain_curve, rel=1e-4, abs=1e-4)
