"""create_app(): the Starlette application over an Authority, with error mapping, access log and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api import render
from .api.problems import STATUS_BY_CODE, Problem, from_error, problem_response
from .api.requests import MAX_BODY, authenticate_scope, check_declared_length, parse_json_body
from .api.routes import ISSUE_PATH, ROUTES, issue_arguments
from .authority import Authority
from .errors import CAError

log = logging.getLogger("vcc_pki_server.api")
access_log = logging.getLogger("vcc_pki_server.access")

# A background job started and stopped with the app (e.g. the health checker).
Lifecycle = tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]


def _loggable(path: str) -> str:
    """``path`` (percent-decoded by the server) with control characters, non-ASCII and quotes
    escaped: a request for ``/x%0A<fake log line>`` must not forge lines in the log."""
    return path.encode("unicode_escape").decode("ascii").replace('"', '\\"')


async def _ca_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CAError)
    return _error_response(request.url.path, exc)


def _error_response(path: str, exc: CAError) -> Response:
    if STATUS_BY_CODE.get(exc.code, 500) >= 500:
        log.error("request failed path=%s code=%s detail=%s", _loggable(path), exc.code, exc.message)
    return from_error(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
    code = codes.get(exc.status_code, "malformed_request")
    detail = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    headers = dict(exc.headers or {})
    return problem_response(code, detail, status=exc.status_code, headers=headers or None)


async def _unexpected(request: Request, exc: Exception) -> Response:
    return _unexpected_response(request.url.path)


def _unexpected_response(path: str) -> Response:
    log.exception("unexpected error path=%s", _loggable(path))  # noqa: LOG004 - called from except blocks
    return problem_response("internal_error", "internal error; the server log has the details")


def _log_access(scope: Scope, status: int, start: float) -> None:
    if access_log.isEnabledFor(logging.INFO):
        client = scope.get("client") or ("-", 0)
        actor = scope.get("state", {}).get("actor", "-")
        access_log.info('client=%s method=%s path="%s" status=%d ms=%.1f actor=%s', client[0],
                        scope["method"], _loggable(scope["path"]), status,
                        (time.perf_counter() - start) * 1000, actor)


class AccessLog:
    """One line per request: method, path (no query string), status, duration, actor. No secrets."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            _log_access(scope, status, start)


# What JSONResponse renders (starlette.responses.JSONResponse.render), with one encoder.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
_JSON_TYPE = (b"content-type", b"application/json")


class IssueFastPath:
    """``POST /api/v1/certificates/request`` without Starlette's routing and middleware.

    Certificate requests are nearly all of a busy server's traffic, and for them the router,
    the three middleware layers and the request/response objects cost more CPU than the
    policy check. This answers them directly, doing what the route
    (:func:`.api.routes.request_certificate`) does under :class:`AccessLog` and the exception
    handlers: the same body cap and checks, in the same order, authentication on every
    request, the same answers (201 JSON; CAErrors as their problem documents; anything else
    500, logged, and re-raised for the server as ServerErrorMiddleware does) and the same
    access-log line. Every other request goes through Starlette.
    """

    __slots__ = ("authority",)

    def __init__(self, authority: Authority) -> None:
        self.authority = authority

    @staticmethod
    def handles(scope: Scope) -> bool:
        return (scope["type"] == "http" and scope["path"] == ISSUE_PATH and scope["method"] == "POST"
                and not scope.get("root_path"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500
        started = False
        try:
            try:
                body = await self._issue(scope, receive)
                status, started = 201, True
                await send({"type": "http.response.start", "status": 201,
                            "headers": [(b"content-length", str(len(body)).encode("latin-1")), _JSON_TYPE]})
                await send({"type": "http.response.body", "body": body})
            except CAError as exc:
                response = _error_response(scope["path"], exc)
                status, started = response.status_code, True
                await response(scope, receive, send)
            finally:
                _log_access(scope, status, start)
        except Exception:
            # As ServerErrorMiddleware: a 500 problem unless the answer had started, then re-raise.
            if not started:
                await _unexpected_response(scope["path"])(scope, receive, send)
            raise

    async def _issue(self, scope: Scope, receive: Receive) -> bytes:
        length = content_type = authorization = None
        for name, value in scope["headers"]:  # the first of each, as Request.headers.get
            if name == b"content-length":
                if length is None:
                    length = value.decode("latin-1")
            elif name == b"content-type":
                if content_type is None:
                    content_type = value.decode("latin-1")
            elif name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
        check_declared_length(length)
        chunks: list[bytes] = []
        size = 0
        while True:  # as Request.stream()
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > MAX_BODY:
                        raise Problem("body_too_large", f"request body exceeds the {MAX_BODY}-byte limit")
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            elif message["type"] == "http.disconnect":
                raise ClientDisconnect()
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        service_id, csr, validity = issue_arguments(parse_json_body(raw, content_type))
        actor = authenticate_scope(self.authority, authorization, scope)
        issued = await self.authority.issue_async(service_id, csr, actor=actor, validity_days=validity)
        return _JSON.encode(render.issued(issued)).encode("utf-8")


class _App(Starlette):
    """The Starlette app, with :class:`IssueFastPath` in front for certificate requests."""

    issue_fast_path: IssueFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast = self.issue_fast_path
        if fast is not None and fast.handles(scope):
            scope["app"] = self
            await fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(authority: Authority, *, background: list[Lifecycle] | None = None,
               crl_refresh_seconds: float = 600.0) -> Starlette:
    """The API app. ``background`` jobs start with the app and stop with it; the CRL is
    regenerated before its nextUpdate by a periodic check every ``crl_refresh_seconds``."""
    jobs = list(background or [])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def refresh_crl() -> None:
            while True:
                try:
                    await run_in_threadpool(authority.refresh_crl_if_due)
                except Exception:
                    log.exception("CRL refresh failed")
                await asyncio.sleep(crl_refresh_seconds)

        task = asyncio.create_task(refresh_crl())
        for start, _ in jobs:
            await start()
        try:
            yield
        finally:
            for _, stop in reversed(jobs):
                await stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = _App(
        routes=ROUTES,
        exception_handlers={CAError: _ca_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.authority = authority
    app.add_middleware(AccessLog)
    app.issue_fast_path = IssueFastPath(authority)
    return app

