"""A scalar value head on a causal LM, for reward models.

The head is ``Linear(hidden_size, 1)`` on the final (post-norm) hidden state, registered on the
model as ``model.v_head`` so that it trains, syncs under DDP and is checkpointed with the model's
parameters. It is *saved separately* next to the adapter or model, in LLaMA-Factory/TRL's layout:

- ``value_head.safetensors`` with keys ``v_head.summary.weight`` ``[1, H]`` and ``v_head.summary.bias`` ``[1]``;
- ``value_head_config.json``: ``{"hidden_size": H, "score": "last_non_pad_token"}``.

Full-model saves should drop the ``v_head.`` keys (:func:`strip_value_head`) so that the model
directory stays a plain ``*ForCausalLM`` checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from lmf.extras.errors import LmfError
from lmf.model.forward import decoder_hidden_states, unwrap_causal_lm


VALUE_HEAD_WEIGHTS = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head_config.json"
VALUE_HEAD_PREFIX = "v_head."


class ValueHead(nn.Module):
    """``Linear(hidden_size, 1)``: one scalar per position, computed in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` hidden states -> ``[B, T]`` values."""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


def _hidden_size(model) -> int:
    config = unwrap_causal_lm(model).config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.hidden_size)


def add_value_head(model, seed: Optional[int] = None) -> ValueHead:
    """Attach a fresh fp32 value head as ``model.v_head`` (on the LM head's device) and return it.

    The weight starts small (normal, std ``1/sqrt(H+1)`` as in TRL) and the bias at zero.
    """
    if getattr(model, "v_head", None) is not None:
        return model.v_head
    hidden_size = _hidden_size(model)
    head = ValueHead(hidden_size)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        head.summary.weight.normal_(0.0, 1.0 / (hidden_size + 1) ** 0.5, generator=gen)
        head.summary.bias.zero_()
    device = unwrap_causal_lm(model).get_output_embeddings().weight.device
    model.v_head = head.to(device)
    return model.v_head


def get_value_head(model) -> ValueHead:
    """``model.v_head``; an error when the model has none."""
    head = getattr(model, "v_head", None)
    if not isinstance(head, ValueHead):
        raise LmfError("this model has no value head: add one with add_value_head() or load_value_head()")
    return head


def value_head_state_dict(model) -> dict[str, torch.Tensor]:
    """The head's weights under their saved names (``v_head.summary.weight``/``.bias``), on CPU."""
    head = get_value_head(model)
    return {VALUE_HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}


def strip_value_head(state_dict: dict) -> dict:
    """``state_dict`` without the value head's entries (any key containing ``v_head.``)."""
    return {k: v for k, v in state_dict.items() if VALUE_HEAD_PREFIX not in k}


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_value_head(model, output_dir: str) -> None:
    """Write ``value_head.safetensors`` and ``value_head_config.json`` of ``model.v_head`` into ``output_dir``."""
    save_value_head_state(value_head_state_dict(model), output_dir)


def save_value_head_state(state: dict, output_dir: str) -> None:
    """Write the value head from its ``v_head.summary.*`` tensors (e.g. taken out of a full state dict)."""
    from safetensors.torch import save_file

    tensors = {VALUE_HEAD_PREFIX + name: state[VALUE_HEAD_PREFIX + name].detach().cpu().float().contiguous()
               for name in ("summary.weight", "summary.bias")}
    os.makedirs(output_dir, exist_ok=True)
    config = {"hidden_size": int(tensors[VALUE_HEAD_PREFIX + "summary.weight"].shape[1]), "score": "last_non_pad_token"}
    _atomic_write(os.path.join(output_dir, VALUE_HEAD_WEIGHTS), lambda p: save_file(tensors, p, metadata={"format": "pt"}))

    def write_json(p):
        with open(p, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2)

    _atomic_write(os.path.join(output_dir, VALUE_HEAD_CONFIG), write_json)


def has_value_head(path: str) -> bool:
    """Whether ``path`` holds a saved value head."""
    return os.path.isfile(os.path.join(path, VALUE_HEAD_WEIGHTS))


def load_value_head(model, path: str) -> ValueHead:
    """Restore the value head saved in folder ``path`` onto ``model`` (as ``model.v_head``)."""
    from safetensors.torch import load_file

    weights = os.path.join(path, VALUE_HEAD_WEIGHTS)
    if not os.path.isfile(weights):
        raise LmfError(f"no value head in {path}: {VALUE_HEAD_WEIGHTS} is missing (was this saved by `lmf rm`?)")
    tensors = load_file(weights)
    try:
        state = {"summary.weight": tensors[VALUE_HEAD_PREFIX + "summary.weight"],
                 "summary.bias": tensors[VALUE_HEAD_PREFIX + "summary.bias"]}
    except KeyError as exc:
        raise LmfError(f"{weights} lacks tensor {exc.args[0]!r}; found {sorted(tensors)}") from None
    hidden_size = _hidden_size(model)
    if state["summary.weight"].shape != (1, hidden_size):
        raise LmfError(f"{weights} has shape {tuple(state['summary.weight'].shape)}, "
                       f"but the model's hidden size is {hidden_size}")
    head = getattr(model, "v_head", None)
    if isinstance(head, ValueHead) and head.hidden_size == hidden_size:
        with torch.no_grad():  # in place: the optimizer and any wrapper keep the same parameters
            head.summary.weight.copy_(state["summary.weight"])
            head.summary.bias.copy_(state["summary.bias"])
        return head
    head = ValueHead(hidden_size)
    head.load_state_dict(state)
    model.v_head = head.to(unwrap_causal_lm(model).get_output_embeddings().weight.device)
    return model.v_head


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row ``[B]`` (right or left padding)."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (positions * attention_mask.bool()).max(dim=1).values


def token_values(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 position_ids: Optional[torch.Tensor] = None, mm_inputs: Optional[dict] = None) -> torch.Tensor:
    """Values at every position ``[B, T]`` (fp32)."""
    hidden = decoder_hidden_states(model, input_ids, attention_mask, position_ids, mm_inputs)
    return get_value_head(model)(hidden)


def score(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reward of each sequence ``[B]``: the value at its last non-pad token."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    values = token_values(model, input_ids, attention_mask)
    return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)


def load_reward_model(model_name_or_path: str, adapter_name_or_path: Optional[str] = None, device=None,
                      dtype: Optional[torch.dtype] = None):
    """A saved reward model, ready to :func:`score`: base model (+ LoRA adapter) + value head, eval mode.

    The value head is read from the adapter folder when given, else from the model folder.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype or "auto")
    head_dir = model_name_or_path
    if adapter_name_or_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_name_or_path)
        head_dir = adapter_name_or_path
    load_value_head(model, head_dir)
    if device is not None:
        model.to(device)
    return model.eval()
