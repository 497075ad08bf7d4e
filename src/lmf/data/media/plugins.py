"""Vision plugins: how a model family turns ``<image>`` placeholders into vision tokens and images into pixels,
as LLaMA-Factory 0.9.5's mm_plugin does: :class:`QwenVLPlugin` (templates ``qwen2_vl``, ``qwen3_vl``,
``qwen3_vl_nothink``, ...), :class:`LlavaPlugin` (``llava``), :class:`Gemma3Plugin` (``gemma3``).

:func:`media_plugin_for` picks the plugin of a template for a model directory (None for text models).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from lmf.data.media import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from lmf.data.media.images import image_size, load_image, regularized_size
from lmf.extras.errors import ConfigError, NotAvailableError

#: LLaMA-Factory's mm_plugin names lmf implements -> plugin class name.
IMPLEMENTED = {"Qwen2VLPlugin": "QwenVLPlugin", "Qwen3VLPlugin": "QwenVLPlugin", "LlavaPlugin": "LlavaPlugin",
               "Gemma3Plugin": "Gemma3Plugin"}
#: ``mm_token_type_ids`` values (transformers' ProcessorMixin.create_mm_token_type_ids).
IMAGE_TYPE, VIDEO_TYPE = 1, 2


@dataclass
class MediaOptions:
    """The config's image/video keys (LLaMA-Factory's ProcessorArguments)."""

    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128

    @classmethod
    def from_data_args(cls, data_args) -> "MediaOptions":
        return cls(data_args.image_max_pixels, data_args.image_min_pixels, data_args.video_max_pixels,
                   data_args.video_min_pixels, data_args.video_fps, data_args.video_maxlen)


@dataclass
class MediaPlugin:
    """What every vision plugin does: placeholders to vision tokens (:meth:`expand`), images to pixel inputs
    (:meth:`model_inputs`); subclasses say how many tokens an image takes and how they are written."""

    image_processor: Any
    tokenizer: Any
    options: MediaOptions = field(default_factory=MediaOptions)
    name: str = ""
    processor_config: dict = field(default_factory=dict)  # the model's processor_config.json
    image_token: str = "<image>"
    #: LLaMA-Factory's extra resize rules of the Qwen-VL family (sides >= 28 pixels, aspect ratio <= 200)
    qwen_rules = False

    def __post_init__(self) -> None:
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        #: never labels, even with train_on_prompt (LLaMA-Factory labels them then; lmf deviates on purpose)
        self.vision_token_ids = tuple(self.tokenizer.convert_tokens_to_ids(t) for t in self.vision_tokens())

    def vision_tokens(self) -> tuple[str, ...]:
        return (self.image_token,)

    def cache_identity(self) -> dict:
        """What the preprocessed data depends on besides the text (part of the cache key)."""
        return {"plugin": self.name, "options": vars(self.options), "image_processor": self.image_processor.to_dict(),
                "processor": self.processor_config}

    def image_seqlen(self, path: str) -> int:
        """Vision tokens of the image at ``path``."""
        raise NotImplementedError

    def image_text(self, path: str) -> str:
        """What one ``<image>`` placeholder becomes."""
        return self.image_token * self.image_seqlen(path)

    def video_text(self, path: str) -> str:
        """What one ``<video>`` placeholder becomes."""
        raise NotAvailableError(f"videos with {self.name or type(self).__name__} are not implemented in lmf (the "
                                "Qwen-VL family takes videos)")

    def expand(self, messages: list[dict], images: list[str], videos: tuple = ()) -> tuple[list[dict], int]:
        """(messages with each ``<image>`` / ``<video>`` expanded, total vision tokens)."""
        out, used_images, used_videos, total = [], 0, 0, 0
        for message in messages:
            pieces = message["content"].split(IMAGE_PLACEHOLDER)  # LLaVA's image token is "<image>": split, not replace
            text = pieces[0]
            for piece in pieces[1:]:
                block = self.image_text(images[used_images])
                total += block.count(self.image_token)  # the block's own tokens: each file is read once
                text += block + piece
                used_images += 1
            pieces = text.split(VIDEO_PLACEHOLDER)
            text = pieces[0]
            for piece in pieces[1:]:
                block = self.video_text(videos[used_videos])
                total += block.count(self.video_token)
                text += block + piece
                used_videos += 1
            out.append(dict(message, content=text))
        return out, total

    def count_image_tokens(self, ids: list[int]) -> int:
        """Vision tokens in ``ids`` (image and video placeholders' tokens)."""
        return ids.count(self.image_token_id)

    def load_images(self, paths: list[str]) -> list:
        o = self.options
        return [load_image(p, o.image_max_pixels, o.image_min_pixels, qwen_rules=self.qwen_rules) for p in paths]

    def model_inputs(self, paths: list[str], input_ids, videos: tuple = ()) -> dict:
        """The pixel inputs of the images ``paths`` and ``videos`` (in row order) and the token types of
        ``input_ids``."""
        inputs: dict = {}
        if paths:
            inputs.update(self.image_processor(self.load_images(paths), return_tensors="pt"))
        if videos:
            inputs.update(self.video_inputs(list(videos)))
        inputs.update(self.token_types(input_ids))
        return dict(inputs)

    def video_inputs(self, videos: list[str]) -> dict:
        raise NotAvailableError(f"videos with {self.name or type(self).__name__} are not implemented in lmf")

    def token_types(self, input_ids) -> dict:
        return {}

    def expected_tokens(self, inputs: dict, pictures: int) -> Optional[int]:
        """Vision tokens the pixel ``inputs`` of ``pictures`` images/videos fill (None: not checkable)."""
        return pictures * self.image_seqlen("") if hasattr(self, "seqlen") else None


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
        o = self.options
        width, height = regularized_size(image_size(path), o.image_max_pixels, o.image_min_pixels, qwen_rules=True)
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


PLUGINS = {"QwenVLPlugin": QwenVLPlugin, "LlavaPlugin": LlavaPlugin, "Gemma3Plugin": Gemma3Plugin}


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
            f"templates lmf implements: those of {', '.join(sorted(IMPLEMENTED))}, e.g. qwen2_vl, qwen3_vl, llava, "
            "gemma3)")
    try:
        image_processor = load_image_processor(model_path, trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise ConfigError(f"model_name_or_path={model_path!r}: cannot load its image processor: {exc}") from exc
    plugin = PLUGINS[IMPLEMENTED[name]]
    if plugin is QwenVLPlugin and not hasattr(image_processor, "get_number_of_image_patches"):
        raise NotAvailableError(f"{type(image_processor).__name__}: lmf's {name} needs a Qwen-VL image processor")
    return plugin(image_processor, tokenizer, MediaOptions.from_data_args(data_args), name=name,
                  processor_config=_processor_config(model_path))


def load_image_processor(model_path: str, trust_remote_code: bool = False):
    """The model's image processor; without torchvision, its PIL implementation (transformers < 5.24's
    ``AutoImageProcessor`` asks for torchvision instead of falling back)."""
    import json

    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except ImportError:
        with open(os.path.join(model_path, "preprocessor_config.json"), encoding="utf-8") as fh:
            name = json.load(fh).get("image_processor_type") or ""
        pil = getattr(transformers, name.removesuffix("Fast") + "Pil", None) if name else None
        if pil is None:
            raise
        return pil.from_pretrained(model_path)


def _processor_config(model_path: str) -> dict:
    import json

    config: dict = {}
    path = os.path.join(model_path, "processor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    video = os.path.join(model_path, "video_preprocessor_config.json")
    if os.path.isfile(video):
        with open(video, encoding="utf-8") as fh:
            config["video_processor"] = json.load(fh)
    return config
