"""JSON shapes of the API (vcc_pki_client.wire)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vcc_pki_client.errors import ConfigurationError, InvalidResponseError
from vcc_pki_client.keys import build_csr, fingerprint_sha256, generate_private_key
from vcc_pki_client.wire import (
    CertificateInfo,
    IssuedCertificate,
    Page,
    ServiceEntry,
    ServiceHealth,
    certificate_request,
    format_time,
    normalize_fingerprint,
    parse_time,
    pem_chain,
    renew_request,
)

if TYPE_CHECKING:
    from conftest import MiniCA

FP = "9f2c" + "0a" * 30


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def issued_json(mini_ca: MiniCA) -> tuple[dict[str, Any], x509.Certificate]:
    cert, _ = mini_ca.issue("billing")
    return {
        "service_id": "billing",
        "serial_number": format(cert.serial_number, "x"),
        "certificate": pem(cert),
        "chain": pem_chain(mini_ca.chain),
        "not_before": format_time(cert.not_valid_before_utc),
        "not_after": format_time(cert.not_valid_after_utc),
        "fingerprint_sha256": fingerprint_sha256(cert),
    }, cert


CERT_INFO = {
    "serial_number": "1f2e3d",
    "service_id": "billing",
    "subject": "CN=billing",
    "san_dns": ["billing", "billing.internal"],
    "san_ip": ["10.0.0.7"],
    "not_before": "2026-01-01T00:00:00Z",
    "not_after": "2027-01-01T00:00:00Z",
    "status": "revoked",
    "fingerprint_sha256": FP,
    "revoked_at": "2026-06-01T12:30:00Z",
    "revocation_reason": "keyCompromise",
}

SERVICE = {
    "service_id": "billing",
    "service_name": "Billing",
    "endpoints": ["https://billing:9443"],
    "health_check_url": "https://billing:9443/health",
    "version": None,
    "owner": "payments",
    "metadata": {"tier": 1},
    "san_dns": ["billing"],
    "san_ip": [],
    "created_at": "2026-01-01T00:00:00Z",
    "updated_at": "2026-01-02T00:00:00Z",
    "health": {"status": "healthy", "last_checked": "2026-01-02T00:00:30Z", "last_error": None,
               "consecutive_failures": 0},
}


# -- times --------------------------------------------------------------------------


def test_parse_time_gives_aware_utc() -> None:
    assert parse_time("2026-11-26T20:00:00Z") == datetime(2026, 11, 26, 20, tzinfo=timezone.utc)
    t = parse_time("2026-11-26T21:00:00.5+01:00")
    assert t.tzinfo == timezone.utc and t == datetime(2026, 11, 26, 20, 0, 0, 500000, tzinfo=timezone.utc)


@pytest.mark.parametrize("text", ["2026-11-26T20:00:00", "2026-11-26", "yesterday", "", "2026-11-26T20:00Z"])
def test_parse_time_refuses_non_rfc3339(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_format_time_is_utc_z_seconds() -> None:
    berlin = timezone(timedelta(hours=1))
    assert format_time(datetime(2026, 11, 26, 21, 0, 0, 999999, tzinfo=berlin)) == "2026-11-26T20:00:00Z"
    with pytest.raises(ValueError):
        format_time(datetime(2026, 11, 26))


def test_time_round_trip() -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    assert parse_time(format_time(now)) == now


# -- fingerprints -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        FP,
        FP.upper(),
        ":".join(FP[i : i + 2] for i in range(0, 64, 2)),
        ":".join(FP[i : i + 2] for i in range(0, 64, 2)).upper(),
        "sha256:" + FP,
        "SHA256:" + ":".join(FP[i : i + 2] for i in range(0, 64, 2)).upper(),
        f"  {FP}\n",
    ],
)
def test_normalize_fingerprint_accepts_usual_spellings(text: str) -> None:
    assert normalize_fingerprint(text) == FP


@pytest.mark.parametrize(
    "text",
    ["", FP[:-2], FP + "00", "g" * 64, "sha1:" + FP, FP[:2] + ":" + FP[2:], "md5:" + FP, "sha256:"],
)
def test_normalize_fingerprint_refuses_everything_else(text: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid SHA-256 fingerprint"):
        normalize_fingerprint(text)


# -- issued certificates ------------------------------------------------------------


def test_issued_certificate_from_json(mini_ca: MiniCA) -> None:
    data, cert = issued_json(mini_ca)
    issued = IssuedCertificate.from_json(data)
    assert issued.certificate == cert
    assert issued.chain == mini_ca.chain
    assert issued.not_after == cert.not_valid_after_utc.replace(microsecond=0)
    assert issued.not_before.tzinfo == timezone.utc
    assert issued.serial_number == format(cert.serial_number, "x")
    assert issued.fingerprint_sha256 == fingerprint_sha256(cert)


@pytest.mark.parametrize(
    "member", ["service_id", "serial_number", "certificate", "chain", "not_before", "not_after", "fingerprint_sha256"])
def test_issued_certificate_missing_member(mini_ca: MiniCA, member: str) -> None:
    data, _ = issued_json(mini_ca)
    del data[member]
    with pytest.raises(InvalidResponseError, match=member):
        IssuedCertificate.from_json(data)


@pytest.mark.parametrize(
    ("member", "value"),
    [
        ("certificate", "not a pem"),
        ("certificate", 17),
        ("not_after", "next tuesday"),
        ("chain", ["a", "b"]),
        ("serial_number", "abc"),  # does not describe the certificate
        ("fingerprint_sha256", FP),
    ],
)
def test_issued_certificate_ill_typed_or_inconsistent(mini_ca: MiniCA, member: str, value: object) -> None:
    data, _ = issued_json(mini_ca)
    data[member] = value
    with pytest.raises(InvalidResponseError, match=member):
        IssuedCertificate.from_json(data)


def test_issued_certificate_with_empty_chain(mini_ca: MiniCA) -> None:
    data, _ = issued_json(mini_ca)
    data["chain"] = ""
    assert IssuedCertificate.from_json(data).chain == []


@pytest.mark.parametrize("data", [None, [], "x", 3])
def test_non_object_answers(data: object) -> None:
    with pytest.raises(InvalidResponseError, match="expected a JSON object"):
        IssuedCertificate.from_json(data)


# -- records, registry, pages -------------------------------------------------------


def test_certificate_info_from_json() -> None:
    info = CertificateInfo.from_json(CERT_INFO)
    assert info.san_dns == ["billing", "billing.internal"]
    assert info.revoked_at == datetime(2026, 6, 1, 12, 30, tzinfo=timezone.utc)
    assert info.revocation_reason == "keyCompromise"
    valid = CertificateInfo.from_json({**CERT_INFO, "status": "valid", "revoked_at": None, "revocation_reason": None})
    assert (valid.revoked_at, valid.revocation_reason) == (None, None)


@pytest.mark.parametrize(
    ("member", "value"),
    [("san_dns", "billing"), ("san_ip", [1]), ("status", None), ("not_before", 0), ("subject", True)],
)
def test_certificate_info_rejects_bad_members(member: str, value: object) -> None:
    with pytest.raises(InvalidResponseError, match=member):
        CertificateInfo.from_json({**CERT_INFO, member: value})


def test_service_entry_from_json() -> None:
    entry = ServiceEntry.from_json({**SERVICE, "certificates": [CERT_INFO]})
    assert entry.health == ServiceHealth(
        status="healthy",
        last_checked=datetime(2026, 1, 2, 0, 0, 30, tzinfo=timezone.utc),
        last_error=None,
        consecutive_failures=0,
    )
    assert entry.metadata == {"tier": 1}
    assert entry.version is None
    assert entry.certificates == [CertificateInfo.from_json(CERT_INFO)]
    assert ServiceEntry.from_json(SERVICE).certificates == []


def test_service_entry_hides_enrolment_token() -> None:
    entry = ServiceEntry.from_json({**SERVICE, "enrolment_token": "s3cret-token"})
    assert entry.enrolment_token == "s3cret-token"
    assert "s3cret" not in repr(entry)


@pytest.mark.parametrize(
    ("member", "value"),
    [
        ("health", None),
        ("health", {"status": "healthy", "consecutive_failures": "0"}),
        ("health", {"status": "healthy", "consecutive_failures": True}),
        ("endpoints", None),
        ("metadata", ["x"]),
        ("created_at", "2026-01-01"),
    ],
)
def test_service_entry_rejects_bad_members(member: str, value: object) -> None:
    with pytest.raises(InvalidResponseError):
        ServiceEntry.from_json({**SERVICE, member: value})


def test_page_from_json() -> None:
    page = Page.from_json({"items": [CERT_INFO, CERT_INFO], "next_cursor": "abc"}, CertificateInfo.from_json)
    assert len(page.items) == 2 and page.next_cursor == "abc"
    last = Page.from_json({"items": [], "next_cursor": None}, ServiceEntry.from_json)
    assert last.items == [] and last.next_cursor is None
    with pytest.raises(InvalidResponseError, match="items"):
        Page.from_json({"next_cursor": None}, CertificateInfo.from_json)


# -- requests ------------------------------------------------------------------------


def test_request_bodies() -> None:
    key = generate_private_key()
    csr = build_csr(key, "billing")
    body = certificate_request("billing", csr, validity=timedelta(days=30))
    assert body["service_id"] == "billing" and body["validity_days"] == 30
    assert x509.load_pem_x509_csr(body["csr"].encode()).public_key() == csr.public_key()
    assert "validity_days" not in certificate_request("billing", csr)
    assert certificate_request("billing", csr, validity=timedelta(hours=8))["validity_seconds"] == 28800
    assert renew_request() == {}
    assert renew_request(csr)["csr"] == body["csr"]
    assert renew_request(None, timedelta(minutes=15)) == {"validity_seconds": 900}
