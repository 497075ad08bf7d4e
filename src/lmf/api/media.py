"""Media of API requests. Images: ``data:`` URLs decoded to files of the request; local paths only inside the
configured image directory (``--image-dir`` / ``API_IMAGE_DIR``). Remote URLs are refused: fetching them would let
any client make the server request arbitrary addresses. Audio: OpenAI's ``input_audio`` parts (base64 data and its
format), decoded to files of the request."""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import tempfile
from typing import Optional

from lmf.extras.errors import LmfError

DATA_PREFIX = "data:"


class MediaRequestError(LmfError):
    """An image or audio clip of a request the server will not use (the message is for the client)."""


class RequestMedia:
    """The image (``paths``) and audio (``audio_paths``) files of one request, each in placeholder order;
    ``close()`` deletes the decoded ones."""

    def __init__(self, image_dir: Optional[str]) -> None:
        self.image_dir = os.path.realpath(image_dir) if image_dir else None
        self.paths: list[str] = []
        self.audio_paths: list[str] = []
        self._tmp: Optional[str] = None

    def files(self) -> dict[str, list[str]]:
        """The engine's keywords for them (``images`` / ``audios``), the kinds the request has."""
        return {key: paths for key, paths in (("images", self.paths), ("audios", self.audio_paths)) if paths}

    def add_audio(self, data: str, audio_format: str, where: str) -> None:
        """An ``input_audio`` part: base64 ``data`` of a ``audio_format`` file (wav, mp3, flac, ...)."""
        if not re.fullmatch(r"[a-z0-9]{1,10}", audio_format or ""):
            raise MediaRequestError(f"{where}: input_audio.format must be a file type such as wav or mp3")
        try:
            payload = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise MediaRequestError(f"{where}: input_audio.data is not valid base64") from None
        self.audio_paths.append(self._write(payload, f"audio-{len(self.audio_paths)}.{audio_format}"))

    def _write(self, payload: bytes, name: str) -> str:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="lmf-api-media-")
        path = os.path.join(self._tmp, name)
        with open(path, "wb") as fh:
            fh.write(payload)
        return path

    def add(self, url: str, where: str) -> None:
        if url.startswith(DATA_PREFIX):
            self.paths.append(self._decode(url, where))
        elif url.startswith(("http://", "https://")):
            raise MediaRequestError(f"{where}: remote image URLs are not fetched by this server; send the image as a "
                                    "data: URL (base64)")
        else:
            self.paths.append(self._local(url[len("file://"):] if url.startswith("file://") else url, where))

    def _decode(self, url: str, where: str) -> str:
        header, _, payload = url.partition(",")
        subtype = header[len("data:image/"):-len(";base64")] if header.endswith(";base64") else ""
        if not header.startswith("data:image/") or not re.fullmatch(r"[a-z0-9.+-]{1,20}", subtype):
            raise MediaRequestError(f"{where}: a data URL must be data:image/<type>;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaRequestError(f"{where}: the data URL is not valid base64") from None
        return self._write(data, f"{len(self.paths)}.{subtype}")

    def _local(self, path: str, where: str) -> str:
        if "\x00" in path:
            raise MediaRequestError(f"{where}: an image path must not contain NUL")
        if self.image_dir is None:
            raise MediaRequestError(f"{where}: local image paths are refused (the server has no image directory: "
                                    "start it with --image-dir DIR / API_IMAGE_DIR); send a data: URL")
        real = os.path.realpath(os.path.join(self.image_dir, path))
        if os.path.commonpath([real, self.image_dir]) != self.image_dir:
            raise MediaRequestError(f"{where}: {path!r} is outside the server's image directory")
        return real

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
