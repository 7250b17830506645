"""JSON shapes of certificates and services (SPEC §5), written once for the API's answers and
``pki-admin --json``: serials and fingerprints lowercase hex, RFC 3339 times."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

from cryptography import x509

from .authority import Issued
from .encoding import cert_pem
from .store import AuditEntry, CertificateRecord, Revoked, ServiceRecord, current_certificate, opt_text


def issued(result: Issued) -> dict[str, Any]:
    record = result.record
    return {
        "service_id": record.service_id,
        "serial_number": record.serial,
        "certificate": record.pem,
        "chain": _chain_text(result.chain),
        "not_before": opt_text(record.not_before),
        "not_after": opt_text(record.not_after),
        "fingerprint_sha256": record.fingerprint,
    }


@lru_cache(maxsize=8)
def _chain_text(chain: tuple[x509.Certificate, ...]) -> str:
    """The chain as PEM text; the same few chains are rendered on every issuance."""
    return cert_pem(*chain).decode()


def certificate(record: CertificateRecord, now: datetime) -> dict[str, Any]:
    return {
        "service_id": record.service_id,
        "serial_number": record.serial,
        "subject": record.subject,
        "san_dns": list(record.san_dns),
        "san_ip": list(record.san_ip),
        "not_before": opt_text(record.not_before),
        "not_after": opt_text(record.not_after),
        "issued_at": opt_text(record.issued_at),
        "status": record.status(now),
        "fingerprint_sha256": record.fingerprint,
        "revoked_at": opt_text(record.revoked_at),
        "revocation_reason": record.revocation_reason,
    }


def revoked(result: Revoked, now: datetime) -> dict[str, Any]:
    """A revocation's answer: the certificate named, and ``revoked_serials``, every serial
    the call revoked (the named one first)."""
    return {**certificate(result.record, now), "revoked_serials": list(result.serials)}


def service(record: ServiceRecord, *, certificates: list[CertificateRecord] | None = None,
            now: datetime | None = None) -> dict[str, Any]:
    """A registry entry; with ``certificates`` (and ``now``, to tell which are valid), them too."""
    body: dict[str, Any] = {
        "service_id": record.service_id,
        "service_name": record.service_name,
        "endpoints": list(record.endpoints),
        "health_check_url": record.health_check_url,
        "version": record.version,
        "owner": record.owner,
        "metadata": record.metadata,
        "san_dns": list(record.san_dns),
        "san_ip": list(record.san_ip),
        "default_validity_seconds": record.default_validity_seconds,
        "max_validity_seconds": record.max_validity_seconds,
        "created_at": opt_text(record.created_at),
        "updated_at": opt_text(record.updated_at),
        "health": {
            "status": record.health.status,
            "last_checked": opt_text(record.health.last_checked),
            "last_error": record.health.last_error,
            "consecutive_failures": record.health.consecutive_failures,
        },
    }
    if certificates is not None:
        assert now is not None, "certificates are rendered with their status at a time"
        # Current (newest valid) first, then the rest newest first.
        current = current_certificate(certificates, now)
        first = [] if current is None else [current]
        body["certificates"] = [certificate(c, now) for c in first + [c for c in certificates if c is not current]]
    return body


def audit(entry_id: int, entry: AuditEntry) -> dict[str, Any]:
    """An audit log entry (``id`` orders them; the cursor of ``GET /api/v1/audit``)."""
    return {"id": entry_id, "at": opt_text(entry.at), "actor": entry.actor, "action": entry.action,
            "service_id": entry.service_id, "serial": entry.serial, "details": entry.details}
