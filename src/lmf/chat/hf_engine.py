"""The transformers backend: ``model.generate`` in a worker thread, streamed by ``TextIteratorStreamer``.

The prompt is rendered by the training template (:mod:`lmf.data.template`), so a fine-tuned
adapter sees exactly the format it was trained on; generation stops at the template's stop tokens.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Iterator, Optional

from lmf.chat.engine import ChatEngine, ChatStream, GenerationSettings, MessageError, check_media, served_model_name
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)


def load_generation_config(path: str):
    """``generation_config``: a generation_config.json (any file name) or a folder holding one, as a
    ``GenerationConfig``; ConfigError naming the file when it is missing or not a generation config."""
    import os

    from transformers import GenerationConfig

    from lmf.extras.errors import ConfigError

    folder, name = (path, "generation_config.json") if os.path.isdir(path) else os.path.split(path)
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        raise ConfigError(f"config key 'generation_config': no file {file!r}")
    try:
        return GenerationConfig.from_pretrained(folder or ".", config_file_name=name)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"config key 'generation_config': {file!r} is not a generation config: "
                          f"{str(exc).splitlines()[0]}") from None


def inference_device():
    """The first CUDA device when there is one, else the CPU."""
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class HuggingFaceEngine(ChatEngine):
    """Loads tokenizer + model (+ merged adapters) once; each request runs one ``generate`` call."""

    def __init__(self, cfg: "LmfConfig", model: Any = None, tokenizer: Any = None) -> None:
        from lmf.data.template import get_template
        from lmf.model.loader import load_model, load_tokenizer

        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        self.template = get_template(cfg.data.template, self.tokenizer, default_system=cfg.data.default_system,
                                     enable_thinking=cfg.data.enable_thinking)
        from lmf.data.media.plugins import media_plugin_for

        self.media = media_plugin_for(self.template, cfg.model.model_name_or_path, self.tokenizer, cfg.data,
                                      cfg.model.trust_remote_code)
        if model is None:
            model = load_model(cfg, self.tokenizer, is_trainable=False, device=inference_device())
        self.model = model
        self.model.eval()
        self.device = next(model.parameters()).device
        self.stop_ids = self.template.stop_token_ids(self.tokenizer)
        self.tool_format = self.template.tool_format
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.settings = GenerationSettings.from_args(cfg.generating)
        self.base_config = load_generation_config(cfg.generating.generation_config) \
            if cfg.generating.generation_config else None
        self.use_cache = cfg.model.use_cache
        self.model_name = served_model_name(cfg)
        logger.info("chat engine ready: %s on %s, template %s, stop tokens %s",
                    self.model_name, self.device, self.template.name, self.stop_ids)

    def encode(self, messages: list[dict[str, str]], system: Optional[str] = None,
               tools: Optional[str] = None, images: Optional[list[str]] = None,
               audios: Optional[list[str]] = None) -> list[int]:
        """Prompt token ids of a conversation (ending with a user turn), as the training template renders it
        (``<image>`` / ``<audio>`` placeholders expanded into the model's media tokens, as in training)."""
        from lmf.extras.errors import DataError, NotAvailableError

        check_media(self.media, messages, images, audios)
        try:
            if images or audios:
                messages, _ = self.media.expand(messages, list(images or []), (), list(audios or []))
            return self.template.encode_prompt(self.tokenizer, messages, system=system, tools=tools)
        except (DataError, NotAvailableError) as exc:
            raise MessageError(str(exc)) from exc

    def stream_chat(self, messages, system=None, tools=None, images=None, audios=None, **gen: Any) -> ChatStream:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        settings = self.settings.updated(**gen)
        prompt_ids = self.encode(messages, system, tools, images, audios)
        max_new_tokens = settings.reply_budget(len(prompt_ids))
        if self.max_positions:
            room = self.max_positions - len(prompt_ids)
            if room < 1:
                raise MessageError(f"the prompt is {len(prompt_ids)} tokens but the model's context holds "
                                   f"{self.max_positions}; shorten the conversation (chat: type `clear`)")
            max_new_tokens = min(max_new_tokens, room)

        stream = ChatStream(prompt_tokens=len(prompt_ids), stop=settings.stop)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=settings.skip_special_tokens)

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                stop = stream.cancelled.is_set()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        kwargs: dict[str, Any] = dict(
            input_ids=torch.tensor([prompt_ids], device=self.device),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=self.device),
            streamer=streamer,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            repetition_penalty=settings.repetition_penalty,
            stopping_criteria=StoppingCriteriaList([_Cancelled()]),
            use_cache=self.use_cache,
            num_beams=1,
        )
        if self.base_config is not None:
            kwargs["generation_config"] = self.base_config
        if self.media is not None:  # pixel inputs of the images, audio features (and a Qwen-VL model's token types)
            from lmf.train.process import to_device

            inputs = self.media.model_inputs(list(images or []), kwargs["input_ids"].cpu(), (), tuple(audios or ()))
            kwargs.update(to_device(inputs, self.device))
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                          top_k=settings.top_k or None)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    output = self.model.generate(**kwargs)
                outcome["ids"] = output[0, len(prompt_ids):].tolist()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
                outcome["error"] = exc
                streamer.end()  # unblock the consumer

        worker = threading.Thread(target=run, name="lmf-generate", daemon=True)

        def pieces() -> Iterator[str]:
            worker.start()
            for text in streamer:
                if text:
                    yield text
            worker.join()
            if "error" in outcome:
                raise outcome["error"]
            ids = outcome["ids"]
            while ids and ids[-1] == self.pad_id and self.pad_id not in self.stop_ids:
                ids.pop()  # generate pads finished rows; never the case for one row, but be exact
            stream.completion_tokens = len(ids)
            hit_stop = bool(ids) and ids[-1] in self.stop_ids
            stream.finish_reason = "stop" if hit_stop or stream.cancelled.is_set() else "length"

        return stream.attach(pieces())
