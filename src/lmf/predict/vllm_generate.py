"""Prediction through vLLM (``infer_backend: vllm``): the whole prediction set in one ``LLM.generate`` call,
prompts given as the training template's token ids, a LoRA adapter served unmerged (``LoRARequest``)."""

from __future__ import annotations

from typing import Any

from lmf.config.parser import split_list
from lmf.extras.errors import NotAvailableError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)


def generate_with_vllm(cfg, tokenizer, prompts: list[list[int]], stop_ids: list[int], settings: Any) -> list[list[int]]:
    """Answer ids of every prompt (up to and including the stop token), in order."""
    from lmf.chat.vllm_engine import check_vllm_available, vllm_engine_kwargs

    check_vllm_available()
    from vllm import LLM, SamplingParams

    m = cfg.model
    from lmf.model.adapter_concat import combined_adapter, lora_rank

    params = []
    for ids in prompts:
        room = m.vllm_maxlen - len(ids)
        if room < 1:
            raise NotAvailableError(f"a prompt of {len(ids)} tokens does not fit vllm_maxlen {m.vllm_maxlen}; "
                                    "raise vllm_maxlen or lower cutoff_len")
        params.append(SamplingParams(
            temperature=0.0 if settings.greedy else settings.temperature,
            top_p=1.0 if settings.greedy else settings.top_p,
            top_k=-1 if settings.greedy or not settings.top_k else settings.top_k,
            repetition_penalty=settings.repetition_penalty,
            max_tokens=min(settings.reply_budget(len(ids)), room),
            stop_token_ids=stop_ids, skip_special_tokens=False, detokenize=False,
        ))
    adapters = split_list(m.adapter_name_or_path)
    adapter, tmp = combined_adapter(adapters) if adapters else (None, None)
    try:
        rank = lora_rank(adapter) if len(adapters) > 1 else 0  # one adapter: vLLM checks its rank itself
        if rank > m.vllm_max_lora_rank:
            raise NotAvailableError(f"the adapter(s) have LoRA rank {rank} (stacked ranks of several adapters add) but "
                                    f"vllm_max_lora_rank is {m.vllm_max_lora_rank}; raise vllm_max_lora_rank")
        llm = LLM(**vllm_engine_kwargs(cfg, enable_lora=bool(adapters), tokenizer=m.model_name_or_path,
                                       seed=cfg.training.seed))
        lora_request = None
        if adapters:
            from vllm.lora.request import LoRARequest

            lora_request = LoRARequest("default", 1, adapter)
    except BaseException:
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("predicting %d samples with vLLM%s", len(prompts),
                f" (adapter {' + '.join(adapters)})" if adapters else "")
    try:
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, lora_request=lora_request,
                               use_tqdm=False)
    finally:
        shutdown_llm(llm)
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return [list(out.outputs[0].token_ids) for out in outputs]


def shutdown_llm(llm) -> None:
    """Stop an offline ``vllm.LLM``'s engine-core process now (else it outlives its work until interpreter exit)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
