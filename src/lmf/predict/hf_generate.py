"""Batched answers with transformers ``generate``: left-padded prompts, the template's stop tokens."""

from __future__ import annotations

from typing import Any


def generate_in_batches(model, prompts: list[list[int]], stop_ids: list[int], pad_id: int, settings: Any,
                        batch_size: int, use_cache: bool = True, images: Any = None,
                        media: Any = None, num_beams: int = 1, length_penalty: float = 1.0,
                        generation_config: Any = None) -> list[list[int]]:
    """The answer ids of every prompt (up to and including its first stop token), in the order of ``prompts``;
    ``num_beams`` > 1: transformers' beam search (each row's best beam), scores divided by length ** length_penalty.

    Prompts are batched longest first (less padding) and left-padded so that every row ends where its
    answer starts. A multimodal model gets each batch's ``images`` ((images, videos, audios) paths per prompt)
    through ``media``. ``generation_config`` (a GenerationConfig) is the base the settings here are applied over."""
    import torch

    device = next(model.parameters()).device
    max_positions = getattr(model.config, "max_position_embeddings", None)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: dict[int, list[int]] = {}
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = prompts[i]
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[r, width - len(ids):] = 1
        budget = settings.reply_budget(width)
        if max_positions:
            budget = min(budget, max(max_positions - width, 1))
        kwargs: dict[str, Any] = dict(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                      max_new_tokens=budget, eos_token_id=stop_ids, pad_token_id=pad_id,
                                      repetition_penalty=settings.repetition_penalty, use_cache=use_cache,
                                      num_beams=num_beams)
        if generation_config is not None:
            kwargs["generation_config"] = generation_config
        if num_beams > 1:
            kwargs["length_penalty"] = length_penalty
        if media is not None:
            from lmf.train.process import to_device

            paths, videos, audios = ([p for i in rows for p in (images[i][k] if images else [])] for k in range(3))
            kwargs.update(to_device(media.model_inputs(paths, input_ids, tuple(videos), tuple(audios)), device))
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                          top_k=settings.top_k or None)
        with torch.inference_mode():
            output = model.generate(**kwargs)
        for r, i in enumerate(rows):
            answers[i] = _until_stop(output[r, width:].tolist(), stop_ids)
    return [answers[i] for i in range(len(prompts))]


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """``ids`` up to and including the first stop token (what follows is generate's padding)."""
    stops = set(stop_ids)
    for n, token in enumerate(ids):
        if token in stops:
            return ids[:n + 1]
    return ids
