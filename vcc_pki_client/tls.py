"""Server and client ``ssl.SSLContext``s for mutual TLS that follow certificate renewals and CRLs.

:func:`server_ssl_context` and :func:`client_ssl_context` build one-off contexts from the
files as they are now. :class:`ReloadingContexts` hands out contexts that present the
current certificate after :meth:`ReloadingContexts.reload` (the renewer calls it after a
swap) and check peers against the CRL of :meth:`ReloadingContexts.set_crl` (the CRL watcher
calls it when a new one arrives), without a restart and without touching connections
already established.

How a handed-out context follows: each is a *front* whose handshakes run on an *inner*
context built from the files and the CRL of the moment; a reload builds new inners and swaps
one reference each. Inners are never modified once built (other threads are handshaking on
them), so nothing accumulates: an old CRL or certificate is dropped with its inner.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from .errors import ConfigurationError
from .files import CertificateFiles
from .keys import certificates_pem

__all__ = ["ReloadingContexts", "client_ssl_context", "server_ssl_context"]

logger = logging.getLogger("vcc_pki_client")

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
    the connection to ``inner``, whose store (trust and CRL) then verifies the client. The
    verification *flags* stay those of the front (OpenSSL copies them into the connection
    when it is made), so the CRL check is switched on and off there.
    """

    def __init__(self, front: ssl.SSLContext, require_client_cert: bool, alpn: tuple[str, ...],
                 check_revocation: bool, follow: Callable[[], None]) -> None:
        self.front = weakref.ref(front)  # the front holds the only strong reference to its side
        self.follow = follow
        self.require_client_cert = require_client_cert
        self.alpn = alpn
        self.check_revocation = check_revocation
        self.inner: ssl.SSLContext | None = None

    def select(self, conn: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, front: ssl.SSLContext) -> None:
        self.follow()
        conn.context = self.inner  # type: ignore[assignment]  # set before the front is handed out


class _ClientFront(ssl.SSLContext):
    """A client context whose connections are made by its current inner context.

    ``wrap_socket`` (blocking sockets: httpx, requests, urllib) and ``wrap_bio`` (asyncio,
    uvloop, anyio) are the two ways a connection is made from a context; both are handed to
    the inner. ALPN set on the front (httpcore does, on every connection) is passed on.
    Other settings made on the front after it was handed out do not reach the handshake.
    """

    inner: ssl.SSLContext
    check_revocation: bool = False
    alpn: list[str] | None = None
    # Called with the server certificate's DER after each handshake of wrap_socket; raises
    # ssl.SSLCertVerificationError to refuse it (the connection is closed before any data).
    peer_check: Callable[[bytes], None] | None = None
    follow: Callable[[], None] = staticmethod(lambda: None)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.follow()
        sock = self.inner.wrap_socket(*args, **kwargs)
        if self.peer_check is not None:
            if not kwargs.get("do_handshake_on_connect", True):
                sock.close()
                raise ssl.SSLError("this context checks the server after the handshake: "
                                   "do_handshake_on_connect must stay True")
            try:
                self.peer_check(sock.getpeercert(binary_form=True) or b"")
            except BaseException:
                sock.close()
                raise
        return sock

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        if self.peer_check is not None:
            raise ssl.SSLError("this context checks the server after the handshake; use it with blocking sockets")
        self.follow()
        return self.inner.wrap_bio(*args, **kwargs)

    def set_alpn_protocols(self, alpn_protocols: Iterable[str]) -> None:
        self.alpn = list(alpn_protocols)
        super().set_alpn_protocols(self.alpn)
        self.inner.set_alpn_protocols(self.alpn)


class ReloadingContexts:
    """Hands out mTLS contexts that follow certificate renewals and, optionally, the CA's CRL.

    Takes the service's :class:`~vcc_pki_client.files.CertificateFiles` and the CA trust
    (``ca_file`` and/or ``ca_certs``; client contexts fall back to the system store).
    Contexts are remembered weakly; :meth:`reload` makes every live one present the pair
    now on disk for later handshakes, and :meth:`set_crl` makes those made with
    ``check_revocation=True`` check peers against a new CRL.

    Example::

        contexts = ReloadingContexts(files, ca_file="tls/ca_chain.pem")
        server = contexts.server_context()   # e.g. from uvicorn's ssl_context_factory
        client = contexts.client_context()   # e.g. httpx.Client(verify=client)
        files.write(new_cert, new_key, chain)
        contexts.reload()                    # later handshakes present the new pair

    Revocation: a context made with ``check_revocation=True`` checks the peer's certificate
    against the CRL file of the last :meth:`set_crl`. Before any CRL (or after
    ``set_crl(None)``) it refuses every peer, unless ``soft_fail=True`` was given to
    :meth:`set_crl`, which lets peers through unchecked until a CRL arrives.

    Files replaced by another process (the ``vcc-pki`` agent, another worker of the same
    server): every handshake calls :meth:`follow_files`, which looks at the files at most every
    ``reload_interval`` seconds (None: never) and reloads when they changed.

    Trust follows too: :meth:`set_trust` replaces ``ca_certs`` for later handshakes (the SDK
    calls it when the CA's roots or intermediates change, SPEC §13).

    Known limits: a ``ca_file`` is read when contexts are built. Set ALPN protocols on a
    server context through ``alpn_protocols=``, not on the context (the connection is
    moved to an inner context, whose ALPN setting is the one OpenSSL uses); do not set
    ``sni_callback`` on it. Settings changed on a handed-out context (other than ALPN on a
    client context) do not reach its handshakes.
    """

    def __init__(
        self,
        files: CertificateFiles,
        ca_file: CAFile | None = None,
        *,
        ca_certs: Sequence[x509.Certificate] = (),
        reload_interval: float | None = 10.0,
    ) -> None:
        self.files = files
        self._reload_interval = reload_interval
        self._stamp: tuple[tuple[int, int, int], ...] | None = None  # the files' versions last loaded
        self._next_look = 0.0
        self._ca_file = ca_file
        self._ca_certs = tuple(ca_certs)
        self._lock = threading.Lock()
        self._servers: weakref.WeakSet[_ServerSide] = weakref.WeakSet()
        self._clients: weakref.WeakSet[_ClientFront] = weakref.WeakSet()
        self._certificate: x509.Certificate | None = None
        self._crl_file: Path | None = None
        self._soft_fail = False

    @property
    def certificate(self) -> x509.Certificate | None:
        """The certificate the contexts present (None before any context was made)."""
        return self._certificate

    @property
    def crl_file(self) -> Path | None:
        """The CRL file revocation-checking contexts load (None before :meth:`set_crl`)."""
        return self._crl_file

    def server_context(self, *, require_client_cert: bool = True, alpn_protocols: Sequence[str] = (),
                       check_revocation: bool = False) -> ssl.SSLContext:
        """A server context that follows :meth:`reload` (and, with ``check_revocation``,
        :meth:`set_crl`); settings as :func:`server_ssl_context`."""
        alpn = tuple(alpn_protocols)
        front = _server_settings(self._ca_file, self._ca_certs, require_client_cert, alpn)
        side = _ServerSide(front, require_client_cert, alpn, check_revocation, self.follow_files)
        with self._lock:
            inner, self._certificate = self._build([side], [])[0]
            side.inner = inner
            _set_crl_check(front, self._checks(side))
            self._servers.add(side)
        front.sni_callback = side.select  # the front holds the only strong reference to side
        return front

    def client_context(self, *, check_revocation: bool = False,
                       peer_check: Callable[[bytes], None] | None = None) -> ssl.SSLContext:
        """A client context that follows :meth:`reload` (and, with ``check_revocation``,
        :meth:`set_crl`); settings as :func:`client_ssl_context`. ``peer_check`` is called with
        the server certificate (DER) after each handshake and may refuse it by raising
        ``ssl.SSLCertVerificationError`` (blocking sockets only)."""
        front = _ClientFront(ssl.PROTOCOL_TLS_CLIENT)
        _client_defaults(front)
        front.check_revocation = check_revocation
        front.peer_check = peer_check
        front.follow = self.follow_files
        with self._lock:
            front.inner, self._certificate = self._build([], [front])[0]
            self._clients.add(front)
        return front

    def reload(self) -> x509.Certificate:
        """Make every live context present the pair now on disk (for new handshakes).

        Returns that certificate. The pair is read once, checked, and loaded everywhere.
        On ConfigurationError (unreadable or mismatched files) no context changes.
        """
        with self._lock:
            return self._rebuild()

    def follow_files(self) -> None:
        """Reload when another process (the ``vcc-pki`` agent, another worker) replaced the
        files: called at each handshake, it looks at them at most every ``reload_interval``
        seconds (one ``stat`` each). A pair caught mid-replacement or unusable is logged and
        the one in force stays, to be tried again at the next look."""
        interval = self._reload_interval
        if interval is None:
            return
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + interval
        stamp = self.files.stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            cert = self.reload()
        except ConfigurationError as exc:
            logger.warning("the certificate files changed but cannot be loaded (%s); the pair in force stays", exc)
            return
        logger.info("certificate files replaced by another process: now presenting serial %x", cert.serial_number)

    def set_trust(self, ca_certs: Sequence[x509.Certificate]) -> None:
        """Trust ``ca_certs`` (besides a ``ca_file``) from now on, in every live context (new
        handshakes). Raises ConfigurationError if OpenSSL refuses them (no context changes)."""
        with self._lock:
            previous, self._ca_certs = self._ca_certs, tuple(ca_certs)
            try:
                self._rebuild()
            except ConfigurationError:
                self._ca_certs = previous
                raise

    def set_crl(self, crl_file: Path | None, *, soft_fail: bool = False) -> None:
        """Check peers of revocation-checking contexts against ``crl_file`` (PEM or DER) from
        now on (new handshakes). ``None``: no CRL; such contexts then refuse every peer, or
        with ``soft_fail`` accept peers unchecked. Raises ConfigurationError for a file
        OpenSSL cannot load (no context changes)."""
        with self._lock:
            previous = self._crl_file, self._soft_fail
            self._crl_file, self._soft_fail = crl_file, soft_fail
            try:
                self._rebuild()
            except ConfigurationError:
                self._crl_file, self._soft_fail = previous
                raise

    def _rebuild(self) -> x509.Certificate:
        servers, clients = list(self._servers), list(self._clients)
        built = self._build(servers, clients)
        sides: list[_ServerSide | _ClientFront] = [*servers, *clients]
        for side, (inner, _) in zip(sides, built, strict=True):
            if isinstance(side, _ServerSide):
                front = side.front()
                if front is not None:
                    _set_crl_check(front, self._checks(side))
                side.inner = inner  # one reference store: atomic for handshaking threads
            else:
                if side.alpn is not None:
                    inner.set_alpn_protocols(side.alpn)
                side.inner = inner
        cert = built[0][1] if built else self.files.load()[0]
        self._certificate = cert
        return cert

    def _checks(self, side: _ServerSide | _ClientFront) -> bool:
        return side.check_revocation and (self._crl_file is not None or not self._soft_fail)

    def _build(self, servers: Sequence[_ServerSide],
               clients: Sequence[_ClientFront]) -> list[tuple[ssl.SSLContext, x509.Certificate]]:
        """New inner contexts for these sides, from one read of the pair and the CRL file."""
        inners: list[ssl.SSLContext] = []
        sides: list[_ServerSide | _ClientFront] = [*servers, *clients]
        for side in sides:
            if isinstance(side, _ServerSide):
                # Same settings and trust as the front: after the switch OpenSSL verifies the
                # client against the inner context's store.
                inner = _server_settings(self._ca_file, self._ca_certs, side.require_client_cert, side.alpn)
            else:
                inner = _client_settings(self._ca_file, self._ca_certs)
            checks = self._checks(side)
            _set_crl_check(inner, checks)
            if checks and self._crl_file is not None:
                try:
                    inner.load_verify_locations(cafile=os.fspath(self._crl_file))
                except (ssl.SSLError, OSError) as exc:
                    raise ConfigurationError(f"cannot load the CRL {self._crl_file}: {exc}") from exc
            inners.append(inner)
        if not inners:
            return []
        stamp = self.files.stamp()  # before the read: a replacement in between is seen at the next look
        cert = self.files.ssl_load(*inners)
        self._stamp = stamp
        return [(inner, cert) for inner in inners]


def _set_crl_check(ctx: ssl.SSLContext, on: bool) -> None:
    if on:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    else:
        ctx.verify_flags &= ~ssl.VERIFY_CRL_CHECK_LEAF


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


def _client_defaults(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True  # and CERT_REQUIRED: PROTOCOL_TLS_CLIENT's defaults


def _client_settings(ca_file: CAFile | None, ca_certs: Sequence[x509.Certificate]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _client_defaults(ctx)
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


def checking_client_context(ca_certs: Sequence[x509.Certificate],
                            peer_check: Callable[[bytes], None]) -> ssl.SSLContext:
    """A client context without a certificate of its own, trusting ``ca_certs``, that refuses
    a server :func:`peer_check` refuses (see :meth:`ReloadingContexts.client_context`)."""
    front = _ClientFront(ssl.PROTOCOL_TLS_CLIENT)
    _client_defaults(front)
    front.inner = _client_settings(None, ca_certs)
    front.peer_check = peer_check
    return front
