"""Llama 3.2 Vision's plugin (LLaMA-Factory's MllamaPlugin): one ``<|image|>`` token per image, which the language
model's cross-attention layers attend from; images as tiles, grouped per row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lmf.data.media.plugin_base import MediaPlugin
from lmf.extras.errors import NotAvailableError


@dataclass
class MllamaPlugin(MediaPlugin):
    """``<image>`` becomes ``<|image|>``. The inputs of a batch: every row's images as the image processor's tiles
    (``pixel_values [rows, images, tiles, 3, size, size]``, aspect-ratio ids and masks) and the
    ``cross_attention_mask [rows, length, images, tiles]`` saying which text tokens see which image (each image's
    tokens from its ``<|image|>`` on, transformers' own rule)."""

    image_token: str = "<|image|>"

    def image_text(self, path: str) -> str:
        return self.image_token

    def video_text(self, path: str) -> str:
        raise NotAvailableError(f"videos with {self.name}: Llama 3.2 Vision takes images only")

    def model_inputs(self, paths: list[str], input_ids, videos: tuple = (), audios: tuple = ()) -> dict:
        import torch
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        if videos or audios:
            raise NotAvailableError(f"videos or audio with {self.name}: Llama 3.2 Vision takes images only")
        if not paths:
            return {}
        images, rows, start = self.load_images(paths), [], 0
        for count in (input_ids == self.image_token_id).sum(-1).tolist():  # one token per image: the row's images
            rows.append(images[start:start + count])
            start += count
        inputs = dict(self.image_processor(rows, return_tensors="pt"))
        token_masks = [get_cross_attention_token_mask(row, self.image_token_id) for row in input_ids.tolist()]
        dense = convert_sparse_cross_attention_mask_to_dense(
            token_masks, num_tiles=inputs.pop("num_tiles"), max_num_tiles=self.image_processor.max_image_tiles,
            length=input_ids.shape[1])
        inputs["cross_attention_mask"] = torch.from_numpy(dense)
        return inputs

    def expected_tokens(self, inputs: dict, pictures: int) -> Optional[int]:
        return pictures
