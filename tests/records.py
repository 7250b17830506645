"""Store records for tests: certificates, services and tokens as the store sees them."""

from __future__ import annotations

import hashlib
import itertools
from datetime import datetime, timedelta, timezone

from vcc_pki_server.store import CertificateRecord, ServiceRecord, TokenRecord

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
_serials = itertools.count(0x1000_0000_0000_0000_0001)


def cert(service_id: str, *, serial: int | None = None,
         not_before: datetime = NOW - timedelta(days=1), not_after: datetime = NOW + timedelta(days=100),
         fingerprint: str | None = None, key_id: str | None = None) -> CertificateRecord:
    """A certificate record as the store sees it (the store parses the PEM only of rows
    without a key_id, from before schema v3). Each has a key of its own unless ``key_id``."""
    number = next(_serials) if serial is None else serial
    return CertificateRecord(
        serial=format(number, "x"), service_id=service_id, subject=f"CN={service_id}",
        san_dns=(service_id,), san_ip=("10.0.0.1",), not_before=not_before, not_after=not_after,
        fingerprint=fingerprint or hashlib.sha256(f"{number}".encode()).hexdigest(),
        pem="-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n", issued_at=NOW,
        key_id=key_id or hashlib.sha256(f"key-{number}".encode()).hexdigest())


def service(service_id: str) -> ServiceRecord:
    return ServiceRecord(service_id=service_id, service_name=service_id, san_dns=(service_id,),
                         created_at=NOW, updated_at=NOW)


def token(service_id: str) -> TokenRecord:
    return TokenRecord(token_id=hashlib.sha256(service_id.encode()).hexdigest()[:12], kind="enrolment",
                       secret_hash="0" * 64, service_id=service_id, created_at=NOW,
                       expires_at=NOW + timedelta(hours=24))
