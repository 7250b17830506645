"""Private keys and CSRs for services: generate, build, serialise (pure, over cryptography)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from .errors import ConfigurationError

__all__ = [
    "KEY_KINDS",
    "PrivateKey",
    "build_csr",
    "fingerprint_sha256",
    "generate_private_key",
    "key_kind",
    "key_matches_certificate",
    "load_private_key_pem",
    "private_key_pem",
]

#: The key types a service may hold (SPEC §3: whatever the CSR carries).
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

#: Accepted values of ``kind`` for :func:`generate_private_key`; the first is the default.
KEY_KINDS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")

_CURVES: dict[str, ec.EllipticCurve] = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1()}


def generate_private_key(kind: str = "ec-p256") -> PrivateKey:
    """Generate a new private key of ``kind`` (one of :data:`KEY_KINDS`).

    Raises ConfigurationError for an unknown kind.

    >>> generate_private_key("ed25519")  # doctest: +ELLIPSIS
    <cryptography...Ed25519PrivateKey object at ...>
    """
    if kind in _CURVES:
        return ec.generate_private_key(_CURVES[kind])
    if kind in ("rsa-2048", "rsa-3072", "rsa-4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[4:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ConfigurationError(f"unknown key kind {kind!r}; expected one of {', '.join(KEY_KINDS)}")


def key_kind(key: PrivateKey) -> str:
    """The :data:`KEY_KINDS` name of an existing key, e.g. to rekey with the same kind.

    Raises ConfigurationError for a key the SDK would not generate (another curve or size).
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        for kind, curve in _CURVES.items():
            if key.curve.name == curve.name:
                return kind
    elif isinstance(key, rsa.RSAPrivateKey):
        kind = f"rsa-{key.key_size}"
        if kind in KEY_KINDS:
            return kind
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ConfigurationError(f"unsupported private key type {type(key).__name__}")


def build_csr(
    key: PrivateKey,
    service_id: str,
    san_dns: Iterable[str] = (),
    san_ip: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
) -> x509.CertificateSigningRequest:
    """Build a CSR for ``service_id`` signed with ``key``.

    The subject is ``CN=<service_id>``; a subjectAltName extension is added only when SANs
    are given (the CA then checks them against the service's allow-list; without SANs it
    grants the whole allow-list). Raises ConfigurationError for a malformed IP address or a non-ASCII DNS name.
    """
    ips: list[x509.GeneralName] = []
    for ip in san_ip:
        try:
            ips.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise ConfigurationError(f"invalid IP address SAN {ip!r}") from exc
    names: list[x509.GeneralName] = []
    for name in san_dns:
        try:
            names.append(x509.DNSName(name))
        except ValueError as exc:  # U-labels: the CA wants A-labels (SPEC §3)
            raise ConfigurationError(f"invalid DNS SAN {name!r}") from exc
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service_id)])
    )
    if names or ips:
        builder = builder.add_extension(x509.SubjectAlternativeName(names + ips), critical=False)
    return builder.sign(key, _signature_hash(key))


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # Ed25519 signs the message itself; cryptography wants None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def private_key_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (for a 0600 file; never log it)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes) -> PrivateKey:
    """Load an unencrypted PEM private key (PKCS#8 or traditional) of a supported type.

    Raises ValueError for garbage, an encrypted key or an unsupported key type.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography: encrypted key and no password
        raise ValueError("the private key is encrypted") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key


def key_matches_certificate(key: PrivateKey, cert: x509.Certificate) -> bool:
    """True when ``cert`` certifies the public half of ``key``."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def certificates_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """Certificates as one PEM document, in order (a chain file, a ``cadata`` bundle)."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex without separators (the API's format)."""
    return cert.fingerprint(hashes.SHA256()).hex()
