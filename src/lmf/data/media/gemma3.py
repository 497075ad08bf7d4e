"""Gemma 3's vision plugin (LLaMA-Factory's Gemma3Plugin)."""

from __future__ import annotations

from dataclasses import dataclass

from lmf.data.media.plugin_base import MediaPlugin


#: LLaMA-Factory's pan-and-scan settings (``image_do_pan_and_scan``), passed to Gemma 3's image processor.
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                "pan_and_scan_min_ratio_to_activate": 1.2}


@dataclass
class Gemma3Plugin(MediaPlugin):
    """Gemma 3: ``\n\n<start_of_image>`` + ``<image_soft_token>`` x image_seq_length + ``<end_of_image>\n\n``;
    ``token_type_ids`` mark the image tokens (bidirectional attention within an image). With
    ``image_do_pan_and_scan``, LLaMA-Factory's text around the image and its crops: "Here is the original image
    <image> and here are some crops to help you see better <crop> <crop>", the crops counted by the image processor
    for the image's resized size."""

    image_token: str = "<image_soft_token>"
    boi_token: str = "<start_of_image>"
    eoi_token: str = "<end_of_image>"

    def __post_init__(self) -> None:
        self.image_token = getattr(self.tokenizer, "image_token", None) or self.image_token
        self.boi_token = getattr(self.tokenizer, "boi_token", None) or self.boi_token
        self.eoi_token = getattr(self.tokenizer, "eoi_token", None) or self.eoi_token
        super().__post_init__()
        self.seqlen = int(self.processor_config.get("image_seq_length", 256))
        self.pan_and_scan = PAN_AND_SCAN if self.options.image_do_pan_and_scan else {"do_pan_and_scan": False}

    def vision_tokens(self) -> tuple[str, ...]:
        return (self.image_token, self.boi_token, self.eoi_token)

    def image_seqlen(self, path: str) -> int:
        return self.seqlen * (1 + self.crops(path))

    def crops(self, path: str) -> int:
        """Pan-and-scan crops of the image at ``path`` (0 without image_do_pan_and_scan)."""
        if not self.options.image_do_pan_and_scan:
            return 0
        return int(self.blank_output(self.resized_size(path), "num_crops", **self.pan_and_scan))

    def image_text(self, path: str) -> str:
        image = f"\n\n{self.boi_token}{self.image_token * self.seqlen}{self.eoi_token}\n\n"
        if not self.options.image_do_pan_and_scan:
            return image
        return (f"Here is the original image {image} and here are some crops to help you see better "
                + " ".join([image] * self.crops(path)))

    def token_types(self, input_ids) -> dict:
        return {"token_type_ids": (input_ids == self.image_token_id).to(input_ids.dtype)}

    def image_inputs(self, paths: list[str]) -> dict:
        inputs = dict(self.image_processor(self.load_images(paths), return_tensors="pt", **self.pan_and_scan))
        inputs.pop("num_crops", None)  # pan-and-scan bookkeeping of the processor, not a model input
        return inputs

    def expected_tokens(self, inputs: dict, pictures: int) -> int:
        return int(inputs["pixel_values"].shape[0]) * self.seqlen if "pixel_values" in inputs else 0
