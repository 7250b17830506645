"""create_app(): the Starlette application over an Authority, with error mapping, access log and lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api.problems import STATUS_BY_CODE, from_error, problem_response
from .api.routes import ROUTES
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
    if STATUS_BY_CODE.get(exc.code, 500) >= 500:
        log.error("request failed path=%s code=%s detail=%s", _loggable(request.url.path), exc.code,
                  exc.message)
    return from_error(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "malformed_request")
    detail = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    headers = dict(exc.headers or {})
    return problem_response(code, detail, status=exc.status_code, headers=headers or None)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error path=%s", _loggable(request.url.path))
    return problem_response("internal_error", "internal error; the server log has the details")


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
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                actor = scope.get("state", {}).get("actor", "-")
                access_log.info('client=%s method=%s path="%s" status=%d ms=%.1f actor=%s', client[0],
                                scope["method"], _loggable(scope["path"]), status,
                                (time.perf_counter() - start) * 1000, actor)


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

    app = Starlette(
        routes=ROUTES,
        exception_handlers={CAError: _ca_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.authority = authority
    app.add_middleware(AccessLog)
    return app

