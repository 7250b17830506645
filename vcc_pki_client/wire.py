"""The API's JSON shapes: value objects parsed from server answers, request bodies, formats.

Each value has a named constructor ``from_json(data)`` that checks every member it reads
and raises :class:`~vcc_pki_client.errors.InvalidResponseError` naming the member when one
is missing or ill-typed. Unknown members are ignored, so the server may add fields.
Times on the wire are RFC 3339 UTC (``2026-11-26T20:00:00Z``); here they are aware UTC
datetimes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Generic, TypeVar

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .errors import ConfigurationError, InvalidResponseError
from .keys import certificates_pem, fingerprint_sha256

__all__ = [
    "CertificateInfo",
    "IssuedCertificate",
    "Page",
    "ServiceEntry",
    "ServiceHealth",
    "certificate_request",
    "format_time",
    "normalize_fingerprint",
    "parse_time",
    "pem_chain",
    "renew_request",
]

T = TypeVar("T")

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX64_COLONS = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){31}")


def parse_time(text: str) -> datetime:
    """Parse an RFC 3339 timestamp with an offset (``Z`` or ``±hh:mm``) into aware UTC.

    Raises ValueError for anything else, including a timestamp without an offset.
    """
    if not isinstance(text, str) or not _RFC3339.fullmatch(text):
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    return datetime.fromisoformat(text.upper().replace(" ", "T")).astimezone(timezone.utc)


def format_time(value: datetime) -> str:
    """Format an aware datetime as RFC 3339 UTC with ``Z``, to the second.

    Raises ValueError for a naive datetime (its zone would be a guess).
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime: pass an aware (UTC) datetime")
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def normalize_fingerprint(text: str) -> str:
    """Normalise a SHA-256 fingerprint to 64 lowercase hex digits.

    Accepts any case, with or without colons between bytes, with or without a ``sha256:``
    prefix: ``"sha256:9F:2C:..."``, ``"9f2c..."``. Raises ConfigurationError otherwise.
    """
    value = text.strip().lower() if isinstance(text, str) else ""
    if value.startswith("sha256:"):
        value = value[len("sha256:") :].strip()
    if _HEX64_COLONS.fullmatch(value):
        value = value.replace(":", "")
    if not _HEX64.fullmatch(value):
        raise ConfigurationError(
            f"invalid SHA-256 fingerprint {text!r}: expected 64 hex digits, "
            "optionally colon-separated and prefixed with 'sha256:'"
        )
    return value


def certificate_request(
    service_id: str, csr: x509.CertificateSigningRequest, validity: timedelta | None = None
) -> dict[str, Any]:
    """Body of ``POST /certificates/request``."""
    return {"service_id": service_id, "csr": _csr_pem(csr), **lifetime_field(validity)}


def renew_request(csr: x509.CertificateSigningRequest | None = None,
                  validity: timedelta | None = None) -> dict[str, Any]:
    """Body of ``POST /certificates/{service_id}/renew``: with a CSR it is a rekey; without
    ``validity`` the server keeps the lifetime of the certificate renewed."""
    return {**({} if csr is None else {"csr": _csr_pem(csr)}), **lifetime_field(validity)}


def lifetime_field(validity: timedelta | None) -> dict[str, int]:
    """``validity_days`` for whole days (what servers before SPEC §10 understand), else
    ``validity_seconds``; nothing for None."""
    if validity is None:
        return {}
    seconds = int(validity.total_seconds())
    if seconds <= 0:
        raise ConfigurationError(f"validity must be positive, got {validity}")
    return {"validity_days": seconds // 86400} if seconds % 86400 == 0 else {"validity_seconds": seconds}


def _csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


class _Members:
    """Typed, checked access to a JSON object's members (errors name the member)."""

    def __init__(self, data: object, what: str) -> None:
        if not isinstance(data, Mapping):
            raise InvalidResponseError(f"{what}: expected a JSON object, got {_kind(data)}")
        self._data: Mapping[str, Any] = data
        self._what = what

    def _get(self, name: str, types: type | tuple[type, ...], optional: bool) -> Any:
        value = self._data.get(name)
        if value is None:
            if optional:
                return None
            raise InvalidResponseError(f"{self._what}: missing member {name!r}")
        # bool is an int in Python; JSON keeps them apart, so do we.
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self._ill_typed(name, value)
        if not isinstance(value, types):
            raise self._ill_typed(name, value)
        return value

    def _ill_typed(self, name: str, value: object) -> InvalidResponseError:
        return InvalidResponseError(f"{self._what}: member {name!r} is ill-typed ({_kind(value)})")

    def text(self, name: str) -> str:
        value: str = self._get(name, str, False)
        return value

    def opt_text(self, name: str) -> str | None:
        value: str | None = self._get(name, str, True)
        return value

    def integer(self, name: str) -> int:
        value: int = self._get(name, int, False)
        return value

    def time(self, name: str) -> datetime:
        try:
            return parse_time(self.text(name))
        except ValueError as exc:
            raise InvalidResponseError(f"{self._what}: member {name!r}: {exc}") from exc

    def opt_time(self, name: str) -> datetime | None:
        return None if self._data.get(name) is None else self.time(name)

    def texts(self, name: str, *, optional: bool = False) -> list[str]:
        value = self._get(name, list, optional)
        if value is None:
            return []
        if not all(isinstance(item, str) for item in value):
            raise InvalidResponseError(f"{self._what}: member {name!r} must be a list of strings")
        return list(value)

    def array(self, name: str, *, optional: bool = False) -> list[Any]:
        value = self._get(name, list, optional)
        return [] if value is None else list(value)

    def obj(self, name: str, *, optional: bool = False) -> dict[str, Any]:
        value = self._get(name, Mapping, optional)
        return {} if value is None else dict(value)

    def raw(self, name: str) -> object:
        if self._data.get(name) is None:
            raise InvalidResponseError(f"{self._what}: missing member {name!r}")
        return self._data[name]

    def certificates(self, name: str, *, allow_empty: bool) -> list[x509.Certificate]:
        text = self.text(name)
        if allow_empty and not text.strip():
            return []
        try:
            return x509.load_pem_x509_certificates(text.encode("ascii"))
        except ValueError as exc:  # includes UnicodeEncodeError
            raise InvalidResponseError(f"{self._what}: member {name!r} is not PEM certificates") from exc


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


@attrs.frozen(kw_only=True)
class IssuedCertificate:
    """A newly issued certificate: the answer of request, renew and rekey (201)."""

    service_id: str
    serial_number: str
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    not_before: datetime
    not_after: datetime
    fingerprint_sha256: str

    @classmethod
    def from_json(cls, data: object) -> IssuedCertificate:
        """Parse and cross-check (serial and fingerprint must describe ``certificate``)."""
        m = _Members(data, "issued certificate")
        certs = m.certificates("certificate", allow_empty=False)
        cert = certs[0]
        serial = m.text("serial_number")
        fingerprint = m.text("fingerprint_sha256")
        if _serial_value(serial) != cert.serial_number:
            raise InvalidResponseError(f"issued certificate: serial_number {serial!r} does not match the certificate")
        if fingerprint.lower() != fingerprint_sha256(cert):
            raise InvalidResponseError("issued certificate: fingerprint_sha256 does not match the certificate")
        return cls(
            service_id=m.text("service_id"),
            serial_number=serial.lower(),
            certificate=cert,
            chain=m.certificates("chain", allow_empty=True),
            not_before=m.time("not_before"),
            not_after=m.time("not_after"),
            fingerprint_sha256=fingerprint.lower(),
        )


def _serial_value(serial: str) -> int | None:
    try:
        return int(serial, 16)
    except ValueError:
        return None


@attrs.frozen(kw_only=True)
class CertificateInfo:
    """What the server records about one certificate (``GET /certificates/...``)."""

    serial_number: str
    service_id: str
    subject: str
    san_dns: list[str]
    san_ip: list[str]
    not_before: datetime
    not_after: datetime
    status: str  # valid | revoked | expired
    fingerprint_sha256: str
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    #: In a revocation's answer: every serial the call revoked (the named one first; more with
    #: keyCompromise, which takes every certificate of the key, or ``all=True``). Else empty.
    revoked_serials: list[str] = attrs.field(factory=list)

    @classmethod
    def from_json(cls, data: object) -> CertificateInfo:
        m = _Members(data, "certificate record")
        return cls(
            serial_number=m.text("serial_number"),
            service_id=m.text("service_id"),
            subject=m.text("subject"),
            san_dns=m.texts("san_dns"),
            san_ip=m.texts("san_ip"),
            not_before=m.time("not_before"),
            not_after=m.time("not_after"),
            status=m.text("status"),
            fingerprint_sha256=m.text("fingerprint_sha256"),
            revoked_at=m.opt_time("revoked_at"),
            revocation_reason=m.opt_text("revocation_reason"),
            revoked_serials=m.texts("revoked_serials", optional=True),
        )


@attrs.frozen(kw_only=True)
class ServiceHealth:
    """The server's latest probe of a service's ``health_check_url``."""

    status: str  # healthy | unhealthy | unknown
    last_checked: datetime | None = None
    last_error: str | None = None
    consecutive_failures: int = 0

    @classmethod
    def from_json(cls, data: object) -> ServiceHealth:
        m = _Members(data, "service health")
        return cls(
            status=m.text("status"),
            last_checked=m.opt_time("last_checked"),
            last_error=m.opt_text("last_error"),
            consecutive_failures=m.integer("consecutive_failures"),
        )


@attrs.frozen(kw_only=True)
class ServiceEntry:
    """A registry entry (``GET /services/...``, ``POST /services/register``).

    ``certificates`` is filled by ``GET /services/{service_id}`` only. ``enrolment_token``
    is present only in the answer that created the entry; it is a secret (not in repr).
    """

    service_id: str
    service_name: str
    endpoints: list[str]
    health_check_url: str | None
    version: str | None
    owner: str | None
    metadata: dict[str, Any]
    san_dns: list[str]
    san_ip: list[str]
    created_at: datetime
    updated_at: datetime
    health: ServiceHealth
    certificates: list[CertificateInfo] = attrs.Factory(list)
    enrolment_token: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_json(cls, data: object) -> ServiceEntry:
        m = _Members(data, "service entry")
        return cls(
            service_id=m.text("service_id"),
            service_name=m.text("service_name"),
            endpoints=m.texts("endpoints"),
            health_check_url=m.opt_text("health_check_url"),
            version=m.opt_text("version"),
            owner=m.opt_text("owner"),
            metadata=m.obj("metadata", optional=True),
            san_dns=m.texts("san_dns", optional=True),
            san_ip=m.texts("san_ip", optional=True),
            created_at=m.time("created_at"),
            updated_at=m.time("updated_at"),
            health=ServiceHealth.from_json(m.raw("health")),
            certificates=[CertificateInfo.from_json(item) for item in m.array("certificates", optional=True)],
            enrolment_token=m.opt_text("enrolment_token"),
        )


@attrs.frozen(kw_only=True)
class Page(Generic[T]):
    """One page of a list answer: ``{"items": [...], "next_cursor": str | null}``.

    Pass ``next_cursor`` back as ``cursor=`` for the next page; None means the last page.
    """

    items: list[T]
    next_cursor: str | None = None

    @classmethod
    def from_json(cls, data: object, item: Callable[[object], T]) -> Page[T]:
        """Parse a page, each item with ``item`` (e.g. ``CertificateInfo.from_json``)."""
        m = _Members(data, "list")
        return cls(items=[item(entry) for entry in m.array("items")], next_cursor=m.opt_text("next_cursor"))


def pem_chain(certs: Sequence[x509.Certificate]) -> str:
    """Certificates as one PEM string (the wire form of ``chain``)."""
    return certificates_pem(certs).decode("ascii")
