"""Image files: resolve against ``media_dir``, check they open, resize as LLaMA-Factory 0.9.5 does.

The resize rules (``image_max_pixels`` / ``image_min_pixels``, then the Qwen-VL rules: sides of at least 28
pixels, aspect ratio at most 200) are applied by the same sequence of PIL resizes as LLaMA-Factory's, so pixel
values match; :func:`regularized_size` follows the sequence on the sizes alone (the header of the file is read,
not its pixels) for counting vision tokens at preprocessing time.
"""

from __future__ import annotations

import math
import os
from typing import Optional


def resolve_media_path(value: str, media_dir: Optional[str]) -> str:
    """``media_dir/value`` when that file exists, else ``value`` (absolute, or relative to the cwd), as an absolute
    path with symlinks resolved: the preprocessed data is cached and may be read from another working directory,
    or by another copy of a project whose data folder is a symlink to the same shared folder."""
    if media_dir:
        joined = os.path.join(media_dir, value)
        if os.path.isfile(joined):
            return os.path.realpath(joined)
    return os.path.realpath(value)


def image_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a readable image (missing, not an image), or None. Reads the header only."""
    if not os.path.isfile(path):
        return f"image file {path!r} not found"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - the header parsed
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        return f"image file {path!r} cannot be read ({exc})"
    return None


def _steps(width: int, height: int, max_pixels: int, min_pixels: int, qwen_rules: bool) -> list[tuple[int, int]]:
    """The sizes LLaMA-Factory resizes to, in order (empty when the image is kept as it is)."""
    steps = []
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
        steps.append((width, height))
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
        steps.append((width, height))
    if qwen_rules:
        if min(width, height) < 28:
            width, height = max(width, 28), max(height, 28)
            steps.append((width, height))
        if width / height > 200:
            width, height = height * 180, height
            steps.append((width, height))
        if height / width > 200:
            width, height = width, width * 180
            steps.append((width, height))
    return steps


def image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header."""
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def regularized_size(size: tuple[int, int], max_pixels: int, min_pixels: int, qwen_rules: bool) -> tuple[int, int]:
    """(width, height) of an image of ``size`` after :func:`load_image`'s resizes."""
    steps = _steps(size[0], size[1], max_pixels, min_pixels, qwen_rules)
    return steps[-1] if steps else size


def load_image(path: str, max_pixels: int, min_pixels: int, qwen_rules: bool):
    """The RGB PIL image of ``path``, resized as LLaMA-Factory does."""
    from PIL import Image

    try:
        return resize_like_llamafactory(Image.open(path), max_pixels, min_pixels, qwen_rules)
    except (OSError, Image.DecompressionBombError) as exc:  # e.g. a file truncated after its header
        from lmf.extras.errors import DataError

        raise DataError(f"image file {path!r} cannot be decoded ({exc})") from exc


def resize_like_llamafactory(image, max_pixels: int, min_pixels: int, qwen_rules: bool):
    """``image`` (PIL) resized by LLaMA-Factory's rules, in RGB."""
    width, height = image.size
    base = _steps(width, height, max_pixels, min_pixels, qwen_rules=False)
    for step in base:
        image = image.resize(step)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if qwen_rules:
        for step in _steps(image.width, image.height, max_pixels=1 << 62, min_pixels=0, qwen_rules=True):
            image = image.resize(step)
    return image
