"""The LLaVA family's vision plugins: LLaVA-1.5 (LLaMA-Factory's LlavaPlugin), LLaVA-NeXT (LlavaNextPlugin),
LLaVA-NeXT-Video (LlavaNextVideoPlugin) and Video-LLaVA (VideoLlavaPlugin)."""

from __future__ import annotations

from dataclasses import dataclass

from lmf.data.media.plugin_base import MediaPlugin
from lmf.extras.errors import NotAvailableError


@dataclass
class LlavaPlugin(MediaPlugin):
    """LLaVA-1.5 style: ``<image>`` x N, N from the processed image size, the patch size and the feature selection
    (``processor_config.json``), as LLaMA-Factory computes it."""

    #: the image processor's output with the pixels (Video-LLaVA's is ``pixel_values_images``)
    pixel_key = "pixel_values"

    def __post_init__(self) -> None:
        super().__post_init__()
        height, width = self.blank_output((64, 64), self.pixel_key).shape[-2:]
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

        from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

        # LLaMA-Factory takes the tile size from the first tile of the processed images: the crop size
        self.tile = tuple(int(x) for x in self.blank_output((64, 64), "pixel_values").shape[-2:])
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


class FrameVideos:
    """Videos as frames for the LLaVA video families: each video's frames sampled by ``video_fps`` / ``video_maxlen``
    and resized by ``video_max_pixels`` / ``video_min_pixels`` (LLaMA-Factory's base rules, no even padding), then
    ``frame_processor``; ``<video>`` x ``frame_seqlen`` per frame. A batch's frames go to the model as one sequence (its
    video features fill the ``<video>`` tokens in order; videos of different lengths need no padding). LLaMA-Factory
    counts every video of a sample with the first one's frames; lmf counts each with its own (the same on one video
    per sample)."""

    def _init_videos(self, frame_seqlen: int, frame_processor) -> None:
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(self.video_token)
        self.frame_seqlen, self.frame_processor = int(frame_seqlen), frame_processor

    def vision_tokens(self) -> tuple[str, ...]:
        return (self.image_token, self.video_token)

    def count_image_tokens(self, ids: list[int]) -> int:
        return ids.count(self.image_token_id) + ids.count(self.video_token_id)

    def _indices(self, path: str) -> list[int]:
        from lmf.data.media.videos import video_metadata

        return video_metadata(path, self.options.video_fps, self.options.video_maxlen)["indices"]

    def video_text(self, path: str) -> str:
        return self.video_token * (self.frame_seqlen * len(self._indices(path)))

    def video_inputs(self, videos: list[str]) -> dict:
        """``pixel_values_videos``: ``[1, all frames, 3, crop height, crop width]``."""
        import torch

        from lmf.data.media.videos import load_frames

        o = self.options
        frames = [frame for path in videos for frame in
                  load_frames(path, self._indices(path), o.video_max_pixels, o.video_min_pixels, qwen_rules=False)]
        out = self.frame_processor(frames, return_tensors="pt")
        pixels = out["pixel_values"] if "pixel_values" in out else out["pixel_values_images"]  # Video-LLaVA's processor
        return {"pixel_values_videos": torch.as_tensor(pixels).unsqueeze(0)}

    def expected_tokens(self, inputs: dict, pictures: int) -> None:
        return None  # images and videos: counted at preprocessing, checked by the model


@dataclass
class LlavaNextVideoPlugin(FrameVideos, LlavaNextPlugin):
    """LLaVA-NeXT-Video: images as LLaVA-NeXT; videos as :class:`FrameVideos` through the video processor's resize and
    center crop (``video_preprocessor_config.json``): ``<video>`` x (crop patches / 4, the model's 2 x 2 pooling) per
    frame, as LLaMA-Factory's LlavaNextVideoPlugin counts them."""

    video_token: str = "<video>"

    def __post_init__(self) -> None:
        super().__post_init__()
        video = self.processor_config.get("video_processor", {})
        crop = video.get("crop_size") or {"height": 224, "width": 224}
        if video.get("do_center_crop") is False or not isinstance(crop, dict) or not {"height", "width"} <= set(crop):
            raise NotAvailableError("LLaVA-NeXT-Video: a video processor without a center crop to crop_size {height, "
                                    "width} (video_preprocessor_config.json) is not implemented in lmf")
        patch = int(self.processor_config.get("patch_size") or 14)
        self._init_videos((crop["height"] // patch) * (crop["width"] // patch) // 4, _frame_processor(video))


@dataclass
class VideoLlavaPlugin(FrameVideos, LlavaPlugin):
    """Video-LLaVA: images as LLaVA-1.5 (``pixel_values_images``); videos as :class:`FrameVideos` through the CLIP
    resize, center crop and normalization of its video processor (``video_preprocessor_config.json``; without one, of
    its image processor): ``<video>`` x (patches + the class token, which the video tower's features keep) per frame,
    as LLaMA-Factory's VideoLlavaPlugin counts them."""

    video_token: str = "<video>"
    pixel_key = "pixel_values_images"

    def __post_init__(self) -> None:
        super().__post_init__()
        video = self.processor_config.get("video_processor")
        self._init_videos(self.seqlen + int(self.processor_config.get("vision_feature_select_strategy") == "default"),
                          _frame_processor(video) if video else self.image_processor)

    def image_inputs(self, paths: list[str]) -> dict:
        out = self.image_processor(self.load_images(paths), return_tensors="pt")
        return {"pixel_values_images": out[self.pixel_key]}


def _frame_processor(config: dict):
    """The video processor's per-frame steps (resize the shortest side, center crop, rescale, normalize) with
    transformers' PIL CLIP image processor, which runs without torchvision; its defaults are LLaVA-NeXT-Video's."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    keys = ("size", "crop_size", "image_mean", "image_std", "do_resize", "do_center_crop", "do_rescale",
            "rescale_factor", "do_normalize", "do_convert_rgb", "resample")
    return CLIPImageProcessorPil(**{key: config[key] for key in keys if key in config})
