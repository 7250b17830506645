"""Revocation checks: the CA's CRL, fetched, signature-checked against the intermediate, and cached."""

from __future__ import annotations

import threading
import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ._session import Session
from .errors import ConfigurationError, InvalidResponseError, TrustError
from .trust import check_crl

__all__ = ["CRLCache"]


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

    def _issuer(self, crl: x509.CertificateRevocationList) -> x509.Certificate:
        for cert in self._session.ca_chain():
            if cert.subject == crl.issuer:
                return cert
        raise TrustError(f"the CRL is issued by {crl.issuer.rfc4514_string()}, not by our CA")
