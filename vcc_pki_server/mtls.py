"""Give the ASGI app the client certificate presented at the TLS handshake.

uvicorn does not implement the ASGI TLS extension (upstream PRs are still open): its scope
carries no client certificate. The SDK's :mod:`vcc_pki_client.asgi` adds it (services use it
to tell who calls them); this module puts it on the server's protocols (h11 and httptools)
together with the coalescing transport, and builds the server's context and uvicorn config.

The hook leans on uvicorn internals (``connection_made`` and the ``self.app`` attribute its
protocols read for every request), so pyproject pins ``uvicorn<0.55``;
tests/server/test_mtls.py fails if an upgrade breaks the hook. Raise the bound after it passes.

Known limits: ``client_cert_chain`` holds the leaf only (Python 3.11 does not expose the
chain the client sent); ``server_cert`` is None; WebSocket upgrades and HTTP/2 bypass the
hook, so ``uvicorn_config()`` turns WebSockets off and offers only ``http/1.1`` in ALPN.
A connection keeps the certificate it was opened with, however long it lives: the app must
check expiry and revocation per request.

Usage::

    ctx = server_ssl_context(server / "cert.pem", server / "key.pem", ca / "chain.pem")
    uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=8443, ssl_context=ctx)).run()
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vcc_pki_client.asgi import ASGIApp, peer_certificate_der, tls_extension
from vcc_pki_client.asgi import TLSExtensionMixin as _SDKTLSExtensionMixin

from .limits import EdgeLimitsMixin
from .transport import CoalescingTransport

__all__ = [
    "MTLSH11Protocol",
    "MTLSProtocol",
    "TLSExtensionMixin",
    "peer_certificate_der",
    "server_ssl_context",
    "tls_extension",
    "uvicorn_config",
]

StrPath = str | os.PathLike[str]


class TLSExtensionMixin(_SDKTLSExtensionMixin):
    """The SDK's mixin (the ASGI TLS extension in every scope), plus the server's transport
    that sends one loop pass's writes as one TLS record (:mod:`.transport`)."""

    transport: Any  # set by uvicorn's connection_made; replaced by a CoalescingTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = CoalescingTransport(self.transport, asyncio.get_running_loop())


class MTLSH11Protocol(TLSExtensionMixin, H11Protocol):
    """uvicorn's h11 protocol with the ASGI TLS extension."""


MTLSProtocol: type[asyncio.Protocol]
try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional; without it uvicorn's "auto" picks h11 too.
    MTLSProtocol = MTLSH11Protocol
else:  # httptools is a server dependency (pyproject), so this is the one normally used

    class MTLSHttpToolsProtocol(EdgeLimitsMixin, TLSExtensionMixin, HttpToolsProtocol):
        """uvicorn's httptools protocol with the ASGI TLS extension and the edge's limits."""

    MTLSProtocol = MTLSHttpToolsProtocol
    __all__ += ["MTLSHttpToolsProtocol"]


def server_ssl_context(
    cert_file: StrPath, key_file: StrPath, ca_file: StrPath, *, password: str | bytes | None = None
) -> ssl.SSLContext:
    """Build the server's TLS context: client certificate optional, verified against ``ca_file``.

    ``cert_file`` holds the server certificate followed by its chain; ``ca_file`` the CA
    certificates client certificates must chain to (our root and intermediate). TLS 1.2 or
    later. A client certificate that does not verify fails the handshake; a missing one
    passes it, and the app must answer 401. Raises ``ssl.SSLError``/``OSError`` for bad
    files and ``ValueError`` for a wrong key password.

    Session tickets are off (``num_tickets = 0`` for TLS 1.3, ``OP_NO_TICKET`` for 1.2) so
    that no reconnect resumes with a certificate verified long ago and never checked again.
    OpenSSL's TLS 1.2 session-ID cache, which Python cannot turn off, still resumes for up to
    its timeout (300 s): the app checks expiry and revocation per request in any case.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file, password=password)
    ctx.load_verify_locations(cafile=ca_file)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    ctx.set_alpn_protocols(["http/1.1"])  # HTTP/2 would bypass MTLSProtocol
    return ctx


class _SSLContextFactory:
    """uvicorn's ``ssl_context_factory``; picklable when its source is (``--workers`` spawns)."""

    def __init__(self, source: ssl.SSLContext | Callable[[], ssl.SSLContext]) -> None:
        self.source = source

    def __call__(
        self, config: uvicorn.Config, default: Callable[[], ssl.SSLContext]
    ) -> ssl.SSLContext:
        return self.source if isinstance(self.source, ssl.SSLContext) else self.source()


def uvicorn_config(
    app: ASGIApp | str,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
    **kw: Any,
) -> uvicorn.Config:
    """Return a ``uvicorn.Config`` serving ``app`` over ``ssl_context`` with ``MTLSProtocol``.

    ``ssl_context`` is a context, or a picklable callable that builds one, e.g.
    ``functools.partial(server_ssl_context, cert, key, ca)``: uvicorn's ``workers > 1``
    pickles the config into each worker (and needs ``app`` as an import string), and an
    ``SSLContext`` does not pickle. Other keyword arguments (``log_config``, ``access_log``,
    ``workers``...) go to ``uvicorn.Config`` as given; ``ws`` defaults to ``"none"`` because
    WebSocket upgrades bypass the TLS extension. uvicorn's own ``ssl_*`` options and
    ``http``/``http2`` are refused with ``TypeError``: they would be ignored or bypass the hook.
    """
    clashing = sorted(k for k in kw if k.startswith("ssl_") or k in ("http", "http2"))
    if clashing:
        raise TypeError(f"uvicorn_config() sets TLS and HTTP itself; got {', '.join(clashing)}")
    kw.setdefault("ws", "none")
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=MTLSProtocol,
        ssl_context_factory=_SSLContextFactory(ssl_context),
        **kw,
    )
