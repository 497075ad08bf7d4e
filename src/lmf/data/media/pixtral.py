"""Pixtral's vision plugin (LLaMA-Factory's PixtralPlugin: templates ``pixtral``, ``ministral3``, ``mistral_small``)."""

from __future__ import annotations

from dataclasses import dataclass

from lmf.data.media.plugin_base import MediaPlugin


@dataclass
class PixtralPlugin(MediaPlugin):
    """Pixtral / Mistral 3: one ``[IMG]`` per (merged) patch, ``[IMG_BREAK]`` after each row of them, the last one
    ``[IMG_END]``; rows and columns come from the size the model's image processor gives the image after
    LLaMA-Factory's resize (its longest side fitted, its sides rounded up to patches), as LLaMA-Factory reads them
    from ``image_sizes``. The processor's ``patch_size``, ``spatial_merge_size`` and tokens come from
    ``processor_config.json``."""

    image_token: str = "[IMG]"
    break_token: str = "[IMG_BREAK]"
    end_token: str = "[IMG_END]"

    def __post_init__(self) -> None:
        config = self.processor_config
        self.image_token = config.get("image_token") or self.image_token
        self.break_token = config.get("image_break_token") or self.break_token
        self.end_token = config.get("image_end_token") or self.end_token
        self.patch = int(config.get("patch_size") or 16) * int(config.get("spatial_merge_size") or 1)
        super().__post_init__()

    def vision_tokens(self) -> tuple[str, ...]:
        return (self.image_token, self.break_token, self.end_token)

    def processed_size(self, path: str) -> tuple[int, int]:
        """(height, width) of the image at ``path`` as the model sees it (the processor's ``image_sizes`` for its
        resized size)."""
        height, width = self.blank_output(self.resized_size(path), "image_sizes").tolist()
        return int(height), int(width)

    def image_seqlen(self, path: str) -> int:
        height, width = self.processed_size(path)
        return (height // self.patch) * (width // self.patch)

    def image_text(self, path: str) -> str:
        height, width = self.processed_size(path)
        rows = [self.image_token * (width // self.patch)] * (height // self.patch)
        return self.break_token.join(rows) + self.end_token

    def expected_tokens(self, inputs: dict, pictures: int) -> int:
        return sum((h // self.patch) * (w // self.patch) for h, w in inputs["image_sizes"].tolist())
