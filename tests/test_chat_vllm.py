"""The vLLM backend's bridge (event-loop thread, cumulative-text deltas, abort, LoRA request, sampling
parameters) against a stand-in `vllm` module; the real vLLM (its CPU build) runs in tests/test_vllm_serving.py."""

from __future__ import annotations

import asyncio
import sys
import types

import pytest

from lmf.chat.options import load_serving_config


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeAsyncLLMEngine:
    """Streams the words 'w0 w1 ...' as cumulative text, like vLLM's RequestOutput."""

    instances: list["FakeAsyncLLMEngine"] = []

    def __init__(self, args):
        self.args, self.requests, self.aborted = args, [], []

    @classmethod
    def from_engine_args(cls, args):
        engine = cls(args)
        cls.instances.append(engine)
        return engine

    async def generate(self, prompt, params, request_id, lora_request=None):
        self.requests.append((prompt, params, request_id, lora_request))
        text, ids = "", []
        for i in range(params.max_tokens):
            if request_id in self.aborted:
                return
            await asyncio.sleep(0.001)
            text += f" w{i}"
            ids.append(i)
            done = i == params.max_tokens - 1
            yield types.SimpleNamespace(outputs=[types.SimpleNamespace(
                text=text, token_ids=list(ids), finish_reason="length" if done else None)])

    async def abort(self, request_id):
        self.aborted.append(request_id)


@pytest.fixture()
def fake_vllm(monkeypatch):
    import torch

    module = types.ModuleType("vllm")
    module.__spec__ = types.SimpleNamespace(name="vllm")
    module.AsyncEngineArgs = lambda **kw: types.SimpleNamespace(**kw)
    module.AsyncLLMEngine = FakeAsyncLLMEngine
    module.SamplingParams = FakeSamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, idx, path: types.SimpleNamespace(name=name, idx=idx, path=path)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "vllm" else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    FakeAsyncLLMEngine.instances.clear()
    return module


def test_vllm_engine_streams_deltas_and_passes_settings(fake_vllm, tiny_model_dir, tmp_path):
    from lmf.chat import create_engine

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cfg = load_serving_config(["--model", tiny_model_dir, "--adapter", str(adapter), "--template", "qwen",
                               "--backend", "vllm", "temperature=0.5", "top_k=0", "max_new_tokens=4", "vllm_maxlen=512"])
    engine = create_engine(cfg)
    try:
        (backend,) = FakeAsyncLLMEngine.instances
        assert backend.args.model == tiny_model_dir and backend.args.enable_lora and backend.args.max_model_len == 512
        messages = [{"role": "user", "content": "hello"}]
        stream = engine.stream_chat(messages)
        assert list(stream) == [" w0", " w1", " w2", " w3"]
        assert (stream.finish_reason, stream.completion_tokens) == ("length", 4)
        prompt, params, _, lora_request = backend.requests[-1]
        assert prompt["prompt_token_ids"] == engine.template.encode_prompt(engine.tokenizer, messages)
        assert stream.prompt_tokens == len(prompt["prompt_token_ids"])
        assert (params.temperature, params.top_k, params.max_tokens) == (0.5, -1, 4)
        assert params.stop_token_ids == [engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        assert lora_request.path == str(adapter)

        reply = engine.chat(messages, temperature=0.0, max_new_tokens=3)
        assert reply.text == " w0 w1 w2" and backend.requests[-1][1].temperature == 0.0

        stream = engine.stream_chat(messages, max_new_tokens=400)
        next(stream)
        stream.close()  # aborts the vLLM request
        rest = list(stream)
        assert len(rest) < 399 and backend.aborted == [backend.requests[-1][2]]
    finally:
        engine.close()


def test_vllm_rejects_a_prompt_longer_than_vllm_maxlen(fake_vllm, tiny_model_dir):
    from lmf.chat import create_engine
    from lmf.chat.engine import MessageError

    engine = create_engine(load_serving_config(["--model", tiny_model_dir, "--template", "qwen", "--backend", "vllm",
                                                "vllm_maxlen=10"]))
    try:
        with pytest.raises(MessageError, match="vllm_maxlen is 10"):
            engine.stream_chat([{"role": "user", "content": "hello"}])
    finally:
        engine.close()


def test_vllm_without_cuda_is_a_clear_error(fake_vllm, monkeypatch, tiny_model_dir):
    import torch

    from lmf.chat import create_engine
    from lmf.extras.errors import NotAvailableError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NotAvailableError, match="CUDA GPU"):
        create_engine(load_serving_config(["--model", tiny_model_dir, "--template", "qwen", "--backend", "vllm"]))
