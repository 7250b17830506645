"""Limits at the edge: what an unauthenticated client may hold of a server worker (issue 18).

uvicorn's httptools protocol has no bound on a request's header size, and no timeout before a
connection's first request: a 64 MiB header is buffered whole, and idle or slowloris
connections are held forever, until the file-descriptor limit locks everyone out.
:class:`EdgeLimitsMixin` (on the server's protocol) adds, per worker process:

* ``max_header_bytes`` / ``max_headers``: a request head over either is answered 431 and the
  connection closed (the parser holds at most the limit plus one read);
* ``header_timeout``: from a connection's start, or a request's first byte, to the end of its
  headers; an idle or slowloris connection is closed when it runs out. The TLS handshake before
  it gets as long again (:class:`EdgeServer`; asyncio's own default is 60 s);
* ``max_connections_per_client`` and ``max_connections``: connections over either are closed
  as soon as they are made (the total defaults to the file-descriptor limit less a reserve).

Each trip is logged (WARNING, at most once a second per kind, with how many since).
Connections still in their TLS handshake are not counted (the protocol sees a connection only
once its handshake is done): the handshake timeout is what bounds them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
import socket
import time
from collections import Counter
from typing import Any, ClassVar

import attrs
import uvicorn

log = logging.getLogger("vcc_pki_server.limits")

_FD_RESERVE = 64  # files the worker needs besides client connections (store, logs, probes)


def default_max_connections() -> int:
    """The soft file-descriptor limit less a reserve (at least 32)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 65536
    return max(32, soft - _FD_RESERVE)


@attrs.frozen(kw_only=True)
class EdgeLimits:
    """The limits of one worker; see the module doc. ``max_connections=0``: from the fd limit."""

    max_header_bytes: int = 65536
    max_headers: int = 100
    header_timeout: float = 10.0
    max_connections_per_client: int = 256
    max_connections: int = 0

    def total(self) -> int:
        return self.max_connections or default_max_connections()


class _Trips:
    """Rate-limited WARNING lines: the first trip of a kind at once, then one per second."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def trip(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, 0.0) < 1.0:
            self._unlogged[kind] += 1
            return
        self._last[kind] = now
        more = self._unlogged.pop(kind, 0)
        if more:
            log.warning("%s (and %d more since the last such line)", message % args, more)
        else:
            log.warning(message, *args)


class _Connections:
    """Open connections of this worker, in total and per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.by_client: Counter[str] = Counter()


class EdgeLimitsMixin(asyncio.Protocol):
    """Mix into uvicorn's httptools protocol (first base): the limits of :class:`EdgeLimits`."""

    limits: ClassVar[EdgeLimits] = EdgeLimits()
    _open: ClassVar[_Connections] = _Connections()
    _trips: ClassVar[_Trips] = _Trips()

    client: tuple[str, int] | None
    transport: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._counted: str | None = None
        self._refused = False
        self._in_head = True
        self._head_bytes = 0  # bytes read while a request's head is incomplete
        self._field_bytes = 0  # bytes of the head the parser has seen (URL and header fields)
        self._headers = 0
        self._timer: asyncio.TimerHandle | None = None
        address = self.client[0] if self.client else "?"
        limits, open_ = self.limits, self._open
        if open_.total >= limits.total():
            self._trips.trip("connections", "connection from %s closed: %d connections open, the limit "
                             "(max_connections)", address, open_.total)
            self.transport.abort()
            return
        if open_.by_client[address] >= limits.max_connections_per_client:
            self._trips.trip("per-client", "connection from %s closed: it has %d open, the limit "
                             "(max_connections_per_client)", address, open_.by_client[address])
            self.transport.abort()
            return
        open_.total += 1
        open_.by_client[address] += 1
        self._counted = address
        self._start_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted is not None:
            self._open.total -= 1
            self._open.by_client[self._counted] -= 1
            if not self._open.by_client[self._counted]:
                del self._open.by_client[self._counted]
            self._counted = None
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered 431 and closing: nothing more is parsed
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and not self._refused and self._head_bytes > self.limits.max_header_bytes:
            self._refuse_head()

    # httptools parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()  # type: ignore[misc]
        self._in_head, self._head_bytes, self._headers, self._field_bytes = True, 0, 0, 0
        self._start_timer()

    def on_url(self, url: bytes) -> None:
        self._field_bytes += len(url)
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        self._field_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if self._headers <= self.limits.max_headers:
            super().on_header(name, value)  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        # What the head really held (the read that ended it may carry the body too).
        if self._field_bytes > self.limits.max_header_bytes or self._headers > self.limits.max_headers:
            self._refuse_head()
            return
        self._in_head = False
        self._stop_timer()
        super().on_headers_complete()  # type: ignore[misc]

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()  # type: ignore[misc]

    # internals
    def _refuse_head(self) -> None:
        self._refused = True
        self._in_head = False
        self._stop_timer()
        address = self.client[0] if self.client else "?"
        self._trips.trip("header", "request from %s refused (431): %d header bytes, %d header fields; limits "
                         "%d and %d", address, max(self._head_bytes, self._field_bytes), self._headers,
                         self.limits.max_header_bytes,
                         self.limits.max_headers)
        body = json.dumps({"type": "https://vcc-pki.invalid/problems/request-header-too-large",
                           "title": "Request header fields too large", "status": 431,
                           "detail": f"a request's header may have at most {self.limits.max_header_bytes} bytes "
                                     f"and {self.limits.max_headers} fields",
                           "code": "header_too_large"}).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: application/problem+json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    def _start_timer(self) -> None:
        self._stop_timer()
        self._timer = asyncio.get_running_loop().call_later(self.limits.header_timeout, self._too_slow)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if not self._in_head:
            return
        address = self.client[0] if self.client else "?"
        self._trips.trip("slow", "connection from %s closed: no complete request header within %g s "
                         "(header_timeout; %d bytes came)", address, self.limits.header_timeout, self._head_bytes)
        self.transport.close()


class EdgeServer(uvicorn.Server):
    """uvicorn's server, whose listening sockets end TLS handshakes that take longer than
    ``EdgeLimits.header_timeout`` (uvicorn leaves asyncio's 60 s: a client could hold a file
    descriptor that long per connection without sending a byte)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        loop.create_server = functools.partial(  # type: ignore[method-assign]
            loop.create_server, ssl_handshake_timeout=EdgeLimitsMixin.limits.header_timeout)
        try:
            await super().startup(sockets)
        finally:
            del loop.create_server  # the loop's own method again
