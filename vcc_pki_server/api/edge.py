"""The edge: what every HTTP request goes through, whichever handler answers it.

One access-log line and one count in the metrics per request, and one error mapping: a
:class:`~vcc_pki_server.errors.CAError` becomes its RFC 9457 problem document, Starlette's
404/405/413 theirs, anything else a logged 500 (re-raised for the server, as Starlette's
``ServerErrorMiddleware`` does). In front of the router sits a short dispatch for the few
routes whose path has no parameters and that carry most of the traffic (certificate
requests): the router's path matching costs more than they do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import CAError
from ..metrics import Metrics
from .problems import STATUS_BY_CODE, UNAVAILABLE_DETAIL, from_error, problem_response

log = logging.getLogger("vcc_pki_server.api")
access_log = logging.getLogger("vcc_pki_server.access")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def loggable(path: str) -> str:
    """``path`` (percent-decoded by the server) with control characters, non-ASCII and quotes
    escaped: a request for ``/x%0A<fake log line>`` must not forge lines in the log."""
    return path.encode("unicode_escape").decode("ascii").replace('"', '\\"')


class Edge:
    """The ASGI application the server runs: ``Edge(Router(ROUTES), state=..., metrics=..., direct=[...])``.

    ``state`` is what handlers find as ``request.app.state`` (the authority, the issuer);
    ``direct`` are routes answered without the router when path and method match exactly.
    """

    def __init__(self, app: ASGIApp, *, state: State, metrics: Metrics, direct: Iterable[Route] = ()) -> None:
        self.app = app
        self.state = state
        self.metrics = metrics
        self._direct: dict[tuple[str, str], tuple[ASGIApp, str]] = {
            (route.path, method): (route.app, route.path) for route in direct for method in route.methods or ()}
        # The ``route`` label of a request the router answered: its route's path (bounded, unlike
        # the request's own path), found from the endpoint the router puts in the scope.
        self._route_names: dict[object, str] = {
            route.endpoint: route.path for route in getattr(app, "routes", ()) if isinstance(route, Route)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self  # handlers' request.app; the router raises HTTPException under it
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        direct = None if scope.get("root_path") else self._direct.get((scope["path"], scope["method"]))
        try:
            await (direct[0] if direct else self.app)(scope, receive, send_status)
        except ClientDisconnect:
            status = status or 499  # nobody to answer (nginx's code for it, in the log only)
        except Exception as exc:
            if status:  # the answer had begun: nothing else can be said on this connection
                raise
            response = self._problem(scope, exc)
            status = response.status_code
            await response(scope, receive, send)
            if status == 500:
                raise
        finally:
            self._log_access(scope, status or 500, start)
            route = direct[1] if direct else self._route_names.get(scope.get("endpoint"), "unmatched")
            self.metrics.request(route, status or 500, time.perf_counter() - start)

    @staticmethod
    def _problem(scope: Scope, exc: Exception) -> Any:
        path = scope["path"]
        if isinstance(exc, CAError):
            if STATUS_BY_CODE.get(exc.code, 500) >= 500:
                log.error("request failed path=%s code=%s detail=%s", loggable(path), exc.code, exc.message)
                if not scope.get("state", {}).get("admin"):
                    # Which database, host or file failed is for admins and the log, not for
                    # anyone who can reach the port.
                    return problem_response(exc.code, UNAVAILABLE_DETAIL)
            return from_error(exc)
        if isinstance(exc, HTTPException):
            code = _HTTP_CODES.get(exc.status_code, "malformed_request")
            detail = (f"no route {scope['method']} {path}" if exc.status_code in (404, 405)
                      else str(exc.detail))
            return problem_response(code, detail, status=exc.status_code,
                                    headers=dict(exc.headers) if exc.headers else None)
        log.error("unexpected error path=%s", loggable(path), exc_info=exc)
        return problem_response("internal_error", "internal error; the server log has the details")

    @staticmethod
    def _log_access(scope: Scope, status: int, start: float) -> None:
        if access_log.isEnabledFor(logging.INFO):
            client = scope.get("client") or ("-", 0)
            actor = scope.get("state", {}).get("actor", "-")
            access_log.info('client=%s method=%s path="%s" status=%d ms=%.1f actor=%s', client[0],
                            scope["method"], loggable(scope["path"]), status,
                            (time.perf_counter() - start) * 1000, actor)
