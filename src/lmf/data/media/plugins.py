"""Vision plugins: how a model family turns ``<image>`` placeholders into vision tokens and images into pixels.

:class:`QwenVLPlugin` (templates ``qwen2_vl``, ``qwen3_vl``, ``qwen3_vl_nothink``, ... whose LLaMA-Factory plugin is
``Qwen2VLPlugin`` / ``Qwen3VLPlugin``): each ``<image>`` becomes ``<|vision_start|>`` + ``<|image_pad|>`` x
(patches / merge_size^2) + ``<|vision_end|>``, the patch count from the image processor's own resize of the
regularized image (:mod:`lmf.data.media.images`), as in LLaMA-Factory 0.9.5.

:func:`media_plugin_for` picks the plugin of a template for a model directory (None for text models).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from lmf.data.media import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from lmf.data.media.images import image_size, load_image, regularized_size
from lmf.extras.errors import ConfigError, NotAvailableError

#: LLaMA-Factory's mm_plugin names lmf implements -> plugin class name.
IMPLEMENTED = {"Qwen2VLPlugin": "QwenVLPlugin", "Qwen3VLPlugin": "QwenVLPlugin"}
#: ``mm_token_type_ids`` values (transformers' ProcessorMixin.create_mm_token_type_ids).
IMAGE_TYPE, VIDEO_TYPE = 1, 2


@dataclass
class MediaOptions:
    """The config's image/video keys (LLaMA-Factory's ProcessorArguments)."""

    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32

    @classmethod
    def from_data_args(cls, data_args) -> "MediaOptions":
        return cls(data_args.image_max_pixels, data_args.image_min_pixels)


@dataclass
class QwenVLPlugin:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL images."""

    image_processor: Any
    tokenizer: Any
    options: MediaOptions = field(default_factory=MediaOptions)
    name: str = "Qwen2VLPlugin"
    image_token: str = "<|image_pad|>"
    video_token: str = "<|video_pad|>"
    vision_bos: str = "<|vision_start|>"
    vision_eos: str = "<|vision_end|>"

    def __post_init__(self) -> None:
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(self.video_token)
        self.merge_length = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        #: never labels, even with train_on_prompt (LLaMA-Factory labels them then; lmf deviates on purpose)
        self.vision_token_ids = tuple(self.tokenizer.convert_tokens_to_ids(t) for t in
                                      (self.image_token, self.video_token, self.vision_bos, self.vision_eos))

    def cache_identity(self) -> dict:
        """What the preprocessed data depends on besides the text (part of the cache key)."""
        return {"plugin": self.name, "options": vars(self.options), "image_processor": self.image_processor.to_dict()}

    def _regularized(self, path: str) -> tuple[int, int]:
        o = self.options
        return regularized_size(image_size(path), o.image_max_pixels, o.image_min_pixels, qwen_rules=True)

    def image_seqlen(self, path: str) -> int:
        """Vision tokens of the image at ``path`` (its header is read, not its pixels)."""
        width, height = self._regularized(path)
        return int(self.image_processor.get_number_of_image_patches(height, width, {})) // self.merge_length

    def expand(self, messages: list[dict], images: list[str]) -> tuple[list[dict], int]:
        """(messages with each ``<image>`` expanded, total image tokens)."""
        seqlens = [self.image_seqlen(p) for p in images]
        out, used = [], 0
        for message in messages:
            content = message["content"]
            while IMAGE_PLACEHOLDER in content:
                run = self.image_token * seqlens[used]
                content = content.replace(IMAGE_PLACEHOLDER, f"{self.vision_bos}{run}{self.vision_eos}", 1)
                used += 1
            if VIDEO_PLACEHOLDER in content:
                raise NotAvailableError("videos are not implemented in lmf yet (images only)")
            out.append(dict(message, content=content))
        return out, sum(seqlens)

    def count_image_tokens(self, ids: list[int]) -> int:
        return ids.count(self.image_token_id)

    def load_images(self, paths: list[str]) -> list:
        o = self.options
        return [load_image(p, o.image_max_pixels, o.image_min_pixels, qwen_rules=True) for p in paths]

    def model_inputs(self, paths: list[str], input_ids) -> dict:
        """``pixel_values``, ``image_grid_thw`` of ``paths`` (in row order) and ``mm_token_type_ids`` of ``input_ids``."""
        inputs: dict = {}
        if paths:
            inputs.update(self.image_processor(self.load_images(paths), return_tensors="pt"))
        types = (input_ids == self.image_token_id).to(input_ids.dtype) * IMAGE_TYPE
        types += (input_ids == self.video_token_id).to(input_ids.dtype) * VIDEO_TYPE
        inputs["mm_token_type_ids"] = types
        return dict(inputs)


def has_image_processor(model_path: str) -> bool:
    return os.path.isfile(os.path.join(model_path, "preprocessor_config.json"))


def media_plugin_for(template, model_path: str, tokenizer, data_args, trust_remote_code: bool = False):
    """The vision plugin of ``template`` for the model at ``model_path``, or None (a text template, or a model
    without an image processor: text only)."""
    name = getattr(template, "mm_plugin", None)
    if not name or not os.path.isdir(model_path) or not has_image_processor(model_path):
        return None
    if name not in IMPLEMENTED:
        raise NotAvailableError(
            f"template {template.name!r}: images with LLaMA-Factory's {name} are not implemented in lmf (vision-language "
            f"templates lmf implements: those of {', '.join(sorted(IMPLEMENTED))}, e.g. qwen2_vl, qwen3_vl)")
    from transformers import AutoImageProcessor

    try:
        image_processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"model_name_or_path={model_path!r}: cannot load its image processor: {exc}") from exc
    if not hasattr(image_processor, "get_number_of_image_patches"):
        raise NotAvailableError(f"{type(image_processor).__name__}: lmf's {name} needs a Qwen-VL image processor")
    return QwenVLPlugin(image_processor, tokenizer, MediaOptions.from_data_args(data_args), name=name)
