"""Helpers for tests where services built with the SDK talk to each other over mTLS."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import uvicorn
from cryptography.hazmat.primitives import hashes
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from support import free_port
from vcc_pki_client import PKIClient, RetryPolicy
from vcc_pki_server.home import Home

FAST = RetryPolicy(max_attempts=3, backoff_initial=0.01, backoff_max=0.05)


def new_id() -> str:
    return f"sdk-{uuid.uuid4().hex[:10]}"


def fingerprint(home: Home, *, style: str = "plain") -> str:
    digest: str = home.root_certificate().fingerprint(hashes.SHA256()).hex()
    if style == "colons":
        return "sha256:" + ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper()
    return digest


@contextlib.contextmanager
def serving(config: uvicorn.Config) -> Iterator[uvicorn.Server]:
    """Run uvicorn with ``config`` in a thread until the block ends."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)


class PeerServer:
    """A tiny Starlette service over uvicorn, TLS from ``pki.server_ssl_context()``."""

    def __init__(self, pki: PKIClient) -> None:
        self.port = free_port()
        app = Starlette(routes=[Route("/hello", self._hello)])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, http="h11", lifespan="off",
                                log_config=None, access_log=False,
                                ssl_context_factory=lambda config, default: pki.server_ssl_context())
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    async def _hello(self, request: Request) -> Response:
        return PlainTextResponse("hello over mTLS")

    def __enter__(self) -> PeerServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline and self._thread.is_alive(), "peer server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)
