"""Prediction (do_predict + predict_with_generate): answers and BLEU/ROUGE equal LLaMA-Factory's, after
training in the same run, across two processes, with its example YAML; earlier predictions are kept."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError

pytest.importorskip("jieba")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")
DATA = os.path.join(REPO_ROOT, "examples", "data")
GOLDEN = os.path.join(REPO_ROOT, "tests", "fixtures", "lf_predict")
LF_EXAMPLE = os.path.join(REPO_ROOT, "..", "shared", "lf-examples", "extras", "nlg_eval", "llama3_lora_predict.yaml")
METRICS = ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l")


def _lf_config(out, **overrides) -> dict:
    """The config LLaMA-Factory 0.9.5 ran to write the golden files (tests/fixtures/lf_predict)."""
    with open(os.path.join(GOLDEN, "lf_config.yaml"), encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw = {k: (v.replace("<repo>", REPO_ROOT) if isinstance(v, str) else v) for k, v in raw.items()}
    raw.update(output_dir=str(out), preprocessing_cache_dir=os.path.join(os.path.dirname(str(out)), "cache"))
    raw.update(overrides)
    return raw


def _predictions(out) -> list[dict]:
    with open(os.path.join(out, "generated_predictions.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _results(out) -> dict:
    with open(os.path.join(out, "predict_results.json"), encoding="utf-8") as fh:
        return json.load(fh)


def _run(argv: list[str]) -> None:
    from lmf.experiment import run_experiment

    run_experiment(argv, command="sft")


def _write_yaml(path, raw: dict) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(raw, fh)
    return str(path)


@pytest.mark.parametrize("batch", [1, 4])
def test_predictions_and_scores_equal_llamafactory(tmp_path, batch):
    out = tmp_path / "out"
    _run([_write_yaml(tmp_path / "c.yaml", _lf_config(out, per_device_eval_batch_size=batch))])
    assert _predictions(out) == _predictions(GOLDEN)  # prompt, predict, label: LF's greedy answers, left-padded here
    ours, lf = _results(out), _results(GOLDEN)
    for key in METRICS:
        assert ours[key] == pytest.approx(lf[key], abs=1e-9), key
    assert ours["predict_samples_per_second"] > 0


def test_similarity_scores_by_hand():
    from lmf.predict.metrics import similarity_scores

    same = similarity_scores(["你好世界", "the cat sat"], ["你好世界", "the cat sat"])
    assert same == {"rouge-1": 100.0, "rouge-2": pytest.approx(100.0), "rouge-l": 100.0, "bleu-4": pytest.approx(100.0)}
    empty = similarity_scores([""], ["an answer"])
    assert empty["rouge-1"] == 0.0 and empty["rouge-l"] == 0.0 and empty["bleu-4"] == 0.0


def test_train_then_predict_in_one_run_uses_the_trained_adapter(tmp_path):
    out = tmp_path / "out"
    raw = _lf_config(out, do_train=True, dataset="identity", max_steps=6, learning_rate=5e-3, lora_target="all",
                     per_device_train_batch_size=4, save_steps=100, logging_steps=1, max_samples=8)
    _run([_write_yaml(tmp_path / "c.yaml", raw)])
    assert os.path.isfile(out / "adapter_model.safetensors")
    trained = _predictions(out)
    assert len(trained) == 16 and trained != _predictions(GOLDEN)[:16]
    # the same answers from a prediction-only run with the saved adapter
    again = tmp_path / "again"
    _run([_write_yaml(tmp_path / "p.yaml", _lf_config(again, adapter_name_or_path=str(out), max_samples=8))])
    assert _predictions(again) == trained


def test_earlier_predictions_are_kept_without_overwrite_output_dir(tmp_path):
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "generated_predictions.jsonl").write_text("mine\n", encoding="utf-8")
    cfg = _write_yaml(tmp_path / "c.yaml", _lf_config(out, overwrite_output_dir=False, max_samples=2))
    with pytest.raises(ConfigError, match="generated_predictions.jsonl.*overwrite_output_dir"):
        _run([cfg])
    assert (out / "generated_predictions.jsonl").read_text(encoding="utf-8") == "mine\n"
    # also refused before training when do_train and do_predict are both on
    with pytest.raises(ConfigError, match="overwrite_output_dir"):
        _run([cfg, "do_train=true", "dataset=identity"])
    assert not (out / "adapter_model.safetensors").exists()


def test_configs_that_cannot_predict_are_refused():
    base = {"model_name_or_path": "m", "do_predict": True, "predict_with_generate": True, "eval_dataset": "identity"}
    cfg = build_config(base)
    assert cfg.training.do_train is False  # LF's prediction YAMLs leave do_train unset
    for change, message in (({"predict_with_generate": False}, "without 'predict_with_generate'"),
                            ({"stage": "dpo"}, "stage sft"), ({"eval_dataset": None}, "needs 'eval_dataset'")):
        with pytest.raises(ConfigError, match=message):
            build_config({**base, **change})
    with pytest.raises(ConfigError, match="'predict_with_generate' during evaluation"):
        build_config({"model_name_or_path": "m", "predict_with_generate": True})


def test_llamafactory_predict_example_runs_unchanged_but_for_paths(tmp_path):
    from lmf.train.workflow import run_training

    adapter = tmp_path / "adapter"
    run_training(build_config(dict(model_name_or_path=DEMO_MODEL, dataset_dir=DATA, dataset="identity",
                                   template="qwen", finetuning_type="lora", max_steps=2, output_dir=str(adapter),
                                   preprocessing_cache_dir=str(tmp_path / "cache"), disable_tqdm=True,
                                   save_steps=100)))
    with open(LF_EXAMPLE, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw.update(model_name_or_path=DEMO_MODEL, adapter_name_or_path=str(adapter))
    out = tmp_path / "predict"
    overrides = [f"output_dir={out}", f"dataset_dir={DATA}", "max_samples=2", "max_new_tokens=8",
                 "preprocessing_num_workers=1", f"preprocessing_cache_dir={tmp_path / 'cache'}"]
    _run([_write_yaml(tmp_path / "lf.yaml", raw), *overrides])
    rows = _predictions(out)
    assert len(rows) == 4 and rows[0]["prompt"].startswith("<|start_header_id|>user")  # its llama3 template
    assert set(METRICS) <= set(_results(out))


@pytest.mark.slow
def test_two_processes_predict_each_sample_once_and_write_the_same_file(tmp_path):
    import subprocess
    import sys

    cfg = _write_yaml(tmp_path / "c.yaml", _lf_config(tmp_path / "dist", per_device_eval_batch_size=2))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "lmf", "sft", cfg], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    written = tmp_path / "dist" / "generated_predictions.jsonl"
    assert written.is_file(), f"exit 0 but no {written}:\n{proc.stderr[-6000:]}"
    assert _predictions(tmp_path / "dist") == _predictions(GOLDEN)



@pytest.mark.parametrize("beams_key", ["num_beams", "eval_num_beams"])
def test_beam_search_predictions_equal_llamafactory(tmp_path, beams_key):
    """num_beams 3 and length_penalty 0.6: LLaMA-Factory 0.9.5's predictions (tests/fixtures/lf_predict_beams, its
    run of lf_predict's config with those two keys added); eval_num_beams counts where num_beams is 1."""
    beams = os.path.join(REPO_ROOT, "tests", "fixtures", "lf_predict_beams")
    out = tmp_path / "out"
    _run([_write_yaml(tmp_path / "c.yaml", _lf_config(out, length_penalty=0.6, **{beams_key: 3}))])
    assert _predictions(out) == _predictions(beams)
    assert _predictions(beams) != _predictions(GOLDEN)  # the beams changed answers


def test_beams_are_refused_where_replies_stream_or_vllm_predicts(tiny_model_dir):
    from lmf.chat import create_engine

    for key, value in (("num_beams", 2), ("length_penalty", 0.5)):
        with pytest.raises(ConfigError, match=rf"'{key}': beam search is not implemented for chat and api"):
            create_engine(build_config({"model_name_or_path": tiny_model_dir, "template": "qwen", key: value}))
