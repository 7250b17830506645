"""Server and client ``ssl.SSLContext``s for mutual TLS that follow certificate renewals.

:func:`server_ssl_context` and :func:`client_ssl_context` build one-off contexts from the
files as they are now. :class:`ReloadingContexts` hands out contexts that present the
current certificate after :meth:`ReloadingContexts.reload` (the renewer calls it after a
swap), without a restart and without touching connections already established.
"""

from __future__ import annotations

import os
import ssl
import threading
import weakref
from collections.abc import Sequence

from cryptography import x509

from .errors import ConfigurationError
from .files import CertificateFiles
from .keys import certificates_pem

__all__ = ["ReloadingContexts", "client_ssl_context", "server_ssl_context"]

CAFile = str | os.PathLike[str]


def server_ssl_context(
    files: CertificateFiles,
    ca_file: CAFile | None = None,
    *,
    ca_certs: Sequence[x509.Certificate] = (),
    require_client_cert: bool = True,
) -> ssl.SSLContext:
    """A server context presenting the pair in ``files`` as it is now (no reloading).

    TLS 1.2 or later; client certificates verified against ``ca_file`` and/or
    ``ca_certs`` (one is required), ``CERT_REQUIRED`` by default, ``CERT_OPTIONAL`` with
    ``require_client_cert=False`` (the app must then refuse requests without one). No
    TLS 1.3 session tickets, so every connection presents and verifies a certificate.
    Raises ConfigurationError for unusable files or trust.
    """
    ctx = _server_settings(ca_file, ca_certs, require_client_cert, ())
    files.ssl_load(ctx)
    return ctx


def client_ssl_context(
    files: CertificateFiles | None,
    ca_file: CAFile | None = None,
    *,
    ca_certs: Sequence[x509.Certificate] = (),
) -> ssl.SSLContext:
    """A client context presenting the pair in ``files`` (if given) as it is now.

    TLS 1.2 or later; the server is verified against ``ca_file`` and/or ``ca_certs``, or
    the system store when neither is given; host names are checked.
    Raises ConfigurationError for unusable files or trust.
    """
    ctx = _client_settings(ca_file, ca_certs)
    if files is not None:
        files.ssl_load(ctx)
    return ctx


class _ServerSide:
    """The certificate-bearing half of one handed-out server context.

    The context handed out (the *front*) holds settings and trust but no certificate; its
    SNI callback, which OpenSSL calls for every ClientHello (with or without SNI), moves
    the connection to ``inner``. ``inner`` is never modified once built: a reload builds a
    new one and swaps the reference. That avoids mutating a context that other threads
    are creating connections from, and drops an old certificate even if the key type
    changed (a reloaded context would keep it in its slot for the other key type).
    """

    def __init__(self, inner: ssl.SSLContext, require_client_cert: bool, alpn: tuple[str, ...]) -> None:
        self.inner = inner
        self.require_client_cert = require_client_cert
        self.alpn = alpn

    def select(self, conn: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, front: ssl.SSLContext) -> None:
        conn.context = self.inner


class ReloadingContexts:
    """Hands out mTLS contexts that keep presenting the current certificate after renewal.

    Takes the service's :class:`~vcc_pki_client.files.CertificateFiles` and the CA trust
    (``ca_file`` and/or ``ca_certs``; client contexts fall back to the system store).
    Contexts are remembered weakly; :meth:`reload` makes every live one present the pair
    now on disk for later handshakes.

    Example::

        contexts = ReloadingContexts(files, ca_file="tls/ca_chain.pem")
        server = contexts.server_context()   # e.g. from uvicorn's ssl_context_factory
        client = contexts.client_context()   # e.g. httpx.Client(verify=client)
        files.write(new_cert, new_key, chain)
        contexts.reload()                    # later handshakes present the new pair

    Known limits: trust (the CA bundle) is fixed at creation. Set ALPN protocols on a
    server context through ``alpn_protocols=``, not on the context (the connection is
    moved to an inner context, whose ALPN setting is the one OpenSSL uses); do not set
    ``sni_callback`` on it. Client contexts are reloaded in place with
    ``load_cert_chain`` (Python offers nothing else): keep the key type across rekeys, as
    OpenSSL keeps one certificate per key type in a context.
    """

    def __init__(
        self,
        files: CertificateFiles,
        ca_file: CAFile | None = None,
        *,
        ca_certs: Sequence[x509.Certificate] = (),
    ) -> None:
        self.files = files
        self._ca_file = ca_file
        self._ca_certs = tuple(ca_certs)
        self._lock = threading.Lock()
        self._servers: weakref.WeakSet[_ServerSide] = weakref.WeakSet()
        self._clients: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
        self._certificate: x509.Certificate | None = None

    @property
    def certificate(self) -> x509.Certificate | None:
        """The certificate the contexts present (None before any context was made)."""
        return self._certificate

    def server_context(self, *, require_client_cert: bool = True, alpn_protocols: Sequence[str] = ()) -> ssl.SSLContext:
        """A server context that follows :meth:`reload`; settings as :func:`server_ssl_context`."""
        alpn = tuple(alpn_protocols)
        front = _server_settings(self._ca_file, self._ca_certs, require_client_cert, alpn)
        with self._lock:
            inner = self._server_inner(require_client_cert, alpn)
            self._certificate = self.files.ssl_load(inner)
            side = _ServerSide(inner, require_client_cert, alpn)
            self._servers.add(side)
        front.sni_callback = side.select  # the front holds the only strong reference to side
        return front

    def client_context(self) -> ssl.SSLContext:
        """A client context that follows :meth:`reload`; settings as :func:`client_ssl_context`."""
        ctx = _client_settings(self._ca_file, self._ca_certs)
        with self._lock:
            self._certificate = self.files.ssl_load(ctx)
            self._clients.add(ctx)
        return ctx

    def reload(self) -> x509.Certificate:
        """Make every live context present the pair now on disk (for new handshakes).

        Returns that certificate. The pair is read once, checked, and loaded everywhere.
        On ConfigurationError (unreadable or mismatched files) no context changes.
        """
        with self._lock:
            sides = list(self._servers)
            inners = [self._server_inner(side.require_client_cert, side.alpn) for side in sides]
            clients = list(self._clients)
            cert = self.files.ssl_load(*inners, *clients)
            for side, inner in zip(sides, inners, strict=True):
                side.inner = inner  # one reference store: atomic for handshaking threads
            self._certificate = cert
            return cert

    def _server_inner(self, require_client_cert: bool, alpn: tuple[str, ...]) -> ssl.SSLContext:
        # Same settings and trust as the front: after the switch OpenSSL verifies the
        # client against the inner context's store and mode.
        return _server_settings(self._ca_file, self._ca_certs, require_client_cert, alpn)


def _server_settings(
    ca_file: CAFile | None,
    ca_certs: Sequence[x509.Certificate],
    require_client_cert: bool,
    alpn: Sequence[str],
) -> ssl.SSLContext:
    if ca_file is None and not ca_certs:
        raise ConfigurationError("a server context needs a CA (ca_file or ca_certs) to verify clients against")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    # TLS 1.3 resumption would let a reconnect skip the client certificate (and its
    # expiry/revocation check): issue no tickets, in TLS 1.3 or 1.2.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    _load_trust(ctx, ca_file, ca_certs)
    return ctx


def _client_settings(ca_file: CAFile | None, ca_certs: Sequence[x509.Certificate]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    if ca_file is None and not ca_certs:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_trust(ctx, ca_file, ca_certs)
    return ctx


def _load_trust(ctx: ssl.SSLContext, ca_file: CAFile | None, ca_certs: Sequence[x509.Certificate]) -> None:
    try:
        if ca_file is not None:
            ctx.load_verify_locations(cafile=os.fspath(ca_file))
        if ca_certs:
            ctx.load_verify_locations(cadata=certificates_pem(ca_certs).decode("ascii"))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(f"cannot load the CA bundle {ca_file or '(ca_certs)'}: {exc}") from exc
