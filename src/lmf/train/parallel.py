"""Wrapping the loss module for the parallelism plan (:mod:`lmf.dist.plan`): none, DDP, or FSDP2
(``fully_shard`` per decoder layer, on a 1-D or, for hybrid sharding, a 2-D device mesh)."""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Iterator, Optional

from lmf.dist.plan import ParallelPlan
from lmf.extras.errors import ConfigError, LmfError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    import torch

logger = get_logger(__name__)


def decoder_layers(model) -> list["torch.nn.Module"]:
    """The repeated decoder blocks of a (possibly PEFT-wrapped) causal LM."""
    from lmf.model.forward import decoder_of, unwrap_causal_lm

    causal_lm = unwrap_causal_lm(model)
    decoder = decoder_of(causal_lm)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"FSDP: cannot find the decoder layers of {type(causal_lm).__name__}")
    return list(layers)


def ddp_options(args, plan: ParallelPlan) -> dict:
    """DistributedDataParallel's arguments from the ``ddp_*`` keys (torch's defaults for those not set); refused,
    naming both keys, when the plan shards with FSDP2 (which has no such options)."""
    given = {key: (argument, value) for key, argument, value in (
        ("ddp_bucket_cap_mb", "bucket_cap_mb", args.ddp_bucket_cap_mb),
        ("ddp_broadcast_buffers", "broadcast_buffers", args.ddp_broadcast_buffers),
        ("ddp_static_graph", "static_graph", args.ddp_static_graph)) if value is not None}
    if given and plan.mode == "fsdp":
        by = "deepspeed" if plan.deepspeed else "fsdp"
        raise ConfigError(f"config keys {next(iter(given))!r} and {by!r}: the first configures DDP, and this run "
                          "shards the model with FSDP2 instead")
    if given and plan.mode != "ddp":
        logger.info("%s: no effect in a run without DDP (one process)", ", ".join(given))
    return {"find_unused_parameters": bool(args.ddp_find_unused_parameters), **dict(given.values())}


def wrap(loss_module, plan: ParallelPlan, device: "torch.device", mixed_dtype: Optional["torch.dtype"],
         ddp: dict, checkpoint_dirs: tuple = ()):
    """Move ``loss_module`` to ``device`` and wrap it per ``plan``; return the module the loop calls. ``ddp``: the
    arguments of DistributedDataParallel (:func:`ddp_options`). ``checkpoint_dirs``: where ``init_on_meta`` reads
    the weights (the model, then a checkpoint resumed from)."""
    import torch

    if plan.mode == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        _single_process_group(device)
        mp = MixedPrecisionPolicy(param_dtype=mixed_dtype, reduce_dtype=torch.float32) if mixed_dtype else MixedPrecisionPolicy()
        options = dict(mp_policy=mp, reshard_after_forward=plan.reshard_after_forward)
        if plan.offload:
            pin = plan.pin_memory and torch.cuda.is_available()  # pinning needs an accelerator
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=pin)
        if plan.shard_size is not None:
            options["mesh"] = hsdp_mesh(device, plan.shard_size)
        layers = decoder_layers(loss_module.model)
        _check_layer_classes(layers, plan.layer_classes)
        full = _rank0_state(loss_module) if plan.from_rank0 else None
        buffers = {n: b.detach().clone() for n, b in loss_module.named_buffers()} if plan.from_checkpoint else None
        for layer in layers:
            fully_shard(layer, **options)
        fully_shard(loss_module, **options)
        if plan.from_rank0:
            _fill_from_rank0(loss_module, full, device)
        if plan.from_checkpoint:
            _fill_from_checkpoint(loss_module, checkpoint_dirs, device, buffers)
        if plan.offload:
            _buffers_to(loss_module, device)  # sharded parameters stay on CPU; FSDP2 moves them per use
        else:
            loss_module.to(device)
        return loss_module
    loss_module.to(device)
    if plan.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(loss_module, device_ids=ids, **ddp)
    return loss_module


def _rank0_state(module) -> Optional[tuple[dict, dict]]:
    """On rank 0, references to the full parameters and buffers (no copy); None on the meta ranks."""
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return None
    return dict(module.state_dict()), {n: b for n, b in module.named_buffers()}


def _fill_from_rank0(module, full: Optional[tuple[dict, dict]], device: "torch.device") -> None:
    """``init_on_rank0``: allocate every rank's shards and buffers, then receive them from rank 0."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module.to_empty(device=device)
    config = getattr(module.model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and hasattr(module.model, "tie_weights"):
        module.model.tie_weights()
    state, buffers = full if full is not None else ({}, {})
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in module.named_buffers():  # non-persistent buffers (rotary frequencies) are not in the state
        if full is not None:
            buf.copy_(buffers[name])
        dist.broadcast(buf, src=0)
    if dist.get_rank() == 0:
        from lmf.extras.logging import get_logger

        get_logger(__name__).info("init_on_rank0: rank 0 read the checkpoint and sent %d process(es) "
                                             "their shards", dist.get_world_size() - 1)


def _safetensors_files(path: str) -> list[str]:
    import glob

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    files = [f for f in files if not os.path.basename(f).startswith(("adapter_", "value_head"))]
    if not files:
        raise LmfError(f"init_on_meta: {path} holds no safetensors weights to read the shards from; use init_on_rank0")
    return files


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


class SafetensorsRows:
    """Reads rows of the tensors of one safetensors file with plain reads (``os.pread``), not a memory map: a
    rank reading its shard keeps only the shard in memory, not the pages of the whole file."""

    def __init__(self, path: str) -> None:
        import json
        import struct

        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", self._read(8, 0))
            self.header = json.loads(self._read(size, 8))
        except (struct.error, ValueError, OSError) as exc:
            os.close(self.fd)
            raise LmfError(f"init_on_meta: {path} is not a readable safetensors file ({exc})") from exc
        self.header.pop("__metadata__", None)
        self.base = 8 + size

    def _read(self, length: int, offset: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (``pread`` may return fewer, e.g. above 2 GiB)."""
        chunks, done = [], 0
        while done < length:
            chunk = os.pread(self.fd, length - done, offset + done)
            if not chunk:
                raise LmfError(f"init_on_meta: {self.path} ends before the data its header describes")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def shape(self, key: str) -> list[int]:
        return list(self.header[key]["shape"])

    def keys(self) -> list[str]:
        return list(self.header)

    def rows(self, key: str, start: int, stop: int):
        """Rows ``start:stop`` (along dim 0) of tensor ``key``, as a torch tensor."""
        import torch

        entry = self.header[key]
        dtype = getattr(torch, _SAFETENSORS_DTYPES[entry["dtype"]])
        shape = entry["shape"]
        begin, end = entry["data_offsets"]
        if not shape:
            start, stop, row_bytes = 0, 1, end - begin
        else:
            row_bytes = (end - begin) // shape[0] if shape[0] else 0
        data = self._read((stop - start) * row_bytes, self.base + begin + start * row_bytes)
        out = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        return out.reshape([stop - start, *shape[1:]] if shape else [])

    def close(self) -> None:
        os.close(self.fd)


def _fill_from_checkpoint(module, checkpoint_dirs: tuple, device: "torch.device", buffers: dict) -> None:
    """``init_on_meta``: allocate this rank's shards, copy each one out of the checkpoint's safetensors (reading only
    the rank's rows of every tensor), and put back the rank's own buffers. Every parameter must be found (a model
    whose weights are renamed or converted at load time is refused: use init_on_rank0)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    module.to_empty(device=device)
    config = getattr(module.model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and hasattr(module.model, "tie_weights"):
        module.model.tie_weights()
    params = dict(module.named_parameters(remove_duplicate=True))
    prefix = "model."  # the loss module holds the causal LM as .model; checkpoints name the causal LM's parameters
    filled: set[str] = set()
    with torch.no_grad():
        for path in checkpoint_dirs:
            for file in _safetensors_files(path):
                reader = SafetensorsRows(file)
                try:
                    for key in reader.keys():
                        param = params.get(prefix + key)
                        if param is None:
                            continue
                        if reader.shape(key) != list(param.shape):
                            raise LmfError(f"init_on_meta: {key} is {reader.shape(key)} in {file} but "
                                           f"{list(param.shape)} in the model (resized embeddings, or weights converted "
                                           "at load time); use init_on_rank0")
                        rows = (0, param.shape[0] if param.dim() else 1)
                        target = param
                        if isinstance(param, DTensor):
                            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                                                 param.placements)
                            target = param.to_local()
                            if param.dim() and all(isinstance(p, Shard) and p.dim == 0 or not isinstance(p, Shard)
                                                   for p in param.placements):
                                rows = (offset[0], offset[0] + shape[0])  # dim-0 shards: this rank's rows only
                            else:  # another layout: read the tensor whole, keep this rank's part
                                full = reader.rows(key, *rows)
                                target.copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])
                                filled.add(prefix + key)
                                continue
                        target.copy_(reader.rows(key, *rows).to(target.dtype).reshape(target.shape))
                        filled.add(prefix + key)
                finally:
                    reader.close()
        for name, buf in module.named_buffers():
            buf.copy_(buffers[name].to(buf.device))
    missing = sorted(set(params) - filled)
    if missing:
        raise LmfError(f"init_on_meta: {', '.join(m[len(prefix):] for m in missing[:3])} not found in the safetensors "
                       f"of {', '.join(checkpoint_dirs)} (a model whose weights are renamed or converted at load time); "
                       "use init_on_rank0")
    if dist.get_rank() == 0:
        from lmf.extras.logging import get_logger

        get_logger(__name__).info("init_on_meta: every rank read its own shards of %d tensors from %s",
                                             len(filled), " + ".join(checkpoint_dirs))


def _single_process_group(device: "torch.device") -> None:
    """FSDP2 needs a process group; one process (offload on one GPU) gets a group of one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def _buffers_to(module, device: "torch.device") -> None:
    for sub in module.modules():
        for name, buf in list(sub._buffers.items()):
            if buf is not None:
                sub._buffers[name] = buf.to(device)


def placement_bytes(module, optimizer) -> dict[str, dict[str, int]]:
    """Bytes of this rank's parameter shards and optimizer state per device type, between steps."""
    out: dict[str, dict[str, int]] = {"parameters": {}, "optimizer state": {}}

    def add(kind: str, tensor) -> None:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        out[kind][local.device.type] = out[kind].get(local.device.type, 0) + local.numel() * local.element_size()

    for p in module.parameters():
        add("parameters", p)
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "numel") and value.dim() > 0:
                add("optimizer state", value)
    return out


def log_offload(module, optimizer, is_main: bool) -> bool:
    """After the first step under CPU offload: say where parameters and optimizer state really live."""
    placement = placement_bytes(module, optimizer)
    if is_main:
        logger.info("offload: between steps, rank 0 holds %s", "; ".join(
            f"{kind} " + ", ".join(f"{b / 2**20:.1f} MiB on {dev}" for dev, b in sorted(where.items()))
            for kind, where in placement.items()))
    return True


def hsdp_mesh(device: "torch.device", shard_size: int):
    """The 2-D ``(replicate, shard)`` device mesh of hybrid sharding: consecutive ranks form a shard group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def _check_layer_classes(layers: list, wanted: tuple) -> None:
    """``transformer_layer_cls_to_wrap`` must name the decoder layers lmf wraps."""
    if not wanted:
        return
    have = {type(layer).__name__ for layer in layers}
    if not have & set(wanted):
        raise ConfigError(f"config key 'fsdp_config.transformer_layer_cls_to_wrap': {', '.join(wanted)} is not the "
                          f"model's decoder layer ({', '.join(sorted(have))}), which lmf wraps")


@contextlib.contextmanager
def gradient_sync(wrapped, plan: ParallelPlan, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-batches that are not the last of an accumulation window."""
    if enabled or plan.mode == "single":
        yield
    elif plan.mode == "ddp":
        with wrapped.no_sync():
            yield
    else:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
