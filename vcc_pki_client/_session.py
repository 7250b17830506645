"""The plumbing behind one PKIClient: trust, the HTTP connection, reloading contexts, installing certificates.

Everything here is built lazily, on first use, so constructing a client does no I/O:

* the trust anchors (:func:`~vcc_pki_client.trust.resolve_trust`; a pinned root is fetched
  from the server then, once);
* one httpx client to the PKI server: TLS verified against the anchors and, once the
  service has a certificate, presenting it (a context from :class:`ReloadingContexts`, so
  it follows renewals). A client made before enrolment is replaced by an mTLS one after;
* the reloading contexts handed out for peers (server and client side).

Trust follows the CA (SPEC §13): :meth:`Session.refresh_trust` reads ``/api/v1/ca/bundle``,
accepts a new root only through a cross-certificate from a root already trusted, drops roots
the CA retired, and hands the result to every context; the intermediates it lists are the
issuers whose CRLs the SDK checks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
from cryptography import x509

from ._http import Connection
from .errors import ConfigurationError, InvalidResponseError, PKIError
from .files import CertificateFiles, write_atomically
from .identity import require_pki_server
from .keys import PrivateKey, certificates_pem, key_matches_certificate
from .retry import RetryPolicy
from .tls import ReloadingContexts, checking_client_context
from .trust import (
    LEARNED_FILE_NAME,
    Trust,
    check_ca_chain,
    intermediates_of,
    judge_bundle,
    resolve_trust,
    unverified_context,
    verify_leaf,
)
from .wire import IssuedCertificate

__all__ = ["Session", "pem_certificates"]

logger = logging.getLogger("vcc_pki_client")


class Session:
    """Lazily built trust, connection and contexts of one service's client (thread-safe).

    ``http_client``, when given, is lent: used for every request (including the root fetch
    of a pinned fingerprint) and never closed here.
    """

    def __init__(
        self,
        url: str,
        service_id: str,
        files: CertificateFiles | None,
        *,
        ca_bundle: Path | None,
        pin: str | None,
        timeout: float,
        retry_policy: RetryPolicy,
        http_client: httpx.Client | None,
        clock: Callable[[], datetime],
        reload_interval: float | None = 10.0,
    ) -> None:
        self.url = url
        self.reload_interval = reload_interval
        self.service_id = service_id
        self.files = files
        self.retry_policy = retry_policy
        self.clock = clock
        self._ca_bundle = ca_bundle
        self._pin = pin
        self._timeout = timeout
        self._lent = http_client
        self.lock = threading.RLock()
        self.closed = False
        self._trust: Trust | None = None
        self._connection: Connection | None = None
        self._mtls = False
        self._contexts: ReloadingContexts | None = None
        self._peer_contexts: ReloadingContexts | None = None
        self._ca_chain: list[x509.Certificate] | None = None
        self._recovered = False
        self._issuers: tuple[x509.Certificate, ...] | None = None  # from the last bundle read
        self._trust_read = -1e9  # when the bundle was last read (monotonic)
        self._trust_lock = threading.Lock()  # one bundle read at a time

    @property
    def enrolled(self) -> bool:
        """True when the certificate and key files exist."""
        return self.files is not None and self.files.exists()

    def require_files(self) -> CertificateFiles:
        """The files, or ConfigurationError when the client was made without them. The first
        call finishes a swap that a crash cut short (:meth:`CertificateFiles.recover`)."""
        if self.files is None:
            raise ConfigurationError("this needs cert_file and key_file")
        if not self._recovered:
            self._recovered = True
            try:
                self.files.recover()
            except ConfigurationError as exc:
                logger.warning("service %s: %s", self.service_id, exc)
        return self.files

    def require_open(self) -> None:
        """ConfigurationError once closed."""
        if self.closed:
            raise ConfigurationError("this PKIClient is closed")

    # -- trust ---------------------------------------------------------------------------
    def trust(self) -> Trust:
        """The trust anchors, resolved on first use."""
        with self.lock:
            if self._trust is None:
                self._trust = resolve_trust(ca_bundle=self._ca_bundle, pin=self._pin,
                                            cert_file=self.files.cert_file if self.files else None,
                                            fetch_root=self._fetch_root)
                logger.debug("service %s trusts %s", self.service_id, self._trust.source)
            return self._trust

    def _fetch_root(self) -> bytes:
        """The root as the server serves it, unverified: resolve_trust checks it against the pin."""
        if self._lent is not None:
            return self._root_from(self._lent)
        with httpx.Client(verify=unverified_context(), timeout=self._timeout) as client:
            return self._root_from(client)

    def _root_from(self, client: httpx.Client) -> bytes:
        connection = Connection(self.url, client, owns_client=False, retry_policy=self.retry_policy)
        return connection.request("GET", "/ca/root", params={"format": "der"}).content

    def ca_chain(self, *, refresh: bool = False) -> list[x509.Certificate]:
        """The CA chain (intermediate, root) from the server, checked against the anchors; cached."""
        with self.lock:
            chain = self._ca_chain
        if chain is not None and not refresh:
            return chain
        response = self.connection().request("GET", "/ca/chain")
        chain = check_ca_chain(pem_certificates(response.content, "the CA chain"), self.trust().anchors)
        with self.lock:
            self._ca_chain = chain
        return chain

    def issuers(self) -> tuple[x509.Certificate, ...]:
        """The CA's unexpired intermediates (the current one first): whose CRLs to check."""
        issuers = self._issuers
        if issuers is None:
            self.refresh_trust(max_age=0)
            issuers = self._issuers
        return issuers or ()

    def refresh_trust(self, *, max_age: float) -> bool:
        """Read ``/api/v1/ca/bundle`` unless it was read less than ``max_age`` seconds ago, and
        follow it: new roots (through a cross-certificate from a trusted one) and retired ones
        change the anchors of every context (and ``ca_roots.pem``); ``ca_chain.pem`` is
        rewritten with the CA certificates in force. True if the anchors changed. Raises the
        SDK's errors (TrustError: the server lists no root we can trust; nothing changes)."""
        with self._trust_lock:
            if time.monotonic() - self._trust_read < max_age:
                return False
            trust = self.trust()
            response = self.connection().request("GET", "/ca/bundle")
            certs = pem_certificates(response.content, "the CA bundle")
            if trust.system:  # nothing to judge the roots by but the verified server
                self._issuers = intermediates_of(certs)
                self._trust_read = time.monotonic()
                return False
            judged = judge_bundle(certs, trust.anchors, now=self.clock())
            self._issuers = judged.intermediates
            self._trust_read = time.monotonic()
            changed = bool(judged.added or judged.dropped)
            if changed:
                self._adopt_roots(trust, judged.roots, judged.added, judged.dropped)
            self._write_chain((*judged.intermediates, *judged.roots, *judged.crosses))
            return changed

    def _adopt_roots(self, trust: Trust, roots: tuple[x509.Certificate, ...], added: tuple[x509.Certificate, ...],
                     dropped: tuple[x509.Certificate, ...]) -> None:
        for root in added:
            logger.info("service %s: now trusting root %s (certified by a root already trusted)", self.service_id,
                        root.subject.rfc4514_string())
        for root in dropped:
            logger.info("service %s: no longer trusting root %s (retired by the CA)", self.service_id,
                        root.subject.rfc4514_string())
        with self.lock:
            self._trust = Trust(roots, trust.source, trust.path)
            self._ca_chain = None
            live = {id(c): c for c in (self._contexts, self._peer_contexts) if c is not None}
        for contexts in live.values():
            contexts.set_trust(roots)
        if self.files is not None:
            try:
                write_atomically(self.files.cert_file.parent / LEARNED_FILE_NAME, certificates_pem(roots), 0o644)
            except OSError as exc:
                logger.warning("service %s: cannot keep the roots in %s: %s", self.service_id,
                               LEARNED_FILE_NAME, exc.strerror or exc)

    def _write_chain(self, certs: tuple[x509.Certificate, ...]) -> None:
        """``ca_chain.pem`` (what peers are checked against, and what ``vcc-pki`` leaves for
        nginx) holds the CA certificates in force, when it exists and differs."""
        chain = self.files.chain_file if self.files is not None else None
        if chain is None or not chain.is_file():
            return
        data = certificates_pem(certs)
        try:
            if chain.read_bytes() != data:
                write_atomically(chain, data, 0o644)
        except OSError as exc:
            logger.warning("service %s: cannot rewrite %s: %s", self.service_id, chain, exc.strerror or exc)

    def refresh_trust_quietly(self, max_age: float) -> None:
        """:meth:`refresh_trust`, a failure logged (WARNING) instead of raised: the trust in
        force stays."""
        try:
            self.refresh_trust(max_age=max_age)
        except PKIError as exc:
            logger.warning("service %s: refreshing the CA trust failed (%s); the trust in force stays",
                           self.service_id, exc)

    def peer_anchors(self) -> tuple[x509.Certificate, ...]:
        """The anchors for peers; with system trust, the root the (verified) server publishes."""
        anchors = self.trust().anchors
        return anchors or tuple(c for c in self.ca_chain() if c.issuer == c.subject)

    # -- connection and contexts ---------------------------------------------------------
    def connection(self) -> Connection:
        """The connection to the PKI server (mTLS once the service has a certificate)."""
        with self.lock:
            self.require_open()
            if self._connection is None:
                client = self._lent if self._lent is not None else self._new_http_client()
                self._connection = Connection(self.url, client, owns_client=self._lent is None,
                                              retry_policy=self.retry_policy)
            elif self._connection.owns_client and not self._mtls and self.enrolled:
                self._connection.replace_client(self._new_http_client())  # enrolled since: use mTLS
            return self._connection

    def _new_http_client(self) -> httpx.Client:
        trust = self.trust()
        # Trusting our CA, the server must also be the CA's own server, not any service of it.
        check = require_pki_server if trust.source in ("root_fingerprint", "ca_chain") else None
        verify = trust.ssl_context() if check is None else checking_client_context(trust.anchors, check)
        self._mtls = False
        if self.enrolled:
            try:
                verify, self._mtls = self._pki_contexts().client_context(peer_check=check), True
            except ConfigurationError as exc:  # e.g. a pair that does not match: enrol again
                logger.warning("service %s: not presenting a client certificate: %s", self.service_id, exc)
        return httpx.Client(verify=verify, timeout=self._timeout)

    def _pki_contexts(self) -> ReloadingContexts:
        with self.lock:
            if self._contexts is None:
                self._contexts = ReloadingContexts(self.require_files(), ca_certs=self.trust().anchors,
                                                   reload_interval=self.reload_interval)
            return self._contexts

    def peer_contexts(self) -> ReloadingContexts:
        """Contexts for talking to peers: our certificate, trusting only our CA."""
        if not self.enrolled:
            raise ConfigurationError(f"service {self.service_id!r} has no certificate yet: enroll() first")
        with self.lock:
            self.require_open()
            if self._peer_contexts is None:
                self._peer_contexts = (
                    self._pki_contexts() if self.trust().anchors
                    else ReloadingContexts(self.require_files(), ca_certs=self.peer_anchors(),
                                           reload_interval=self.reload_interval)
                )
            return self._peer_contexts

    # -- certificates --------------------------------------------------------------------
    def install(self, issued: IssuedCertificate, key: PrivateKey) -> None:
        """Check an issued certificate, swap the files atomically, reload every context.

        Raises InvalidResponseError (not for us, not our key), TrustError (does not chain to
        the anchors) or ConfigurationError (files not writable); the old files then stay.
        """
        cert = issued.certificate
        if issued.service_id != self.service_id:
            raise InvalidResponseError(
                f"asked for service {self.service_id!r}, got a certificate for {issued.service_id!r}")
        if not key_matches_certificate(key, cert):
            raise InvalidResponseError("the issued certificate does not certify the key this client sent")
        anchors = self.trust().anchors or tuple(c for c in issued.chain if c.issuer == c.subject)
        # Judge the chain, not the clocks: a few minutes of skew must not waste a one-time token.
        at = min(max(self.clock(), cert.not_valid_before_utc), cert.not_valid_after_utc)
        verify_leaf(cert, issued.chain, anchors, what=f"the certificate issued for {self.service_id!r}", now=at)
        self.require_files().write(cert, key, issued.chain)
        with self.lock:
            live = {id(c): c for c in (self._contexts, self._peer_contexts) if c is not None}
            for contexts in live.values():
                contexts.reload()
            connection = self._connection
            if connection is not None and connection.owns_client and self._mtls:
                # A kept-alive connection would go on presenting the certificate it was opened
                # with (the server authenticates the connection): later requests open new ones.
                connection.replace_client(self._new_http_client(), grace=self._timeout + 1)
        logger.info("service %s: installed certificate %s (not_after %s)", self.service_id,
                    issued.serial_number, issued.not_after.isoformat())

    def close(self) -> None:
        """Close the HTTP client made here (a lent one stays open). Idempotent."""
        with self.lock:
            self.closed = True
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


def pem_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """The PEM certificates of an answer (InvalidResponseError if there are none)."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidResponseError(f"{what} is not PEM certificates") from exc
