"""Qwen2-Audio's plugin (LLaMA-Factory's Qwen2AudioPlugin): audio clips, no images or videos."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from lmf.data.media.audios import load_audio
from lmf.data.media.plugin_base import MediaPlugin
from lmf.extras.errors import ConfigError, NotAvailableError


def audio_tokens(mel_frames):
    """Audio tokens of a clip of ``mel_frames`` mel frames (an int or a tensor of them): Qwen2-Audio's encoder halves
    the frames with a stride-2 convolution, then pools them by 2."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


@dataclass
class Qwen2AudioPlugin(MediaPlugin):
    """``<|audio_bos|>`` + ``<|AUDIO|>`` x tokens + ``<|audio_eos|>`` per clip. A clip is resampled to 16 kHz and
    padded (cut) to the Whisper feature extractor's 30 seconds; its tokens are counted from its mel frames before
    the padding, as LLaMA-Factory counts them."""

    audio_token: str = "<|AUDIO|>"
    audio_bos: str = "<|audio_bos|>"
    audio_eos: str = "<|audio_eos|>"
    takes_audio = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.audio_token_id = self.tokenizer.convert_tokens_to_ids(self.audio_token)
        expected = getattr(self.feature_extractor, "sampling_rate", None)
        if expected and self.options.audio_sampling_rate != expected:
            raise ConfigError(f"config key 'audio_sampling_rate': {self.options.audio_sampling_rate} Hz, but "
                              f"{type(self.feature_extractor).__name__} takes {expected} Hz audio; remove the key")

    def vision_tokens(self) -> tuple[str, ...]:
        return (self.audio_token, self.audio_bos, self.audio_eos)

    def count_image_tokens(self, ids: list[int]) -> int:
        return ids.count(self.audio_token_id)

    def image_text(self, path: str) -> str:
        raise NotAvailableError(f"images with {self.name}: Qwen2-Audio takes audio only (the template is for audio)")

    def video_text(self, path: str) -> str:
        raise NotAvailableError(f"videos with {self.name}: Qwen2-Audio takes audio only (the template is for audio)")

    def mel_frames(self, path: str) -> int:
        """Mel frames of the clip at ``path`` that are not padding: what the feature extractor's attention mask
        counts (one per ``hop_length`` samples, at most its ``n_samples`` samples)."""
        fe = self.feature_extractor
        samples = len(load_audio(path, self.options.audio_sampling_rate))
        return math.ceil(min(samples, fe.n_samples) / fe.hop_length)

    def audio_text(self, path: str) -> str:
        return f"{self.audio_bos}{self.audio_token * audio_tokens(self.mel_frames(path))}{self.audio_eos}"

    def audio_inputs(self, audios: list[str]) -> dict:
        """``input_features`` ``[clips, mel bins, frames]`` and ``feature_attention_mask`` ``[clips, frames]``."""
        rate = self.options.audio_sampling_rate
        out = self.feature_extractor([load_audio(p, rate) for p in audios], sampling_rate=rate,
                                     return_attention_mask=True, padding="max_length", return_tensors="pt")
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}

    def expected_tokens(self, inputs: dict, pictures: int) -> Optional[int]:
        if "feature_attention_mask" not in inputs:
            return 0
        return int(audio_tokens(inputs["feature_attention_mask"].sum(-1)).sum())
