"""For services served by uvicorn: the client certificate in each request's ASGI scope, and
which service the caller is.

uvicorn does not implement the ASGI TLS extension: its scope carries no client certificate.
:class:`MTLSH11Protocol` (``uvicorn.Config(..., http=MTLSH11Protocol)``) adds it, so that
every HTTP request's scope has ``scope["extensions"]["tls"]``::

    {"client_cert_chain": [leaf_pem] or [], "server_cert": None,
     "tls_version": 0x0304, "cipher_suite": 0x1302,
     "client_cert_der": leaf_der or None}     # our addition, see peer_certificate_der()

and :func:`caller_service_id` reads the caller's service id from it::

    config = uvicorn.Config(app, host="0.0.0.0", port=9443, http=MTLSH11Protocol,
                            ssl_context_factory=lambda config, default: pki.server_ssl_context())

    async def items(request):
        if caller_service_id(request.scope) not in {"billing", "reports"}:
            return PlainTextResponse("forbidden", status_code=403)

This module needs uvicorn (the rest of the SDK does not). The hook leans on uvicorn internals
(``connection_made`` and the ``self.app`` attribute its protocols read for every request);
the SDK's tests run it against the uvicorn they install. A connection keeps the certificate it
was opened with; ``server_ssl_context()`` refuses revoked and expired certificates at every
handshake.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .identity import peer_service_id

__all__ = ["MTLSH11Protocol", "TLSExtensionMixin", "caller_service_id", "peer_certificate_der", "tls_extension"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Run uvicorn's setup, then bind this connection's TLS facts to its app."""
        super().connection_made(transport)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _WithTLSExtension(self.app, tls_extension(ssl_object))


class MTLSH11Protocol(TLSExtensionMixin, H11Protocol):
    """uvicorn's h11 protocol with the ASGI TLS extension (``uvicorn.Config(http=...)``)."""


def peer_certificate_der(scope: Mapping[str, Any]) -> bytes | None:
    """The DER of the client certificate verified at the handshake, or None.

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


def caller_service_id(scope: Mapping[str, Any], *, trust_domain: str | None = None) -> str | None:
    """The service id of the caller of this request (:func:`peer_service_id` of its verified
    client certificate), or None without one."""
    der = peer_certificate_der(scope)
    return None if der is None else peer_service_id(der, trust_domain=trust_domain)
