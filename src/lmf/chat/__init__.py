"""Chat: the engine interface (:mod:`lmf.chat.engine`), its backends (transformers ``generate``,
vLLM), tool-call parsing and the ``lmf chat`` command."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.extras.errors import ConfigError

if TYPE_CHECKING:
    from lmf.chat.engine import ChatEngine
    from lmf.config.parser import LmfConfig


def create_engine(cfg: "LmfConfig") -> ChatEngine:
    """The engine of ``infer_backend``: ``huggingface``/``hf`` (default) or ``vllm``."""
    backend, g = cfg.model.infer_backend, cfg.generating
    for key, default in (("num_beams", 1), ("length_penalty", 1.0)):
        if getattr(g, key) != default:
            raise ConfigError(f"config key {key!r}: beam search is not implemented for chat and api (replies are "
                              "streamed token by token); it applies to prediction (do_predict)")
    if backend in ("huggingface", "hf"):
        from lmf.chat.hf_engine import HuggingFaceEngine

        return HuggingFaceEngine(cfg)
    if backend == "vllm":
        from lmf.chat.vllm_engine import VllmEngine

        return VllmEngine(cfg)
    raise ConfigError(f"config key 'infer_backend': {backend!r} is not supported; choose huggingface or vllm")
