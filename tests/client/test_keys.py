"""Key generation, CSRs, PEM and fingerprints (vcc_pki_client.keys)."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from vcc_pki_client.errors import ConfigurationError
from vcc_pki_client.keys import (
    KEY_KINDS,
    build_csr,
    fingerprint_sha256,
    generate_private_key,
    key_kind,
    key_matches_certificate,
    load_private_key_pem,
    private_key_pem,
)

if TYPE_CHECKING:
    from conftest import MiniCA

FAST_KINDS = ["ec-p256", "ec-p384", "ed25519", "rsa-2048"]


@pytest.mark.parametrize("kind", FAST_KINDS)
def test_generate_each_kind_and_name_it_back(kind: str) -> None:
    key = generate_private_key(kind)
    assert key_kind(key) == kind


def test_default_kind_is_ec_p256() -> None:
    key = generate_private_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert KEY_KINDS[0] == "ec-p256"


@pytest.mark.parametrize("kind", ["rsa-3072", "rsa-4096"])
def test_generate_big_rsa(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the size matters here; cryptography's RSA generation itself is not under test.
    seen: list[int] = []
    real = rsa.generate_private_key

    def fake(public_exponent: int, key_size: int) -> rsa.RSAPrivateKey:
        seen.append(key_size)
        return real(public_exponent, 2048)

    monkeypatch.setattr(rsa, "generate_private_key", fake)
    generate_private_key(kind)
    assert seen == [int(kind[4:])]


@pytest.mark.parametrize("kind", ["", "ec-p521", "rsa-1024", "RSA-2048", "dsa"])
def test_unknown_kind(kind: str) -> None:
    with pytest.raises(ConfigurationError, match="unknown key kind"):
        generate_private_key(kind)


def test_key_kind_refuses_keys_the_sdk_would_not_make() -> None:
    with pytest.raises(ConfigurationError):
        key_kind(ec.generate_private_key(ec.SECP521R1()))


@pytest.mark.parametrize("kind", FAST_KINDS)
def test_csr_carries_service_id_and_sans(kind: str) -> None:
    key = generate_private_key(kind)
    csr = build_csr(key, "billing", san_dns=["billing", "billing.internal"], san_ip=["10.0.0.7", "::1"])
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "billing"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["billing", "billing.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("::1")]
    assert csr.public_key() == key.public_key()


def test_csr_signature_hash_follows_key() -> None:
    assert isinstance(build_csr(generate_private_key("ec-p256"), "a").signature_hash_algorithm, hashes.SHA256)
    assert isinstance(build_csr(generate_private_key("ec-p384"), "a").signature_hash_algorithm, hashes.SHA384)
    assert build_csr(generate_private_key("ed25519"), "a").signature_hash_algorithm is None


def test_csr_without_sans_has_no_san_extension() -> None:
    csr = build_csr(generate_private_key(), "billing")
    with pytest.raises(x509.ExtensionNotFound):
        csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)


@pytest.mark.parametrize(("dns", "ip"), [((), ("10.0.0.300",)), ((), ("billing",)), (("bücher.example",), ())])
def test_csr_refuses_malformed_sans(dns: tuple[str, ...], ip: tuple[str, ...]) -> None:
    with pytest.raises(ConfigurationError, match="invalid"):
        build_csr(generate_private_key(), "billing", san_dns=dns, san_ip=ip)


@pytest.mark.parametrize("kind", FAST_KINDS)
def test_private_key_pem_round_trip(kind: str) -> None:
    key = generate_private_key(kind)
    data = private_key_pem(key)
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    again = load_private_key_pem(data)
    assert private_key_pem(again) == data


def test_load_private_key_pem_refuses_garbage_encrypted_and_foreign_keys() -> None:
    with pytest.raises(ValueError):
        load_private_key_pem(b"not a key")
    encrypted = generate_private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    with pytest.raises(ValueError, match="encrypted"):
        load_private_key_pem(encrypted)
    x448 = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.x448").X448PrivateKey.generate()
    foreign = x448.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="unsupported"):
        load_private_key_pem(foreign)


def test_fingerprint_and_key_match(mini_ca: MiniCA) -> None:
    cert, key = mini_ca.issue()
    fp = fingerprint_sha256(cert)
    assert len(fp) == 64 and fp == fp.lower()
    assert fp == cert.fingerprint(hashes.SHA256()).hex()
    assert key_matches_certificate(key, cert)
    assert not key_matches_certificate(generate_private_key(), cert)
    assert not key_matches_certificate(ed25519.Ed25519PrivateKey.generate(), cert)
