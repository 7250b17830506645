"""PKIClient: a service's enrolment, renewal, revocation, peers, CA bundle, CRL and mTLS contexts."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import httpx
from cryptography import x509

from ._http import Connection, Retry
from ._session import Session, pem_certificates
from .errors import ConfigurationError, PKIError, RenewalError, TrustError
from .files import CertificateFiles
from .identity import peer_service_id
from .keys import KEY_KINDS, build_csr, generate_private_key, key_kind
from .renewal import RenewalPolicy, Renewer, next_renewal_at
from .retry import Backoff, RetryPolicy
from .revocation import CRLCache, CRLWatcher
from .tls import ReloadingContexts
from .trust import CHAIN_FILE_NAME, verify_leaf
from .wire import (
    CertificateInfo,
    IssuedCertificate,
    Page,
    ServiceEntry,
    certificate_request,
    normalize_fingerprint,
    renew_request,
)

__all__ = ["DEFAULT_RETRY", "PKIClient"]

logger = logging.getLogger("vcc_pki_client")

#: Attempts and back-off of retried calls (and of each renewal) unless ``retry_policy=`` says otherwise.
DEFAULT_RETRY = RetryPolicy(max_attempts=4, backoff_initial=0.5, backoff_max=8.0)
_SERVICE_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
StrPath = str | os.PathLike[str]


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@attrs.frozen
class _AutoRenewal:
    policy: RenewalPolicy
    rekey: bool = True
    validity: timedelta | None = None


class PKIClient:
    """A service's client of the VCC PKI server.

    Takes the server URL and the service's id; ``cert_file``/``key_file`` are where its
    certificate and private key live (``ca_chain.pem`` is kept beside them). Trust, in this
    order: ``ca_bundle`` (a PEM file), ``root_fingerprint`` (the root's SHA-256, pinned: hex
    with or without colons or ``sha256:``), ``ca_chain.pem`` beside ``cert_file``, the
    system store. ``enrolment_token`` (or its older spelling ``enrollment_token``) is the
    default token of :meth:`enroll`; ``key_type``
    the kind of key it makes (later rekeys keep the kind of the current key).
    ``retry_policy`` (a :class:`~vcc_pki_client.retry.RetryPolicy`) sets attempts and
    back-off of retried calls and of each renewal; ``http_client`` lends an
    httpx client (used as it is, never closed here); ``crl_max_age`` (seconds) bounds how
    long :meth:`is_revoked` trusts a fetched CRL. ``clock`` is the time the client goes by: renewal checks, the CRL's
    nextUpdate, verifying certificates (a seam for tests: a clock a day ahead makes a renewal due).

    Revocation: the contexts of :meth:`server_ssl_context`, :meth:`client_ssl_context` and
    :meth:`httpx_client` refuse a peer whose certificate is on the CA's CRL, at every
    handshake. The CRL is re-fetched in the background every ``crl_refresh`` seconds (and
    once the one held is past its nextUpdate), kept as ``crl.pem`` beside the certificate,
    and contexts already handed out follow. Without a usable CRL (never fetched, or expired
    while the CA is unreachable) they refuse every peer; ``crl_soft_fail=True`` lets peers
    through unchecked instead, with a WARNING. ``check_revocation=False`` on a method turns
    the check off for that context.

    CA rotation (SPEC §13): the client follows the CA's trust at run time, reading its bundle
    at each renewal and every ``trust_refresh`` seconds (60): a new root is trusted only through
    a cross-certificate signed by a root already trusted, a root the CA retired is dropped, and
    contexts already handed out (server and client side) follow; CRLs are checked for every
    unexpired intermediate of the CA.

    Files shared between processes: contexts re-read ``cert_file``/``key_file`` when another
    process replaced them (the ``vcc-pki`` agent, or the worker of a multi-worker server that
    renewed), looking at most every ``reload_interval`` seconds (10; None: never), so every
    worker serves the renewed certificate without a restart.

    Example::

        with PKIClient("https://pki.internal:8443", service_id="billing",
                       cert_file="tls/cert.pem", key_file="tls/key.pem",
                       root_fingerprint="sha256:9f2c...") as pki:
            pki.ensure_enrolled(token)        # enrols once; a second run uses the files
            pki.enable_auto_renewal(renew_before_days=30)
            peer = pki.get_service_certificate("inventory")

    Raises ConfigurationError for bad arguments. Methods raise the typed errors of
    :mod:`vcc_pki_client.errors`.
    """

    def __init__(
        self,
        pki_server_url: str,
        service_id: str,
        *,
        cert_file: StrPath | None = None,
        key_file: StrPath | None = None,
        ca_bundle: StrPath | None = None,
        root_fingerprint: str | None = None,
        enrolment_token: str | None = None,
        key_type: str = "ec-p256",
        timeout: float = 10.0,
        http_client: httpx.Client | None = None,
        retry_policy: Backoff = DEFAULT_RETRY,
        crl_max_age: float = 60.0,
        clock: Callable[[], datetime] = _utc_now,
        crl_refresh: float = 60.0,
        crl_soft_fail: bool = False,
        reload_interval: float | None = 10.0,
        enrollment_token: str | None = None,
        trust_refresh: float = 60.0,
    ) -> None:
        if enrolment_token is not None and enrollment_token is not None and enrolment_token != enrollment_token:
            raise ConfigurationError("pass enrolment_token= or its older spelling enrollment_token=, not both")
        if not isinstance(pki_server_url, str) or not pki_server_url.startswith(("https://", "http://")):
            raise ConfigurationError(f"pki_server_url must be an https:// URL, got {pki_server_url!r}")
        if pki_server_url.startswith("http://") and http_client is None:
            raise ConfigurationError(f"pki_server_url must be https:// (mutual TLS), got {pki_server_url!r}")
        if not isinstance(service_id, str) or not _SERVICE_ID.fullmatch(service_id):
            raise ConfigurationError(f"invalid service id {service_id!r}: lowercase letters, digits and '-'")
        if (cert_file is None) != (key_file is None):
            raise ConfigurationError("pass cert_file and key_file together")
        if key_type not in KEY_KINDS:
            raise ConfigurationError(f"unknown key_type {key_type!r}; expected one of {', '.join(KEY_KINDS)}")
        if reload_interval is not None and (not isinstance(reload_interval, (int, float)) or reload_interval <= 0):
            raise ConfigurationError(f"reload_interval must be a positive number of seconds or None, "
                                     f"got {reload_interval!r}")
        if not isinstance(crl_refresh, (int, float)) or crl_refresh <= 0:
            raise ConfigurationError(f"crl_refresh must be a positive number of seconds, got {crl_refresh!r}")
        if not isinstance(trust_refresh, (int, float)) or trust_refresh <= 0:
            raise ConfigurationError(f"trust_refresh must be a positive number of seconds, got {trust_refresh!r}")
        self.pki_server_url = pki_server_url.rstrip("/")
        self.service_id = service_id
        #: The certificate, key and chain files (None without ``cert_file``).
        self.files: CertificateFiles | None = None
        if cert_file is not None and key_file is not None:
            self.files = CertificateFiles(cert_file, key_file, Path(cert_file).parent / CHAIN_FILE_NAME)
        self._session = Session(
            self.pki_server_url, service_id, self.files,
            ca_bundle=Path(ca_bundle) if ca_bundle is not None else None,
            pin=normalize_fingerprint(root_fingerprint) if root_fingerprint is not None else None,
            timeout=timeout, retry_policy=RetryPolicy.of(retry_policy), http_client=http_client, clock=clock,
            reload_interval=reload_interval,
        )
        self._enrolment_token = enrolment_token or enrollment_token
        self._key_type = key_type
        self._retry = RetryPolicy.of(retry_policy)
        self._clock = clock
        self._lock = self._session.lock
        self._renew_lock = threading.RLock()  # one certificate replacement at a time
        self._trust_refresh = float(trust_refresh)
        self._crl = CRLCache(self._session, max_age=crl_max_age, trust_refresh=self._trust_refresh)
        self._crl_refresh = min(float(crl_refresh), self._trust_refresh)  # the watcher's rounds refresh both
        self._crl_soft_fail = crl_soft_fail
        self._watcher: CRLWatcher | None = None
        self._renewer: Renewer | None = None
        self._auto = _AutoRenewal(RenewalPolicy(**attrs.asdict(self._retry)))
        self._closing = False
        self._on_renewed: Callable[[x509.Certificate], None] | None = None
        self._due: tuple[int, datetime] | None = None

    def __repr__(self) -> str:
        return f"PKIClient({self.pki_server_url!r}, service_id={self.service_id!r})"

    # -- state --------------------------------------------------------------------------
    @property
    def enrolled(self) -> bool:
        """True when the certificate and key files exist (an enrolment happened)."""
        return self._session.enrolled

    @property
    def certificate(self) -> x509.Certificate:
        """The service's current certificate, read from ``cert_file`` (ConfigurationError if none)."""
        return self._session.require_files().load()[0]

    # -- certificates -------------------------------------------------------------------
    def enroll(
        self, token: str | None = None, *, san_dns: Sequence[str] = (), san_ip: Sequence[str] = (),
        validity_days: int | None = None, validity: timedelta | None = None,
    ) -> IssuedCertificate:
        """Get the first certificate with a one-time enrolment token.

        A key of ``key_type`` is made here; only a CSR is sent (without SANs, the CA grants
        the service's whole allow-list). ``validity`` (or ``validity_days``) asks for a
        lifetime (at least 5 minutes, at most what the CA's policy allows); by default the
        CA's. Certificate, key (0600) and chain are written atomically. Not retried once the
        request may have reached the server (that could spend the token); retried only while
        the connection is refused.
        Raises AuthenticationError for a spent, expired or unknown token,
        PolicyRefusedError for SANs outside the allow-list.
        """
        token = token or self._enrolment_token
        if not token:
            raise ConfigurationError("enroll() needs an enrolment token (argument or enrolment_token=)")
        return self._issue(self._key_type, san_dns, san_ip, _lifetime(validity_days, validity), token=token,
                           retry=Retry.UNSENT)

    def ensure_enrolled(
        self, token: str | None = None, *, san_dns: Sequence[str] = (), san_ip: Sequence[str] = (),
        validity_days: int | None = None, validity: timedelta | None = None,
    ) -> bool:
        """Enrol unless the files already hold a usable certificate: True when it enrolled now.

        For a script or service that starts more than once: the one-time token is spent by the
        first run, and later runs use the certificate on disk. Usable means: the key matches,
        it names this service, it is valid now, it chains to the trusted CA and the CA's CRL
        does not list it — the last two asked of the CA; when it cannot be reached, a certificate
        that passes the local checks is used (WARNING). Otherwise (no files, expired, revoked,
        from another CA) it enrols with ``token`` as :meth:`enroll` does, replacing the files.
        """
        files = self._session.require_files()
        if files.exists():
            try:
                cert, _ = files.load()
                now = self._clock()
                if peer_service_id(cert) != self.service_id:
                    raise ConfigurationError(f"{files.cert_file} is a certificate of another service")
                if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
                    raise ConfigurationError(f"{files.cert_file} is not valid now")
                try:
                    verify_leaf(cert, files.load_chain(), self._session.peer_anchors(),
                                what=str(files.cert_file), now=now)
                    revoked = self._crl.is_revoked(cert)
                except (ConfigurationError, TrustError):
                    raise
                except PKIError as exc:  # the CA unreachable: a restart must not wait for it
                    logger.warning("service %s: cannot reach the CA to check %s (%s); using it as it is",
                                   self.service_id, files.cert_file, exc)
                    return False
                if revoked:
                    raise ConfigurationError(f"{files.cert_file} is revoked")
                return False
            except (ConfigurationError, TrustError) as exc:
                logger.info("service %s: %s; enrolling", self.service_id, exc)
        self.enroll(token, san_dns=san_dns, san_ip=san_ip, validity_days=validity_days, validity=validity)
        return True

    def request_certificate(
        self, *, san_dns: Sequence[str] = (), san_ip: Sequence[str] = (), validity_days: int | None = None,
        validity: timedelta | None = None,
    ) -> IssuedCertificate:
        """A new certificate (new key of the current kind) requested with the current one over mTLS.

        Unlike :meth:`renew`, the names may change (within the allow-list). Files and
        contexts are replaced as by :meth:`renew`; ``on_renewed`` is called.
        """
        with self._renew_lock:
            kind = key_kind(self._session.require_files().load()[1])
            issued = self._issue(kind, san_dns, san_ip, _lifetime(validity_days, validity), token=None,
                                 retry=Retry.TRANSIENT)
            self._notify(issued.certificate)
        return issued

    def renew(self, rekey: bool = True, *, validity_days: int | None = None,
              validity: timedelta | None = None) -> IssuedCertificate:
        """Renew the current certificate over mTLS: new serial, new validity, same names.

        ``rekey=True`` makes a new key of the same kind and sends its CSR; ``rekey=False``
        keeps the key. Without ``validity`` (or ``validity_days``) the new certificate has the
        lifetime of the one renewed (an 8-hour certificate stays 8 hours), within the policy.
        Retried on transient failures (a repeat only issues one more certificate). Files are
        swapped atomically (a failure leaves the old pair in place), contexts from this client
        reloaded, ``on_renewed`` called.
        """
        with self._renew_lock:
            files = self._session.require_files()
            cert, key = files.load()
            self._session.refresh_trust_quietly(0)  # a new root must be trusted before its certificate
            new_key = generate_private_key(key_kind(key)) if rekey else key
            body = renew_request(build_csr(new_key, self.service_id, *_sans(cert)) if rekey else None,
                                 _lifetime(validity_days, validity))
            data = self._conn().json("POST", f"/certificates/{self.service_id}/renew", body=body)
            issued = IssuedCertificate.from_json(data)
            self._session.install(issued, new_key)
            self._due = None
            self._notify(issued.certificate)
        self._keep_crl()
        return issued

    def revoke(self, reason: str = "unspecified", serial: int | str | None = None, *,
               all_certificates: bool = False) -> CertificateInfo:
        """Revoke the current certificate (or ``serial``, int or hex) with an RFC 5280 reason name.

        ``keyCompromise`` also revokes every unexpired certificate with the same key (older
        ones a same-key renewal left); ``all_certificates=True`` every unexpired certificate of
        this service. Returns the named certificate's record, ``revoked_serials`` listing all
        revoked; the server publishes a new CRL first.
        """
        params = {"reason": reason}
        if all_certificates:
            params["all"] = "true"
        if serial is not None:
            params["serial"] = format(serial, "x") if isinstance(serial, int) else serial.replace(":", "").lower()
        data = self._conn().json("DELETE", f"/certificates/{self.service_id}/revoke", params=params, retry=Retry.UNSENT)
        self._crl.forget()
        return CertificateInfo.from_json(data)

    # -- registry -----------------------------------------------------------------------
    def register_service(
        self, service_name: str, endpoints: Sequence[str], health_check_url: str | None = None,
        version: str | None = None, owner: str | None = None, metadata: Mapping[str, Any] | None = None,
    ) -> ServiceEntry:
        """Update this service's registry entry (over mTLS); returns the entry.

        The server probes ``health_check_url`` (HTTPS, with its own client certificate).
        """
        body: dict[str, Any] = {"service_id": self.service_id, "service_name": service_name,
                                "endpoints": list(endpoints)}
        extra = {"health_check_url": health_check_url, "version": version, "owner": owner,
                 "metadata": dict(metadata) if metadata is not None else None}
        body.update({k: v for k, v in extra.items() if v is not None})
        return ServiceEntry.from_json(self._conn().json("POST", "/services/register", body=body))

    def discover(self, service_id: str) -> ServiceEntry:
        """One service's registry entry, with its endpoints, health and certificates."""
        return ServiceEntry.from_json(self._conn().json("GET", f"/services/{_checked_id(service_id)}"))

    def list_services(self, healthy: bool | None = None) -> list[ServiceEntry]:
        """The whole registry (all pages); ``healthy=True``: only services whose last probe passed."""
        params: dict[str, str] = {"limit": "1000"}
        if healthy is not None:
            params["healthy"] = "true" if healthy else "false"
        entries: list[ServiceEntry] = []
        while True:
            page = Page.from_json(self._conn().json("GET", "/services/", params=params), ServiceEntry.from_json)
            entries += page.items
            if page.next_cursor is None or not page.items:
                return entries
            params["cursor"] = page.next_cursor

    # -- peers, CA, CRL -----------------------------------------------------------------
    def get_service_certificate(self, service_id: str) -> x509.Certificate:
        """The current certificate of ``service_id``, checked to chain to our CA (TrustError if not)."""
        response = self._conn().request("GET", f"/certificates/{_checked_id(service_id)}/download",
                                        params={"chain": "true"})
        what = f"the certificate of service {service_id!r}"
        certs = pem_certificates(response.content, what)
        verify_leaf(certs[0], certs[1:], self._session.peer_anchors(), what=what, now=self._clock())
        return certs[0]

    def get_ca_bundle(self) -> list[x509.Certificate]:
        """The CA chain, intermediate then root, checked against the trusted root."""
        return list(self._session.ca_chain(refresh=True))

    def get_crl(self) -> x509.CertificateRevocationList:
        """The current CRL, its signature checked against the intermediate CA (TrustError if not)."""
        return self._crl.fetch()

    def is_revoked(self, cert: x509.Certificate | int | str | None = None, *, refresh: bool = False) -> bool:
        """True when ``cert`` (a certificate, or its serial as int or hex; by default this
        service's own current certificate) is on the CRL.

        The CRL is fetched when the one kept is older than ``crl_max_age`` seconds or past its
        nextUpdate, or with ``refresh=True``. A certificate from another issuer is a
        TrustError: this CA's CRL cannot vouch for it.
        """
        return self._crl.is_revoked(self.certificate if cert is None else cert, refresh=refresh)

    def refresh_crl(self) -> x509.CertificateRevocationList | None:
        """Fetch the CA's CRL now and make this client's contexts enforce it, as the background
        refresh does every ``crl_refresh`` seconds (e.g. right after a revocation an operator
        announced). Returns the CRL in force; when the fetch fails, the one held stays (WARNING)."""
        watcher = self._crl_watcher()
        watcher.refresh()
        return watcher.crl

    # -- automatic renewal --------------------------------------------------------------
    def enable_auto_renewal(
        self, renew_before_days: float | None = None, *, check_interval: timedelta | float | None = None,
        on_renewed: Callable[[x509.Certificate], None] | None = None,
        on_error: Callable[[Exception], None] | None = None, rekey: bool = True, validity_days: int | None = None,
        validity: timedelta | None = None,
    ) -> None:
        """Check the certificate now and every ``check_interval`` (seconds or timedelta) in a
        background thread; renew it when one third of its lifetime is left (an 8-hour
        certificate at about 5 h 20 min, a 90-day one at 60 days), or ``renew_before_days``
        before it expires if given (for a lifetime shorter than that: at two thirds), with
        retries on transient failures. The check interval defaults to an hour, or a tenth of
        the current certificate's lifetime if that is shorter. Renewals keep the lifetime of
        the certificate renewed unless ``validity`` (or ``validity_days``) says otherwise.

        ``on_renewed(cert)`` follows every renewal; a renewal that gives up is logged and
        reported to ``on_error(RenewalError)``. Calling again replaces the settings.
        """
        if not self.enrolled:
            raise ConfigurationError(f"service {self.service_id!r} has no certificate to renew yet: enroll() first")
        if check_interval is None:
            cert = self.certificate
            interval = min(timedelta(hours=1), (cert.not_valid_after_utc - cert.not_valid_before_utc) / 10)
        elif isinstance(check_interval, timedelta):
            interval = check_interval
        else:
            interval = timedelta(seconds=check_interval)
        before = None if renew_before_days is None else timedelta(days=renew_before_days)
        policy = RenewalPolicy(renew_before=before, check_interval=interval, **attrs.asdict(self._retry))
        with self._lock:
            if self._closing:
                raise ConfigurationError("this PKIClient is closed")
            self._auto = _AutoRenewal(policy, rekey, _lifetime(validity_days, validity))
            self._on_renewed, self._due = on_renewed, None
            if self._renewer is None:
                self._renewer = Renewer(service_id=self.service_id)
            self._renewer.on_error = on_error
            self._renewer.start(self._background_check, interval, immediately=True)

    def disable_auto_renewal(self) -> None:
        """Stop the background renewal (waits for a running check). Idempotent."""
        with self._lock:
            renewer = self._renewer
        if renewer is not None:
            renewer.stop()

    def renew_now(self, *, now: datetime | None = None) -> IssuedCertificate | None:
        """Run one renewal check synchronously, as of ``now`` (default: the client's clock).

        Returns the new certificate if it renewed, None if it was not due. Raises
        RenewalError (``last_error`` holds the cause) when the renewal gave up.
        """
        with self._renew_lock:
            try:
                cert = self._session.require_files().load()[0]
                auto = self._auto
                if self._due is None or self._due[0] != cert.serial_number:
                    self._due = (cert.serial_number, next_renewal_at(
                        cert.not_valid_before_utc, cert.not_valid_after_utc, auto.policy))
                if (now or self._clock()) < self._due[1]:
                    return None
                logger.info("service %s: renewing certificate %x (not_after %s)", self.service_id,
                            cert.serial_number, cert.not_valid_after_utc.isoformat())
                return self.renew(rekey=auto.rekey, validity=auto.validity)
            except Exception as exc:
                raise RenewalError(f"renewal of the certificate of service {self.service_id!r} failed: {exc}",
                                   last_error=exc) from exc

    def _background_check(self) -> None:
        self._session.refresh_trust_quietly(self._trust_refresh)
        self.renew_now()

    # -- TLS ----------------------------------------------------------------------------
    def server_ssl_context(self, require_client_cert: bool = True, *, check_revocation: bool = True) -> ssl.SSLContext:
        """A server context presenting this service's certificate and verifying clients
        against our CA and (unless ``check_revocation=False``) its CRL; it presents the new
        certificate after each renewal and checks against each new CRL (new handshakes).
        The first call fetches the CRL before returning (see the class doc for a CA that
        cannot be reached)."""
        return self._server_context(require_client_cert, check_revocation, wait=True)

    def client_ssl_context(self, *, check_revocation: bool = True) -> ssl.SSLContext:
        """A client context presenting this service's certificate, trusting only our CA and
        (unless ``check_revocation=False``) refusing a server on its CRL; it follows renewals
        and new CRLs (new handshakes)."""
        return self._client_context(check_revocation, wait=True)

    def httpx_client(self, *, check_revocation: bool = True, **kwargs: Any) -> httpx.Client:
        """An httpx client for mTLS calls to peers (``verify`` is :meth:`client_ssl_context`).

        Other keyword arguments go to ``httpx.Client``. The caller closes it.
        """
        return httpx.Client(verify=self.client_ssl_context(check_revocation=check_revocation), **kwargs)

    def _server_context(self, require_client_cert: bool, check_revocation: bool, *, wait: bool) -> ssl.SSLContext:
        contexts = self._peer_contexts(check_revocation, wait=wait)
        return contexts.server_context(require_client_cert=require_client_cert, check_revocation=check_revocation)

    def _client_context(self, check_revocation: bool, *, wait: bool) -> ssl.SSLContext:
        return self._peer_contexts(check_revocation, wait=wait).client_context(check_revocation=check_revocation)

    def _peer_contexts(self, check_revocation: bool, *, wait: bool) -> ReloadingContexts:
        """The peer contexts; with ``check_revocation``, enforcing the watcher's CRL (started
        on first use; ``wait``: its first fetch is made before returning)."""
        contexts = self._session.peer_contexts()
        if check_revocation:
            self._crl_watcher().attach(contexts, wait=wait)
        return contexts

    def _crl_watcher(self) -> CRLWatcher:
        with self._lock:
            self._session.require_open()
            if self._watcher is None:
                self._watcher = CRLWatcher(self._crl, self._session.require_files(), refresh=self._crl_refresh,
                                           soft_fail=self._crl_soft_fail, clock=self._clock,
                                           service_id=self.service_id)
            return self._watcher

    def _keep_crl(self) -> None:
        """After a certificate was installed: fetch the CRL into crl.pem if there is none yet,
        so that contexts made later (even by AsyncPKIClient, which never waits for the CA)
        start with one. A failure is a WARNING: contexts fetch it again."""
        watcher = self._crl_watcher()
        if watcher.crl is None and not watcher.path.exists():
            watcher.refresh()

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background renewal and close the HTTP client this object made. Idempotent;
        a lent ``http_client`` stays open."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            renewer = self._renewer
        if renewer is not None:
            renewer.stop()  # waits for a running check, which may still need the connection
        watcher = self._watcher
        if watcher is not None:
            watcher.close()
        self._session.close()

    def __enter__(self) -> PKIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------
    def _conn(self) -> Connection:
        return self._session.connection()

    def _issue(self, kind: str, san_dns: Sequence[str], san_ip: Sequence[str], validity: timedelta | None,
               *, token: str | None, retry: Retry) -> IssuedCertificate:
        self._session.require_files()
        key = generate_private_key(kind)
        body = certificate_request(self.service_id, build_csr(key, self.service_id, san_dns, san_ip), validity)
        data = self._conn().json("POST", "/certificates/request", body=body, token=token, retry=retry)
        issued = IssuedCertificate.from_json(data)
        with self._renew_lock:
            self._session.install(issued, key)
            self._due = None
        self._keep_crl()
        return issued

    def _notify(self, cert: x509.Certificate) -> None:
        callback = self._on_renewed
        if callback is None:
            return
        try:
            callback(cert)
        except Exception:  # the renewal itself succeeded; a broken hook must not undo that
            logger.exception("service %s: on_renewed callback raised", self.service_id)


def _lifetime(validity_days: int | None, validity: timedelta | None) -> timedelta | None:
    if validity_days is not None and validity is not None:
        raise ConfigurationError("give validity or validity_days, not both")
    if validity_days is not None:
        return timedelta(days=validity_days)
    return validity


def _checked_id(service_id: str) -> str:
    if not isinstance(service_id, str) or not _SERVICE_ID.fullmatch(service_id):
        raise ConfigurationError(f"invalid service id {service_id!r}")
    return service_id


def _sans(cert: x509.Certificate) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """The DNS and IP names of ``cert`` (a renewal asks for the same names)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    ips = [ip for ip in san.get_values_for_type(x509.IPAddress)
           if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address))]  # leaves name hosts, not networks
    return list(san.get_values_for_type(x509.DNSName)), ips
