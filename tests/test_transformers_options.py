"""The rest of transformers' TrainingArguments options that LLaMA-Factory passes through: optim_args,
optim_target_modules, train_sampling_strategy / group_by_length, debug: underflow_overflow, prediction_loss_only,
generation_config / generation_num_beams, accelerator_config, and the options with no meaning in lmf's loop (a
warning saying why)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmf.config.parser import build_config
from lmf.extras.errors import ConfigError


def _cfg(**keys):
    return build_config({"model_name_or_path": "m", **keys})


# ---- optim_args / optim_target_modules
def test_optim_args_reach_the_torch_optimizer():
    import torch

    from lmf.train.optimizer import create_optimizer

    model = torch.nn.Linear(4, 4)
    sgd = create_optimizer(model, _cfg(optim="sgd", optim_args="momentum=0.9, nesterov=true,dampening=0").training)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True
    adamw = create_optimizer(model, _cfg(optim_args="amsgrad=True").training)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["amsgrad"] is True
    assert create_optimizer(model, _cfg().training).defaults["amsgrad"] is False


@pytest.mark.parametrize("keys, message", [
    ({"optim_args": "momentum"}, "'momentum' is not key=value"),
    ({"optim_args": "momentum=0.9"}, "'momentum' is not an argument of optim adamw_torch"),
    ({"optim": "sgd", "optim_args": "momentum=fast"}, "momentum='fast' is not a number"),
    ({"optim": "sgd", "optim_args": "nesterov=maybe"}, "nesterov='maybe' is not a boolean"),
    ({"optim": "sgd", "optim_args": "weight_decay=0.1"}, "weight_decay is the config key weight_decay"),
    ({"optim_args": "amsgrad=true", "use_adam_mini": True, "finetuning_type": "full"}, "'use_adam_mini'"),
    ({"optim_target_modules": ["q_proj"]}, "set use_galore or use_apollo"),
    ({"optim_target_modules": "q_proj", "use_galore": True, "finetuning_type": "full", "galore_target": "v_proj"},
     "name different modules"),
])
def test_optimizer_options_that_cannot_work_name_the_key(keys, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**keys)


def test_optim_target_modules_are_the_galore_or_apollo_targets():
    galore = _cfg(optim_target_modules=["q_proj", "v_proj"], use_galore=True, finetuning_type="full")
    assert galore.finetuning.galore_target == "q_proj,v_proj"
    apollo = _cfg(optim_target_modules="mlp", use_apollo=True, finetuning_type="full")
    assert apollo.finetuning.apollo_target == "mlp" and apollo.finetuning.galore_target == "all"


# ---- the order of the data
def test_train_sampling_strategy_maps_onto_lmf_keys():
    assert _cfg(train_sampling_strategy="sequential").finetuning.disable_shuffling
    assert _cfg(train_sampling_strategy="group_by_length").training.group_by_length
    plain = _cfg(train_sampling_strategy="random")
    assert not plain.training.group_by_length and not plain.finetuning.disable_shuffling
    with pytest.raises(ConfigError, match="batch_rebalance is not implemented"):
        _cfg(train_sampling_strategy="batch_rebalance")
    with pytest.raises(ConfigError, match="'group_by_length' and 'disable_shuffling'"):
        _cfg(group_by_length=True, disable_shuffling=True)
    with pytest.raises(ConfigError, match="'group_by_length' and 'streaming'"):
        _cfg(group_by_length=True, streaming=True, max_steps=2)


def test_length_grouped_order_sorts_mega_batches_longest_first_as_transformers():
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from lmf.train.batches import length_grouped

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=1000)  # distinct enough that ties are rare; ties keep the shuffled order
    g = torch.Generator()
    g.manual_seed(7)
    shuffled = torch.randperm(1000, generator=g).numpy()
    ours = length_grouped(shuffled.copy(), lengths, batch=5)
    g.manual_seed(7)
    theirs = get_length_grouped_indices(lengths.tolist(), 5, generator=g)
    assert [lengths[i] for i in ours] == [lengths[i] for i in theirs]
    assert sorted(ours.tolist()) == list(range(1000))  # a permutation: every sample once
    assert lengths[ours[0]] == lengths.max()


def test_the_sampler_groups_by_length_per_epoch_and_resumes_mid_epoch():
    from lmf.train.batches import ResumableShardedSampler

    lengths = np.arange(1, 201)
    samplers = [ResumableShardedSampler(200, 2, rank, seed=3, lengths=lengths, group_batch=4) for rank in (0, 1)]
    orders = [s.epoch_order() for s in samplers]
    assert sorted(np.concatenate(orders).tolist()) == list(range(200))
    # each rank's micro-batches of 2 come from one sorted mega-batch: far narrower than a random batch
    spread = [np.ptp(lengths[o[i:i + 2]]) for o in orders for i in range(2, 100, 2)]
    assert np.mean(spread) < 10
    samplers[0].set_epoch(1)
    second = samplers[0].epoch_order()
    assert not np.array_equal(second, orders[0])  # reshuffled each epoch
    samplers[0].set_epoch(1, skip=10)
    assert list(samplers[0]) == second[10:].tolist()


def test_group_by_length_trains(tiny_model_dir, demo_data_dir, tmp_path):
    from lmf.train.workflow import run_training

    raw = dict(model_name_or_path=tiny_model_dir, dataset_dir=demo_data_dir, dataset="alpaca_en_demo", template="qwen",
               cutoff_len=64, max_samples=16, output_dir=str(tmp_path / "out"), max_steps=3,
               per_device_train_batch_size=4, learning_rate=5e-3, save_strategy="no", disable_tqdm=True,
               logging_steps=1, preprocessing_cache_dir=str(tmp_path / "cache"), train_sampling_strategy="group_by_length")
    run_training(build_config(raw))
    with open(tmp_path / "out" / "trainer_state.json", encoding="utf-8") as fh:
        losses = [h["loss"] for h in json.load(fh)["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(np.isfinite(losses))


# ---- debug: underflow_overflow
def test_underflow_overflow_names_the_module_that_overflowed(tiny_model_dir, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from lmf.train.overflow import NumericalOverflowError, watch_overflow

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    watch_overflow(model)
    model(torch.tensor([[1, 2, 3]]))  # finite: nothing happens
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("inf"))
    with pytest.raises(NumericalOverflowError, match="module 'model.layers.1.mlp.down_proj' in forward 2"):
        model(torch.tensor([[1, 2, 3]]))
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out  # the frames before it


def test_debug_options_are_checked():
    assert _cfg(debug="underflow_overflow").training.debug == "underflow_overflow"
    assert _cfg(debug=["underflow_overflow"]).training.debug == "underflow_overflow"
    with pytest.raises(ConfigError, match="lmf does not run on TPUs"):
        _cfg(debug="tpu_metrics_debug")
    with pytest.raises(ConfigError, match="'overflow' is not one of"):
        _cfg(debug="overflow")


# ---- evaluation and prediction
def test_prediction_loss_only_is_refused_where_it_would_drop_something():
    assert _cfg(prediction_loss_only=True, val_size=0.1).training.prediction_loss_only
    with pytest.raises(ConfigError, match="'prediction_loss_only' and 'compute_accuracy'"):
        _cfg(prediction_loss_only=True, compute_accuracy=True)
    with pytest.raises(ConfigError, match="'prediction_loss_only' and 'do_predict'"):
        _cfg(prediction_loss_only=True, do_predict=True, predict_with_generate=True, eval_dataset="x",
             do_train=False)


def test_generation_num_beams_is_eval_num_beams_unless_that_is_set():
    assert _cfg(generation_num_beams=3).data.eval_num_beams == 3
    assert _cfg(generation_num_beams=3, eval_num_beams=2).data.eval_num_beams == 2  # LLaMA-Factory's precedence


def test_generation_config_is_the_base_of_generate(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from lmf.chat.engine import GenerationSettings
    from lmf.chat.hf_engine import load_generation_config
    from lmf.predict.hf_generate import generate_in_batches

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    settings = GenerationSettings(do_sample=False, max_new_tokens=3)
    prompt = [[5, 6, 7, 8]]
    plain = generate_in_batches(model, prompt, stop_ids=[0], pad_id=0, settings=settings, batch_size=1)[0]
    GenerationConfig(suppress_tokens=[plain[0]]).save_pretrained(tmp_path / "gen")
    base = load_generation_config(str(tmp_path / "gen"))
    assert load_generation_config(str(tmp_path / "gen" / "generation_config.json")).suppress_tokens == [plain[0]]
    steered = generate_in_batches(model, prompt, stop_ids=[0], pad_id=0, settings=settings, batch_size=1,
                                  generation_config=base)[0]
    assert steered[0] != plain[0] and len(steered) == 3


def test_a_missing_or_broken_generation_config_names_the_file(tmp_path):
    from lmf.chat.hf_engine import load_generation_config

    with pytest.raises(ConfigError, match="no file .*generation_config.json"):
        load_generation_config(str(tmp_path))
    (tmp_path / "gen.json").write_text("{not json")
    with pytest.raises(ConfigError, match="gen.json' is not a generation config"):
        load_generation_config(str(tmp_path / "gen.json"))


# ---- accelerator_config and the options without a meaning in lmf
def test_accelerator_config_is_accepted_where_lmf_does_the_same(tmp_path):
    _cfg(accelerator_config={"split_batches": False, "even_batches": True, "use_seedable_sampler": True})
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"dispatch_batches": None}))
    _cfg(accelerator_config=str(path))
    with pytest.raises(ConfigError, match=r"'accelerator_config.split_batches': True is not implemented"):
        _cfg(accelerator_config={"split_batches": True})
    with pytest.raises(ConfigError, match=r"'accelerator_config.sharding': unknown"):
        _cfg(accelerator_config={"sharding": 1})
    with pytest.raises(ConfigError, match="cannot read the JSON file"):
        _cfg(accelerator_config=str(tmp_path / "missing.json"))


@pytest.mark.parametrize("key, value", [("eval_accumulation_steps", 4), ("log_on_each_node", False),
                                        ("sortish_sampler", True), ("generation_max_length", 512),
                                        ("restore_callback_states_from_checkpoint", True)])
def test_options_without_a_meaning_in_lmf_warn_saying_why(key, value):
    from tests.conftest import log_records

    with log_records("lmf") as records:
        _cfg(**{key: value})
    assert any(f"{key!r} has no effect in lmf" in r.getMessage() for r in records)


# ---- auto_find_batch_size and the final evaluation's precision
def _train_state(tiny_model_dir, demo_data_dir, tmp_path, name, **overrides):
    from lmf.train.workflow import run_training

    raw = dict(model_name_or_path=tiny_model_dir, dataset_dir=demo_data_dir, dataset="alpaca_en_demo", template="qwen",
               cutoff_len=64, max_samples=10, output_dir=str(tmp_path / name), num_train_epochs=2,
               per_device_train_batch_size=4, learning_rate=5e-3, save_strategy="no", disable_tqdm=True,
               logging_steps=1, preprocessing_cache_dir=str(tmp_path / "cache"), padding_free=False)
    raw.update(overrides)
    run_training(build_config(raw))
    with open(tmp_path / name / "trainer_state.json", encoding="utf-8") as fh:
        return json.load(fh)


def test_auto_find_batch_size_retries_the_step_in_halves_with_the_same_samples(tiny_model_dir, demo_data_dir,
                                                                              tmp_path, monkeypatch):
    import torch

    import lmf.train.trainer as trainer
    from tests.conftest import log_records

    make, calls = trainer._make_loss_module, []

    def limited(model, compute_loss, coef=None):  # the second forward of more than 2 rows runs out of memory
        def compute(model, batch):
            if batch["input_ids"].shape[0] > 2:
                calls.append(1)
                if len(calls) > 1:  # step 2, in the middle of the first epoch
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return compute_loss(model, batch)
        return make(model, compute, coef)

    monkeypatch.setattr(trainer, "_make_loss_module", limited)
    with log_records("lmf") as records:
        found = _train_state(tiny_model_dir, demo_data_dir, tmp_path, "found", auto_find_batch_size=True)
    monkeypatch.setattr(trainer, "_make_loss_module", make)
    planned = _train_state(tiny_model_dir, demo_data_dir, tmp_path, "planned", per_device_train_batch_size=2,
                           gradient_accumulation_steps=2)
    said = [r.getMessage() for r in records if "auto_find_batch_size: out of memory" in r.getMessage()]
    assert len(said) == 1 and "micro-batches of 4" in said[0] and "micro-batches of 2 x accumulation 2" in said[0]
    # 10 samples: 3 steps an epoch either way; every step trains the same samples as micro-batches of 2 x 2
    assert found["global_step"] == planned["global_step"] == 6
    losses = [[h["loss"] for h in s["log_history"] if "loss" in h] for s in (found, planned)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_auto_find_batch_size_leaves_other_errors_and_the_smallest_batch_alone(tiny_model_dir, demo_data_dir,
                                                                              tmp_path, monkeypatch):
    import torch

    import lmf.train.trainer as trainer

    make = trainer._make_loss_module

    def failing(model, compute_loss, coef=None):
        def compute(model, batch):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return make(model, compute, coef)

    monkeypatch.setattr(trainer, "_make_loss_module", failing)
    with pytest.raises(torch.OutOfMemoryError):  # 4 -> 2 -> 1, then nothing smaller is left
        _train_state(tiny_model_dir, demo_data_dir, tmp_path, "oom", auto_find_batch_size=True)
    from lmf.train.batch_finder import is_out_of_memory, smaller_micro_batch

    assert [smaller_micro_batch(n) for n in (1, 2, 3, 6, 12)] == [None, 1, 1, 3, 6]
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 1099511627776 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("keys, message", [
    ({"auto_find_batch_size": True, "batching_strategy": "dynamic_batching", "max_steps": 2}, "'batching_strategy'"),
    ({"auto_find_batch_size": True, "streaming": True, "max_steps": 2}, "'streaming'"),
    ({"bf16_full_eval": True, "fp16_full_eval": True}, "'bf16_full_eval' and 'fp16_full_eval'"),
    ({"generation_config": "gen", "infer_backend": "vllm"}, "'generation_config' and 'infer_backend: vllm'"),
])
def test_precision_and_batch_finding_combinations_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**keys)


def test_auto_find_batch_size_is_refused_with_several_processes_naming_the_key():
    from lmf.config.world import apply_world_size

    apply_world_size(_cfg(auto_find_batch_size=True), 1)
    with pytest.raises(ConfigError, match=r"'auto_find_batch_size' with 2 processes is not implemented"):
        apply_world_size(_cfg(auto_find_batch_size=True), 2)  # what a run checks once its process group is up


def test_bf16_full_eval_runs_the_final_evaluation_in_bf16_only(tiny_model_dir, demo_data_dir, tmp_path):
    runs = [_train_state(tiny_model_dir, demo_data_dir, tmp_path, f"run{n}", num_train_epochs=1, val_size=2,
                         eval_strategy="steps", eval_steps=1, **extra)
            for n, extra in enumerate(({}, {"bf16_full_eval": True}))]
    evals = [[h["eval_loss"] for h in s["log_history"] if "eval_loss" in h] for s in runs]
    assert evals[0][:-1] == evals[1][:-1]  # the evaluations during training: unchanged
    assert evals[0][-1] != evals[1][-1] and evals[0][-1] == pytest.approx(evals[1][-1], rel=2e-2)


# ---- profile_modules, adapter_folder, offload_folder
def test_profile_modules_times_the_matching_modules_at_each_logging_step(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from lmf.train.profiler import ModuleTimer
    from tests.conftest import log_records

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with log_records("lmf") as records:
        timer = ModuleTimer(model, "*.layers.0.self_attn, *.layers.1.mlp", is_main=True)
        for step in (1, 2):
            model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
            report = timer.after_step(step, due=step % 2 == 0)  # logging_steps 2
            assert (report is None) == (step == 1)
    assert set(report) == {"model.layers.0.self_attn", "model.layers.1.mlp"}
    assert all(f > 0 and b > 0 for f, b in report.values())
    assert any("profile_modules at step 2" in r.getMessage() and "model.layers.1.mlp: fwd=" in r.getMessage()
               for r in records)
    timer.remove()
    model(torch.tensor([[1, 2]]))
    assert not timer.times  # the hooks are gone
    with log_records("lmf") as records:
        ModuleTimer(model, "*.nothing", True)
    assert any("no module matches" in r.getMessage() for r in records)


def test_profile_modules_in_a_training_run(tiny_model_dir, demo_data_dir, tmp_path):
    from tests.conftest import log_records

    with log_records("lmf") as records:
        _train_state(tiny_model_dir, demo_data_dir, tmp_path, "prof", max_steps=2, profile_modules="*.layers.0.mlp")
    assert sum("profile_modules at step" in r.getMessage() for r in records) == 2


def test_adapter_folder_is_appended_to_every_adapter_path(tmp_path):
    cfg = _cfg(adapter_name_or_path="a, b", adapter_folder="sub")
    assert cfg.model.adapter_name_or_path == "a/sub,b/sub"
    with pytest.raises(ConfigError, match="'adapter_folder' names a sub-folder"):
        _cfg(adapter_folder="sub")


def test_offload_folder_goes_with_an_automatic_device_map():
    from tests.conftest import log_records

    with log_records("lmf") as records:
        _cfg(offload_folder="/tmp/x")
        _cfg(offload_folder="/tmp/x", quantization_device_map="auto", quantization_bit=4)
    said = [r.getMessage() for r in records if "'offload_folder' has no effect" in r.getMessage()]
    assert len(said) == 1


def test_parallelism_config_maps_onto_fsdp_hsdp_or_ddp():
    full = _cfg(parallelism_config={"dp_shard_size": 4})
    assert full.training.fsdp == ["full_shard"] or full.training.fsdp == "full_shard"
    assert full.training.dp_size == 4
    hybrid = _cfg(parallelism_config={"dp_shard_size": 2, "dp_replicate_size": 3})
    assert "hybrid_shard" in hybrid.training.fsdp and hybrid.training.dp_size == 6
    assert hybrid.training.fsdp_config["hybrid_shard_size"] == 2
    ddp = _cfg(parallelism_config={"dp_replicate_size": 2})
    assert not ddp.training.fsdp and ddp.training.dp_size == 2
    for key, what in (("tp_size", "tensor parallelism"), ("cp_size", "context parallelism")):
        with pytest.raises(ConfigError, match=f"'parallelism_config.{key}': {what} is not implemented"):
            _cfg(parallelism_config={key: 2})
    with pytest.raises(ConfigError, match="'parallelism_config.tp_handler' is not implemented"):
        _cfg(parallelism_config={"tp_handler": {}})


def test_liger_kernel_config_switches_are_checked_and_steer_the_loss():
    from lmf.loss import loss_kwargs
    from tests.conftest import log_records

    import torch

    model = torch.nn.Linear(2, 2)
    on = _cfg(use_liger_kernel=True, liger_kernel_config={"rope": False, "swiglu": True})
    assert loss_kwargs(on.model, model)["use_liger"] is True
    off = _cfg(use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": False})
    assert loss_kwargs(off.model, model)["use_liger"] is False
    with pytest.raises(ConfigError, match=r"'liger_kernel_config.flash' is not implemented"):
        _cfg(use_liger_kernel=True, liger_kernel_config={"flash": True})
    with pytest.raises(ConfigError, match=r"'liger_kernel_config.rope': expected true or false"):
        _cfg(use_liger_kernel=True, liger_kernel_config={"rope": "yes"})
    with log_records("lmf") as records:
        _cfg(liger_kernel_config={"rope": True})
        _cfg(use_liger_kernel=True, liger_kernel_config={"cross_entropy": True})
    said = " | ".join(r.getMessage() for r in records)
    assert "has no effect without use_liger_kernel" in said and "cross_entropy' has no effect in lmf" in said


def test_liger_module_kernels_are_a_logged_no_op_on_the_cpu(monkeypatch):
    import torch

    import lmf.extras.logging as lmf_logging
    from lmf.loss.liger import apply_module_kernels
    from tests.conftest import log_records

    monkeypatch.setattr(lmf_logging, "_ONCE", set())  # said once a process: this test's process hears it
    model = torch.nn.Linear(2, 2)
    with log_records("lmf") as records:
        assert apply_module_kernels(model, {"rope": True}, torch.device("cpu")) is False
    assert any("module kernels run on CUDA only" in r.getMessage() for r in records)


# ---- ignore_pad_token_for_loss: false (LLaMA-Factory's SFT collator trains the padding)
def test_training_on_padding_labels_the_padding_and_pads_to_eights(tiny_model_dir):
    from transformers import AutoTokenizer

    from lmf.data.collator import SFTCollator

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": list(range(5, 16)),
                                                                    "labels": [-100] * 5 + list(range(10, 16))}]
    batch = SFTCollator(tok, pad_to_multiple_of=8, label_pad_id=pad)(features)
    assert batch["labels"].shape == (2, 16)
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [pad] * 13
    assert batch["labels"][1, 11:].tolist() == [pad] * 5 and batch["attention_mask"][0, 3:].sum() == 0


def test_training_on_padding_turns_padding_free_off_or_names_what_removes_it():
    cfg = _cfg(ignore_pad_token_for_loss=False)
    assert cfg.model.padding_free is False
    with pytest.raises(ConfigError, match="'ignore_pad_token_for_loss: false' and 'batching_strategy: padding_free'"):
        _cfg(ignore_pad_token_for_loss=False, batching_strategy="padding_free")
    with pytest.raises(ConfigError, match="'stage: dpo': training on padding is implemented for sft and pt only"):
        _cfg(ignore_pad_token_for_loss=False, stage="dpo")


def test_training_on_padding_counts_the_padded_labels(tiny_model_dir, demo_data_dir, tmp_path):
    padded = _train_state(tiny_model_dir, demo_data_dir, tmp_path, "pad", max_steps=2, ignore_pad_token_for_loss=False,
                          cutoff_len=512, learning_rate=0.0)  # long enough that rows differ in length
    plain = _train_state(tiny_model_dir, demo_data_dir, tmp_path, "plain", max_steps=2, learning_rate=0.0,
                         cutoff_len=512)
    # the same weights (lr 0): the loss differs only by the padded positions it now includes
    assert [h["loss"] for h in padded["log_history"] if "loss" in h] != \
        [h["loss"] for h in plain["log_history"] if "loss" in h]
