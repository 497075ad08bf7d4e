"""The Qwen-VL family's vision plugin (LLaMA-Factory's Qwen2VLPlugin and Qwen3VLPlugin): images and videos."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lmf.data.media.images import regularized_size
from lmf.data.media.plugin_base import IMAGE_TYPE, VIDEO_TYPE, MediaPlugin


@dataclass
class QwenVLPlugin(MediaPlugin):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: ``<|vision_start|>`` + ``<|image_pad|>`` x (patches / merge_size^2) +
    ``<|vision_end|>``; the patch count from the image processor's own resize of the regularized image, read
    from the file's header."""

    image_token: str = "<|image_pad|>"
    video_token: str = "<|video_pad|>"
    vision_bos: str = "<|vision_start|>"
    vision_eos: str = "<|vision_end|>"
    qwen_rules = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(self.video_token)
        self.merge_length = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        self.video = _video_processing(self.image_processor, self.processor_config.get("video_processor", {}))

    def count_image_tokens(self, ids: list[int]) -> int:
        return ids.count(self.image_token_id) + ids.count(self.video_token_id)

    @property
    def qwen3(self) -> bool:
        return self.name == "Qwen3VLPlugin"

    def _video_meta(self, path: str) -> dict:
        from lmf.data.media.videos import video_metadata

        return video_metadata(path, self.options.video_fps, self.options.video_maxlen)

    def video_grid(self, path: str, meta: Optional[dict] = None) -> list[int]:
        """``[t, h, w]`` patches of the video at ``path`` (``meta``: its :func:`video_metadata`, read when not
        given; container data only), as LLaMA-Factory counts them."""
        o, v = self.options, self.video
        meta = meta or self._video_meta(path)
        width, height = regularized_size((meta["width"], meta["height"]), o.video_max_pixels, o.video_min_pixels,
                                         qwen_rules=True)
        frames = len(meta["indices"]) + len(meta["indices"]) % 2
        factor = v["patch_size"] * v["merge_size"]
        if self.qwen3:  # Qwen3-VL's video resize also weighs the frame count
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

            rh, rw = smart_resize(frames, height, width, temporal_factor=v["temporal_patch_size"], factor=factor,
                                  min_pixels=v["min_pixels"], max_pixels=v["max_pixels"])
        else:
            rh, rw = _smart_resize(height, width, factor, v["min_pixels"], v["max_pixels"])
        return [math.ceil(frames / v["temporal_patch_size"]), rh // v["patch_size"], rw // v["patch_size"]]

    def video_seqlen(self, path: str) -> int:
        t, h, w = self.video_grid(path)
        return t * h * w // self.video["merge_size"] ** 2

    def video_text(self, path: str) -> str:
        """Qwen2-VL: one block of video tokens. Qwen3-VL: one block per temporal patch, each after its time
        (``<1.5 seconds>``: the mean time of the patch's frames, as its processor writes it)."""
        if not self.qwen3:
            return f"{self.vision_bos}{self.video_token * self.video_seqlen(path)}{self.vision_eos}"
        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

        o = self.options
        meta = self._video_meta(path)
        t, h, w = self.video_grid(path, meta)
        scaled = [i / meta["average_fps"] * o.video_fps for i in meta["indices"]]  # LLaMA-Factory's arithmetic
        seconds = Qwen3VLProcessor._calculate_timestamps(None, scaled, o.video_fps, self.video["merge_size"])
        block = f"{self.vision_bos}{self.video_token * (h * w // self.video['merge_size'] ** 2)}{self.vision_eos}"
        return "".join(f"<{seconds[i]:.1f} seconds>{block}" for i in range(t))

    def video_inputs(self, videos: list[str]) -> dict:
        """``pixel_values_videos`` and ``video_grid_thw`` (+ ``second_per_grid_ts`` for Qwen2.5-VL)."""
        import torch

        from lmf.data.media.videos import load_frames, qwen_video_patches

        o, v = self.options, self.video
        patches, grids, seconds = [], [], []
        for path in videos:
            meta = self._video_meta(path)
            t, h, w = self.video_grid(path, meta)
            frames = load_frames(path, meta["indices"], o.video_max_pixels, o.video_min_pixels)
            flat, grid = qwen_video_patches(frames, (h * v["patch_size"], w * v["patch_size"]), v["patch_size"],
                                            v["temporal_patch_size"], v["merge_size"], v["mean"], v["std"])
            patches.append(flat)
            grids.append(grid)
            seconds.append(v["temporal_patch_size"] / (len(meta["indices"]) / meta["duration"]) if meta.get("duration")
                           else v["temporal_patch_size"] / o.video_fps)
        inputs = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
        if self.processor_config.get("processor_class") == "Qwen2_5_VLProcessor":
            inputs["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        return inputs

    def vision_tokens(self) -> tuple[str, ...]:
        return (self.image_token, self.video_token, self.vision_bos, self.vision_eos)

    def image_seqlen(self, path: str) -> int:
        width, height = self.resized_size(path)
        return int(self.image_processor.get_number_of_image_patches(height, width, {})) // self.merge_length

    def image_text(self, path: str) -> str:
        return f"{self.vision_bos}{self.image_token * self.image_seqlen(path)}{self.vision_eos}"

    def expected_tokens(self, inputs: dict, pictures: int) -> Optional[int]:
        total = int(inputs["image_grid_thw"].prod(-1).sum()) // self.merge_length if "image_grid_thw" in inputs else 0
        if "video_grid_thw" in inputs:
            total += int(inputs["video_grid_thw"].prod(-1).sum()) // self.video["merge_size"] ** 2
        return total

    def token_types(self, input_ids) -> dict:
        types = (input_ids == self.image_token_id).to(input_ids.dtype) * IMAGE_TYPE
        types += (input_ids == self.video_token_id).to(input_ids.dtype) * VIDEO_TYPE
        return {"mm_token_type_ids": types}


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's resize to multiples of ``factor`` within the pixel budget (transformers' own function)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def _video_processing(image_processor, video_config: dict) -> dict:
    """Patch sizes, pixel budget and normalisation of the model's video processor (``video_preprocessor_config.json``),
    else of its image processor (what LLaMA-Factory falls back to)."""
    def pick(name, default=None):
        return video_config.get(name, getattr(image_processor, name, default))

    size = pick("size", {}) or {}
    size = size if isinstance(size, dict) else vars(size)
    return {"patch_size": int(pick("patch_size", 14)), "temporal_patch_size": int(pick("temporal_patch_size", 2)),
            "merge_size": int(pick("merge_size", 2)),
            "min_pixels": int(video_config.get("min_pixels") or size.get("shortest_edge") or 3136),
            "max_pixels": int(video_config.get("max_pixels") or size.get("longest_edge") or 12845056),
            "mean": list(pick("image_mean", [0.48145466, 0.4578275, 0.40821073])),
            "std": list(pick("image_std", [0.26862954, 0.26130258, 0.27577711]))}
