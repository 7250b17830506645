"""PEM text of certificates and other DER: one way to write it, used by the store, the API and the CLI."""

from __future__ import annotations

import base64
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vcc_pki_client.keys import certificates_pem


def pem_text(der: bytes, label: str = "CERTIFICATE") -> str:
    """RFC 7468 PEM of ``der`` (64-character lines), as ``public_bytes(Encoding.PEM)`` writes it."""
    b64 = base64.b64encode(der).decode("ascii")
    body = "\n".join([b64[i:i + 64] for i in range(0, len(b64), 64)])
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


def der_fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER, lowercase hex: what the store keeps and the API shows
    (the SDK's ``fingerprint_sha256`` of the same certificate)."""
    return hashlib.sha256(der).hexdigest()


def cert_pem(*certs: x509.Certificate) -> bytes:
    """Certificates as one PEM document (the SDK's helper: one way to write it)."""
    return certificates_pem(certs)


def public_key_id(cert: x509.Certificate) -> str:
    """SHA-256 of a certificate's SubjectPublicKeyInfo, lowercase hex: the same for every
    certificate of one key (what a keyCompromise revocation follows)."""
    return hashlib.sha256(cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()


def public_key_id_of_pem(pem: str) -> str:
    """:func:`public_key_id` of a PEM certificate."""
    return public_key_id(x509.load_pem_x509_certificate(pem.encode("ascii")))


def ski_hex(cert: x509.Certificate) -> str:
    """A CA certificate's subject key identifier, lowercase hex: how the API names an issuer
    (``/api/v1/crl/{ski}``, ``/api/v1/ca/intermediate/{ski}``)."""
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def issuer_key_id(cert: x509.Certificate) -> str:
    """The key identifier of ``cert``'s issuer (its authority key identifier), lowercase hex:
    the issuer's :func:`ski_hex`; "" without one."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return ""
    return aki.key_identifier.hex() if aki.key_identifier else ""
