"""What a save gathers from the ranks, for the process(es) that write it: the full (unsharded, CPU) model and
optimizer state, every rank's RNG state and stream position. The writer is global rank 0 (a gather to it: under FSDP
the collectives every rank takes part in), or with ``save_on_each_node`` the local rank 0 of every node, each of
which then needs the whole state (DDP, where every rank holds it; FSDP is refused by :mod:`lmf.dist.plan`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from lmf.dist.runtime import DistInfo
    from lmf.train.state import Run


def _cpu(tree):
    import torch

    return torch.utils._pytree.tree_map(lambda v: v.detach().cpu() if isinstance(v, torch.Tensor) else v, tree)


def full_model_state(loss_module, runtime: "DistInfo", trainable_only: bool, quantization_bit=None) -> dict:
    """The HF model's full state dict on the writer(s) (names without the loss module's ``model.``); a collective
    under FSDP. ``trainable_only``: the adapter's weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if trainable_only and quantization_bit is not None:
        # QLoRA (never sharded): the trainable weights only; quantized modules have no plain state dict
        # to walk (bitsandbytes 8-bit layers on CPU lack their scales until used)
        return {k[len("model."):]: v.detach().cpu().clone() for k, v in loss_module.named_parameters()
                if v.requires_grad and k.startswith("model.")}
    # cpu_offload gathers to global rank 0 only; with a writer on every node (DDP: every rank holds the whole model)
    # each rank takes its own copy and only the writers keep it
    each_node = runtime.writers_per_node
    options = StateDictOptions(full_state_dict=True, cpu_offload=not each_node, ignore_frozen_params=trainable_only)
    sd = get_model_state_dict(loss_module, options=options)
    if each_node:
        sd = _cpu(sd) if runtime.is_writer else {}
    return {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}


def full_optimizer_state(run: "Run", runtime: "DistInfo") -> Optional[dict]:
    """The optimizer's full state on the writer(s) (None elsewhere with a writer per node); a collective under
    FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if hasattr(run.optimizer, "lmf_state_dict"):
        return run.optimizer.lmf_state_dict()  # lmf.train.optimizer_plugins: one process or DDP, own layout
    each_node = runtime.writers_per_node
    sd = get_optimizer_state_dict(run.loss_module, run.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=not each_node))
    if each_node:
        return _cpu(sd) if runtime.is_writer else None
    return sd


def rank_states(run: "Run", runtime: "DistInfo") -> tuple[Optional[list], Optional[list]]:
    """Every rank's RNG state and, for streamed data, its stream position, in rank order: on the writer(s) (None
    elsewhere)."""
    import torch.distributed as dist

    from lmf.dist.runtime import is_dist
    from lmf.train.rng_state import capture_rng_state

    mine = (capture_rng_state(), run.stream.position() if hasattr(run.stream, "position") else None)
    states = [mine]
    if is_dist() and runtime.writers_per_node:  # every node's writer needs them all
        states = [None] * runtime.world_size
        dist.all_gather_object(states, mine)
        states = states if runtime.is_writer else None
    elif is_dist():
        states = [None] * runtime.world_size if runtime.is_main else None
        dist.gather_object(mine, states, dst=0)
    if states is None:
        return None, None
    positions = [position for _, position in states]
    return [rng for rng, _ in states], positions if positions[0] is not None else None
