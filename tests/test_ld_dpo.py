"""ld_alpha (LD-DPO, LLaMA-Factory): the policy's answer log-probabilities weigh the tokens past the shorter answer
of the pair by ld_alpha; equal to LLaMA-Factory's position-based formula on pairwise data, chunked or not."""

from __future__ import annotations

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError


def _formula(logits, labels, ld_alpha):
    """LLaMA-Factory's get_batch_logps with ld_alpha, written out: positions before first label + shorter count."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1]
    mask = labels != -100
    labels[~mask] = 0
    per_token = logits.log_softmax(-1).gather(2, labels.unsqueeze(2)).squeeze(2)
    lengths = mask.sum(-1)
    half = labels.shape[0] // 2
    shared = torch.minimum(lengths[:half], lengths[half:])
    public = torch.argmax(mask.int(), dim=1) + torch.cat([shared, shared])
    front = torch.arange(labels.shape[1]).expand_as(labels) < public.unsqueeze(1)
    return (per_token * (front & mask)).sum(-1) + ld_alpha * (per_token * (~front & mask)).sum(-1), lengths


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_ld_logps_equal_llamafactory_formula(chunk_size):
    from lmf.train.reference import ld_sequence_logps

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 10, 8, generator=g)
    head = torch.nn.Linear(8, 32, bias=False)
    labels = torch.randint(0, 32, (4, 10), generator=g)
    labels[:, :3] = -100  # prompts
    labels[0, 8:] = -100  # a shorter chosen answer (rows 0 and 2 pair up), padding at its end
    labels[3, 6:] = -100  # a shorter rejected answer (rows 1 and 3)
    got, lengths = ld_sequence_logps(hidden, head, labels, 0.5, chunk_size=chunk_size)
    want, want_lengths = _formula(head(hidden), labels, 0.5)
    torch.testing.assert_close(got, want)
    assert lengths.tolist() == want_lengths.tolist()
    plain = (head(hidden)[:, :-1].log_softmax(-1).gather(2, labels[:, 1:].clamp(min=0).unsqueeze(2)).squeeze(2)
             * (labels[:, 1:] != -100)).sum(-1)
    assert not torch.allclose(got, plain)  # the longer answers' tails were down-weighted


def test_ld_dpo_trains_and_v1_passes_it(tiny_model_dir, demo_data_dir, tmp_path):
    import json

    from lmf.config.v1 import translate_v1
    from lmf.train.workflow import run_training

    out = tmp_path / "out"
    run_training(build_config(dict(
        model_name_or_path=tiny_model_dir, stage="dpo", dataset_dir=demo_data_dir, dataset="dpo_en_demo",
        template="qwen", cutoff_len=128, max_samples=8, output_dir=str(out), max_steps=2,
        per_device_train_batch_size=2, learning_rate=5e-3, save_strategy="no", disable_tqdm=True, logging_steps=1,
        ld_alpha=0.5, preprocessing_cache_dir=str(tmp_path / "cache"))))
    logged = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logged) == 2 and all(h["loss"] == h["loss"] for h in logged)
    assert translate_v1({"model": "m", "ld_alpha": 0.3, "full_determinism": True}, stage="dpo")["ld_alpha"] == 0.3


@pytest.mark.parametrize("keys, message", [
    ({"stage": "sft"}, r"'ld_alpha' \(LD-DPO\) weighs DPO's answers; it does not apply to stage sft"),
    ({"stage": "dpo", "ld_alpha": 1.5}, r"'ld_alpha': 1.5 is out of range"),
])
def test_ld_alpha_outside_dpo_or_its_range_is_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", "ld_alpha": 0.5, **keys})
