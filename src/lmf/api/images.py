"""Images of API requests: ``data:`` URLs decoded to files of the request; local paths only inside the
configured image directory (``--image-dir`` / ``API_IMAGE_DIR``). Remote URLs are refused: fetching them would let
any client make the server request arbitrary addresses."""

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


class ImageRequestError(LmfError):
    """An image of a request the server will not use (the message is for the client)."""


class RequestImages:
    """The image files of one request, in placeholder order; ``close()`` deletes the decoded ones."""

    def __init__(self, image_dir: Optional[str]) -> None:
        self.image_dir = os.path.realpath(image_dir) if image_dir else None
        self.paths: list[str] = []
        self._tmp: Optional[str] = None

    def add(self, url: str, where: str) -> None:
        if url.startswith(DATA_PREFIX):
            self.paths.append(self._decode(url, where))
        elif url.startswith(("http://", "https://")):
            raise ImageRequestError(f"{where}: remote image URLs are not fetched by this server; send the image as a "
                                    "data: URL (base64)")
        else:
            self.paths.append(self._local(url[len("file://"):] if url.startswith("file://") else url, where))

    def _decode(self, url: str, where: str) -> str:
        header, _, payload = url.partition(",")
        subtype = header[len("data:image/"):-len(";base64")] if header.endswith(";base64") else ""
        if not header.startswith("data:image/") or not re.fullmatch(r"[a-z0-9.+-]{1,20}", subtype):
            raise ImageRequestError(f"{where}: a data URL must be data:image/<type>;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageRequestError(f"{where}: the data URL is not valid base64") from None
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="lmf-api-images-")
        path = os.path.join(self._tmp, f"{len(self.paths)}.{subtype}")
        with open(path, "wb") as fh:
            fh.write(data)
        return path

    def _local(self, path: str, where: str) -> str:
        if "\x00" in path:
            raise ImageRequestError(f"{where}: an image path must not contain NUL")
        if self.image_dir is None:
            raise ImageRequestError(f"{where}: local image paths are refused (the server has no image directory: "
                                    "start it with --image-dir DIR / API_IMAGE_DIR); send a data: URL")
        real = os.path.realpath(os.path.join(self.image_dir, path))
        if os.path.commonpath([real, self.image_dir]) != self.image_dir:
            raise ImageRequestError(f"{where}: {path!r} is outside the server's image directory")
        return real

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
