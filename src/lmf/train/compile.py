"""``torch_compile``: the decoder blocks compiled in place, close to how torchtitan compiles its transformer blocks:
each block's modules (attention, MLP, norms) are compiled, one graph per module type reused across the blocks; the
residual additions, the embeddings, the head and lmf's chunked loss stay eager. Modules, not whole blocks, because
transformers checkpoints a block by wrapping its ``forward``: a compiled block would trace the checkpoint itself
and break its graph there (a compiled module inside it is recomputed like any other). ``nn.Module.compile`` keeps
the modules and their state-dict names, so checkpoints, adapters and resumes are the same files as an eager run's.
``torch_compile_backend`` (default ``inductor``) and ``torch_compile_mode`` are torch.compile's ``backend`` and
``mode``."""

from __future__ import annotations

from lmf.extras.logging import get_logger

logger = get_logger(__name__)

def compile_decoder_blocks(model, args) -> int:
    """Compile the decoder blocks of ``model`` (before DDP/FSDP wrapping) when ``torch_compile``; the block count."""
    if not args.torch_compile:
        return 0
    from lmf.train.parallel import decoder_layers

    kwargs = {"backend": args.torch_compile_backend or "inductor"}
    if args.torch_compile_mode:
        kwargs["mode"] = args.torch_compile_mode
    layers = decoder_layers(model)
    modules = [child for layer in layers for child in layer.children()]
    for module in modules:
        module.compile(**kwargs)
    logger.info("torch_compile: %d decoder blocks compiled, %d modules (backend %s%s); the first steps include "
                "compilation", len(layers), len(modules), kwargs["backend"],
                f", mode {kwargs['mode']}" if "mode" in kwargs else "")
    return len(layers)
