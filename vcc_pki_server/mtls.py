"""Give the ASGI app the client certificate presented at the TLS handshake.

uvicorn does not implement the ASGI TLS extension (upstream PRs are still open): its scope
carries no client certificate. This module subclasses uvicorn's HTTP protocol so that every
HTTP request's scope gets ``scope["extensions"]["tls"]`` in the shape of that extension::

    {"client_cert_chain": [leaf_pem] or [], "server_cert": None,
     "tls_version": 0x0304, "cipher_suite": 0x1302,
     "client_cert_der": leaf_der or None}     # our addition, see peer_certificate_der()

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
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

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

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
StrPath = str | os.PathLike[str]

# Wire values of TLS versions (RFC 8446 §4.2.1), as the ASGI TLS extension wants them.
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """Describe a finished handshake as the ASGI TLS extension's ``tls`` dict.

    ``client_cert_der`` (not in the ASGI spec) keeps the leaf's DER so that the app does
    not decode PEM on every request.
    """
    der = ssl_object.getpeercert(binary_form=True)
    cipher = ssl_object.cipher()
    suite = None
    if cipher is not None:
        # get_ciphers() ids are 0x0300XXXX, where XXXX is the IANA number the spec asks for.
        ids = {c["name"]: c["id"] & 0xFFFF for c in ssl_object.context.get_ciphers()}
        suite = ids.get(cipher[0])
    return {
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_der": der or None,
        "server_cert": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": suite,
    }


class _WithTLSExtension:
    """Wrap one connection's app so each HTTP scope carries that connection's TLS extension."""

    __slots__ = ("app", "tls")

    def __init__(self, app: ASGIApp, tls: Mapping[str, Any]) -> None:
        self.app = app
        self.tls = tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # A fresh dict per request: one request's app cannot alter what the next one sees.
            tls = {**self.tls, "client_cert_chain": list(self.tls["client_cert_chain"])}
            scope = {**scope, "extensions": {**scope.get("extensions", {}), "tls": tls}}
        await self.app(scope, receive, send)


class TLSExtensionMixin(asyncio.Protocol):
    """Mix into a uvicorn HTTP protocol class (first base) to add the ASGI TLS extension.

    uvicorn calls ``connection_made`` once the handshake is complete, so the peer
    certificate is known there; the protocol's ``self.app``, read for every request of the
    connection, is then wrapped to put it in each scope. Plain-HTTP connections are left alone.
    """

    app: ASGIApp
    transport: Any  # set by uvicorn's connection_made; replaced by a CoalescingTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Run uvicorn's setup, then bind this connection's TLS facts to its app."""
        super().connection_made(transport)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _WithTLSExtension(self.app, tls_extension(ssl_object))
        self.transport = CoalescingTransport(self.transport, asyncio.get_running_loop())


class MTLSH11Protocol(TLSExtensionMixin, H11Protocol):
    """uvicorn's h11 protocol with the ASGI TLS extension."""


MTLSProtocol: type[asyncio.Protocol]
try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is optional; without it uvicorn's "auto" picks h11 too.
    MTLSProtocol = MTLSH11Protocol
else:  # httptools is a server dependency (pyproject), so this is the one normally used

    class MTLSHttpToolsProtocol(TLSExtensionMixin, HttpToolsProtocol):
        """uvicorn's httptools protocol with the ASGI TLS extension."""

    MTLSProtocol = MTLSHttpToolsProtocol
    __all__ += ["MTLSHttpToolsProtocol"]


def peer_certificate_der(scope: Mapping[str, Any]) -> bytes | None:
    """Return the DER of the client certificate verified at the handshake, or None.

    Reads the ASGI TLS extension: our ``client_cert_der`` when present, else the first PEM
    of ``client_cert_chain`` (so a server that implements the extension natively works
    too). None for plain HTTP and for a TLS client that sent no certificate.
    """
    tls = scope.get("extensions", {}).get("tls")
    if not tls:
        return None
    der: bytes | None = tls.get("client_cert_der")
    if der is not None:
        return der
    chain = tls.get("client_cert_chain") or []
    return ssl.PEM_cert_to_DER_cert(chain[0]) if chain else None


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
