"""GLM-4.1V / GLM-4.5V's plugin (LLaMA-Factory's GLM4VPlugin, Qwen2-VL's rules with GLM's tokens): images."""

from __future__ import annotations

from dataclasses import dataclass

from lmf.data.media.qwen_vl import QwenVLPlugin
from lmf.extras.errors import NotAvailableError


@dataclass
class GLM4VPlugin(QwenVLPlugin):
    """``<|begin_of_image|>`` + ``<|image|>`` x (patches / merge_size^2) + ``<|end_of_image|>``: the Qwen-VL
    family's resize rules and patch count (GLM-4V's image processor is Qwen2-VL's), GLM's tokens."""

    image_token: str = "<|image|>"
    video_token: str = "<|video|>"
    vision_bos: str = "<|begin_of_image|>"
    vision_eos: str = "<|end_of_image|>"

    def video_text(self, path: str) -> str:
        raise NotAvailableError(f"videos with {self.name} are not implemented in lmf yet (its images are)")
