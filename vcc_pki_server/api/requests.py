"""Reading requests: capped JSON bodies, typed fields, query parameters, and who is asking."""

from __future__ import annotations

import json
from collections.abc import Callable, MutableMapping
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive

from ..authority import Actor, Authority
from ..errors import InvalidRequest, NotAuthenticated, NotPermitted
from ..mtls import peer_certificate_der
from .problems import Problem
from .store_calls import StoreCalls

MAX_BODY = 64 * 1024
T = TypeVar("T")


async def read_json(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object; the body is capped at 64 KiB even without a Content-Length."""
    raw = await read_body(request.receive, request.headers.get("content-length"))
    return parse_json_body(raw, request.headers.get("content-type"), optional=optional)


async def read_body(receive: Receive, length: str | None) -> bytes:
    """The whole body of a request with Content-Length ``length`` (or None), read from the
    ASGI ``receive`` and capped at :data:`MAX_BODY`, with or without a Content-Length."""
    check_declared_length(length)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > MAX_BODY:
                raise Problem("body_too_large", f"request body exceeds the {MAX_BODY}-byte limit")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_declared_length(length: str | None) -> None:
    """Refuse a Content-Length over the cap before reading the body."""
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise Problem("body_too_large", f"request body of {length} bytes exceeds the {MAX_BODY}-byte limit")


def parse_json_body(raw: bytes, content_type: str | None, *, optional: bool = False) -> dict[str, Any]:
    """A whole request body (at most :data:`MAX_BODY`) as its JSON object, else a problem:
    empty, not ``application/json``, not JSON, not an object."""
    if not raw.strip():
        if optional:
            return {}
        raise Problem("malformed_request", "request body is empty; send a JSON object")
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise Problem("unsupported_media_type",
                      f"content type {media or '(none)'!r} is not supported; send application/json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem("malformed_request", f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. 30000 nested arrays: within the size cap, beyond the parser
        raise Problem("malformed_request", "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise Problem("malformed_request", "request body must be a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type[T], *, required: bool = True) -> T | None:
    """``body[name]`` checked to be a ``kind``; missing required fields and wrong types are 422."""
    if name not in body or body[name] is None:
        if required:
            raise InvalidRequest(f"missing required field '{name}'")
        return None
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def requested_lifetime(body: dict[str, Any]) -> timedelta | None:
    """The lifetime a request or renewal body asks for: ``validity_days`` (a positive integer)
    or ``validity_seconds`` (an integer; the policy refuses under 300), not both; None if
    neither. Whether it is allowed is the policy's to say."""
    days = field(body, "validity_days", int, required=False)
    seconds = field(body, "validity_seconds", int, required=False)
    if days is not None and seconds is not None:
        raise InvalidRequest("give validity_days or validity_seconds, not both")
    if days is not None:
        if days < 1:
            raise InvalidRequest(f"validity_days must be a positive integer, got {days}")
        return timedelta(days=min(days, _LONGEST_DAYS))
    if seconds is not None:
        return timedelta(seconds=max(min(seconds, _LONGEST_DAYS * 86400), -_LONGEST_DAYS * 86400))
    return None


_LONGEST_DAYS = 10**6  # beyond any policy; keeps timedelta() from overflowing on absurd input


def query_int(request: Request, name: str, *, default: int | None = None, low: int = 0,
              high: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter '{name}' must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequest(f"query parameter '{name}' must be {bound}, got {value}")
    return value


def query_bool(request: Request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise InvalidRequest(f"query parameter '{name}' must be true or false, got {raw!r}")


def authenticate(request: Request) -> Actor:
    """Who is asking: a bearer token (admin or enrolment) or else the mTLS client certificate.

    Synchronous (it reads the store): call it inside the worker thread with the work itself.
    Certificates are re-checked on every request (fingerprint, revocation, expiry), never
    trusted because a handshake or a resumed session once accepted them.
    """
    return authenticate_scope(request.app.state.authority, request.headers.get("authorization"),
                              request.scope)


def authenticate_scope(authority: Authority, header: str | None, scope: MutableMapping[str, Any], *,
                       metrics: bool = False) -> Actor:
    """:func:`authenticate` over an ASGI scope and its ``Authorization`` header (or None);
    the actor's label goes to ``scope["state"]["actor"]`` for the access log. A metrics
    token is refused unless ``metrics`` (the ``/metrics`` route)."""
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise NotAuthenticated("Authorization must be 'Bearer <token>'", code="invalid_token")
        actor = authority.authenticate_token(value.strip())
    else:
        der = peer_certificate_der(scope)
        if der is None:
            raise NotAuthenticated("no credentials: present a client certificate or a bearer token")
        actor = authority.authenticate_certificate(der)
    if actor.kind == "metrics" and not metrics:
        raise NotPermitted("a metrics token opens GET /metrics and nothing else")
    adopt_actor(scope, actor)
    return actor


def adopt_actor(scope: MutableMapping[str, Any], actor: Actor) -> None:
    """Note who asks in the request's scope: for the access log, the edge and the metrics."""
    state = scope.setdefault("state", {})
    state["actor"] = actor.label  # for the access log
    state["admin"] = actor.is_admin  # a failure's full detail is for admins (the edge)
    state["enrolment"] = actor.kind == "enrolment"  # a first certificate (the issued metric)


async def as_actor(request: Request, work: Callable[[Actor], T]) -> T:
    """Authenticate and run ``work(actor)`` in one hop to a store thread, within the database
    deadline (:class:`.store_calls.StoreCalls`); enrolment tokens are refused (they may only
    request the first certificate, :mod:`.issuance`)."""
    def run() -> T:
        actor = authenticate(request)
        if actor.kind == "enrolment":
            raise NotPermitted("an enrolment token may only request the first certificate")
        return work(actor)

    return await store_calls(request).run(run)


def store_calls(request: Request) -> StoreCalls:
    return request.app.state.store_calls  # type: ignore[no-any-return]


def query_time(request: Request, name: str) -> datetime | None:
    """An RFC 3339 time in the query (``2026-12-01T00:00:00Z``), or None; 400 if malformed."""
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{name} must be an RFC 3339 time such as 2026-12-01T00:00:00Z, got {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
