"""Pure policy rules: service ids, DNS names, CSR checks, allow-lists and lifetimes (SPEC §3, §4)."""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from support import make_csr
from vcc_pki_server.errors import InvalidCSR, InvalidRequest, PolicyRefused
from vcc_pki_server.policy import (
    Lifetimes,
    Policy,
    check_service_id,
    load_csr_key,
    normalize_dns_name,
    normalize_sans,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def load_csr(data: str | bytes) -> x509.CertificateSigningRequest:
    return load_csr_key(data)[0]


# --- service ids -----------------------------------------------------------------------------

@pytest.mark.parametrize("service_id", ["veritas-backend", "a", "svc1", "0", "a" * 63, "a-b-c"])
def test_service_id_accepts_lower_case_ldh_labels(service_id: str) -> None:
    assert check_service_id(service_id) == service_id


@pytest.mark.parametrize("service_id", ["../../etc", "Veritas", "VERITAS", "a" * 64, "-backend",
                                        "backend-", "", "a_b", "a.b", "a b", "bücher", None, 42])
def test_service_id_refuses_anything_else(service_id: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_service_id(service_id)
    assert info.value.code == "invalid_field"


# --- DNS names -------------------------------------------------------------------------------

def _name_of_length(length: int) -> str:
    """A valid-looking DNS name of exactly ``length`` characters (labels of up to 63)."""
    labels, left = [], length
    while left > 0:
        size = min(63, left)
        labels.append("a" * size)
        left -= size + 1
    name = ".".join(labels)
    return name[:length]


@pytest.mark.parametrize("name", ["", "a..b", "bad_name", "*.x", "*.example.com", "127.0.0.1",
                                  "10.0.0.1", "a" * 64 + ".example", "-lead.example",
                                  "trail-.example", "a b.example", _name_of_length(254)])
def test_dns_name_refuses_non_ldh_wildcard_ip_and_overlong(name: str) -> None:
    with pytest.raises(InvalidRequest):
        normalize_dns_name(name)


@pytest.mark.parametrize(("name", "expected"), [
    ("localhost", "localhost"),
    ("veritas-backend", "veritas-backend"),
    ("API.Example.COM", "api.example.com"),
    ("host.example.", "host.example"),
    ("a" * 63 + ".example", "a" * 63 + ".example"),
    (_name_of_length(253), _name_of_length(253)),
])
def test_dns_name_accepts_ldh_names_in_lower_case(name: str, expected: str) -> None:
    assert normalize_dns_name(name) == expected


def test_dns_name_converts_u_labels_to_a_labels() -> None:
    assert normalize_dns_name("bücher.example") == "xn--bcher-kva.example"


def test_sans_are_deduplicated_in_first_seen_order() -> None:
    dns, ips = normalize_sans(["b.example", "A.example", "b.example", "a.example"],
                              ["10.0.0.2", "10.0.0.1", "10.0.0.2", "::1"])
    assert dns == ("b.example", "a.example")
    assert ips == (ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("10.0.0.1"),
                   ipaddress.ip_address("::1"))


def test_sans_refuse_an_invalid_ip() -> None:
    with pytest.raises(InvalidRequest, match="300.1.1.1"):
        normalize_sans([], ["300.1.1.1"])


# --- CSR loading -----------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"not a csr at all",
    b"",
    b"-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE REQUEST-----\n",
    "-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n",
])
def test_load_csr_refuses_garbage(data: str | bytes) -> None:
    with pytest.raises(InvalidCSR) as info:
        load_csr(data)
    assert info.value.code == "invalid_csr"


def test_load_csr_accepts_pem_as_str_or_bytes_and_der() -> None:
    csr_pem, _key = make_csr("api.example", dns=["api.example"])
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    for data in (csr_pem, csr_pem.decode(), der):
        assert load_csr(data).subject.rfc4514_string() == "CN=api.example"


@pytest.mark.parametrize("key_kind", ["ec", "rsa", "ed25519"])
def test_load_csr_refuses_a_csr_with_a_flipped_signature_bit(key_kind: str) -> None:
    key: Any = (ec.generate_private_key(ec.SECP256R1()) if key_kind == "ec"
                else rsa.generate_private_key(public_exponent=65537, key_size=2048) if key_kind == "rsa"
                else ed25519.Ed25519PrivateKey.generate())
    csr_pem, _ = make_csr("api.example", key=key)
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte belongs to the signature BIT STRING
    tampered = x509.load_der_x509_csr(bytes(der))  # still parses: only the signature is wrong
    assert tampered.subject.rfc4514_string() == "CN=api.example"
    tampered_pem = tampered.public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidCSR, match="signature"):
        load_csr(tampered_pem)


def _rsa_key(bits: int, e: int = 65537) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=e, key_size=bits)


@pytest.mark.parametrize(("make_key", "message"), [
    (lambda: _rsa_key(1024), "1024 bits"),
    (lambda: _rsa_key(2048, e=3), "exponent 3"),
    (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
    (lambda: ec.generate_private_key(ec.SECP224R1()), "secp224r1"),
    (lambda: ed448.Ed448PrivateKey.generate(), "Ed448"),
], ids=["rsa-1024", "rsa-e3", "secp256k1", "p-224", "ed448"])
def test_load_csr_refuses_weak_or_unsupported_keys(make_key: Any, message: str) -> None:
    key = make_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.example")]))
    algorithm = None if isinstance(key, ed448.Ed448PrivateKey) else hashes.SHA256()
    csr_pem = builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidCSR, match=message):
        load_csr(csr_pem)


@pytest.mark.parametrize("make_key", [
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: _rsa_key(2048),
    lambda: ed25519.Ed25519PrivateKey.generate(),
], ids=["p-256", "p-384", "rsa-2048", "ed25519"])
def test_load_csr_accepts_profile_key_types(make_key: Any) -> None:
    key = make_key()
    csr_pem, _ = make_csr("api.example", key=key)
    assert load_csr(csr_pem).public_key() == key.public_key()


def test_csr_with_an_email_san_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.example")]))
           .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("a@example.com")]), critical=False)
           .sign(key, hashes.SHA256()))
    with pytest.raises(InvalidCSR, match="RFC822Name"):
        Policy().template("svc", ["api.example"], [], load_csr(csr.public_bytes(serialization.Encoding.PEM)),
                          now=NOW)


@pytest.mark.parametrize("bad", ["bad_name", "*.example", "a..b"])
def test_csr_with_an_invalid_dns_san_is_refused(bad: str) -> None:
    csr, _ = make_csr("api.example", dns=[bad])
    with pytest.raises(InvalidCSR, match="CSR names"):
        Policy().template("svc", ["api.example"], [], load_csr(csr), now=NOW)


# --- allow-list ------------------------------------------------------------------------------

ALLOW_DNS = ["api.example", "www.example", "svc"]
ALLOW_IP = ["10.0.0.1", "fd00::1"]


def _template(csr_pem: bytes, **kwargs: Any) -> Any:
    return Policy().template("svc", ALLOW_DNS, ALLOW_IP, load_csr(csr_pem), now=NOW, **kwargs)


@pytest.mark.parametrize(("dns", "ips", "named"), [
    (["evil.example"], [], "evil.example"),
    (["api.example", "evil.example"], [], "evil.example"),
    ([], ["10.6.6.6"], "10.6.6.6"),
    (["api.example"], ["fd00::2"], "fd00::2"),
])
def test_san_outside_allow_list_is_refused_naming_the_san(dns: list[str], ips: list[str], named: str) -> None:
    csr, _ = make_csr("api.example", dns=dns, ips=ips)
    with pytest.raises(PolicyRefused) as info:
        _template(csr)
    assert named in str(info.value)
    assert info.value.code == "policy_refused"


def test_cn_outside_allow_list_is_refused() -> None:
    csr, _ = make_csr("evil.example", dns=["api.example"])
    with pytest.raises(PolicyRefused, match="evil.example"):
        _template(csr)


def test_csr_without_sans_gets_the_whole_allow_list() -> None:
    csr, _ = make_csr(None)
    template = _template(csr)
    assert template.san_dns == ("api.example", "www.example", "svc")
    assert template.san_ip == (ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("fd00::1"))
    assert template.common_name == "api.example"


def test_cn_is_copied_into_the_sans_first() -> None:
    csr, _ = make_csr("www.example", dns=["api.example"], ips=["10.0.0.1"])
    template = _template(csr)
    assert template.common_name == "www.example"
    assert template.san_dns == ("www.example", "api.example")
    assert template.san_ip == (ipaddress.ip_address("10.0.0.1"),)


def test_ip_cn_is_copied_into_the_ip_sans() -> None:
    csr, _ = make_csr("10.0.0.1", dns=["api.example"])
    template = _template(csr)
    assert template.common_name == "10.0.0.1"
    assert template.san_dns == ("api.example",)
    assert template.san_ip == (ipaddress.ip_address("10.0.0.1"),)


def test_cn_equal_to_the_service_id_is_dropped_when_not_allowed() -> None:
    csr, _ = make_csr("other-svc", dns=["api.example"])
    template = Policy().template("other-svc", ALLOW_DNS, ALLOW_IP, load_csr(csr), now=NOW)
    assert template.common_name == "api.example"
    assert template.san_dns == ("api.example",)


def test_requested_names_are_normalised_before_the_allow_list_check() -> None:
    csr, _ = make_csr("API.Example", dns=["WWW.example"])
    template = _template(csr)
    assert template.common_name == "api.example"
    assert template.san_dns == ("api.example", "www.example")


def test_empty_allow_list_is_refused() -> None:
    csr, _ = make_csr(None)
    with pytest.raises(PolicyRefused, match="empty"):
        Policy().template("svc", [], [], load_csr(csr), now=NOW)


# --- lifetimes -------------------------------------------------------------------------------

def test_validity_defaults_to_365_days_backdated_five_minutes() -> None:
    not_before, not_after = Policy().validity(None, NOW)
    assert not_before == NOW - timedelta(minutes=5)
    assert not_after == NOW + timedelta(days=365)


def test_lifetimes_up_to_the_maximum_are_granted() -> None:
    assert Policy().validity(timedelta(days=1), NOW)[1] == NOW + timedelta(days=1)
    assert Policy().validity(timedelta(days=365), NOW)[1] == NOW + timedelta(days=365)
    assert Policy().validity(timedelta(seconds=300), NOW)[1] == NOW + timedelta(seconds=300)
    assert Policy(max_validity_days=30, default_validity_days=30).validity(None, NOW)[1] == \
        NOW + timedelta(days=30)


@pytest.mark.parametrize(("policy", "days"), [(Policy(), 366), (Policy(max_validity_days=90), 91)])
def test_a_lifetime_above_the_maximum_is_an_invalid_field_naming_the_limit(policy: Policy, days: int) -> None:
    with pytest.raises(InvalidRequest) as info:
        policy.validity(timedelta(days=days), NOW)
    assert info.value.code == "invalid_field"
    assert f"{days} days" in str(info.value) and f"{policy.max_validity_days} days" in str(info.value)
    assert "max_validity_days" in str(info.value)


@pytest.mark.parametrize("seconds", [299, 60, 0, -1])
def test_a_lifetime_under_five_minutes_is_refused(seconds: int) -> None:
    with pytest.raises(InvalidRequest, match="at least 300 seconds") as info:
        Policy().validity(timedelta(seconds=seconds), NOW)
    assert info.value.code == "invalid_field"


def test_a_service_s_own_lifetimes_come_first_within_the_server_s() -> None:
    service = Lifetimes(default=timedelta(hours=8), maximum=timedelta(days=1))
    assert Policy().validity(None, NOW, service=service)[1] == NOW + timedelta(hours=8)
    with pytest.raises(InvalidRequest, match="this service's maximum of 1 days \\(max_validity_seconds\\)"):
        Policy().validity(timedelta(days=2), NOW, service=service)
    # A service maximum above the server's does not lift it; cap= cuts instead of refusing.
    loose = Lifetimes(maximum=timedelta(days=1000))
    with pytest.raises(InvalidRequest, match="server's maximum of 365 days"):
        Policy().validity(timedelta(days=400), NOW, service=loose)
    assert Policy().validity(timedelta(days=400), NOW, cap=True)[1] == NOW + timedelta(days=365)
    assert Policy().validity(None, NOW, service=Lifetimes(default=timedelta(days=900)))[1] == \
        NOW + timedelta(days=365)


def test_template_carries_the_requested_lifetime() -> None:
    csr, _ = make_csr("api.example")
    template = _template(csr, validity=timedelta(days=10))
    assert template.not_before == NOW - timedelta(minutes=5)
    assert template.not_after == NOW + timedelta(days=10)
    with pytest.raises(InvalidRequest):
        _template(csr, validity=timedelta(days=400))
