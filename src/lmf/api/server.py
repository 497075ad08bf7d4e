"""``lmf api``: an OpenAI-compatible HTTP server over a :class:`~lmf.chat.engine.ChatEngine`.

Routes: ``GET /v1/models`` and ``POST /v1/chat/completions`` (JSON or, with ``stream: true``,
server-sent events). Generation runs in worker threads; at most ``max_concurrent`` requests
generate at once and at most ``max_queue`` more wait; beyond that the server answers 503.
With an API key set, every request needs ``Authorization: Bearer <key>`` (else 401).
Errors use OpenAI's ``{"error": {"message", "type", "param", "code"}}`` body.

Settings (flag, then environment variable, then default):
``--host`` / ``API_HOST`` (127.0.0.1), ``--port`` / ``API_PORT`` (8000), ``API_KEY`` (none; environment
only, so it never shows in ``ps``), ``--model-name`` / ``API_MODEL_NAME`` (the model or adapter folder
name), ``--max-concurrent`` / ``API_MAX_CONCURRENT`` (1), ``--max-queue`` / ``API_MAX_QUEUE`` (16),
``--max-body-mb`` / ``API_MAX_BODY_MB`` (1: larger request bodies get a 413), ``--max-tokens`` /
``API_MAX_TOKENS`` (the config's ``max_new_tokens``: a request asking for more gets a 400),
``--max-n`` / ``API_MAX_N`` (4: choices per request).

An unexpected failure is logged with its traceback and an id; the client gets a 500 with that id only.

(No ``from __future__ import annotations`` here: FastAPI must see the real request class.)
"""

import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional

from lmf.api.settings import (
    LOOPBACK_HOSTS,
    ApiKeyMiddleware,
    ApiSettings,
    BodyLimitMiddleware,
    Overloaded,
    RequestLimiter,
    check_port_free,
    parse_api_settings,
)
from lmf.extras.errors import LmfError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from fastapi import FastAPI

    from lmf.chat.engine import ChatEngine, ChatStream

logger = get_logger(__name__)


def _internal_error(where: str):
    """Log the current exception with an id; a 500 whose body names only that id (no exception text)."""
    import uuid

    error_id = f"err-{uuid.uuid4().hex[:12]}"
    logger.exception("%s failed (error id %s)", where, error_id)
    return _error_response(500, f"internal server error (id {error_id}); the server log has the details",
                           "server_error", code="internal_error"), error_id


def _error_response(status: int, message: str, type_: str = "invalid_request_error",
                    param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
    from fastapi.responses import JSONResponse

    from lmf.api.protocol import error_body

    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _validation_message(errors: list[dict]) -> tuple[str, Optional[str]]:
    """Readable text and the first bad parameter of a pydantic validation error list."""
    parts, first_param = [], None
    for err in errors[:5]:
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        loc = [x for x in err.get("loc", ()) if x != "body"]
        # drop pydantic's union-branch names (e.g. 'str', 'list[TextPart]') from the path; list indices as [i]
        loc = [x for x in loc
               if isinstance(x, int) or not any(c in x for c in "[]") and x not in ("str", "function-after")]
        param = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or None
        first_param = first_param or param
        msg = err.get("msg", "invalid value")
        parts.append(f"{param}: {msg}" if param else msg)
    return "; ".join(parts), first_param


def create_app(engine: "ChatEngine", settings: Optional[ApiSettings] = None) -> "FastAPI":
    """The FastAPI application serving ``engine``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.background import BackgroundTask
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, StreamingResponse

    from lmf.api import protocol
    from lmf.chat.engine import MessageError, split_system

    settings = settings or ApiSettings()
    settings.validate()
    model_name = settings.model_name or engine.model_name
    limiter = RequestLimiter(settings.max_concurrent, settings.max_queue)
    app = FastAPI(title="lmf", docs_url=None, redoc_url=None)
    app.state.limiter = limiter
    app.state.model_name = model_name
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(settings.max_body_mb * (1 << 20)))
    if settings.api_key:  # added last: runs first, so an unauthenticated client learns nothing else
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    max_tokens_limit = settings.max_tokens or (engine.settings.max_new_tokens if engine.settings.max_new_tokens > 0
                                               else engine.settings.max_length)

    @app.exception_handler(Exception)
    async def _on_unexpected_error(request: Request, exc: Exception):
        return _internal_error(f"{request.method} {request.url.path}")[0]

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return _error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(exc.status_code, str(exc.detail), type_)

    @app.get("/v1/models")
    async def list_models():
        card = {"id": model_name, "object": "model", "created": protocol.now(), "owned_by": "lmf"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _request_body(request)
        if body.model != model_name:
            return _error_response(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                                   param="model", code="model_not_found")
        if body.n > settings.max_n:
            return _error_response(400, f"n={body.n} exceeds this server's limit of {settings.max_n} (API_MAX_N)",
                                   param="n")
        if body.stream and body.n > 1:
            return _error_response(400, "n > 1 is not supported with stream=true", param="n")
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None and requested > max_tokens_limit:
            param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            return _error_response(400, f"{param}={requested} exceeds this server's limit of {max_tokens_limit} "
                                   "tokens (API_MAX_TOKENS)", param=param)
        if body.stream and body.tools:
            return _error_response(400, "tool calls cannot be streamed: send tools with stream=false", param="stream")
        try:
            system, messages = split_system([{"role": m.engine_role(), "content": m.text()} for m in body.messages])
        except MessageError as exc:
            return _error_response(400, str(exc), param="messages")
        from lmf.api.media import MediaRequestError, RequestMedia

        images = RequestMedia(settings.image_dir)
        try:
            for index, message in enumerate(body.messages):
                for url in message.image_urls():
                    images.add(url, f"messages[{index}].content")
                for audio in message.audio_parts():
                    images.add_audio(audio.data, audio.format, f"messages[{index}].content")
        except (MediaRequestError, OSError, ValueError) as exc:  # the decoded ones so far are deleted
            images.close()
            return _error_response(400, str(exc), param="messages")
        gen_images = images.files()
        tools = None
        if body.tools:
            tools = json.dumps([t.function.model_dump(exclude_none=True) for t in body.tools], ensure_ascii=False)
        gen = {
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "max_new_tokens": body.max_completion_tokens or body.max_tokens,
            "repetition_penalty": body.repetition_penalty,
            "stop": body.stop,
        }
        try:
            release_slot = await limiter.acquire()
        except Overloaded as exc:
            images.close()
            return _error_response(503, str(exc), "server_error", code="server_overloaded",
                                   headers={"Retry-After": "1"})
        def release() -> None:
            release_slot()
            images.close()

        request_id = protocol.new_id()
        if not body.stream:
            try:
                replies = []
                for _ in range(body.n):
                    reply = await _reply_unless_disconnected(request, engine, run_in_threadpool, messages, system, tools,
                                                             dict(gen, **gen_images))
                    if reply is None:  # the client is gone: nobody reads an answer
                        return JSONResponse({}, status_code=499)
                    replies.append(reply)
            except LmfError as exc:  # a conversation or setting the engine rejects
                return _error_response(400, str(exc))
            except Exception:  # noqa: BLE001 - the log gets the traceback, the client an opaque id
                return _internal_error("generation")[0]
            finally:
                release()
            choices = [_choice(i, r, engine.parse_tool_calls(r.text) if tools else None) for i, r in enumerate(replies)]
            usage = protocol.usage_body(replies[0].prompt_tokens, sum(r.completion_tokens for r in replies))
            return JSONResponse(protocol.completion_body(request_id, model_name, choices, usage))

        try:
            stream = await run_in_threadpool(engine.stream_chat, messages, system, tools, **gen, **gen_images)
        except LmfError as exc:
            release()
            return _error_response(400, str(exc))
        except Exception:  # noqa: BLE001
            release()
            return _internal_error("generation")[0]
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def cleanup() -> None:
            stream.close()
            release()

        events = _sse_events(stream, request_id, model_name, include_usage, cleanup, iterate_in_threadpool)
        return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(cleanup),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _request_body(request: Any):
    """The request's :class:`~lmf.api.protocol.ChatCompletionRequest`, read as JSON whatever its Content-Type says
    (none, text/plain: as OpenAI's server); a bad body raises FastAPI's RequestValidationError (a 400)."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    from lmf.api.protocol import ChatCompletionRequest

    raw = await request.body()
    try:
        data = json.loads(raw)
    except ValueError as exc:  # not JSON, or not UTF-8/16/32 text
        error = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
                                       "ctx": {"error": error}}]) from None
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


DISCONNECT_POLL_S = 0.1


async def _reply_unless_disconnected(request: Any, engine: "ChatEngine", run_in_threadpool: Callable, messages: list,
                                     system: Optional[str], tools: Optional[str], gen: dict) -> Optional[Any]:
    """A complete reply (``Response``), or None when the client disconnected first (generation is then stopped)."""
    from lmf.chat.engine import Response

    stream = await run_in_threadpool(engine.stream_chat, messages, system, tools, **gen)
    gone = asyncio.Event()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        gone.set()
        stream.close()  # the generating thread sees the cancel flag at its next token

    watcher = asyncio.create_task(watch())
    try:
        text = await run_in_threadpool(lambda: "".join(stream))
    finally:
        watcher.cancel()
        stream.close()
    if gone.is_set():
        logger.info("client disconnected: generation stopped after %d tokens", stream.completion_tokens)
        return None
    return Response(text, stream.prompt_tokens, stream.completion_tokens, stream.finish_reason or "stop")


def _choice(index: int, reply: Any, tool_calls: Optional[list[dict]]) -> dict:
    """One non-streaming choice: a text reply, or (finish_reason ``tool_calls``) the parsed tool calls."""
    if not tool_calls:
        return {"index": index, "message": {"role": "assistant", "content": reply.text},
                "finish_reason": reply.finish_reason}
    import uuid

    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call} for call in tool_calls]
    return {"index": index, "message": {"role": "assistant", "content": None, "tool_calls": calls},
            "finish_reason": "tool_calls"}


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse_events(stream: "ChatStream", request_id: str, model_name: str, include_usage: bool,
                      cleanup: Callable[[], None], iterate_in_threadpool: Callable) -> AsyncIterator[str]:
    """Server-sent events of one streamed completion, ending with ``data: [DONE]``."""
    from lmf.api import protocol

    try:
        yield _sse(protocol.chunk_body(request_id, model_name, {"role": "assistant", "content": ""}))
        async for piece in iterate_in_threadpool(stream):
            if piece:
                yield _sse(protocol.chunk_body(request_id, model_name, {"content": piece}))
        yield _sse(protocol.chunk_body(request_id, model_name, {}, finish_reason=stream.finish_reason or "stop"))
        if include_usage:
            usage = protocol.usage_body(stream.prompt_tokens, stream.completion_tokens)
            yield _sse(protocol.chunk_body(request_id, model_name, {}, usage=usage, with_choice=False))
        yield "data: [DONE]\n\n"
    except Exception:  # noqa: BLE001 - headers are sent: report in-band, with an opaque id
        import uuid

        error_id = f"err-{uuid.uuid4().hex[:12]}"
        logger.exception("generation failed while streaming (error id %s)", error_id)
        yield _sse(protocol.error_body(f"internal server error (id {error_id}); the server log has the details",
                                       "server_error", code="internal_error"))
    finally:
        cleanup()


def run_api(argv: list[str]) -> int:
    """``lmf api CONFIG.yaml [key=value ...] [--host H] [--port P] [--model-name N] [--max-concurrent C]
    [--max-queue Q]``."""
    try:
        import uvicorn
    except ImportError:
        from lmf.extras.errors import NotAvailableError

        raise NotAvailableError("lmf api needs fastapi and uvicorn: pip install 'lmf[api]'") from None
    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config

    settings, rest = parse_api_settings(argv)
    cfg = load_serving_config(rest)
    check_port_free(settings.host, settings.port)
    engine = create_engine(cfg)
    app = create_app(engine, settings)
    if settings.host not in LOOPBACK_HOSTS and not settings.api_key:
        logger.warning("serving on %s without an API key: anyone who can reach this port can use the model",
                       settings.host)
    print(f"lmf api: serving {app.state.model_name!r} on http://{settings.host}:{settings.port}/v1 "
          f"({'API key required' if settings.api_key else 'no API key'})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5)
    except OSError as exc:
        raise LmfError(f"cannot serve on {settings.host}:{settings.port}: {exc}") from exc
    finally:
        engine.close()
    return 0
