"""What every media plugin does (:class:`MediaPlugin`): ``<image>`` / ``<video>`` / ``<audio>`` placeholders to the
model's media tokens and files to the model's inputs, with the config's image, video and audio keys
(:class:`MediaOptions`); the families are in :mod:`lmf.data.media.qwen_vl`, :mod:`lmf.data.media.llava`,
:mod:`lmf.data.media.gemma3`, :mod:`lmf.data.media.pixtral`, :mod:`lmf.data.media.internvl`, :mod:`lmf.data.media.mllama`,
:mod:`lmf.data.media.glm4v` and :mod:`lmf.data.media.qwen_audio`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lmf.data.media import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from lmf.data.media.images import image_size, load_image, regularized_size
from lmf.extras.errors import NotAvailableError

#: ``mm_token_type_ids`` values (transformers' ProcessorMixin.create_mm_token_type_ids).
IMAGE_TYPE, VIDEO_TYPE = 1, 2


@dataclass
class MediaOptions:
    """The config's image/video/audio keys (LLaMA-Factory's ProcessorArguments)."""

    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128
    image_do_pan_and_scan: bool = False
    audio_sampling_rate: int = 16000
    crop_to_patches: bool = False

    @classmethod
    def from_data_args(cls, data_args) -> "MediaOptions":
        return cls(data_args.image_max_pixels, data_args.image_min_pixels, data_args.video_max_pixels,
                   data_args.video_min_pixels, data_args.video_fps, data_args.video_maxlen,
                   data_args.image_do_pan_and_scan, data_args.audio_sampling_rate, data_args.crop_to_patches)


@dataclass
class MediaPlugin:
    """What every media plugin does: placeholders to media tokens (:meth:`expand`), files to model inputs
    (:meth:`model_inputs`); subclasses say how many tokens an image (video, audio clip) takes and how they are
    written. ``image_processor`` is None for an audio-only family; ``feature_extractor`` is the audio one."""

    image_processor: Any
    tokenizer: Any
    options: MediaOptions = field(default_factory=MediaOptions)
    name: str = ""
    processor_config: dict = field(default_factory=dict)  # the model's processor_config.json
    image_token: str = "<image>"
    feature_extractor: Any = None
    _blank_outputs: dict = field(default_factory=dict, repr=False)
    #: LLaMA-Factory's extra resize rules of the Qwen-VL family (sides >= 28 pixels, aspect ratio <= 200)
    qwen_rules = False
    #: the family takes ``<audio>`` clips
    takes_audio = False

    def __post_init__(self) -> None:
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        #: never labels, even with train_on_prompt (LLaMA-Factory labels them then; lmf deviates on purpose)
        self.vision_token_ids = tuple(self.tokenizer.convert_tokens_to_ids(t) for t in self.vision_tokens())

    def vision_tokens(self) -> tuple[str, ...]:
        return (self.image_token,)

    def cache_identity(self) -> dict:
        """What the preprocessed data depends on besides the text (part of the cache key)."""
        return {"plugin": self.name, "options": vars(self.options), "processor": self.processor_config,
                **{key: part.to_dict() for key, part in (("image_processor", self.image_processor),
                                                          ("feature_extractor", self.feature_extractor)) if part}}

    def image_seqlen(self, path: str) -> int:
        """Vision tokens of the image at ``path``."""
        raise NotImplementedError

    def image_text(self, path: str) -> str:
        """What one ``<image>`` placeholder becomes."""
        return self.image_token * self.image_seqlen(path)

    def video_text(self, path: str) -> str:
        """What one ``<video>`` placeholder becomes."""
        raise NotAvailableError(f"videos with {self.name or type(self).__name__} are not implemented in lmf (the "
                                "Qwen-VL and LLaVA-NeXT-Video families take videos)")

    def audio_text(self, path: str) -> str:
        """What one ``<audio>`` placeholder becomes."""
        raise NotAvailableError(f"audio with {self.name or type(self).__name__} is not implemented in lmf (Qwen2-Audio "
                                "takes audio)")

    def expand(self, messages: list[dict], images: list[str], videos: tuple = (),
               audios: tuple = ()) -> tuple[list[dict], int]:
        """(messages with each ``<image>`` / ``<video>`` / ``<audio>`` expanded, total media tokens)."""
        # a kind is a placeholder only where its files are given: a text may say "<video>" literally (the converter
        # checks the counts of the columns a dataset declares); LLaVA's image token is "<image>": split, not replace
        kinds = [(placeholder, files, text_of, token) for placeholder, files, text_of, token in (
            (IMAGE_PLACEHOLDER, images, self.image_text, "image_token"),
            (VIDEO_PLACEHOLDER, videos, self.video_text, "video_token"),
            (AUDIO_PLACEHOLDER, audios, self.audio_text, "audio_token")) if files]
        used, out, total = [0] * len(kinds), [], 0
        for message in messages:
            text = message["content"]
            for k, (placeholder, files, text_of, token) in enumerate(kinds):
                pieces = text.split(placeholder)
                text = pieces[0]
                for piece in pieces[1:]:
                    block = text_of(files[used[k]])
                    total += block.count(getattr(self, token))  # the block's own tokens: each file is read once
                    text += block + piece
                    used[k] += 1
            out.append(dict(message, content=text))
        return out, total

    def count_image_tokens(self, ids: list[int]) -> int:
        """Vision tokens in ``ids`` (image and video placeholders' tokens)."""
        return ids.count(self.image_token_id)

    def blank_output(self, size: tuple[int, int], key: str, **kwargs):
        """The image processor's ``key`` for one blank image of ``size`` (width, height), cached: what it makes of
        any image of that size (the processed size, the crops ...) without reading a file again."""
        cache_key = (size, key, tuple(sorted(kwargs.items())))
        if cache_key not in self._blank_outputs:
            from PIL import Image

            out = self.image_processor([Image.new("RGB", size)], return_tensors="pt", **kwargs)
            self._blank_outputs[cache_key] = out[key][0]
        return self._blank_outputs[cache_key]

    def resized_size(self, path: str) -> tuple[int, int]:
        """(width, height) of the image at ``path`` once :meth:`load_images` resizes it (its header is read)."""
        o = self.options
        return regularized_size(image_size(path), o.image_max_pixels, o.image_min_pixels, qwen_rules=self.qwen_rules)

    def load_images(self, paths: list[str]) -> list:
        o = self.options
        return [load_image(p, o.image_max_pixels, o.image_min_pixels, qwen_rules=self.qwen_rules) for p in paths]

    def model_inputs(self, paths: list[str], input_ids, videos: tuple = (), audios: tuple = ()) -> dict:
        """The pixel inputs of the images ``paths`` and ``videos``, the features of the ``audios`` (each in row
        order) and the token types of ``input_ids``."""
        inputs: dict = {}
        if paths:
            inputs.update(self.image_inputs(paths))
        if videos:
            inputs.update(self.video_inputs(list(videos)))
        if audios:
            inputs.update(self.audio_inputs(list(audios)))
        inputs.update(self.token_types(input_ids))
        return dict(inputs)

    def image_inputs(self, paths: list[str]) -> dict:
        """The image processor's inputs of the images ``paths``."""
        return dict(self.image_processor(self.load_images(paths), return_tensors="pt"))

    def video_inputs(self, videos: list[str]) -> dict:
        raise NotAvailableError(f"videos with {self.name or type(self).__name__} are not implemented in lmf")

    def audio_inputs(self, audios: list[str]) -> dict:
        raise NotAvailableError(f"audio with {self.name or type(self).__name__} is not implemented in lmf")

    def token_types(self, input_ids) -> dict:
        return {}

    def expected_tokens(self, inputs: dict, pictures: int) -> Optional[int]:
        """Media tokens the ``inputs`` of ``pictures`` images/videos/audio clips fill (None: not checkable)."""
        return pictures * self.image_seqlen("") if hasattr(self, "seqlen") else None
