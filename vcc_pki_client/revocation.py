"""Revocation: the CA's CRL, fetched, signature-checked against the intermediate, cached, and
enforced by the SDK's TLS contexts.

:class:`CRLCache` answers :meth:`PKIClient.is_revoked`. :class:`CRLWatcher` keeps the CRL that
handed-out contexts check peers against: fetched in a background thread every ``refresh``
seconds (sooner once the one held is past its nextUpdate), checked (issuer and signature),
written to ``crl.pem`` beside the certificate (so a restart starts with the last good CRL
even when the CA is unreachable) and given to the contexts (:meth:`ReloadingContexts.set_crl`).
A fetch that fails keeps the CRL in force and logs a WARNING; a CRL that fails its checks is
never installed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ._session import Session
from .errors import ConfigurationError, InvalidResponseError, PKIError, TrustError
from .files import CertificateFiles, write_atomically
from .tls import ReloadingContexts
from .trust import check_crl

__all__ = ["CRL_FILE_NAME", "CRLCache", "CRLWatcher"]

CRL_FILE_NAME = "crl.pem"
logger = logging.getLogger("vcc_pki_client")


class CRLCache:
    """The CRL of a :class:`~vcc_pki_client._session.Session`'s CA, kept for ``max_age`` seconds.

    A kept CRL is never used past its nextUpdate, by the session's clock.
    """

    def __init__(self, session: Session, *, max_age: float) -> None:
        self._session = session
        self._max_age = max_age
        self._clock = session.clock
        self._lock = threading.Lock()
        self._kept: tuple[float, x509.CertificateRevocationList] | None = None

    def fetch(self) -> x509.CertificateRevocationList:
        """Fetch the CRL (DER), check issuer and signature against our intermediate, keep it.

        Raises InvalidResponseError (not a CRL) or TrustError (not signed by our CA).
        """
        response = self._session.connection().request("GET", "/crl")
        try:
            crl = x509.load_der_x509_crl(response.content)
        except ValueError as exc:
            raise InvalidResponseError("GET /api/v1/crl: the answer is not a DER CRL") from exc
        check_crl(crl, self._issuer(crl))
        with self._lock:
            kept = self._kept
            if kept is not None and (_crl_number(crl) or 0) < (_crl_number(kept[1]) or 0):
                # An older CRL (a replica behind, or someone replaying one): keep the newer.
                logger.warning("the PKI server sent CRL number %s, older than number %s already seen; "
                               "keeping the newer", _crl_number(crl), _crl_number(kept[1]))
                self._kept = (time.monotonic(), kept[1])
                return kept[1]
            self._kept = (time.monotonic(), crl)
        return crl

    def current(self, *, refresh: bool = False) -> x509.CertificateRevocationList:
        """The kept CRL while fresh, else (or with ``refresh``) a newly fetched one."""
        with self._lock:
            kept = self._kept
        if kept is not None and not refresh and time.monotonic() - kept[0] < self._max_age:
            next_update = kept[1].next_update_utc
            if next_update is None or self._clock() < next_update:
                return kept[1]
        return self.fetch()

    def forget(self) -> None:
        """Drop the kept CRL (after a revocation through this client)."""
        with self._lock:
            self._kept = None

    def is_revoked(self, cert: x509.Certificate | int | str, *, refresh: bool = False) -> bool:
        """True when ``cert`` (a certificate, or its serial as int or hex) is on the CRL.

        A certificate not signed by this CA's intermediate is a TrustError: the CRL cannot
        speak for it. A malformed serial is a ConfigurationError.
        """
        crl = self.current(refresh=refresh)
        if isinstance(cert, x509.Certificate):
            try:
                cert.verify_directly_issued_by(self._issuer(crl))
            except (ValueError, TypeError, InvalidSignature, TrustError) as exc:
                raise TrustError(f"certificate {cert.serial_number:x} ({cert.subject.rfc4514_string()}) is not "
                                 "issued by this CA: its CRL cannot say whether it is revoked") from exc
            serial = cert.serial_number
        elif isinstance(cert, int):
            serial = cert
        else:
            try:
                serial = int(cert.replace(":", ""), 16)
            except ValueError as exc:
                raise ConfigurationError(f"not a certificate serial number: {cert!r}") from exc
        return crl.get_revoked_certificate_by_serial_number(serial) is not None

    def fetch_root(self) -> x509.CertificateRevocationList:
        """The root CA's CRL (revoked intermediates), its signature checked against the root.
        What verifiers that check the whole chain need besides :meth:`fetch`'s (nginx does)."""
        root = self._session.ca_chain()[-1]
        ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
        response = self._session.connection().request("GET", f"/crl/{ski}")
        try:
            crl = x509.load_der_x509_crl(response.content)
        except ValueError as exc:
            raise InvalidResponseError(f"GET /api/v1/crl/{ski}: the answer is not a DER CRL") from exc
        return check_crl(crl, root)

    def _issuer(self, crl: x509.CertificateRevocationList) -> x509.Certificate:
        for cert in self._session.ca_chain():
            if cert.subject == crl.issuer:
                return cert
        raise TrustError(f"the CRL is issued by {crl.issuer.rfc4514_string()}, not by our CA")


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


class CRLWatcher:
    """The CRL that revocation-checking contexts enforce, kept fresh in a background thread.

    ``soft_fail``: with no usable CRL (none ever fetched, or the one held past its
    nextUpdate while the CA is unreachable) contexts accept peers unchecked instead of
    refusing them; a WARNING says so.
    """

    def __init__(self, cache: CRLCache, files: CertificateFiles, *, refresh: float, soft_fail: bool,
                 clock: Callable[[], datetime], service_id: str) -> None:
        self._cache = cache
        self._files = files
        self._path = files.cert_file.parent / CRL_FILE_NAME
        self._refresh = refresh
        self._soft_fail = soft_fail
        self._clock = clock
        self._service_id = service_id
        self._lock = threading.Lock()
        self._contexts: list[ReloadingContexts] = []
        self._held: x509.CertificateRevocationList | None = None  # the CRL in force
        self._root_crl: x509.CertificateRevocationList | None = None  # written after it, for whole-chain verifiers
        self._installed: Path | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def crl(self) -> x509.CertificateRevocationList | None:
        """The CRL in force (None before any)."""
        return self._held

    @property
    def path(self) -> Path:
        """Where the CRL in force is kept: ``crl.pem`` beside the certificate."""
        return self._path

    def attach(self, contexts: ReloadingContexts, *, wait: bool) -> None:
        """Make ``contexts`` enforce the CRL; the first call starts the watcher. With ``wait``
        the first fetch is made before returning (its failure is logged, not raised)."""
        with self._lock:
            if any(c is contexts for c in self._contexts):
                return
            self._contexts.append(contexts)
            first = self._thread is None
            if first:
                self._load_from_disk()
            self._apply([contexts], changed=True)
            if not first:
                return
            self._thread = threading.Thread(target=self._run, args=(not wait,),
                                            name=f"vcc-pki-crl-{self._service_id}", daemon=True)
        if wait:
            self.refresh()
        self._thread.start()

    def refresh(self) -> bool:
        """Fetch the CRL now; install it if newer. False (and a WARNING) when the fetch or
        its checks fail: the CRL in force stays."""
        try:
            crl = self._cache.fetch()
        except PKIError as exc:
            self._expired_warning(f"fetching the CRL failed ({exc}); the CRL in force stays")
            return False
        try:
            root_crl = self._cache.fetch_root()
            if self._root_crl is None or (_crl_number(root_crl) or 0) > (_crl_number(self._root_crl) or 0):
                changed_root, self._root_crl = True, root_crl
            else:
                changed_root = False
        except PKIError as exc:  # kept out of crl.pem until it can be fetched: only whole-chain verifiers need it
            logger.warning("service %s: fetching the root's CRL failed (%s)", self._service_id, exc)
            changed_root = False
        self._offer(crl, rewrite=changed_root)
        return True

    def close(self) -> None:
        """Stop the background thread (waits for a fetch in flight). Idempotent."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join()

    # -- internals --------------------------------------------------------------------------
    def _run(self, fetch_first: bool) -> None:
        if fetch_first:
            self.refresh()
        while not self._stop.is_set():
            self._wake.wait(self._next_wait())
            self._wake.clear()
            if self._stop.is_set():
                return
            self.refresh()

    def _next_wait(self) -> float:
        held = self._held
        wait = self._refresh
        if held is not None and held.next_update_utc is not None:
            left = (held.next_update_utc - self._clock()).total_seconds()
            wait = min(wait, max(left, 1.0))
        return wait

    def _offer(self, crl: x509.CertificateRevocationList, *, rewrite: bool = False) -> None:
        """Install a checked CRL unless it is the one in force or older (a CRL number never
        goes back, whichever replica behind a load balancer answered). ``crl.pem`` holds it
        and then the root's CRL; ``rewrite``: the root's changed, write the file anew."""
        held = self._held
        number = _crl_number(crl) or 0
        held_number = -1 if held is None else _crl_number(held) or 0
        if held is not None and (number < held_number or (
                number == held_number and crl.last_update_utc <= held.last_update_utc)):
            if rewrite:
                self._write(held)
            with self._lock:
                self._apply(self._contexts, changed=False)  # the same CRL: re-judge its expiry only
            return
        ahead = (crl.last_update_utc - self._clock()).total_seconds()
        if ahead > 0:
            # Made by a CA whose clock is ahead of ours: OpenSSL would call it "not yet valid"
            # and refuse every peer. The one in force stays until the new one is due.
            logger.info("service %s: CRL number %d takes effect in %.0f s, at its thisUpdate",
                        self._service_id, number, ahead)
            if self._stop.wait(ahead + 0.5):
                return
        if not self._write(crl):
            return
        with self._lock:
            self._held = crl
            self._apply(self._contexts, changed=True)
        logger.info("service %s: CRL number %d in force (%d revoked, next update %s)", self._service_id,
                    number, len(crl), crl.next_update_utc.isoformat() if crl.next_update_utc else "-")

    def _write(self, crl: x509.CertificateRevocationList) -> bool:
        pem = crl.public_bytes(serialization.Encoding.PEM)
        if self._root_crl is not None:
            pem += self._root_crl.public_bytes(serialization.Encoding.PEM)
        try:
            write_atomically(self._path, pem, 0o644)
        except OSError as exc:
            logger.warning("service %s: cannot write %s: %s; the CRL in force stays", self._service_id,
                           self._path, exc.strerror or exc)
            return False
        return True

    def _apply(self, contexts: list[ReloadingContexts], *, changed: bool) -> None:
        """Give ``contexts`` the CRL in force, or none (with soft fail, an expired one is none).
        Contexts are rebuilt only when the CRL or its usability changed (``changed``: the CRL
        is new, or the contexts are)."""
        held = self._held
        usable = held is not None and (held.next_update_utc is None or self._clock() < held.next_update_utc)
        path = self._path if held is not None and (usable or not self._soft_fail) else None
        if not changed and path == self._installed:
            return
        for each in contexts:
            try:
                each.set_crl(path, soft_fail=self._soft_fail)
            except ConfigurationError as exc:
                logger.warning("service %s: %s; the CRL in force stays", self._service_id, exc)
        self._installed = path
        if path is None and self._soft_fail:
            logger.warning("service %s: no usable CRL: peers are accepted without a revocation check "
                           "(crl_soft_fail=True)", self._service_id)

    def _load_from_disk(self) -> None:
        """Start with the CRL a previous run left in ``crl.pem``, if it checks out."""
        if not self._path.is_file():
            return
        try:
            crl = x509.load_pem_x509_crl(self._path.read_bytes())
            chain = self._files.load_chain()
            issuer = next((c for c in chain if c.subject == crl.issuer), None)
            if issuer is None:
                raise TrustError(f"the CRL is issued by {crl.issuer.rfc4514_string()}, not by our CA")
            check_crl(crl, issuer)
        except (OSError, ValueError, PKIError) as exc:
            logger.warning("service %s: ignoring %s: %s", self._service_id, self._path, exc)
            return
        self._held = crl

    def _expired_warning(self, message: str) -> None:
        held = self._held
        if held is not None and held.next_update_utc is not None and self._clock() >= held.next_update_utc:
            what = ("peers are accepted without a revocation check (crl_soft_fail=True)" if self._soft_fail
                    else "handshakes with peers are refused until a fresh CRL is fetched")
            logger.warning("service %s: %s; the CRL held expired at %s: %s", self._service_id, message,
                           held.next_update_utc.isoformat(), what)
            with self._lock:
                self._apply(self._contexts, changed=False)
        else:
            logger.warning("service %s: %s", self._service_id, message)
