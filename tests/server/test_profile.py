"""SPEC §3: every certificate and CRL the core issues, parsed back and judged by openssl and pkilint.

EC keys come from the session CA (``ca_home``); one module-scoped home with the default key
types (RSA-4096 root, RSA-2048 intermediate) covers RSA, and one with P-384 keys covers SHA-384.
"""

from __future__ import annotations

import ipaddress
import subprocess
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import CA_PASSWORD, ROOT_PASSWORD
from support import BIN, make_csr, openssl_verify, pem, pkilint_cert, pkilint_crl
from vcc_pki_client import peer_service_id
from vcc_pki_server import ca as ca_module
from vcc_pki_server.authority import Actor, Authority, Issued
from vcc_pki_server.config import Config
from vcc_pki_server.home import Home
from vcc_pki_server.store.sqlite import SQLiteStore

OPERATOR = Actor.operator()
KEY_USAGE_BITS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                  "key_agreement", "key_cert_sign", "crl_sign")


# --- helpers ---------------------------------------------------------------------------------

def ext(cert: x509.Certificate | x509.CertificateRevocationList, cls: type[Any]) -> x509.Extension[Any]:
    return cert.extensions.get_extension_for_class(cls)


def has_ext(cert: x509.Certificate, cls: type[Any]) -> bool:
    try:
        cert.extensions.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return False
    return True


def key_usage_bits(cert: x509.Certificate) -> set[str]:
    """The keyUsage bits that are set, after checking the extension is critical."""
    extension = ext(cert, x509.KeyUsage)
    assert extension.critical, "keyUsage must be critical"
    usage = extension.value
    bits = {name for name in KEY_USAGE_BITS if getattr(usage, name)}
    if usage.key_agreement:
        bits |= {name for name in ("encipher_only", "decipher_only") if getattr(usage, name)}
    return bits


def ski(cert: x509.Certificate) -> bytes:
    return bytes(ext(cert, x509.SubjectKeyIdentifier).value.digest)


def aki(item: x509.Certificate | x509.CertificateRevocationList) -> bytes | None:
    value = ext(item, x509.AuthorityKeyIdentifier).value
    return None if value.key_identifier is None else bytes(value.key_identifier)


def serial_octets(serial: int) -> int:
    """Length of the DER INTEGER content of a positive serial (sign bit included)."""
    return serial.bit_length() // 8 + 1


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def pkilint_chain(issuer: Path, subject: Path) -> str:
    """pkilint's issuer/subject linter at ERROR: empty output when the pair is clean."""
    proc = subprocess.run([str(BIN / "lint_pkix_signer_signee_cert_chain"), "lint", "-s", "ERROR",
                           str(issuer), str(subject)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 or proc.stdout.strip(), proc.stderr
    return proc.stdout.strip()


def assert_ca_profile(cert: x509.Certificate, *, pathlen: int | None) -> None:
    """SPEC §3 for root and intermediate: CA:TRUE (critical), keyCertSign + cRLSign only, SKI."""
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca is True
    assert bc.value.path_length == pathlen
    assert key_usage_bits(cert) == {"key_cert_sign", "crl_sign"}
    assert not has_ext(cert, x509.ExtendedKeyUsage)
    assert not has_ext(cert, x509.SubjectAlternativeName)
    assert ski(cert) == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    assert_serial(cert.serial_number)


def assert_serial(serial: int) -> None:
    assert serial > 0
    assert serial_octets(serial) <= 20
    assert serial.bit_length() > 64


def assert_leaf_profile(leaf: x509.Certificate, intermediate: x509.Certificate, public_url: str) -> None:
    """SPEC §3 for a service certificate, independent of its key type."""
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None
    expected_ku = {"digital_signature"}
    if isinstance(leaf.public_key(), rsa.RSAPublicKey):
        expected_ku.add("key_encipherment")
    assert key_usage_bits(leaf) == expected_ku
    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    san = ext(leaf, x509.SubjectAlternativeName).value
    names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
    names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    # SPEC §10: exactly one URI, the service's SPIFFE-style identity; read back by the SDK.
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert len(uris) == 1 and uris[0].startswith("spiffe://vcc-pki.internal/svc/")
    assert peer_service_id(leaf) == uris[0].rsplit("/", 1)[1]
    assert all(isinstance(g, (x509.DNSName, x509.IPAddress, x509.UniformResourceIdentifier)) for g in san)
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn in names
    assert ski(leaf) == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key()).digest
    assert aki(leaf) == ski(intermediate)
    assert leaf.issuer == intermediate.subject
    crl_dp = ext(leaf, x509.CRLDistributionPoints).value
    # SPEC §13: per issuer (its subject key identifier), so that the URLs stay right across rotations.
    issuer_ski = ski(intermediate).hex()
    assert [n.value for dp in crl_dp for n in dp.full_name or []] == [f"{public_url}/api/v1/crl/{issuer_ski}"]
    aia = ext(leaf, x509.AuthorityInformationAccess).value
    ca_issuers = [d.access_location.value for d in aia
                  if d.access_method == x509.oid.AuthorityInformationAccessOID.CA_ISSUERS]
    assert ca_issuers == [f"{public_url}/api/v1/ca/intermediate/{issuer_ski}?format=der"]
    assert leaf.not_valid_after_utc <= intermediate.not_valid_after_utc
    assert_serial(leaf.serial_number)
    leaf.verify_directly_issued_by(intermediate)


def enrol(authority: Authority, key: Any = None, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (),
          allow_dns: tuple[str, ...] = (), allow_ip: tuple[str, ...] = ("10.1.2.3",),
          validity: timedelta | None = None) -> Issued:
    """Register a fresh service and enrol it once with its token; the CSR's CN is a DNS name."""
    service_id = f"svc-{uuid.uuid4().hex[:10]}"
    name = f"{service_id}.svc.internal"
    _, token = authority.register_service(service_id, san_dns=[name, *allow_dns], san_ip=list(allow_ip),
                                          actor=OPERATOR)
    csr, _ = make_csr(name, dns=dns, ips=ips, key=key)
    return authority.issue(service_id, csr, actor=authority.authenticate_token(token.value),
                           validity=validity)


def verify_ok(root: Path, intermediate: Path, leaf: Path, crl: Path | None = None,
              purpose: str | None = None) -> None:
    result = openssl_verify(root, intermediate, leaf, crl=crl, purpose=purpose)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")


def crl_file(authority: Authority, tmp_path: Path, name: str = "crl.der") -> Path:
    latest = authority.store.latest_crl()
    assert latest is not None
    return write(tmp_path / name, latest.der)


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsa_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """The default key types (RSA-4096 root, RSA-2048 intermediate) and a non-default public URL."""
    home = Home(tmp_path_factory.mktemp("rsa") / "home")
    home.ensure()
    home.save_config(Config(public_url="https://10.20.30.40:9443"))
    home.create_root(ROOT_PASSWORD)
    home.create_intermediate(ROOT_PASSWORD, CA_PASSWORD)
    return home


@pytest.fixture(scope="module")
def rsa_authority(rsa_home: Home) -> Iterator[Authority]:
    auth = rsa_home.authority(CA_PASSWORD)
    auth.generate_crl(actor=OPERATOR)
    yield auth
    auth.store.close()


@pytest.fixture(scope="module")
def p384_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    home = Home(tmp_path_factory.mktemp("p384") / "home")
    home.ensure()
    home.save_config(Config())
    home.create_root(ROOT_PASSWORD, key_type="ec-p384")
    home.create_intermediate(ROOT_PASSWORD, CA_PASSWORD, key_type="ec-p384")
    return home


@pytest.fixture(scope="module")
def ec_leaf(authority: Authority) -> Issued:
    """A P-256 leaf from the session CA, asking for one DNS and one IP SAN."""
    service_id = f"svc-{uuid.uuid4().hex[:10]}"
    name = f"{service_id}.svc.internal"
    _, token = authority.register_service(service_id, san_dns=[name, "api.svc.internal"],
                                          san_ip=["10.1.2.3"], actor=OPERATOR)
    csr, _ = make_csr(name, dns=["api.svc.internal"], ips=["10.1.2.3"])
    return authority.issue(service_id, csr, actor=authority.authenticate_token(token.value))


# --- root and intermediate -------------------------------------------------------------------

def test_root_is_a_self_signed_ca_without_path_length_valid_ten_years(ca_home: Home) -> None:
    root = ca_home.root_certificate()
    assert_ca_profile(root, pathlen=None)
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    assert not has_ext(root, x509.AuthorityKeyIdentifier)
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=3650) <= lifetime <= timedelta(days=3653)
    assert isinstance(root.signature_hash_algorithm, hashes.SHA256)


def test_intermediate_has_path_length_zero_and_names_the_root_key(ca_home: Home) -> None:
    root, inter = ca_home.root_certificate(), ca_home.intermediate_certificate()
    assert_ca_profile(inter, pathlen=0)
    assert inter.issuer == root.subject
    inter.verify_directly_issued_by(root)
    assert aki(inter) == ski(root)
    lifetime = inter.not_valid_after_utc - inter.not_valid_before_utc
    assert timedelta(days=1825) <= lifetime <= timedelta(days=1827)
    assert inter.not_valid_after_utc <= root.not_valid_after_utc
    assert inter.serial_number != root.serial_number


def test_intermediate_never_outlives_its_root() -> None:
    now = datetime.now(timezone.utc)
    root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = ca_module.create_root(root_key, now=now, days=100)
    inter = ca_module.create_intermediate(root, root_key, inter_key, now=now)
    assert inter.not_valid_after_utc == root.not_valid_after_utc


def test_ca_certificates_pass_openssl_verify_and_pkilint(ca_home: Home) -> None:
    for cert_path in (ca_home.root_cert, ca_home.intermediate_cert):
        verify_ok(ca_home.root_cert, ca_home.intermediate_cert, cert_path)
        assert pkilint_cert(cert_path) == [], cert_path.name


# --- leaves ----------------------------------------------------------------------------------

def test_ec_leaf_follows_the_service_profile(ca_home: Home, ec_leaf: Issued) -> None:
    leaf = ec_leaf.certificate
    assert_leaf_profile(leaf, ca_home.intermediate_certificate(), ca_home.config().public_url)
    san = ext(leaf, x509.SubjectAlternativeName)
    assert not san.critical
    cn = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert san.value.get_values_for_type(x509.DNSName) == [cn, "api.svc.internal"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert ec_leaf.chain == (ca_home.intermediate_certificate(), ca_home.root_certificate())


def test_leaf_defaults_to_365_days(ec_leaf: Issued) -> None:
    leaf = ec_leaf.certificate
    now = datetime.now(timezone.utc)
    assert leaf.not_valid_before_utc <= now
    assert abs(leaf.not_valid_after_utc - (now + timedelta(days=365))) < timedelta(minutes=2)


def test_leaf_lifetime_follows_validity_days(authority: Authority) -> None:
    leaf = enrol(authority, validity=timedelta(days=30)).certificate
    now = datetime.now(timezone.utc)
    assert abs(leaf.not_valid_after_utc - (now + timedelta(days=30))) < timedelta(minutes=2)


def test_ec_leaf_passes_openssl_verify_for_client_and_server_and_pkilint(
    ca_home: Home, authority: Authority, ec_leaf: Issued, tmp_path: Path
) -> None:
    leaf = write(tmp_path / "leaf.pem", pem(ec_leaf.certificate))
    crl = crl_file(authority, tmp_path)
    for purpose in ("sslserver", "sslclient"):
        verify_ok(ca_home.root_cert, ca_home.intermediate_cert, leaf, crl=crl, purpose=purpose)
    assert pkilint_cert(leaf) == []
    assert pkilint_chain(ca_home.root_cert, ca_home.intermediate_cert) == ""
    assert pkilint_chain(ca_home.intermediate_cert, leaf) == ""


@pytest.mark.parametrize("key_type", ["ed25519", "ec-p384", "rsa-3072"])
def test_csr_key_types_are_accepted_and_issue_valid_leaves(
    ca_home: Home, authority: Authority, key_type: str, tmp_path: Path
) -> None:
    key: Any = (ed25519.Ed25519PrivateKey.generate() if key_type == "ed25519"
                else ec.generate_private_key(ec.SECP384R1()) if key_type == "ec-p384"
                else rsa.generate_private_key(public_exponent=65537, key_size=3072))
    issued = enrol(authority, key)
    leaf = issued.certificate
    assert leaf.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == \
        key.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    assert_leaf_profile(leaf, ca_home.intermediate_certificate(), ca_home.config().public_url)
    path = write(tmp_path / "leaf.pem", pem(leaf))
    verify_ok(ca_home.root_cert, ca_home.intermediate_cert, path, crl=crl_file(authority, tmp_path))
    assert pkilint_cert(path) == []


def test_leaf_ignores_what_the_csr_asks_beyond_names_and_key(ca_home: Home, authority: Authority,
                                                              service_id: str) -> None:
    name = f"{service_id}.svc.internal"
    authority.register_service(service_id, san_dns=[name], actor=OPERATOR)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
                                    x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                        key_encipherment=False, data_encipherment=False,
                                        key_agreement=False, key_cert_sign=True, crl_sign=True,
                                        encipher_only=False, decipher_only=False), critical=True)
           .sign(key, hashes.SHA256()))
    csr_pem = csr.public_bytes(serialization.Encoding.PEM)
    leaf = authority.issue(service_id, csr_pem, actor=OPERATOR).certificate
    assert leaf.subject.rfc4514_string() == f"CN={name}"
    assert ext(leaf, x509.BasicConstraints).value.ca is False
    assert key_usage_bits(leaf) == {"digital_signature"}
    assert_leaf_profile(leaf, ca_home.intermediate_certificate(), ca_home.config().public_url)


def test_leaf_never_outlives_a_short_intermediate(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.ensure()
    home.save_config(Config())
    home.create_root(ROOT_PASSWORD, key_type="ec-p256")
    inter = home.create_intermediate(ROOT_PASSWORD, CA_PASSWORD, key_type="ec-p256", days=30)
    authority = home.authority(CA_PASSWORD)
    try:
        issued = enrol(authority)
        authority.generate_crl(actor=OPERATOR)
        leaf = issued.certificate
        assert leaf.not_valid_after_utc == inter.not_valid_after_utc
        assert issued.record.not_after == inter.not_valid_after_utc
        path = write(tmp_path / "leaf.pem", pem(leaf))
        verify_ok(home.root_cert, home.intermediate_cert, path, crl=crl_file(authority, tmp_path))
    finally:
        authority.store.close()


# --- RSA (default key types) -----------------------------------------------------------------

def test_default_home_has_rsa4096_root_and_rsa2048_intermediate_signed_with_sha256(rsa_home: Home) -> None:
    root, inter = rsa_home.root_certificate(), rsa_home.intermediate_certificate()
    root_key, inter_key = root.public_key(), inter.public_key()
    assert isinstance(root_key, rsa.RSAPublicKey) and root_key.key_size == 4096
    assert isinstance(inter_key, rsa.RSAPublicKey) and inter_key.key_size == 2048
    assert_ca_profile(root, pathlen=None)
    assert_ca_profile(inter, pathlen=0)
    assert aki(inter) == ski(root)
    for cert in (root, inter):
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_rsa_leaf_gets_key_encipherment_and_ec_leaf_does_not(rsa_home: Home, rsa_authority: Authority,
                                                              tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_leaf = enrol(rsa_authority, rsa_key).certificate
    ec_leaf = enrol(rsa_authority).certificate
    assert key_usage_bits(rsa_leaf) == {"digital_signature", "key_encipherment"}
    assert key_usage_bits(ec_leaf) == {"digital_signature"}
    inter = rsa_home.intermediate_certificate()
    crl = crl_file(rsa_authority, tmp_path)
    for name, leaf in (("rsa", rsa_leaf), ("ec", ec_leaf)):
        assert_leaf_profile(leaf, inter, "https://10.20.30.40:9443")
        assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
        path = write(tmp_path / f"{name}.pem", pem(leaf))
        verify_ok(rsa_home.root_cert, rsa_home.intermediate_cert, path, crl=crl)
        assert pkilint_cert(path) == [], name


def test_rsa_ca_certificates_and_crl_pass_pkilint(rsa_home: Home, rsa_authority: Authority,
                                                 tmp_path: Path) -> None:
    for cert_path in (rsa_home.root_cert, rsa_home.intermediate_cert):
        verify_ok(rsa_home.root_cert, rsa_home.intermediate_cert, cert_path)
        assert pkilint_cert(cert_path) == [], cert_path.name
    crl = crl_file(rsa_authority, tmp_path)
    assert isinstance(x509.load_der_x509_crl(crl.read_bytes()).signature_hash_algorithm, hashes.SHA256)
    assert pkilint_crl(crl) == []


# --- P-384 -----------------------------------------------------------------------------------

def test_p384_issuers_sign_with_sha384(p384_home: Home, tmp_path: Path) -> None:
    authority = p384_home.authority(CA_PASSWORD)
    try:
        leaf = enrol(authority).certificate
        crl = authority.generate_crl(actor=OPERATOR)
    finally:
        authority.store.close()
    root, inter = p384_home.root_certificate(), p384_home.intermediate_certificate()
    for cert in (root, inter, leaf):
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    assert isinstance(x509.load_der_x509_crl(crl.der).signature_hash_algorithm, hashes.SHA384)
    assert_ca_profile(root, pathlen=None)
    assert_ca_profile(inter, pathlen=0)
    assert_leaf_profile(leaf, inter, p384_home.config().public_url)
    leaf_path = write(tmp_path / "leaf.pem", pem(leaf))
    crl_path = write(tmp_path / "crl.der", crl.der)
    verify_ok(p384_home.root_cert, p384_home.intermediate_cert, leaf_path, crl=crl_path)
    for path in (p384_home.root_cert, p384_home.intermediate_cert, leaf_path):
        assert pkilint_cert(path) == [], path.name
    assert pkilint_crl(crl_path) == []


def test_p384_root_over_p256_intermediate_still_signs_it_with_sha384() -> None:
    now = datetime.now(timezone.utc)
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = ca_module.create_root(root_key, now=now)
    inter = ca_module.create_intermediate(root, root_key, ec.generate_private_key(ec.SECP256R1()), now=now)
    assert isinstance(inter.signature_hash_algorithm, hashes.SHA384)


# --- serial numbers --------------------------------------------------------------------------

def test_serials_are_positive_random_at_most_20_octets_and_unique_over_300_issuances(
    ca_home: Home, authority: Authority, service_id: str
) -> None:
    authority.register_service(service_id, san_dns=[f"{service_id}.svc.internal"], actor=OPERATOR)
    csr, _ = make_csr(f"{service_id}.svc.internal")
    serials = [authority.issue(service_id, csr, actor=OPERATOR).certificate.serial_number
               for _ in range(300)]
    stored = [int(r.serial, 16) for r in authority.store.certificates_for(service_id)]
    assert sorted(stored) == sorted(serials)
    assert len(set(serials)) == 300
    for serial in serials:
        assert_serial(serial)
    # 64+ bits of entropy: neither the low 64 bits nor the bits above them ever repeat.
    assert len({s & (2**64 - 1) for s in serials}) == 300
    assert len({s >> 64 for s in serials}) == 300
    assert ca_home.root_certificate().serial_number not in serials


# --- CRL -------------------------------------------------------------------------------------

REVOKE_REASONS = {"keyCompromise": x509.ReasonFlags.key_compromise,
                  "superseded": x509.ReasonFlags.superseded,
                  "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
                  "affiliationChanged": x509.ReasonFlags.affiliation_changed,
                  "unspecified": None}


@pytest.fixture(scope="module")
def revocations(authority: Authority) -> tuple[dict[str, Issued], Issued]:
    """One service with a certificate revoked for each reason in REVOKE_REASONS, plus one kept."""
    service_id = f"svc-{uuid.uuid4().hex[:10]}"
    authority.register_service(service_id, san_dns=[f"{service_id}.svc.internal"], actor=OPERATOR)
    csr, _ = make_csr(f"{service_id}.svc.internal")
    revoked: dict[str, Issued] = {}
    for reason in REVOKE_REASONS:
        issued = authority.issue(service_id, csr, actor=OPERATOR)
        authority.revoke(service_id, serial=issued.record.serial, reason=reason, actor=OPERATOR)
        revoked[reason] = issued
    kept = authority.issue(service_id, csr, actor=OPERATOR)
    return revoked, kept


def tbs_version(crl: x509.CertificateRevocationList) -> int:
    """The version field of TBSCertList (1 means v2), read from the DER."""
    tbs = crl.tbs_certlist_bytes
    assert tbs[0] == 0x30
    offset = 2 + (tbs[1] & 0x7F if tbs[1] & 0x80 else 0)
    assert tbs[offset:offset + 2] == b"\x02\x01", "TBSCertList has no version field"
    return tbs[offset + 2]


def test_crl_is_v2_signed_by_the_intermediate_with_number_aki_and_seven_day_lifetime(
    ca_home: Home, authority: Authority, revocations: tuple[dict[str, Issued], Issued]
) -> None:
    record = authority.store.latest_crl()
    assert record is not None
    crl = x509.load_der_x509_crl(record.der)
    inter = ca_home.intermediate_certificate()
    assert tbs_version(crl) == 1
    assert crl.issuer == inter.subject
    assert crl.is_signature_valid(inter.public_key())
    assert ext(crl, x509.CRLNumber).value.crl_number == record.number
    assert aki(crl) == ski(inter)
    assert crl.last_update_utc <= datetime.now(timezone.utc)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=7)
    assert len(crl) == record.entries >= len(REVOKE_REASONS)


def test_crl_entries_carry_the_given_reason_codes_and_none_for_unspecified(
    authority: Authority, revocations: tuple[dict[str, Issued], Issued]
) -> None:
    revoked, kept = revocations
    record = authority.store.latest_crl()
    assert record is not None
    crl = x509.load_der_x509_crl(record.der)
    for reason, issued in revoked.items():
        entry = crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number)
        assert entry is not None, reason
        stored = authority.store.get_certificate(issued.record.serial)
        assert stored is not None and stored.revoked_at is not None
        assert entry.revocation_date_utc == stored.revoked_at
        expected = REVOKE_REASONS[reason]
        if expected is None:
            with pytest.raises(x509.ExtensionNotFound):
                entry.extensions.get_extension_for_class(x509.CRLReason)
        else:
            assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == expected
    assert crl.get_revoked_certificate_by_serial_number(kept.certificate.serial_number) is None


def test_openssl_rejects_revoked_serials_and_accepts_the_rest_and_pkilint_passes_the_crl(
    ca_home: Home, authority: Authority, revocations: tuple[dict[str, Issued], Issued], tmp_path: Path
) -> None:
    revoked, kept = revocations
    crl = crl_file(authority, tmp_path)
    for reason, issued in revoked.items():
        leaf = write(tmp_path / f"{reason}.pem", pem(issued.certificate))
        result = openssl_verify(ca_home.root_cert, ca_home.intermediate_cert, leaf, crl=crl)
        assert result.returncode == 2, (reason, result.stdout, result.stderr)
        assert "certificate revoked" in result.stdout + result.stderr
    kept_path = write(tmp_path / "kept.pem", pem(kept.certificate))
    verify_ok(ca_home.root_cert, ca_home.intermediate_cert, kept_path, crl=crl)
    assert pkilint_crl(crl) == []
    text = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(crl), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "Version 2 (0x1)" in text
    assert "Key Compromise" in text and "Cessation Of Operation" in text


def test_crl_numbers_strictly_increase_across_generations(authority: Authority) -> None:
    numbers = []
    for _ in range(3):
        record = authority.generate_crl(actor=OPERATOR)
        crl = x509.load_der_x509_crl(record.der)
        assert ext(crl, x509.CRLNumber).value.crl_number == record.number
        numbers.append(record.number)
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    latest = authority.store.latest_crl()
    assert latest is not None and latest.number == numbers[-1]


def test_empty_crl_lints_clean_and_lets_leaves_verify(ca_home: Home, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "empty.db")
    try:
        fresh = Authority(store, ca_home.load_ca(CA_PASSWORD))
        record = fresh.generate_crl(actor=OPERATOR)
        issued = enrol(fresh)
    finally:
        store.close()
    crl = x509.load_der_x509_crl(record.der)
    assert len(crl) == 0 and record.entries == 0
    assert ext(crl, x509.CRLNumber).value.crl_number == 1
    path = write(tmp_path / "empty.der", record.der)
    assert pkilint_crl(path) == []
    leaf = write(tmp_path / "leaf.pem", pem(issued.certificate))
    verify_ok(ca_home.root_cert, ca_home.intermediate_cert, leaf, crl=path)
