"""A tiny in-memory CA (EC P-256: fast) for the client SDK's unit tests; no server needed."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vcc_pki_client.keys import PrivateKey, generate_private_key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class MiniCA:
    """Root and intermediate (EC P-256) that issue mTLS leaf certificates."""

    def __init__(self) -> None:
        now = datetime.now(timezone.utc)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = (
            x509.CertificateBuilder()
            .subject_name(_name("Test Root"))
            .issuer_name(_name("Test Root"))
            .public_key(self.root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.root_key.public_key()), critical=False)
            .sign(self.root_key, hashes.SHA256())
        )
        self.intermediate_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = (
            x509.CertificateBuilder()
            .subject_name(_name("Test Intermediate"))
            .issuer_name(self.root.subject)
            .public_key(self.intermediate_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=1825))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.intermediate_key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root_key.public_key()), critical=False
            )
            .sign(self.root_key, hashes.SHA256())
        )

    @property
    def chain(self) -> list[x509.Certificate]:
        """Intermediate then root, as the server sends it."""
        return [self.intermediate, self.root]

    def issue(
        self,
        service_id: str = "svc",
        *,
        key: PrivateKey | None = None,
        key_kind: str = "ec-p256",
        days: int = 30,
        san_dns: Sequence[str] = ("localhost",),
        san_ip: Sequence[str] = ("127.0.0.1",),
    ) -> tuple[x509.Certificate, PrivateKey]:
        """A leaf for ``service_id`` (serverAuth + clientAuth) and its key."""
        key = key or generate_private_key(key_kind)
        now = datetime.now(timezone.utc)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in san_dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in san_ip]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(service_id))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.intermediate_key.public_key()),
                critical=False,
            )
            .sign(self.intermediate_key, hashes.SHA256())
        )
        return cert, key

    def write_root(self, directory: Path) -> Path:
        """The root as a PEM CA bundle file in ``directory``."""
        path = directory / "root.pem"
        path.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        return path


@pytest.fixture(scope="session")
def mini_ca() -> MiniCA:
    return MiniCA()


@pytest.fixture(scope="session")
def other_ca() -> MiniCA:
    """A second CA that nothing here trusts."""
    return MiniCA()
