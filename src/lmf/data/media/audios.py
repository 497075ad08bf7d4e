"""Audio files, as LLaMA-Factory reads them: decoded (PyAV, ``pip install 'lmf[video]'``), averaged to one channel,
resampled to ``audio_sampling_rate`` with torchaudio's default windowed-sinc filter.

- :func:`audio_problem`: why a file is not a usable audio file (missing, not decodable, no audio stream).
- :func:`load_audio`: the mono float32 waveform at the wanted rate (a numpy array), cached per (file, rate) for the
  last few files: preprocessing counts a clip's tokens from its length, the collator needs its samples again.
- :func:`resample`: ``torchaudio.functional.resample``'s arithmetic (Hann-windowed sinc, ``lowpass_filter_width``
  6, ``rolloff`` 0.99) in plain torch, so lmf needs no torchaudio; equal to it within float32 rounding (tested
  against torchaudio in the LLaMA-Factory venv).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

from lmf.data.media.containers import require_av, stream_problem
from lmf.extras.errors import DataError


def audio_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a readable audio file, or None (the container is opened, nothing decoded)."""
    return stream_problem(path, "audio")


def decode(path: str):
    """``(samples [channels, n] float32, sample rate)`` of the first audio stream of ``path``."""
    import numpy as np

    av = require_av("audio")
    try:
        with av.open(path, "r") as container:
            stream = next(s for s in container.streams if s.type == "audio")
            to_float = av.AudioResampler(format="fltp")  # planar float, same layout and rate
            chunks = [c.to_ndarray() for frame in container.decode(stream) for c in to_float.resample(frame)]
            chunks += [c.to_ndarray() for c in to_float.resample(None)]
            rate = stream.rate
    except (av.FFmpegError, OSError, StopIteration) as exc:
        raise DataError(f"audio file {path!r} cannot be decoded ({exc or 'no audio stream'})") from exc
    if not chunks:
        raise DataError(f"audio file {path!r} holds no samples")
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), int(rate)


@functools.lru_cache(maxsize=8)
def load_audio(path: str, sampling_rate: int):
    """The mono waveform of ``path`` at ``sampling_rate`` (float32 numpy array), as LLaMA-Factory regularizes it:
    channels averaged, then :func:`resample`; the array is shared between calls: do not write to it."""
    import torch

    samples, rate = decode(path)
    waveform = torch.from_numpy(samples)
    if waveform.shape[0] > 1:
        waveform = waveform.mean(dim=0, keepdim=True)
    if rate != sampling_rate:
        waveform = resample(waveform, rate, sampling_rate)
    array = waveform.squeeze(0).numpy()
    array.setflags(write=False)
    return array


def _sinc_kernel(orig: int, new: int, width: int, lowpass_filter_width: int, rolloff: float, dtype):
    """The ``[new, 1, kernel]`` Hann-windowed sinc filters of a resampler from ``orig`` to ``new`` (both divided by
    their gcd): one low-pass filter (cutoff ``rolloff`` x the lower Nyquist rate) per output phase."""
    import torch

    cutoff = min(orig, new) * rolloff
    taps = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new + taps) * cutoff
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.tensor(1.0, dtype=dtype), t.sin() / t)
    return sinc * window * (cutoff / orig)


def resample(waveform, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6, rolloff: float = 0.99):
    """``waveform`` (``[..., n]`` float tensor) from ``orig_freq`` to ``new_freq`` Hz: ``ceil(n x new / orig)`` samples,
    band-limited by a windowed-sinc filter (torchaudio's ``sinc_interp_hann`` method and defaults)."""
    import torch

    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    width = math.ceil(lowpass_filter_width * orig / (min(orig, new) * rolloff))
    kernel = _sinc_kernel(orig, new, width, lowpass_filter_width, rolloff, waveform.dtype)
    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded[:, None], kernel, stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    return out[..., :math.ceil(new * shape[-1] / orig)].reshape(*shape[:-1], -1)
