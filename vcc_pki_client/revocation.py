"""Revocation: the CA's CRLs (one per unexpired intermediate, SPEC §13), fetched,
signature-checked against their issuer, cached, and enforced by the SDK's TLS contexts.

:class:`CRLCache` answers :meth:`PKIClient.is_revoked`. :class:`CRLWatcher` keeps the CRLs that
handed-out contexts check peers against: fetched in a background thread every ``refresh``
seconds (sooner once one held is past its nextUpdate), checked (issuer and signature),
written together to ``crl.pem`` beside the certificate (so a restart starts with the last good
CRLs even when the CA is unreachable) and given to the contexts
(:meth:`ReloadingContexts.set_crl`). Each round first follows the CA's trust
(:meth:`Session.refresh_trust`: new roots, new intermediates). A fetch that fails keeps the
CRLs in force and logs a WARNING; a CRL that fails its checks is never installed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ._session import Session
from .errors import ConfigurationError, InvalidResponseError, PKIError, TrustError
from .files import CertificateFiles, write_atomically
from .tls import ReloadingContexts
from .trust import check_crl, der, issued_by

__all__ = ["CRL_FILE_NAME", "CRLCache", "CRLWatcher"]

CRL_FILE_NAME = "crl.pem"
logger = logging.getLogger("vcc_pki_client")


class CRLCache:
    """The CRLs of a :class:`~vcc_pki_client._session.Session`'s CA, one per issuer (every
    unexpired intermediate: SPEC §13), each kept for ``max_age`` seconds; the list of
    intermediates is read again when it is ``trust_refresh`` seconds old.

    A kept CRL is never used past its nextUpdate, by the session's clock.
    """

    def __init__(self, session: Session, *, max_age: float, trust_refresh: float = 60.0) -> None:
        self._session = session
        self._max_age = max_age
        self._trust_refresh = trust_refresh
        self._clock = session.clock
        self._lock = threading.Lock()
        self._kept: dict[bytes, tuple[float, x509.CertificateRevocationList]] = {}  # by the issuer's DER

    def fetch(self, issuer: x509.Certificate | None = None) -> x509.CertificateRevocationList:
        """Fetch the CRL of ``issuer`` (default: the current intermediate), check issuer and
        signature, keep it (a CRL older than one already seen is not taken: the newer stays).

        Raises InvalidResponseError (not a CRL) or TrustError (not signed by that CA).
        """
        issuer = issuer or self._current_issuer()
        crl = self._get(issuer)
        key = der(issuer)
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and (_crl_number(crl) or 0) < (_crl_number(kept[1]) or 0):
                # An older CRL (a replica behind, or someone replaying one): keep the newer.
                logger.warning("the PKI server sent CRL number %s, older than number %s already seen; "
                               "keeping the newer", _crl_number(crl), _crl_number(kept[1]))
                self._kept[key] = (time.monotonic(), kept[1])
                return kept[1]
            self._kept[key] = (time.monotonic(), crl)
        return crl

    def fetch_all(self) -> list[tuple[x509.Certificate, x509.CertificateRevocationList]]:
        """The CRL of every issuer (the CA's list read anew if older than ``trust_refresh``)."""
        self._session.refresh_trust_quietly(self._trust_refresh)
        return [(issuer, self.fetch(issuer)) for issuer in self._session.issuers()]

    def current(self, issuer: x509.Certificate | None = None, *,
                refresh: bool = False) -> x509.CertificateRevocationList:
        """The kept CRL of ``issuer`` while fresh, else (or with ``refresh``) a newly fetched one."""
        issuer = issuer or self._current_issuer()
        with self._lock:
            kept = self._kept.get(der(issuer))
        if kept is not None and not refresh and time.monotonic() - kept[0] < self._max_age:
            next_update = kept[1].next_update_utc
            if next_update is None or self._clock() < next_update:
                return kept[1]
        return self.fetch(issuer)

    def forget(self) -> None:
        """Drop the kept CRLs (after a revocation through this client)."""
        with self._lock:
            self._kept.clear()

    def is_revoked(self, cert: x509.Certificate | int | str, *, refresh: bool = False) -> bool:
        """True when ``cert`` (a certificate, or its serial as int or hex) is on its issuer's
        CRL (a serial alone: on the CRL of any unexpired issuer of this CA).

        A certificate not signed by one of this CA's intermediates is a TrustError: no CRL
        of ours can speak for it. A malformed serial is a ConfigurationError.
        """
        if isinstance(cert, x509.Certificate):
            issuer = self._issuer_of(cert)
            if issuer is None:
                self._session.refresh_trust_quietly(0)  # an intermediate made since the list was read?
                issuer = self._issuer_of(cert)
            if issuer is None:
                raise TrustError(f"certificate {cert.serial_number:x} ({cert.subject.rfc4514_string()}) is not "
                                 "issued by this CA: its CRL cannot say whether it is revoked")
            crl = self.current(issuer, refresh=refresh)
            return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        if isinstance(cert, int):
            serial = cert
        else:
            try:
                serial = int(cert.replace(":", ""), 16)
            except ValueError as exc:
                raise ConfigurationError(f"not a certificate serial number: {cert!r}") from exc
        return any(self.current(issuer, refresh=refresh).get_revoked_certificate_by_serial_number(serial) is not None
                   for issuer in self._session.issuers())

    def fetch_root(self) -> x509.CertificateRevocationList:
        """The root CA's CRL (revoked intermediates), its signature checked against the root.
        What verifiers that check the whole chain need besides the intermediates' (nginx does)."""
        return self._get(self._session.ca_chain()[-1])

    def _get(self, ca: x509.Certificate) -> x509.CertificateRevocationList:
        """``GET /api/v1/crl/{ski}`` of ``ca``, checked (issuer and signature) against it."""
        path = "/crl/" + ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
        response = self._session.connection().request("GET", path)
        try:
            crl = x509.load_der_x509_crl(response.content)
        except ValueError as exc:
            raise InvalidResponseError(f"GET /api/v1{path}: the answer is not a DER CRL") from exc
        return check_crl(crl, ca)

    def _current_issuer(self) -> x509.Certificate:
        issuers = self._session.issuers()
        if not issuers:
            raise TrustError("the PKI server lists no intermediate CA that chains to the roots this client trusts")
        return issuers[0]

    def _issuer_of(self, cert: x509.Certificate) -> x509.Certificate | None:
        return next((issuer for issuer in self._session.issuers() if issued_by(cert, issuer)), None)


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
        self._held: dict[bytes, x509.CertificateRevocationList] = {}  # in force, by issuer (DER), current first
        self._root_crl: x509.CertificateRevocationList | None = None  # written after it, for whole-chain verifiers
        self._installed: Path | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def crl(self) -> x509.CertificateRevocationList | None:
        """The current intermediate's CRL in force (None before any)."""
        return next(iter(self._held.values()), None)

    @property
    def crls(self) -> list[x509.CertificateRevocationList]:
        """Every CRL in force, the current intermediate's first."""
        return list(self._held.values())

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
        """Fetch every issuer's CRL now; install them if newer. False (and a WARNING) when a
        fetch or its checks fail: the CRLs in force stay."""
        try:
            fetched = self._cache.fetch_all()
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
        self._offer(fetched, rewrite=changed_root)
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
        wait = self._refresh
        first = self._first_expiry()
        if first is not None:
            left = (first - self._clock()).total_seconds()
            wait = min(wait, max(left, 1.0))
        return wait

    def _first_expiry(self) -> datetime | None:
        """The earliest nextUpdate of the CRLs in force (None: none has one)."""
        times = [c.next_update_utc for c in self._held.values() if c.next_update_utc is not None]
        return min(times) if times else None

    def _offer(self, fetched: list[tuple[x509.Certificate, x509.CertificateRevocationList]], *,
               rewrite: bool = False) -> None:
        """Install checked CRLs, one per issuer, unless each is the one in force or older (a CRL
        number never goes back, whichever replica behind a load balancer answered). ``crl.pem``
        holds them and then the root's CRL; ``rewrite``: the root's changed, write the file anew."""
        held = self._held
        offered: dict[bytes, x509.CertificateRevocationList] = {}
        for issuer, crl in fetched:
            key = der(issuer)
            mine = held.get(key)
            if mine is not None and ((_crl_number(crl) or 0) < (_crl_number(mine) or 0) or (
                    _crl_number(crl) == _crl_number(mine) and crl.last_update_utc <= mine.last_update_utc)):
                crl = mine
            offered[key] = crl
        if list(offered.items()) == list(held.items()):
            if rewrite:
                self._write(list(held.values()))
            with self._lock:
                self._apply(self._contexts, changed=False)  # the same CRLs: re-judge their expiry only
            return
        ahead = max(((c.last_update_utc - self._clock()).total_seconds() for c in offered.values()), default=0.0)
        if ahead > 0:
            # Made by a CA whose clock is ahead of ours: OpenSSL would call it "not yet valid"
            # and refuse every peer. The ones in force stay until the new ones are due.
            logger.info("service %s: a new CRL takes effect in %.0f s, at its thisUpdate", self._service_id, ahead)
            if self._stop.wait(ahead + 0.5):
                return
        if not self._write(list(offered.values())):
            return
        with self._lock:
            self._held = offered
            self._apply(self._contexts, changed=True)
        for crl in offered.values():
            if crl not in held.values():
                logger.info("service %s: CRL number %d of %s in force (%d revoked, next update %s)",
                            self._service_id, _crl_number(crl) or 0, crl.issuer.rfc4514_string(), len(crl),
                            crl.next_update_utc.isoformat() if crl.next_update_utc else "-")

    def _write(self, crls: list[x509.CertificateRevocationList]) -> bool:
        pem = b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in crls)
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
        first = self._first_expiry()
        usable = bool(self._held) and (first is None or self._clock() < first)
        path = self._path if self._held and (usable or not self._soft_fail) else None
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
        """Start with the CRLs a previous run left in ``crl.pem``, if they check out (the root's,
        after them, is read again from the CA)."""
        if not self._path.is_file():
            return
        held: dict[bytes, x509.CertificateRevocationList] = {}
        try:
            chain = self._files.load_chain()
            for block in _pem_crls(self._path.read_bytes()):
                crl = x509.load_pem_x509_crl(block)
                issuer = next((c for c in chain if c.subject == crl.issuer), None)
                if issuer is None:
                    raise TrustError(f"the CRL is issued by {crl.issuer.rfc4514_string()}, not by our CA")
                if issuer.issuer != issuer.subject:  # an intermediate's, not the root's
                    held[der(issuer)] = check_crl(crl, issuer)
        except (OSError, ValueError, PKIError) as exc:
            logger.warning("service %s: ignoring %s: %s", self._service_id, self._path, exc)
            return
        self._held = held

    def _expired_warning(self, message: str) -> None:
        first = self._first_expiry()
        if first is not None and self._clock() >= first:
            what = ("peers are accepted without a revocation check (crl_soft_fail=True)" if self._soft_fail
                    else "handshakes with peers are refused until a fresh CRL is fetched")
            logger.warning("service %s: %s; the CRL held expired at %s: %s", self._service_id, message,
                           first.isoformat(), what)
            with self._lock:
                self._apply(self._contexts, changed=False)
        else:
            logger.warning("service %s: %s", self._service_id, message)


_CRL_END = b"-----END X509 CRL-----"


def _pem_crls(data: bytes) -> list[bytes]:
    """The PEM CRLs in ``data``, one block each."""
    return [part + _CRL_END + b"\n" for part in data.split(_CRL_END) if b"-----BEGIN X509 CRL-----" in part]
