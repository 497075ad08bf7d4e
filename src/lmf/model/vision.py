"""Multimodal (vision- and audio-language) models: which parts are the vision (or audio) tower, the projector and the
language model, and what ``freeze_vision_tower`` / ``freeze_multi_modal_projector`` / ``freeze_language_model`` keep
frozen (module keys as LLaMA-Factory's ``COMPOSITE_MODELS``, so the same parameters train; an audio tower is frozen
by ``freeze_vision_tower``, as there).

LoRA: ``lora_target`` names (or ``all``) are matched to full module names outside the frozen parts, so a vision
tower whose MLP reuses the language model's names (Qwen2.5-VL's ``gate_proj``) is not adapted unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class CompositeModel:
    projector: tuple[str, ...]
    vision: tuple[str, ...]
    language: tuple[str, ...]
    lora_conflict: tuple[str, ...] = ()
    #: the first transformers release whose model class has the layout lmf drives (a base model under ``.model``)
    min_transformers: str = ""


_QWEN2_VL = CompositeModel(projector=("visual.merger",), vision=("visual.patch_embed", "visual.blocks"),
                           language=("language_model", "lm_head"), lora_conflict=("patch_embed",))
COMPOSITE_MODELS: dict[str, CompositeModel] = {
    "qwen2_vl": _QWEN2_VL,
    "qwen2_5_vl": _QWEN2_VL,
    "llava": CompositeModel(projector=("multi_modal_projector",), vision=("vision_tower",),
                            language=("language_model", "lm_head")),
    "llava_next": CompositeModel(projector=("multi_modal_projector",), vision=("vision_tower",),
                                 language=("language_model", "lm_head")),  # image_newline: trained with full
    "llava_next_video": CompositeModel(projector=("multi_modal_projector",), vision=("vision_tower",),
                                       language=("language_model", "lm_head")),
    "gemma3": CompositeModel(projector=("multi_modal_projector",), vision=("vision_tower",),
                             language=("language_model", "lm_head")),
    "internvl": CompositeModel(projector=("multi_modal_projector",), vision=("vision_tower",),
                               language=("language_model", "lm_head")),
    "glm4v": CompositeModel(projector=("visual.merger",), vision=("visual.patch_embed", "visual.blocks"),
                            language=("language_model", "lm_head"), lora_conflict=("patch_embed",)),
    "mllama": CompositeModel(projector=("multi_modal_projector",), vision=("vision_model",),
                             language=("language_model", "lm_head")),
    "qwen2_audio": CompositeModel(projector=("multi_modal_projector",), vision=("audio_tower",),
                                  language=("language_model", "lm_head"), min_transformers="5.10"),
    # LLaMA-Factory registers video_llava with its default "vision_tower", a module Video-LLaVA does not have (its towers
    # are image_tower and video_tower): there freeze_vision_tower freezes nothing and LoRA adapts the towers; lmf
    # freezes and leaves out both towers, as the key says
    "video_llava": CompositeModel(projector=("multi_modal_projector",), vision=("image_tower", "video_tower"),
                                  language=("language_model", "lm_head")),
    "qwen3_vl": CompositeModel(projector=("visual.merger",),
                               vision=("visual.pos_embed", "visual.patch_embed", "visual.blocks",
                                       "visual.deepstack_merger_list"),
                               language=("language_model", "lm_head"), lora_conflict=("patch_embed",)),
}


def is_vision_config(config) -> bool:
    """A multimodal model's config: it has a vision (or audio) tower's config."""
    return getattr(config, "vision_config", None) is not None or getattr(config, "audio_config", None) is not None


def composite_of(config) -> CompositeModel:
    model_type = getattr(config, "model_type", None)
    if model_type not in COMPOSITE_MODELS:
        raise NotAvailableError(f"multimodal model type {model_type!r} is not implemented in lmf (implemented: "
                                f"{', '.join(COMPOSITE_MODELS)})")
    parts = COMPOSITE_MODELS[model_type]
    if parts.min_transformers:
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) < Version(parts.min_transformers):
            raise NotAvailableError(f"{model_type} models need transformers >= {parts.min_transformers} in lmf (its "
                                    f"model class with a base model, {type(config).__name__.replace('Config', 'Model')}"
                                    f"); this is {transformers.__version__}: pip install -U transformers")
    return parts


def frozen_keys(config, finetuning) -> set[str]:
    """Module name fragments whose parameters stay frozen (empty for a text model)."""
    if not is_vision_config(config):
        return set()
    parts = composite_of(config)
    keys: set[str] = set()
    if finetuning.freeze_vision_tower:
        keys.update(parts.vision)
    if finetuning.freeze_multi_modal_projector:
        keys.update(parts.projector)
    if finetuning.freeze_language_model:
        keys.update(parts.language)
    return keys


def check_vision_keys(config, finetuning) -> None:
    """The freeze_* keys change nothing on a text model: setting them away from their defaults is refused."""
    if is_vision_config(config):
        composite_of(config)
        return
    changed = [k for k, default in (("freeze_vision_tower", True), ("freeze_multi_modal_projector", True),
                                    ("freeze_language_model", False)) if getattr(finetuning, k) != default]
    if changed:
        raise ConfigError(f"config key {changed[0]!r}: the model has no vision tower (a text model); remove the key")


def freeze_frozen_parts(model, finetuning) -> None:
    """Full / freeze tuning: the frozen parts' parameters get ``requires_grad=False``."""
    keys = frozen_keys(model.config, finetuning)
    if not keys:
        return
    count = 0
    for name, param in model.named_parameters():
        if any(k in name for k in keys) and param.requires_grad:
            param.requires_grad_(False)
            count += 1
    logger.info("vision-language model: %s frozen (%d tensors)", ", ".join(sorted(keys)), count)


def vision_lora_targets(model, finetuning, targets: list[str]) -> list[str]:
    """Full names of the modules LoRA adapts: leaf name in ``targets``, outside the frozen parts and the modules
    LoRA cannot wrap (the patch embedding's Conv3d)."""
    keys = frozen_keys(model.config, finetuning) | set(composite_of(model.config).lora_conflict)
    wanted = set(targets)
    names = [name for name, module in model.named_modules()  # leaf modules only: a merger's "0" is not layer 0
             if name and name.split(".")[-1] in wanted and not any(k in name for k in keys)
             and next(module.children(), None) is None]
    if not names:
        raise ConfigError(f"config key 'lora_target': no module named {', '.join(targets)} outside the frozen "
                          f"parts ({', '.join(sorted(keys))})")
    return names


def uncheckpoint_frozen_parts(model, finetuning) -> None:
    """No activation checkpointing inside frozen parts (the vision tower): nothing there needs a gradient, so
    recomputing its activations would only cost time."""
    keys = frozen_keys(model.config, finetuning)
    if not keys:
        return
    off = 0
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True and any(k in name for k in keys):
            module.gradient_checkpointing = False
            off += 1
    if off:
        logger.info("activation checkpointing: off for %d layer(s) of the frozen %s", off, ", ".join(sorted(keys)))
