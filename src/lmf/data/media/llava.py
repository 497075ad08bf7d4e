"""The LLaVA family's vision plugins: LLaVA-1.5 (LLaMA-Factory's LlavaPlugin) and LLaVA-NeXT (LlavaNextPlugin)."""

from __future__ import annotations

from dataclasses import dataclass

from lmf.data.media.plugin_base import MediaPlugin


@dataclass
class LlavaPlugin(MediaPlugin):
    """LLaVA-1.5 style: ``<image>`` x N, N from the processed image size, the patch size and the feature selection
    (``processor_config.json``), as LLaMA-Factory computes it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from PIL import Image

        pixels = self.image_processor([Image.new("RGB", (64, 64))], return_tensors="pt")["pixel_values"][0]
        height, width = pixels.shape[-2:]
        patch = int(self.processor_config.get("patch_size") or 14)
        seqlen = (height // patch) * (width // patch) + int(self.processor_config.get("num_additional_image_tokens", 0))
        if self.processor_config.get("vision_feature_select_strategy") == "default":
            seqlen -= 1
        self.seqlen = int(seqlen)

    def image_seqlen(self, path: str) -> int:
        return self.seqlen


@dataclass
class LlavaNextPlugin(MediaPlugin):
    """LLaVA-NeXT ("anyres"): ``<image>`` x N, N from the size of the image after LLaMA-Factory's resize, through
    the processor's own count (the base patch, the grid of ``image_grid_pinpoints`` tiles without their padding, a
    newline per row), less one with the ``default`` feature selection, as LLaMA-Factory's LlavaNextPlugin."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from functools import partial
        from types import SimpleNamespace

        from PIL import Image
        from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

        # LLaMA-Factory takes the tile size from the first tile of the processed images: the crop size
        pixels = self.image_processor([Image.new("RGB", (64, 64))], return_tensors="pt")["pixel_values"]
        self.tile = tuple(int(x) for x in pixels.shape[-2:])
        counter = SimpleNamespace(image_processor=self.image_processor,
                                  patch_size=int(self.processor_config.get("patch_size") or 14),
                                  num_additional_image_tokens=int(
                                      self.processor_config.get("num_additional_image_tokens", 0)))
        counter._get_unpadded_features = partial(LlavaNextProcessor._get_unpadded_features, counter)
        self._features = partial(LlavaNextProcessor._get_number_of_features, counter)
        self._less_one = self.processor_config.get("vision_feature_select_strategy") == "default"

    def image_seqlen(self, path: str) -> int:
        width, height = self.resized_size(path)
        return int(self._features(height, width, *self.tile)) - int(self._less_one)
