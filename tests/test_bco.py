"""pref_bco_weight (LLaMA-Factory's BCO mixed into DPO): the running reward baseline as TRL's RunningMoments keeps
it, the mixed loss by hand, and a resumed run equal to an uninterrupted one (the baseline is checkpointed)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError


def test_the_baseline_is_the_running_mean_and_variance_of_the_batch_rewards():
    from lmf.train.dpo.losses import BCOBaseline

    baseline, values = BCOBaseline(), [0.5, -0.1, 0.3]
    for v in values:
        mean = baseline.update(torch.tensor(v))
    assert mean == pytest.approx(sum(values) / 3)
    assert baseline.state["var"] == pytest.approx(torch.tensor(values).var(unbiased=False).item())


def test_the_mixed_loss_by_hand():
    import torch.nn.functional as F

    from lmf.train.dpo.losses import BCOBaseline, preference_loss

    pc, pr, rc, rr = (torch.tensor(x) for x in ([-3.0, -4.0], [-5.0, -4.5], [-3.5, -4.2], [-4.8, -4.4]))
    beta, w = 0.1, 0.5
    baseline = BCOBaseline()
    losses, chosen, rejected = preference_loss(pc, pr, rc, rr, beta=beta, bco_weight=w, bco_baseline=baseline)
    delta = torch.cat((beta * (pc - rc), beta * (pr - rr))).mean()
    dpo = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))
    bco = -F.logsigmoid(beta * (pc - rc) - delta) - F.logsigmoid(-(beta * (pr - rr) - delta))
    torch.testing.assert_close(losses, (dpo + w * bco) / (1 + w))
    assert baseline.state["mean"] == pytest.approx(delta.item())


def test_a_resumed_bco_run_equals_the_uninterrupted_one(tiny_model_dir, demo_data_dir, tmp_path):
    from lmf.train.workflow import run_training

    def run(out, steps):
        run_training(build_config(dict(
            model_name_or_path=tiny_model_dir, stage="dpo", dataset_dir=demo_data_dir, dataset="dpo_en_demo",
            template="qwen", cutoff_len=128, max_samples=16, output_dir=str(out), max_steps=steps, save_steps=2,
            per_device_train_batch_size=2, learning_rate=5e-3, disable_tqdm=True, logging_steps=1,
            pref_bco_weight=0.5, preprocessing_cache_dir=str(tmp_path / "cache"))))
        return json.loads((out / "trainer_state.json").read_text())

    full = run(tmp_path / "full", 4)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run(resumed_dir, 4)
    assert [h["loss"] for h in resumed["log_history"] if "loss" in h] == \
        [h["loss"] for h in full["log_history"] if "loss" in h]
    baseline = full["objective_state"]["bco_baseline"]
    assert baseline == resumed["objective_state"]["bco_baseline"] and baseline["count"] == pytest.approx(4)


@pytest.mark.parametrize("keys, message", [
    ({"stage": "kto"}, r"'pref_bco_weight' mixes BCO into DPO with a reference model"),
    ({"stage": "dpo", "pref_loss": "simpo"}, r"with pref_loss simpo"),
])
def test_bco_without_a_dpo_reference_is_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model_name_or_path": "m", "pref_bco_weight": 0.5, **keys})
