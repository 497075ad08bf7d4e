"""InternVL's plugin (LLaMA-Factory's InternVLPlugin; transformers' ``-hf`` checkpoints): images, each cut into 448-pixel
tiles by the model's image processor (GotOcr2) when asked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmf.data.media.plugin_base import MediaPlugin
from lmf.extras.errors import NotAvailableError

#: What LLaMA-Factory asks of the image processor under ``crop_to_patches: true``.
CROP_TO_PATCHES = {"crop_to_patches": True, "max_patches": 12, "min_patches": 1}


@dataclass
class InternVLPlugin(MediaPlugin):
    """``<img>`` + ``<IMG_CONTEXT>`` x (``image_seq_length`` x tiles) + ``</img>`` per image. The tiles are the image
    processor's: its own setting, or LLaMA-Factory's (up to 12 tiles and a thumbnail) with ``crop_to_patches: true``."""

    image_token: str = "<IMG_CONTEXT>"
    image_start: str = "<img>"
    image_end: str = "</img>"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.seqlen = int(self.processor_config.get("image_seq_length", 256))
        self.patch_kwargs = dict(CROP_TO_PATCHES) if self.options.crop_to_patches else {}

    def vision_tokens(self) -> tuple[str, ...]:
        return (self.image_token, self.image_start, self.image_end)

    def tiles(self, path: str) -> int:
        """Tiles of the image at ``path`` once resized (the processor's count for an image of that size)."""
        return int(self.blank_output(self.resized_size(path), "num_patches", **self.patch_kwargs))

    def image_text(self, path: str) -> str:
        return f"{self.image_start}{self.image_token * (self.seqlen * self.tiles(path))}{self.image_end}"

    def video_text(self, path: str) -> str:
        raise NotAvailableError(f"videos with {self.name} are not implemented in lmf yet (its images are)")

    def image_inputs(self, paths: list[str]) -> dict:
        """``pixel_values``: every image's tiles, ``[tiles, 3, size, size]``."""
        out = self.image_processor(self.load_images(paths), return_tensors="pt", **self.patch_kwargs)
        return {"pixel_values": out["pixel_values"]}

    def expected_tokens(self, inputs: dict, pictures: int) -> Optional[int]:
        return int(inputs["pixel_values"].shape[0]) * self.seqlen if "pixel_values" in inputs else 0
