"""Video files, as LLaMA-Factory 0.9.5 reads them (PyAV, ``pip install 'lmf[video]'``).

- :func:`video_problem`: why a file is not a usable video (missing, not decodable, no video stream).
- :func:`video_metadata`: size, frame rate and the frames LLaMA-Factory samples (``video_fps`` frames per
  second of the stream's duration, at most ``video_maxlen``, evenly spaced), from the container, without decoding:
  preprocessing counts vision tokens from it.
- :func:`load_frames`: the sampled frames, each resized by LLaMA-Factory's image rules (``video_max_pixels`` /
  ``video_min_pixels``, Qwen's side and aspect rules), padded to an even count (two frames per temporal patch).
- :func:`qwen_video_patches`: the frames resized to the processor's grid (PIL bicubic, what transformers' PIL image
  processors use; its torchvision video processor resizes slightly differently) and cut into Qwen-VL's flattened
  patches, ``(grid_t * grid_h * grid_w, channels * temporal_patch * patch * patch)``.
"""

from __future__ import annotations

import math
from typing import Optional

from lmf.data.media.containers import require_av, stream_problem


def video_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a readable video file, or None (the container is opened, nothing decoded)."""
    return stream_problem(path, "video")


def sample_indices(total_frames: int, duration_s: Optional[float], fps: float, maxlen: int) -> list[int]:
    """LLaMA-Factory's frame sampling: ``floor(duration x fps)`` frames (at least 1, at most ``maxlen`` and the
    stream's frame count), evenly spaced over the stream."""
    import numpy as np

    if total_frames == 0:  # a stream that does not say its length
        return np.linspace(0, maxlen - 1, maxlen).astype(np.int32).tolist()
    count = max(1, math.floor((duration_s or 0.0) * fps))
    count = min(total_frames, maxlen, count)
    return np.linspace(0, total_frames - 1, count).astype(np.int32).tolist()


def video_metadata(path: str, fps: float, maxlen: int) -> dict:
    """``{"width", "height", "average_fps", "indices"}`` of the video at ``path`` (container data only)."""
    av = require_av("video")
    with av.open(path, "r") as container:
        stream = next(s for s in container.streams if s.type == "video")
        duration = float(stream.duration * stream.time_base) if stream.duration is not None else None
        return {"width": stream.width, "height": stream.height, "duration": duration,
                "average_fps": float(stream.average_rate) if stream.average_rate else fps,
                "indices": sample_indices(stream.frames, duration, fps, maxlen)}


def load_frames(path: str, indices: list[int], max_pixels: int, min_pixels: int, qwen_rules: bool = True) -> list:
    """The frames at ``indices`` (the sampled ones, :func:`video_metadata`) as RGB PIL images, resized by
    LLaMA-Factory's image rules; ``qwen_rules`` (the Qwen-VL family's): its side and aspect rules too, and padded to an
    even count (two frames per temporal patch)."""
    from lmf.data.media.images import resize_like_llamafactory

    av = require_av("video")
    wanted = set(indices)
    frames = []
    with av.open(path, "r") as container:
        stream = next(s for s in container.streams if s.type == "video")
        container.seek(0)
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                frames.append(frame.to_image())
    if len(frames) != len(wanted):
        from lmf.extras.errors import DataError

        raise DataError(f"video file {path!r}: {len(frames)} of the {len(wanted)} frames its container promises could "
                        "be decoded (its frame count is wrong or the file is damaged); re-encode it")
    if qwen_rules and len(frames) % 2:
        frames.append(frames[-1])
    return [resize_like_llamafactory(f, max_pixels, min_pixels, qwen_rules=qwen_rules) for f in frames]


def qwen_video_patches(frames: list, resized: tuple[int, int], patch: int, temporal: int, merge: int,
                       mean: list, std: list):
    """``(flattened patches [N, C*temporal*patch*patch], grid [t, h, w])`` of one video's frames."""
    import numpy as np
    import torch
    from PIL import Image

    height, width = resized
    arrays = [np.asarray(f.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0
              for f in frames]
    video = (np.stack(arrays) - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    video = torch.from_numpy(video).permute(0, 3, 1, 2)  # T, C, H, W
    if video.shape[0] % temporal:
        video = torch.cat([video, video[-1:].expand(temporal - video.shape[0] % temporal, -1, -1, -1)])
    t, c = video.shape[0] // temporal, video.shape[1]
    h, w = height // patch, width // patch
    patches = video.reshape(t, temporal, c, h // merge, merge, patch, w // merge, merge, patch)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(t * h * w, c * temporal * patch * patch), [t, h, w]
