"""The store: records the CA keeps, and the small interface every backend implements.

:class:`Store` is a ``typing.Protocol``; :mod:`.sqlite` is the embedded default and
:mod:`.postgres` the store of several replicas sharing one database (SPEC §9); the SQL they
share is in :mod:`.sql`. Each method is one transaction, and every state change writes its
audit-log row inside that transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..encoding import der_fingerprint, issuer_key_id, pem_text, public_key_id


def utc_text(moment: datetime) -> str:
    """RFC 3339 UTC with a ``Z``, second precision: sortable as text."""
    if moment.tzinfo is not timezone.utc:
        moment = moment.astimezone(timezone.utc)
    if moment.year < 1000:  # strftime's %Y does not pad; keep its output for such years
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    # %-formatting: three times faster than strftime, and this runs several times a request.
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (moment.year, moment.month, moment.day,
                                               moment.hour, moment.minute, moment.second)


def opt_text(moment: datetime | None) -> str | None:
    """:func:`utc_text`, or None for None."""
    return utc_text(moment) if moment is not None else None


def parse_utc(text: str) -> datetime:
    """The inverse of :func:`utc_text`; anything else raises ``ValueError``."""
    # fromisoformat is ~50x faster than strptime; the shape check keeps it as strict.
    if len(text) == 20 and text[4] == "-" and text[10] == "T" and text[19] == "Z" and text[:4].isdigit():
        return datetime.fromisoformat(text)
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


@attrs.frozen(kw_only=True)
class Health:
    status: str = "unknown"  # healthy | unhealthy | unknown
    last_checked: datetime | None = None
    last_error: str | None = None
    consecutive_failures: int = 0


@attrs.frozen(kw_only=True)
class ServiceRecord:
    """A registry entry; ``san_dns`` / ``san_ip`` are the allow-list for its certificates."""

    service_id: str
    service_name: str
    endpoints: tuple[str, ...] = ()
    health_check_url: str | None = None
    version: str | None = None
    owner: str | None = None
    metadata: dict[str, Any] = attrs.field(factory=dict)
    san_dns: tuple[str, ...] = ()
    san_ip: tuple[str, ...] = ()
    created_at: datetime
    updated_at: datetime
    health: Health = Health()
    # Lifetimes of its certificates set by an admin (None: the server's policy decides).
    default_validity_seconds: int | None = None
    max_validity_seconds: int | None = None


@attrs.frozen(kw_only=True)
class CertificateRecord:
    """One issued certificate as stored: enough to list, authenticate and revoke without parsing."""

    serial: str  # lowercase hex, no separators
    service_id: str
    subject: str
    san_dns: tuple[str, ...]
    san_ip: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    fingerprint: str  # SHA-256 of the DER, lowercase hex
    pem: str
    issued_at: datetime
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    row_id: int | None = None
    key_id: str = ""  # SHA-256 of the SubjectPublicKeyInfo, lowercase hex ("" in rows from before v3)
    issuer: str = ""  # the issuing CA's subject key identifier, hex (SPEC §13)

    @classmethod
    def from_cert(cls, service_id: str, cert: x509.Certificate, *, issued_at: datetime,
                  sans: tuple[Sequence[str], Sequence[Any]] | None = None,
                  subject: str | None = None, issuer: str | None = None) -> CertificateRecord:
        """The record of ``cert``. ``sans`` (DNS names, IP addresses) and ``subject`` (its
        RFC 4514 text) and ``issuer`` (the signer's SKI, hex) may say what it holds when the
        caller just signed it: parsing a fresh certificate's extensions and name costs more than
        the rest of this."""
        if sans is not None:
            dns, ips = tuple(sans[0]), tuple(str(ip) for ip in sans[1])
        else:
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                dns = tuple(san.get_values_for_type(x509.DNSName))
                ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
            except x509.ExtensionNotFound:
                dns, ips = (), ()
        der = cert.public_bytes(serialization.Encoding.DER)
        return cls(
            serial=format(cert.serial_number, "x"), service_id=service_id,
            subject=subject if subject is not None else cert.subject.rfc4514_string(),
            san_dns=dns, san_ip=ips,
            not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
            fingerprint=der_fingerprint(der), pem=pem_text(der), issued_at=issued_at,
            key_id=public_key_id(cert), issuer=issuer_key_id(cert) if issuer is None else issuer,
        )

    def status(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.not_after <= now:
            return "expired"
        if self.not_before > now:
            return "not_yet_valid"
        return "valid"

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.pem.encode())


def current_certificate(records: Iterable[CertificateRecord], now: datetime) -> CertificateRecord | None:
    """The current one of a service's certificates, newest first (as :meth:`Store.certificates_for`
    returns them): the newest valid at ``now``, or None."""
    return next((r for r in records if r.status(now) == "valid"), None)


@attrs.frozen(kw_only=True)
class TokenRecord:
    """An admin, metrics or enrolment token; only the SHA-256 of its secret is kept."""

    token_id: str
    kind: str  # admin | metrics | enrolment
    secret_hash: str = attrs.field(repr=False)
    created_at: datetime
    name: str | None = None
    service_id: str | None = None
    expires_at: datetime | None = None
    used_at: datetime | None = None
    revoked_at: datetime | None = None


@attrs.frozen(kw_only=True)
class CRLRecord:
    number: int
    this_update: datetime
    next_update: datetime
    der: bytes = attrs.field(repr=False)
    entries: int
    issuer: str = ""  # the signing CA's subject key identifier, hex


@attrs.frozen(kw_only=True)
class AuditEntry:
    at: datetime
    actor: str
    action: str
    service_id: str | None = None
    serial: str | None = None
    details: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class ServiceState:
    """A registered service as ``/metrics`` shows it: its health and its current certificate's
    validity (``None`` without a current certificate)."""

    service_id: str
    health_status: str  # healthy | unhealthy | unknown
    not_before: datetime | None
    not_after: datetime | None


@attrs.frozen(kw_only=True)
class CertificateQuery:
    """Filters for :meth:`Store.list_certificates`; ``after`` is the row id cursor."""

    service_id: str | None = None
    status: str | None = None  # valid | revoked | expired
    expiring_before: datetime | None = None
    now: datetime
    limit: int = 100
    after: int | None = None


# An issued certificate to record: the record, the actor's label for the audit log, and the
# enrolment token to spend with it (or None).
NewCertificate = tuple[CertificateRecord, str, "str | None"]


@attrs.frozen
class Revoked:
    """What one revocation did: the certificate named (as revoked), every serial revoked (the
    named one first), and the CRLs published with them, one per issuer of those certificates,
    the named one's first (none if none was asked for)."""

    record: CertificateRecord
    serials: tuple[str, ...]
    crls: tuple[CRLRecord, ...] = ()

    @property
    def crl(self) -> CRLRecord | None:
        """The CRL that lists the named certificate (None if none was published)."""
        return self.crls[0] if self.crls else None


# Signs the next CRL: (its number, the revoked (serial, revoked_at, reason) it lists) -> the record.
BuildCRL = Callable[[int, list[tuple[str, datetime, str]]], "CRLRecord"]
# The CRL signer of an issuer (its SKI, hex); CAUnavailable for a CA this server cannot sign for.
Publisher = Callable[[str], BuildCRL]


Outcomes = Callable[[list["BaseException | None"]], None]
"""Called once per submission of certificates: the error of each, ``None`` where recorded."""


class Store(Protocol):
    """What the authority needs from storage. Implementations: :class:`.sqlite.SQLiteStore`,
    :class:`.postgres.PostgresStore`."""

    def close(self) -> None: ...
    write_failure: str | None  # why the last write failed, until one succeeds
    lead_watcher: Callable[[str, bool], None] | None  # told of each answer of lead(): role, held

    def lead(self, role: str) -> bool:
        """Whether this store object holds the lead for ``role`` (``"health"``, ``"crl"``) among
        every server process on this store — all replicas on PostgreSQL, all workers on SQLite —
        taking it if it is free. Held until the process (or its connection) ends, so the lead
        fails over when its holder dies. Blocking: call it off the event loop."""
        ...

    # services
    def add_service(self, service: ServiceRecord, *, actor: str, token: TokenRecord | None = None) -> None: ...
    def update_service(self, service: ServiceRecord, *, actor: str, action: str = "service.update") -> None: ...
    def get_service(self, service_id: str) -> ServiceRecord | None: ...
    def list_services(self, *, healthy: bool | None = None, limit: int = 100,
                      after: str | None = None) -> list[ServiceRecord]: ...
    def record_health(self, service_id: str, health: Health, *, event: str | None) -> None: ...

    # certificates
    def submit_certificates(self, batch: Sequence[NewCertificate], done: Outcomes) -> None: ...
    def add_certificate(self, record: CertificateRecord, *, actor: str, consume_token: str | None = None) -> None: ...
    def get_certificate(self, serial: str) -> CertificateRecord | None: ...
    def certificates_for(self, service_id: str) -> list[CertificateRecord]: ...
    def list_certificates(self, query: CertificateQuery) -> list[CertificateRecord]: ...
    def revoke_certificates(self, serial: str, *, reason: str, at: datetime, actor: str,
                            service_wide: bool = False, same_key: bool = False,
                            publish: Publisher | None = None) -> Revoked: ...
    def decommission_service(self, service_id: str, *, at: datetime, actor: str,
                             publish: Publisher | None = None) -> tuple[list[str], tuple[CRLRecord, ...]]: ...

    # CRLs: one series per issuer (the CA's SKI, hex); numbers increase across all of them
    def new_crl(self, build: BuildCRL, *, at: datetime, actor: str, issuer: str = "") -> CRLRecord: ...
    def latest_crl_number(self, issuer: str | None = None) -> int: ...  # None: of any issuer
    def latest_crl(self, issuer: str | None = None) -> CRLRecord | None: ...
    def list_crls(self, limit: int = 20) -> list[CRLRecord]: ...
    def revoked(self, *, unexpired_at: datetime | None = None,
                issuer: str | None = None) -> list[tuple[str, datetime, str]]: ...

    def assign_issuer(self, issuer: str) -> int:
        """Record ``issuer`` as the CA of the rows from before schema 6 (NULL); how many
        certificates that was. Only right while one intermediate has ever issued."""
        ...

    def issuer_counts(self, now: datetime) -> dict[str, int]:
        """Per issuer (SKI), how many registered services have their current certificate from it."""
        ...

    # tokens
    def add_token(self, token: TokenRecord, *, actor: str) -> None: ...
    def note_token_refusal(self, token_id: str, *, limit: int, at: datetime, actor: str) -> bool: ...
    def get_token(self, token_id: str) -> TokenRecord | None: ...
    def list_tokens(self, kind: str | None = None) -> list[TokenRecord]: ...
    def revoke_token(self, token_id: str, *, at: datetime, actor: str) -> TokenRecord: ...

    # state the servers of a cluster share
    def shared_state(self, name: str) -> tuple[int, bytes] | None:
        """``(version, value)`` of ``name``, or None before it is first stored."""
        ...

    def put_shared_state(self, name: str, value: bytes, *, replaces: int, at: datetime, actor: str) -> bool:
        """Store ``value`` as version ``replaces + 1`` if the stored version is ``replaces``
        (0: none stored yet); False, changing nothing, if another server stored one first."""
        ...

    # figures (/metrics)
    def fleet(self, now: datetime) -> list[ServiceState]:
        """Every registered (not decommissioned) service, by id."""
        ...

    def revocation_counts(self) -> dict[str, int]:
        """How many certificates were revoked, by reason."""
        ...

    # audit
    def audit(self, entry: AuditEntry) -> None: ...
    def audit_page(self, *, limit: int = 100, service_id: str | None = None, since: datetime | None = None,
                   before: int | None = None) -> list[tuple[int, AuditEntry]]: ...


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def dumps(value: Sequence[Any] | dict[str, Any]) -> str:
    """Compact JSON with sorted keys (one encoder for all calls: json.dumps with options makes
    a new one each time)."""
    return _ENCODER.encode(value)
