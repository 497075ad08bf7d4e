"""Gemma 3's vision plugin (LLaMA-Factory's Gemma3Plugin)."""

from __future__ import annotations

from dataclasses import dataclass

from lmf.data.media.plugin_base import MediaPlugin
from lmf.extras.errors import NotAvailableError


@dataclass
class Gemma3Plugin(MediaPlugin):
    """Gemma 3: ``\n\n<start_of_image>`` + ``<image_soft_token>`` x image_seq_length + ``<end_of_image>\n\n``;
    ``token_type_ids`` mark the image tokens (bidirectional attention within an image)."""

    image_token: str = "<image_soft_token>"
    boi_token: str = "<start_of_image>"
    eoi_token: str = "<end_of_image>"

    def __post_init__(self) -> None:
        self.image_token = getattr(self.tokenizer, "image_token", None) or self.image_token
        self.boi_token = getattr(self.tokenizer, "boi_token", None) or self.boi_token
        self.eoi_token = getattr(self.tokenizer, "eoi_token", None) or self.eoi_token
        super().__post_init__()
        self.seqlen = int(self.processor_config.get("image_seq_length", 256))
        if getattr(self.image_processor, "do_pan_and_scan", False):
            raise NotAvailableError("Gemma 3 pan-and-scan crops (do_pan_and_scan in preprocessor_config.json) are not "
                                    "implemented in lmf; set it to false")

    def vision_tokens(self) -> tuple[str, ...]:
        return (self.image_token, self.boi_token, self.eoi_token)

    def image_seqlen(self, path: str) -> int:
        return self.seqlen

    def image_text(self, path: str) -> str:
        return f"\n\n{self.boi_token}{self.image_token * self.seqlen}{self.eoi_token}\n\n"

    def token_types(self, input_ids) -> dict:
        return {"token_type_ids": (input_ids == self.image_token_id).to(input_ids.dtype)}

    def model_inputs(self, paths: list[str], input_ids, videos: tuple = ()) -> dict:
        inputs = super().model_inputs(paths, input_ids, videos)
        inputs.pop("num_crops", None)  # pan-and-scan bookkeeping of the processor, not a model input
        return inputs
