"""DeepSpeed configs: every section mapped onto FSDP2/DDP, checked against the YAML, or refused by name.

Unit tests read LLaMA-Factory's own configs (../shared/lf-examples/deepspeed) and variations; the
2-process (gloo) runs train each of them, full and LoRA, and check what the config is for: losses equal
to the same run without it, offload really leaves parameters and optimizer state on CPU, and the final
outputs and checkpoints of ZeRO-3 runs reload on one process with from_pretrained.
"""

from __future__ import annotations

import json
import logging
import os

import pytest

from lmf.config.parser import build_config
from lmf.dist.plan import plan_parallelism
from lmf.extras.errors import ConfigError

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LF_DS = os.path.join(os.path.dirname(REPO_ROOT), "shared", "lf-examples", "deepspeed")
needs_lf_configs = pytest.mark.skipif(not os.path.isdir(LF_DS), reason="../shared/lf-examples is not here")

# config -> (mode, reshard_after_forward, offload, pin_memory) on 2 processes
EXPECTED = {
    "ds_z0_config.json": ("ddp", True, False, False),
    "ds_z2_config.json": ("fsdp", False, False, False),
    "ds_z2_offload_config.json": ("fsdp", False, True, True),
    "ds_z3_config.json": ("fsdp", True, False, False),
    "ds_z3_fp8_config.json": ("fsdp", True, True, False),
    "ds_z3_offload_config.json": ("fsdp", True, True, True),
}


def _cfg(ds, **keys):
    return build_config({"model_name_or_path": "m", "deepspeed": str(ds), **keys})


def _write(tmp_path, ds: dict, name="ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(ds))
    return str(path)


@needs_lf_configs
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_llamafactory_configs_map_onto_fsdp2_or_ddp(name):
    plan = plan_parallelism(_cfg(os.path.join(LF_DS, name), bf16=True), 2)
    assert (plan.mode, plan.reshard_after_forward, plan.offload, plan.pin_memory) == EXPECTED[name]


@needs_lf_configs
def test_autotp_is_refused_naming_the_section():
    with pytest.raises(ConfigError, match=r"tensor_parallel: AutoTP tensor parallelism .* not implemented"):
        _cfg(os.path.join(LF_DS, "ds_z2_autotp_config.json"))


@needs_lf_configs
def test_the_log_names_every_section_and_what_became_of_it(caplog):
    cfg = _cfg(os.path.join(LF_DS, "ds_z3_offload_config.json"))
    with caplog.at_level(logging.INFO, logger="lmf"):
        plan_parallelism(cfg, 2)
    text = caplog.text
    with open(os.path.join(LF_DS, "ds_z3_offload_config.json"), encoding="utf-8") as fh:
        ds = json.load(fh)
    for key in [*ds, *ds["zero_optimization"]]:
        if key not in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                       "stage", "zero_optimization"):
            assert key in text, key
    assert "ZeRO-3 -> FSDP2" in text and "CPUOffloadPolicy(pin_memory=True)" in text
    assert "batch sizes and gradient_clipping" in text


def test_auto_takes_the_yaml_and_explicit_values_must_agree(tmp_path):
    ok = _write(tmp_path, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                           "gradient_clipping": 0.5, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    _cfg(ok, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5, bf16=True)
    cases = [
        ({"train_micro_batch_size_per_gpu": 8}, r"train_micro_batch_size_per_gpu: 8 contradicts the YAML's "
                                                r"per_device_train_batch_size: 1"),
        ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps: 4 contradicts .*: 1"),
        ({"gradient_clipping": 0.3}, r"gradient_clipping: 0.3 contradicts the YAML's max_grad_norm: 1.0"),
        ({"bf16": {"enabled": True}}, r"bf16.enabled: True contradicts the YAML's bf16: False"),
        ({"fp16": {"enabled": True}}, r"fp16.enabled: True contradicts the YAML's fp16: False"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, r"optimizer.params.lr: 0.001 contradicts .*"
                                                                   r"learning_rate: 5e-05"),
        ({"scheduler": {"type": "WarmupCosineLR", "params": {}}}, r"lr_scheduler_type cosine, but the YAML's "
                                                                  r"lr_scheduler_type is linear"),
    ]
    for ds, message in cases:
        with pytest.raises(ConfigError, match=message):
            _cfg(_write(tmp_path, ds))
    with pytest.raises(ConfigError, match=r"train_batch_size 12 contradicts .* = 4 x 2 x 2 = 16"):
        plan_parallelism(_cfg(_write(tmp_path, {"train_batch_size": 12}), per_device_train_batch_size=4,
                              gradient_accumulation_steps=2), 2)
    plan_parallelism(_cfg(_write(tmp_path, {"train_batch_size": 16}), per_device_train_batch_size=4,
                          gradient_accumulation_steps=2), 2)


def test_what_fsdp2_cannot_do_is_refused_by_name(tmp_path):
    cases = [
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}},
         r"zero_optimization.offload_param.device: offload to 'nvme' .* not implemented"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
         r"zero_optimization.offload_param: needs ZeRO stage 3 \(the config has stage 2\)"),
        ({"zero_optimization": {"stage": 3, "mics_shard_size": 8}}, r"mics_shard_size: MiCS sharding"),
        ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, r"ZeRO\+\+ quantized weights"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}}, r"partial offload"),
        ({"zero_optimization": {"stage": 3, "made_up_knob": 1}}, r"zero_optimization.made_up_knob: this setting"),
        ({"zero_optimization": {"stage": 4}}, r"zero_optimization.stage: 4; expected 0, 1, 2 or 3"),
        ({"made_up_section": {}}, r"made_up_section: this section is not implemented"),
        ({"activation_checkpointing": {"partition_activations": True}}, r"activation_checkpointing: DeepSpeed's"),
        ({"monitor_config": {"enabled": True, "tensorboard": {"enabled": True}}},
         r"monitor_config.tensorboard: DeepSpeed's monitor \(use report_to\)"),
        ({"optimizer": {"type": "Lamb"}}, r"optimizer.type: the DeepSpeed optimizer 'Lamb'"),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}},
         r"scheduler.params.warmup_num_steps: an explicit schedule value"),
        ({"communication_data_type": "bf16"}, r"communication_data_type: gradient reduction in bf16"),
        ({"wall_clock_breakdown": True}, r"wall_clock_breakdown"),
        ({"fp16": {"enabled": "auto", "fp16_master_weights_and_grads": True}},
         r"fp16.fp16_master_weights_and_grads: this setting"),
    ]
    for ds, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            _cfg(_write(tmp_path, ds))
        assert "config key 'deepspeed'" in str(err.value)
    with pytest.raises(ConfigError, match=r"fp16.loss_scale: a static loss scale \(128\)"):
        _cfg(_write(tmp_path, {"fp16": {"enabled": "auto", "loss_scale": 128}}), fp16=True)
    with pytest.raises(ConfigError, match="not found"):
        _cfg(tmp_path / "missing.json")


def test_offload_on_one_process_still_shards_so_it_offloads(tmp_path):
    plan = plan_parallelism(_cfg(_write(tmp_path, {"zero_optimization": {
        "stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}})), 1)
    assert plan.mode == "fsdp" and plan.offload and not plan.pin_memory
    assert plan_parallelism(_cfg(_write(tmp_path, {"zero_optimization": {"stage": 3}})), 1).mode == "single"


def test_refused_before_any_data_or_model_is_loaded(tmp_path):
    from test_e2e_sft import DEMO, run_lmf

    bad = _write(tmp_path, {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})
    proc = run_lmf("sft", DEMO, f"output_dir={tmp_path / 'out'}", f"deepspeed={bad}")
    assert proc.returncode != 0
    assert "offload_param.device: offload to 'nvme'" in proc.stderr
    assert "dataset ready" not in proc.stderr and "loaded examples" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_deepspeed_loss_scaling_hysteresis_and_min_scale():
    import torch

    from lmf.config.deepspeed import LossScaleSettings
    from lmf.train.loss_scale import create_grad_scaler

    scaler = create_grad_scaler("cpu", LossScaleSettings(initial_scale_power=4, window=2, hysteresis=2,
                                                         min_scale=4.0))
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)

    def step(overflow: bool) -> float:
        opt.zero_grad()
        scaler.scale((p * (float("inf") if overflow else 1.0)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        return scaler.get_scale()

    assert scaler.get_scale() == 16.0
    assert step(True) == 16.0       # first overflow: hysteresis keeps the scale
    assert step(True) == 8.0        # second: halved
    assert step(True) == 4.0
    assert step(True) == 4.0        # min_loss_scale
    assert step(False) == 4.0 and step(False) == 8.0  # doubled after `window` clean steps, hysteresis reset
    assert step(True) == 8.0
    state = scaler.state_dict()
    assert state["hysteresis_budget"] == 1
    fresh = create_grad_scaler("cpu", LossScaleSettings(initial_scale_power=4, window=2, hysteresis=2))
    fresh.load_state_dict(state)
    assert fresh.get_scale() == 8.0 and fresh.budget == 1


# ---------------------------------------------------------------- 2 processes, real training


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """The same runs without a DeepSpeed config (DDP, 2 processes): losses per finetuning type."""
    from conftest import build_once
    from test_e2e_sft import DEMO, history, run_lmf

    def build(folder):
        out = {}
        for ftype in ("lora", "full"):
            path = folder / f"baseline-{ftype}"
            proc = run_lmf("sft", DEMO, f"output_dir={path}", *_train_args(ftype), env_extra=TWO_PROCS)
            assert proc.returncode == 0, proc.stderr[-3000:]
            out[ftype] = [h["loss"] for h in history(path)]
        (folder / "losses.json").write_text(json.dumps(out))

    return json.loads((build_once(tmp_path_factory, "deepspeed-baselines", build) / "losses.json").read_text())


TWO_PROCS = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}


def _train_args(ftype: str) -> tuple:
    return (f"finetuning_type={ftype}", f"learning_rate={1e-3 if ftype == 'full' else 5e-3}", "max_samples=16",
            "max_steps=3", "save_steps=2", "logging_steps=1", "cutoff_len=64", "disable_tqdm=true")


def _reloads(path, ftype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    if ftype == "full":
        model = AutoModelForCausalLM.from_pretrained(str(path))
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(os.path.join(REPO_ROOT, "examples", "tiny-qwen3"))
        model = PeftModel.from_pretrained(base, str(path))
    weights = [p for p in model.parameters()]
    assert weights and all(p.numel() > 0 and torch.isfinite(p).all() for p in weights)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size  # not an empty ZeRO-3 shard


#: each config trains once, LoRA and full over each kind of FSDP2 plan (without and with offload; a full run of
#: ds_z3_offload resumes in test_offloaded_zero3_resumes_exactly); ZeRO-0 is DDP, what the baselines run for both
#: finetuning types; every config's mapping is checked above
TRAINED = [("ds_z0_config.json", "lora"), ("ds_z2_config.json", "lora"),
           ("ds_z3_config.json", "full"), ("ds_z2_offload_config.json", "full"), ("ds_z3_offload_config.json", "lora"),
           ("ds_z3_fp8_config.json", "lora")]


@needs_lf_configs
@pytest.mark.slow
@pytest.mark.parametrize("name,ftype", TRAINED)
def test_llamafactory_configs_train_on_two_processes(tmp_path, baselines, name, ftype):
    from test_e2e_sft import DEMO, history, run_lmf

    out = tmp_path / "out"
    proc = run_lmf("sft", DEMO, f"output_dir={out}", f"deepspeed={os.path.join(LF_DS, name)}", *_train_args(ftype),
                   env_extra=TWO_PROCS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mode, _, offload, _ = EXPECTED[name]
    assert f"parallel={mode}" in proc.stderr and "is mapped onto lmf's engine" in proc.stderr
    assert [h["loss"] for h in history(out)] == pytest.approx(baselines[ftype], rel=1e-4)
    if offload:
        line = next(ln for ln in proc.stderr.splitlines() if "offload: between steps" in ln)
        assert "parameters" in line and "optimizer state" in line and "on cuda" not in line
    for path in (out, out / "checkpoint-2"):
        _reloads(path, ftype)


def test_offload_on_one_process_trains_like_the_plain_run(tmp_path):
    from test_e2e_sft import DEMO, history, run_lmf

    ds = _write(tmp_path, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                 "offload_param": {"device": "cpu"}}})
    plain, offloaded = tmp_path / "plain", tmp_path / "offloaded"
    for out, extra in ((plain, ()), (offloaded, (f"deepspeed={ds}",))):
        proc = run_lmf("sft", DEMO, f"output_dir={out}", *_train_args("lora"), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parallel=fsdp" in proc.stderr and "offload: between steps" in proc.stderr
    assert [h["loss"] for h in history(offloaded)] == pytest.approx([h["loss"] for h in history(plain)], rel=1e-4)
    _reloads(offloaded, "lora")


@needs_lf_configs
@pytest.mark.slow
def test_offloaded_zero3_resumes_exactly(tmp_path):
    import shutil

    from test_e2e_sft import DEMO, history, run_lmf

    args = (f"deepspeed={os.path.join(LF_DS, 'ds_z3_offload_config.json')}", *_train_args("full"), "max_steps=4")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = run_lmf("sft", DEMO, f"output_dir={full}", *args, env_extra=TWO_PROCS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    proc = run_lmf("sft", DEMO, f"output_dir={resumed}", *args, env_extra=TWO_PROCS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr
    assert history(resumed) and [h["loss"] for h in history(resumed)] == [h["loss"] for h in history(full)]
