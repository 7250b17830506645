"""Rows to records and back: the column lists and conversions both SQL backends share."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from . import (
    AuditEntry,
    CertificateRecord,
    CRLRecord,
    Health,
    ServiceRecord,
    TokenRecord,
    dumps,
    parse_utc,
    utc_text,
)

Row = tuple[Any, ...]

CERT_COLUMNS = ("c.id, c.serial, c.service_id, c.subject, c.san_dns, c.san_ip, c.not_before, "
                "c.not_after, c.fingerprint, c.pem, c.issued_at, r.revoked_at, r.reason, c.key_id, c.issuer")
CERT_FROM = "certificates c LEFT JOIN revocations r ON r.serial = c.serial"
SERVICE_COLUMNS = ("service_id, service_name, endpoints, health_check_url, version, owner, "
                   "metadata, san_dns, san_ip, created_at, updated_at, health_status, "
                   "last_checked, last_error, consecutive_failures, default_validity_seconds, "
                   "max_validity_seconds")
TOKEN_COLUMNS = ("token_id, kind, secret_hash, name, service_id, created_at, expires_at, "
                 "used_at, revoked_at")
CRL_COLUMNS = "number, this_update, next_update, der, entries, issuer"
AUDIT_COLUMNS = "at, actor, action, service_id, serial, details"


# The columns :func:`service_params` gives values for, in its order (``service_id`` last).
SERVICE_WRITE = ("service_name", "endpoints", "health_check_url", "version", "owner", "metadata", "san_dns",
                 "san_ip", "created_at", "updated_at", "default_validity_seconds", "max_validity_seconds",
                 "service_id")


def opt_time(text: str | None) -> datetime | None:
    return parse_utc(text) if text else None


def service_params(s: ServiceRecord) -> Row:
    """The values of an INSERT/UPDATE of :data:`SERVICE_WRITE` columns, ``service_id`` last
    (for the WHERE)."""
    return (s.service_name, dumps(list(s.endpoints)), s.health_check_url, s.version, s.owner,
            dumps(s.metadata), dumps(list(s.san_dns)), dumps(list(s.san_ip)),
            utc_text(s.created_at), utc_text(s.updated_at), s.default_validity_seconds,
            s.max_validity_seconds, s.service_id)


def service_record(r: Row) -> ServiceRecord:
    """A row of :data:`SERVICE_COLUMNS`."""
    return ServiceRecord(
        service_id=r[0], service_name=r[1], endpoints=tuple(json.loads(r[2])),
        health_check_url=r[3], version=r[4], owner=r[5], metadata=json.loads(r[6]),
        san_dns=tuple(json.loads(r[7])), san_ip=tuple(json.loads(r[8])),
        created_at=parse_utc(r[9]), updated_at=parse_utc(r[10]),
        health=Health(status=r[11], last_checked=opt_time(r[12]), last_error=r[13],
                      consecutive_failures=r[14]),
        default_validity_seconds=r[15], max_validity_seconds=r[16],
    )


def certificate_record(r: Row) -> CertificateRecord:
    """A row of :data:`CERT_COLUMNS`."""
    return CertificateRecord(
        row_id=r[0], serial=r[1], service_id=r[2], subject=r[3],
        san_dns=tuple(json.loads(r[4])), san_ip=tuple(json.loads(r[5])),
        not_before=parse_utc(r[6]), not_after=parse_utc(r[7]), fingerprint=r[8], pem=r[9],
        issued_at=parse_utc(r[10]), revoked_at=opt_time(r[11]), revocation_reason=r[12],
        key_id=r[13] or "", issuer=r[14] or "",
    )


def token_record(r: Row) -> TokenRecord:
    """A row of :data:`TOKEN_COLUMNS`."""
    return TokenRecord(token_id=r[0], kind=r[1], secret_hash=r[2], name=r[3], service_id=r[4],
                       created_at=parse_utc(r[5]), expires_at=opt_time(r[6]),
                       used_at=opt_time(r[7]), revoked_at=opt_time(r[8]))


def crl_record(r: Row) -> CRLRecord:
    """A row of :data:`CRL_COLUMNS`."""
    return CRLRecord(number=int(r[0]), this_update=parse_utc(r[1]), next_update=parse_utc(r[2]),
                     der=bytes(r[3]), entries=r[4], issuer=r[5] or "")


def audit_entry(r: Row) -> AuditEntry:
    """A row of :data:`AUDIT_COLUMNS`."""
    return AuditEntry(at=parse_utc(r[0]), actor=r[1], action=r[2], service_id=r[3], serial=r[4],
                      details=json.loads(r[5]))


def certificate_rows(record: CertificateRecord, actor: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The ``certificates`` row of a record and its ``certificate.issue`` audit row."""
    issued_at, not_after = utc_text(record.issued_at), utc_text(record.not_after)
    row = (record.serial, record.service_id, record.subject, dumps(list(record.san_dns)),
           dumps(list(record.san_ip)), utc_text(record.not_before), not_after,
           record.fingerprint, record.pem, issued_at, record.key_id, record.issuer)
    audit = (issued_at, actor, "certificate.issue", record.service_id, record.serial,
             dumps({"not_after": not_after}))
    return row, audit
