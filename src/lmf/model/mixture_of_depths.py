"""Mixture-of-depths (Raposo et al., 2024), the ``mixture_of_depths`` key: ``convert`` routes every other decoder
layer, ``load`` reads a model trained so.

A routed layer (layers 1, 3, 5, ...: the ``mixture-of-depth`` package's and LLaMA-Factory's choice) has a router, a
``Linear(hidden, 1)`` named ``mod_router`` inside the layer. In each row the ``k = max(1, int(capacity x L))`` positions
with the highest router weights (capacity 0.125; padding last) go through the layer, in their order and at their own
positions (RoPE, mask); the others skip it. A routed position becomes ``x + w (layer(x) - x)``, ``w`` its router weight,
which is how the router learns (the paper's formula).

LLaMA-Factory builds this on the ``mixture-of-depth`` package (unmaintained since June 2024; it does not import with
transformers 5). Where lmf deviates from it, on purpose:

- the router weight scales what the layer adds, ``x + w (layer(x) - x)`` as in the paper; the package scales the whole
  output, ``w layer(x)``, residual stream included;
- exactly ``k`` positions are routed (the package's strict ``>`` against the k-th weight routes ``k - 1``), never a
  padding position while a real one is left;
- the capacity is 0.125 from the first step: the package anneals it from 1 by its count of forward calls, which differs
  between a forward and its recomputation under activation checkpointing (the recomputed layer would route another
  number of positions);
- the parameter names of the layers stay transformers' own (the package wraps each routed layer in a ``block``), so
  a trained model's config and weights load in transformers as the dense model (``mod_router`` ignored) and in lmf with
  ``mixture_of_depths: load``, which reads :data:`CONFIG_KEY` from its config.json.

Routing reads the whole row (as the package and the paper in training), so generation recomputes the row at each token
(no KV cache: a routed layer holds keys of the routed positions only).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger
from lmf.model.packed_attention import SUPPORTED_MODEL_TYPES

logger = get_logger(__name__)

CAPACITY = 0.125
CONFIG_KEY = "lmf_mixture_of_depths"  # in config.json: {"capacity": 0.125, "layers": [1, 3, ...]}
ROUTER = "mod_router"


def convert(model, capacity: float = CAPACITY, layers: Optional[list[int]] = None):
    """Route ``layers`` (default: the odd ones) of ``model``'s decoder; new routers, initialised by torch's default
    ``Linear`` init (seeded by the run's seed). Records :data:`CONFIG_KEY` in the config."""
    import torch

    decoder = _decoder_layers(model)
    layers = list(range(1, len(decoder), 2)) if layers is None else list(layers)
    hidden = model.config.get_text_config().hidden_size
    param = next(model.parameters())
    for index in layers:
        layer = decoder[index]
        setattr(layer, ROUTER, torch.nn.Linear(hidden, 1, device=param.device, dtype=param.dtype))
        layer.forward = functools.partial(routed_forward, layer, layer.forward, capacity)
    setattr(model.config, CONFIG_KEY, {"capacity": capacity, "layers": layers})
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = False
    logger.info("mixture_of_depths: layers %s routed (capacity %g: %.1f%% of each row's positions go through them)",
                ",".join(map(str, layers)), capacity, capacity * 100)
    return model


def load(model, path: str):
    """``mixture_of_depths: load``: route the layers the checkpoint at ``path`` was trained with and read its routers."""
    settings = getattr(model.config, CONFIG_KEY, None)
    if not settings:
        raise ConfigError(f"config key 'mixture_of_depths': load: {path!r} was not trained with mixture_of_depths "
                          f"(its config.json has no {CONFIG_KEY}); use mixture_of_depths: convert to start")
    convert(model, settings["capacity"], settings["layers"])
    state = _router_tensors(path)
    expected = {name for name, _ in model.named_parameters() if f".{ROUTER}." in name}
    missing = expected - set(state)
    if missing:
        raise ConfigError(f"config key 'mixture_of_depths': load: {path!r} lacks the router weights "
                          f"{sorted(missing)[0]} ...")
    model.load_state_dict(state, strict=False)
    return model


def apply_mixture_of_depths(mode: Optional[str], model, path: str, is_trainable: bool) -> None:
    """The ``mixture_of_depths`` key at load time: ``convert`` (training) or ``load``; unset on a model trained with
    it: the dense model, said in the log (its routers are not loaded)."""
    if mode is None:
        if routes_positions(model.config):
            logger.warning("%s was trained with mixture_of_depths; without mixture_of_depths: load it runs as the "
                           "dense model (its routers are not loaded)", path)
            delattr(model.config, CONFIG_KEY)
        return
    reason = unsupported_reason(model.config.get_text_config())
    if reason:
        raise ConfigError(f"config key 'mixture_of_depths' is not implemented for {reason}")
    if mode == "load":
        load(model, path)
    elif routes_positions(model.config):
        raise ConfigError(f"config key 'mixture_of_depths': convert would replace the trained routers of {path!r} with "
                          "new ones; use mixture_of_depths: load")
    elif is_trainable:
        convert(model)
    else:
        raise ConfigError("config key 'mixture_of_depths': convert starts new (untrained) routers, for training; "
                          "load the trained model with mixture_of_depths: load")


def routes_positions(config) -> bool:
    """Whether the model of ``config`` has routed layers (its padding mask must reach them: padding is never routed
    while a real position is left)."""
    return bool(getattr(config, CONFIG_KEY, None))


def unsupported_reason(config) -> Optional[str]:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (mixture_of_depths supports {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
    return None


def routed_forward(layer, forward, capacity: float, hidden_states, attention_mask=None, position_ids=None,
                   position_embeddings=None, **kwargs):
    """The decoder layer's ``forward`` on the routed positions of each row; the others pass through unchanged."""
    import torch

    if kwargs.get("use_cache") and (kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None):
        raise NotAvailableError("mixture_of_depths: generation with a KV cache is not implemented (a routed layer "
                                "keeps keys of its routed positions only); generate with use_cache: false")
    batch, length, hidden = hidden_states.shape
    weights = getattr(layer, ROUTER)(hidden_states).squeeze(-1)  # [B, L]
    k = min(length, max(1, int(capacity * length)))
    ranking = weights.detach().float()
    valid = _valid_keys(attention_mask, batch, length)
    if valid is not None:
        ranking = ranking.masked_fill(~valid, float("-inf"))  # padding only when the row has too few positions
    index = ranking.topk(k, dim=1).indices.sort(dim=1).values  # [B, k], in row order
    expand = index.unsqueeze(-1).expand(-1, -1, hidden)
    routed = hidden_states.gather(1, expand)
    if position_embeddings is not None:
        position_embeddings = tuple(_gather_positions(t, index, batch) for t in position_embeddings)
    if position_ids is not None:
        position_ids = position_ids.expand(batch, -1).gather(1, index)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
            raise NotAvailableError("mixture_of_depths needs a 4-D attention mask (sdpa or eager attention)")
        rows = attention_mask.expand(batch, -1, -1, -1).gather(
            2, index[:, None, :, None].expand(-1, attention_mask.shape[1], -1, attention_mask.shape[3]))
        attention_mask = rows.gather(3, index[:, None, None, :].expand(-1, rows.shape[1], k, -1))
    out = forward(routed, attention_mask=attention_mask, position_ids=position_ids,
                  position_embeddings=position_embeddings, **kwargs)
    rest = None
    if isinstance(out, tuple):
        out, rest = out[0], out[1:]
    added = (out - routed) * weights.gather(1, index).unsqueeze(-1).to(out.dtype)
    result = hidden_states.scatter_add(1, expand, added)
    return result if rest is None else (result, *rest)


def _valid_keys(attention_mask, batch: int, length: int):
    """[B, L] bool: the positions that are not padding (a key some query of the row may attend to: every real one
    attends to itself, under any causal or sliding-window mask), or None without a 4-D mask."""
    import torch

    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return None
    mask = attention_mask[:, 0, :, :length]
    allowed = mask if mask.dtype == torch.bool else mask == 0
    return allowed.any(dim=1).expand(batch, -1)


def _gather_positions(tensor, index, batch: int):
    """A ``[B or 1, L, D]`` position tensor (RoPE's cos / sin) at ``index`` ``[B, k]``."""
    tensor = tensor.expand(batch, -1, -1)
    return tensor.gather(1, index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1]))


def _decoder_layers(model):
    from lmf.model.forward import decoder_of, unwrap_causal_lm

    causal_lm = unwrap_causal_lm(model)
    decoder = getattr(decoder_of(causal_lm), "layers", None)
    if decoder is None:
        raise NotAvailableError(f"mixture_of_depths: {type(causal_lm).__name__} has no model.layers to route")
    return decoder


def _router_tensors(path: str) -> dict:
    """The ``mod_router`` tensors of the safetensors checkpoint at ``path`` (one file or an index of shards)."""
    from safetensors import safe_open

    from lmf.model.loader import safetensors_files

    files = safetensors_files(path)
    if not all(os.path.isfile(name) for name in files):
        raise ConfigError(f"config key 'mixture_of_depths': load reads the routers from safetensors files; "
                          f"{path!r} has none (model.safetensors or its index)")
    state = {}
    for name in files:
        with safe_open(name, framework="pt") as fh:
            state.update({key: fh.get_tensor(key) for key in fh.keys() if f".{ROUTER}." in key})
    return state
