"""LLaMA-Factory v1 configs: every YAML under ../shared/lf-examples/v1/ runs unchanged but for the model path
(from a folder laid out like LF's checkout: data/, examples/deepspeed/), or stops with a clear error naming what
lmf does not do; the v1 keys map onto lmf's own; the batching strategies."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError, LmfError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
V1 = os.path.join(SHARED, "lf-examples", "v1")
DEMO_MODEL = os.path.join(REPO_ROOT, "examples", "tiny-qwen3")

pytestmark = pytest.mark.skipif(not os.path.isdir(V1), reason="../shared/lf-examples/v1 is not here")


@pytest.fixture
def lf_checkout(tmp_path, monkeypatch):
    """A working directory laid out like LLaMA-Factory's checkout (v1 paths are relative to it)."""
    os.symlink(os.path.join(SHARED, "data", "lf-demo"), tmp_path / "data")
    (tmp_path / "examples").mkdir()
    os.symlink(os.path.join(SHARED, "lf-examples", "deepspeed"), tmp_path / "examples" / "deepspeed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMF_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _run(example: str, command: str = "sft", *overrides: str) -> None:
    from lmf.experiment import run_experiment

    run_experiment([os.path.join(V1, example), f"model={DEMO_MODEL}", *overrides], command=command)


def _state(output_dir) -> dict:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as fh:
        return json.load(fh)


RUNS = [
    ("train_batching_strategy/train_full_fsdp2_batching_normal.yaml", "outputs/test_fsdp2", "model.safetensors"),
    ("train_batching_strategy/train_full_fsdp2_dynamic_batching.yaml", "outputs/test_fsdp2", "model.safetensors"),
    ("train_batching_strategy/train_full_fsdp2_padding_free.yaml", "outputs/test_fsdp2", "model.safetensors"),
    ("train_batching_strategy/train_full_fsdp2_dynamic_padding_free.yaml", "outputs/test_fsdp2", "model.safetensors"),
    ("train_freeze/train_freeze_sft.yaml", "outputs/test_freeze", "model.safetensors"),
    ("train_full/train_full_fsdp2.yaml", None, "model.safetensors"),
    ("train_full/train_full_liger_kernel.yaml", "outputs/test_fsdp2", "model.safetensors"),
    ("train_full/train_full_muon.yaml", "outputs/test_muon", "model.safetensors"),
    ("train_full/train_full_deepspeed.yaml", "outputs/Qwen3-0.6B-deepspeed", "model.safetensors"),
    ("train_lora/train_lora_sft.yaml", "outputs/test_lora", "adapter_model.safetensors"),
    ("train_qlora/quantization.yaml", "outputs/test_quantization", "adapter_model.safetensors"),
]


@pytest.mark.parametrize("example,output_dir,weights", RUNS, ids=[r[0].split("/")[-1][:-5] for r in RUNS])
def test_v1_example_trains_unchanged_but_for_the_model(lf_checkout, example, output_dir, weights):
    if "qlora" in example:
        pytest.importorskip("bitsandbytes")
    if output_dir is None:
        import yaml

        with open(os.path.join(V1, example), encoding="utf-8") as fh:
            output_dir = yaml.safe_load(fh)["output_dir"]
    _run(example)
    out = lf_checkout / output_dir
    state = _state(out)
    assert state["global_step"] == 10 and (out / weights).is_file()
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert all(loss == loss for loss in losses)  # finite


def test_v1_lora_then_merge(lf_checkout):
    from lmf.export import run_export

    _run("train_lora/train_lora_sft.yaml", "sft", "max_steps=2")
    assert run_export([os.path.join(V1, "train_lora", "export_lora.yaml"), f"model={DEMO_MODEL}"]) == 0
    assert (lf_checkout / "merge_lora_model" / "model.safetensors").is_file()


def test_v1_dpo_needs_the_hub_dataset_and_runs_on_its_local_copy(lf_checkout):
    with pytest.raises(LmfError, match="hf_hub.*needs the network"):
        _run("train_lora/train_lora_dpo.yaml", "dpo")
    _run("train_lora/train_lora_dpo.yaml", "dpo", "train_dataset=data/v1_dpo_demo.jsonl", "max_steps=3")
    history = _state(lf_checkout / "outputs" / "test_lora")["log_history"]
    assert any("rewards/margins" in h for h in history)


@pytest.mark.parametrize("example,message", [
    ("train_full/train_full_ulysses_cp.yaml", "context parallelism"),
    ("train_full/train_full_qwen3_moe_fsdpturbo_ep_fsdp.yaml", "fsdpturbo"),
    ("train_full/train_multimodal.yaml", "have images, videos or audio but the model takes text only"),  # the tiny text model
])
def test_v1_examples_lmf_cannot_run_say_why(lf_checkout, example, message):
    with pytest.raises(LmfError, match=message):
        _run(example)


def test_v1_keys_map_onto_lmfs(monkeypatch):
    from lmf.config.world import apply_world_size

    monkeypatch.setenv("WORLD_SIZE", "2")  # parsing never reads it: the result is the same in every process
    cfg = build_config({"model": "m", "train_dataset": "d.yaml", "micro_batch_size": 2, "global_batch_size": 8,
                        "peft_config": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                        "dist_config": {"name": "fsdp2"}, "quant_config": None, "sample_backend": "hf",
                        "optim_config": {"name": "muon", "wd": 0.05, "adamw_betas": [0.9, 0.98]}})
    assert cfg.model.model_name_or_path == "m" and cfg.data.dataset == "d.yaml" and cfg.data.template == "auto"
    t, ft = cfg.training, cfg.finetuning
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.global_batch_size) == (2, 1, 8)
    apply_world_size(cfg, 2)  # what a run does once its process group is up
    assert t.gradient_accumulation_steps == 2  # 8 / (2 processes x 2)
    with pytest.raises(ConfigError, match=r"'global_batch_size': 8 is not a multiple of 3 process\(es\)"):
        apply_world_size(build_config({"model": "m", "micro_batch_size": 2, "global_batch_size": 8}), 3)
    with pytest.raises(ConfigError, match=r"'dp_size': 4 differs from the 2 process\(es\)"):
        apply_world_size(build_config({"model": "m", "dist_config": {"name": "fsdp2", "dp_size": 4}}), 2)
    with pytest.raises(ConfigError, match="'global_batch_size' and 'gradient_accumulation_steps'"):
        build_config({"model_name_or_path": "m", "global_batch_size": 8, "gradient_accumulation_steps": 2})
    assert t.lr_scheduler_type == "constant" and t.bf16 and t.fsdp == "full_shard" and t.weight_decay == 0.05
    assert ft.finetuning_type == "lora" and ft.lora_rank == 4 and ft.lora_target == "q_proj,v_proj" and ft.use_muon
    assert t.adam_beta2 == 0.98
    assert build_config({"model": "m"}).finetuning.finetuning_type == "full"  # no peft_config: full, as in v1
    assert build_config({"model": "m"}, command_stage="dpo").finetuning.stage == "dpo"


def test_v1_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match=r"mixes LLaMA-Factory v1 keys \('model'\) with v0 keys \('dataset'\)"):
        build_config({"model": "m", "dataset": "identity"})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) rank for 'lora'"):
        build_config({"model": "m", "peft_config": {"name": "lora", "rank": 8}})
    with pytest.raises(ConfigError, match="needs a 'name'"):
        build_config({"model": "m", "peft_config": {"r": 8}})
    with pytest.raises(ConfigError, match="global_batch_size"):
        build_config({"model": "m", "micro_batch_size": 3, "global_batch_size": 8})
    with pytest.raises(ConfigError, match="dynamic_batching needs max_steps"):
        build_config({"model": "m", "batching_strategy": "dynamic_batching"})


def test_help_lists_the_v1_keys():
    proc = subprocess.run([sys.executable, "-m", "lmf", "help", "config", "--v1"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    for key in ("micro_batch_size", "peft_config", "dist_config", "batching_strategy", "init_config"):
        assert key in proc.stdout


def test_token_budget_batches():
    from lmf.train.batches import token_budget_batches

    lengths = [5, 3, 8, 2, 2, 7]
    assert token_budget_batches(range(6), lengths, budget=16, padded=True) == [[0, 1], [2, 3], [4, 5]]
    assert token_budget_batches(range(6), lengths, budget=16, padded=False) == [[0, 1, 2], [3, 4, 5]]
    assert token_budget_batches([2], lengths, budget=4, padded=True) == [[2]]  # too long alone: its own batch


def test_dynamic_batching_fills_the_token_budget_and_resumes_exactly(lf_checkout):
    from lmf.train.workflow import run_training

    example = os.path.join(V1, "train_batching_strategy", "train_full_fsdp2_dynamic_batching.yaml")
    import yaml

    with open(example, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw.update(model=DEMO_MODEL, cutoff_len=128, max_steps=6, save_steps=3, output_dir="straight")
    run_training(build_config(raw))
    normal = dict(raw, batching_strategy="normal", output_dir="normal")
    run_training(build_config(normal))
    dyn, fixed = _state("straight"), _state("normal")
    # more samples per step with the same budget: the epoch advances faster than with 2 samples per micro-batch
    assert dyn["epoch"] > fixed["epoch"]
    os.makedirs("resumed")
    import shutil

    shutil.copytree("straight/checkpoint-3", "resumed/checkpoint-3")
    run_training(build_config(dict(raw, output_dir="resumed")))
    a = [h["loss"] for h in dyn["log_history"] if "loss" in h]
    b = [h["loss"] for h in _state("resumed")["log_history"] if "loss" in h]
    assert a == b


@pytest.mark.slow
def test_v1_fsdp2_and_dynamic_batching_on_two_processes(lf_checkout):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for example, out in (("train_full/train_full_fsdp2.yaml", "a"),
                         ("train_batching_strategy/train_full_fsdp2_dynamic_batching.yaml", "b")):
        proc = subprocess.run([sys.executable, "-m", "lmf", "sft", os.path.join(V1, example), f"model={DEMO_MODEL}",
                               "max_steps=3", "cutoff_len=128", f"output_dir={out}"], env=env, capture_output=True,
                              text=True, timeout=480)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "parallel=fsdp" in proc.stderr
        state = _state(out)
        assert state["global_step"] == 3 and state["world_size"] == 2


@pytest.mark.parametrize("spec,stage", [("data/v1_sft_demo.jsonl", "sft"), ("v1_sft_full.yaml", "sft"),
                                        ("data/v1_dpo_demo.jsonl", "dpo")])
def test_v1_tokens_equal_llamafactory_v1(lf_checkout, spec, stage):
    """v1 renders with the tokenizer's chat template: lmf's rows (template: auto) are LF v1's, id for id."""
    import hashlib
    import shutil

    from lmf.train.workflow import load_tokenizer_and_data

    golden_dir = os.path.join(REPO_ROOT, "tests", "fixtures", "lf_v1")
    shutil.copy(os.path.join(golden_dir, "v1_sft_full.yaml"), lf_checkout)
    with open(os.path.join(golden_dir, "golden_digests.json"), encoding="utf-8") as fh:
        golden = json.load(fh)[spec]
    cfg = build_config({"model": DEMO_MODEL, "train_dataset": spec, "cutoff_len": 100000, "output_dir": "o"},
                       command_stage=stage)
    _, _, data = load_tokenizer_and_data(cfg, stage)
    keys = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"] if stage == "dpo" \
        else ["input_ids", "labels"]
    ours = [hashlib.sha1(json.dumps([list(row[k]) for k in keys]).encode()).hexdigest()[:16]
            for row in data.train_dataset]
    assert len(ours) == len(golden)
    assert ours == golden, f"{sum(a != b for a, b in zip(ours, golden))} of {len(golden)} rows differ"


def test_chat_reads_v1_sampler_keys(lf_checkout):
    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config

    cfg = load_serving_config([os.path.join(V1, "train_lora", "train_lora_sft.yaml"), f"model={DEMO_MODEL}",
                               "max_new_tokens=7", "peft_config={\"name\": \"lora\"}"])
    assert cfg.model.infer_backend == "huggingface" and cfg.generating.max_new_tokens == 7
    engine = create_engine(cfg)
    reply = engine.chat([{"role": "user", "content": "hi"}], do_sample=False)
    assert 0 < reply.completion_tokens <= 7


def test_init_on_rank0_single_process_loads_normally(lf_checkout):
    _run("train_lora/train_lora_sft_rank0.yaml", "sft", "max_steps=2")
    assert _state(lf_checkout / "outputs" / "test_lora")["global_step"] == 2
    assert build_config({"model": "m", "init_config": {"name": "init_on_rank0"}}).model.init_on_rank0
    assert build_config({"model": "m", "init_config": {"name": "init_on_meta"}}).model.init_on_meta
    with pytest.raises(ConfigError, match="init_on_meta' with finetuning_type lora is not implemented"):
        build_config({"model": "m", "init_config": {"name": "init_on_meta"}, "peft_config": {"name": "lora"}})


@pytest.mark.slow
@pytest.mark.parametrize("example", ["train_lora/train_lora_sft_rank0.yaml", "train_full/train_full_fsdp2.yaml"])
def test_init_on_rank0_and_meta_on_two_processes_train_like_every_rank_loading(lf_checkout, example):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE="2", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    losses = {}
    inits = (("rank0", "init_on_rank0"), ("default", "init_on_default"))
    if "full" in example:  # init_on_meta is for full/freeze tuning (LoRA: init_on_rank0), as in LLaMA-Factory v1
        inits += (("meta", "init_on_meta"),)
    for name, init in inits:
        proc = subprocess.run([sys.executable, "-m", "lmf", "sft", os.path.join(V1, example), f"model={DEMO_MODEL}",
                               "max_steps=3", "cutoff_len=128", f"output_dir={name}", "bf16=false",
                               f"init_config={{\"name\": \"{init}\"}}"], env=env, capture_output=True, text=True,
                              timeout=480)
        assert proc.returncode == 0, proc.stderr[-4000:]
        if init == "init_on_rank0":
            assert "init_on_rank0: rank 0 read the checkpoint and sent 1 process(es) their shards" in proc.stderr
        if init == "init_on_meta":
            assert "init_on_meta: every rank read its own shards" in proc.stderr
        losses[name] = [h["loss"] for h in _state(name)["log_history"] if "loss" in h]
    assert losses["rank0"] == pytest.approx(losses["default"], rel=1e-5)
    if "meta" in losses:
        assert losses["meta"] == pytest.approx(losses["default"], rel=1e-5)
