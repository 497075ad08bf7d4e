"""``lmf api`` settings and limits: the flags / environment variables (:func:`parse_api_settings`), the
request limiter (slots and queue, 503 beyond), and the ASGI middlewares for the API key (401) and the
request body size (413)."""

import asyncio
import hmac
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from lmf.extras.errors import ConfigError, LmfError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ApiSettings:
    """Server settings that are not model config keys."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    model_name: Optional[str] = None
    max_concurrent: int = 1
    max_queue: int = 16
    max_body_mb: float = 1.0
    max_tokens: Optional[int] = None  # None: the engine's configured max_new_tokens
    max_n: int = 4
    image_dir: Optional[str] = None  # local image paths of requests are read only inside this folder

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"API setting port: {self.port} is not a valid TCP port")
        RequestLimiter(self.max_concurrent, self.max_queue)  # validates the limits
        if self.max_body_mb <= 0:
            raise ConfigError(f"API setting max_body_mb (API_MAX_BODY_MB): must be > 0, got {self.max_body_mb}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"API setting max_tokens (API_MAX_TOKENS): must be >= 1, got {self.max_tokens}")
        if self.max_n < 1:
            raise ConfigError(f"API setting max_n (API_MAX_N): must be >= 1, got {self.max_n}")
        if self.image_dir is not None and not os.path.isdir(self.image_dir):
            raise ConfigError(f"API setting image_dir (--image-dir / API_IMAGE_DIR): {self.image_dir!r} is not a folder")


class Overloaded(Exception):
    """The request queue is full."""


class RequestLimiter:
    """At most ``max_concurrent`` requests run; at most ``max_queue`` more wait; the rest are refused."""

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise ConfigError("API limits: max_concurrent must be >= 1 and max_queue >= 0")
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.pending = 0  # running + waiting; only touched on the event loop
        self._semaphore: Optional[asyncio.Semaphore] = None

    async def acquire(self) -> Callable[[], None]:
        """Wait for a slot; return an idempotent ``release``. Raises :class:`Overloaded` when the queue is full."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrent)
        if self.pending >= self.max_concurrent + self.max_queue:
            raise Overloaded(f"server busy: {self.max_concurrent} request(s) running and "
                             f"{self.max_queue} queued; retry later")
        self.pending += 1
        try:
            await self._semaphore.acquire()
        except BaseException:
            self.pending -= 1
            raise
        released = False
        semaphore = self._semaphore

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                semaphore.release()
                self.pending -= 1

        return release


class ApiKeyMiddleware:
    """Pure ASGI middleware: every HTTP request must carry ``Authorization: Bearer <api_key>``."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                from starlette.responses import JSONResponse

                from lmf.api.protocol import error_body

                message = "invalid API key" if token.strip() else "missing API key: send 'Authorization: Bearer <key>'"
                body = error_body(message, "invalid_request_error", code="invalid_api_key")
                response = JSONResponse(body, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Pure ASGI middleware: a request body over ``max_bytes`` gets a 413 (checked on ``Content-Length``
    before anything is read, and counted while a chunked body streams in)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        from lmf.api.protocol import error_body

        mib = self.max_bytes / (1 << 20)
        body = error_body(f"request body too large: the limit is {mib:g} MB (API_MAX_BODY_MB)",
                          "invalid_request_error", code="request_too_large")
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                too_large = True
            if too_large:
                await self._reject(scope, receive, send)
                return
        # read the body here (at most max_bytes + one chunk), then replay it to the app
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                if message["type"] == "http.disconnect":
                    return
                continue
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads: disconnect notifications

        await self.app(scope, replay, send)


API_FLAGS = {"--host": "host", "--port": "port", "--model-name": "model_name",
             "--max-concurrent": "max_concurrent", "--max-queue": "max_queue", "--max-body-mb": "max_body_mb",
             "--max-tokens": "max_tokens", "--max-n": "max_n", "--image-dir": "image_dir"}


def parse_api_settings(argv: list[str], env: Optional[dict] = None) -> tuple[ApiSettings, list[str]]:
    """Pop the server flags from ``argv``; fill the rest from the environment. Returns (settings, remaining argv)."""
    env = os.environ if env is None else env
    values: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, inline = arg.partition("=")
        if flag in API_FLAGS:
            if eq:
                values[API_FLAGS[flag]] = inline
            elif i + 1 < len(argv):
                values[API_FLAGS[flag]] = argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"flag {flag} needs a value")
        else:
            rest.append(arg)
        i += 1

    def pick(name: str, env_name: str, default: Any) -> Any:
        return values.get(name, env.get(env_name) or default)

    def as_int(name: str, env_name: str, default: int) -> int:
        raw = pick(name, env_name, default)
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"API setting {name} ({env_name}): expected an integer, got {raw!r}") from None

    def as_float(name: str, env_name: str, default: float) -> float:
        raw = pick(name, env_name, default)
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"API setting {name} ({env_name}): expected a number, got {raw!r}") from None

    max_tokens = pick("max_tokens", "API_MAX_TOKENS", None)
    settings = ApiSettings(
        host=pick("host", "API_HOST", "127.0.0.1"),
        port=as_int("port", "API_PORT", 8000),
        api_key=env.get("API_KEY") or None,
        model_name=pick("model_name", "API_MODEL_NAME", None),
        max_concurrent=as_int("max_concurrent", "API_MAX_CONCURRENT", 1),
        max_queue=as_int("max_queue", "API_MAX_QUEUE", 16),
        max_body_mb=as_float("max_body_mb", "API_MAX_BODY_MB", 1.0),
        max_tokens=None if max_tokens is None else as_int("max_tokens", "API_MAX_TOKENS", 0),
        max_n=as_int("max_n", "API_MAX_N", 4),
        image_dir=pick("image_dir", "API_IMAGE_DIR", None),
    )
    settings.validate()
    return settings, rest


def check_port_free(host: str, port: int) -> None:
    """Fail fast (before loading a model for minutes) when ``host:port`` cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"API setting host: cannot resolve {host!r}: {exc}") from exc
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise LmfError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; "
                           "choose another --port / API_PORT") from exc
