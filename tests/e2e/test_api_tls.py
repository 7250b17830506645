"""Real TLS against the real server: curl and httpx with client certificates, a foreign CA refused
at the handshake, and every certificate the API issues judged by ``openssl verify`` and pkilint."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support import RunningServer, make_csr, openssl_verify, pkilint_cert, tls_context

if TYPE_CHECKING:
    from tests.e2e.conftest import Clients, Enrol, Register

API = "/api/v1"
pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "curl", "openssl"], capture_output=True, check=False).returncode != 0,
    reason="needs curl and openssl")


def _curl(server: RunningServer, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``curl`` trusting the root; stdout is the body then a last line with the HTTP status."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(server.home.root_cert),
         "-w", "\n%{http_code}", *args, f"{server.url}{path}"],
        capture_output=True, text=True, check=False)


def test_curl_with_client_certificate_reads_an_mtls_only_endpoint(enrolled: Enrol,
                                                                  pki_server: RunningServer) -> None:
    svc = enrolled()
    proc = _curl(pki_server, f"{API}/certificates/{svc.service_id}", "--cert", str(svc.cert),
                 "--key", str(svc.key))
    assert proc.returncode == 0, proc.stderr
    body, _, status = proc.stdout.rpartition("\n")
    assert status == "200", proc.stdout
    assert json.loads(body)["serial_number"] == svc.serial
    # The same endpoint without a certificate: the handshake passes, the app says 401.
    proc = _curl(pki_server, f"{API}/certificates/{svc.service_id}")
    body, _, status = proc.stdout.rpartition("\n")
    assert proc.returncode == 0 and status == "401"
    assert json.loads(body)["code"] == "not_authenticated"


def test_httpx_with_client_certificate_reads_and_renews(enrolled: Enrol, clients: Clients) -> None:
    svc = enrolled()
    client = clients.mtls(svc.cert, svc.key)
    r = client.get(f"{API}/certificates/{svc.service_id}")
    assert r.status_code == 200 and r.json()["fingerprint_sha256"] == svc.fingerprint
    r = client.post(f"{API}/certificates/{svc.service_id}/renew")
    assert r.status_code == 201 and r.json()["service_id"] == svc.service_id


def _foreign_pki(folder: Path, cn: str) -> tuple[Path, Path]:
    """A throwaway EC root and a clientAuth leaf it signed, in PEM files; (cert, key)."""
    now = datetime.now(timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign Root")])
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(root.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(root_key, hashes.SHA256()))
    cert_file, key_file = folder / "foreign-cert.pem", folder / "foreign-key.pem"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                          + root.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_client_certificate_from_a_foreign_ca_is_refused_at_the_handshake(
        enrolled: Enrol, pki_server: RunningServer, anon: httpx.Client, tmp_path: Path) -> None:
    svc = enrolled()  # the foreign certificate even claims an enrolled service's name
    cert, key = _foreign_pki(tmp_path, svc.service_id)
    ctx = tls_context(pki_server.home.root_cert, cert, key)
    with httpx.Client(base_url=pki_server.url, verify=ctx, timeout=10) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError)):
            client.get(f"{API}/certificates/{svc.service_id}")
    proc = _curl(pki_server, f"{API}/certificates/{svc.service_id}", "--cert", str(cert), "--key", str(key))
    assert proc.returncode != 0, proc.stdout
    assert not proc.stdout.rstrip().endswith("200")
    # The server keeps serving, anonymous and mTLS callers alike.
    assert anon.get("/health").status_code == 200
    assert svc.client.get(f"{API}/certificates/{svc.service_id}").status_code == 200


def _write(folder: Path, name: str, pem: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(pem.encode() if isinstance(pem, str) else pem)
    return path


def test_every_certificate_issued_over_the_api_passes_openssl_and_pkilint(
        enrolled: Enrol, register: Register, admin: httpx.Client, anon: httpx.Client,
        pki_server: RunningServer, tmp_path: Path, service_id: str) -> None:
    svc = enrolled()
    issued: dict[str, dict[str, Any]] = {"enrolment": svc.issued}
    r = svc.client.post(f"{API}/certificates/{svc.service_id}/renew")
    issued["renew"] = r.json()
    r = svc.client.post(f"{API}/certificates/{svc.service_id}/renew",
                        json={"csr": make_csr(svc.service_id)[0].decode()})
    issued["rekey"] = r.json()
    r = svc.client.post(f"{API}/certificates/request",
                        json={"service_id": svc.service_id, "csr": make_csr(svc.service_id)[0].decode()})
    issued["mtls-request"] = r.json()
    register(service_id, san_dns=[f"{service_id}.svc.internal", "api.internal"], san_ip=["10.20.30.40", "fd00::5"])
    for name, key in (("ec-p384", ec.generate_private_key(ec.SECP384R1())),
                      ("rsa-2048", rsa.generate_private_key(65537, 2048))):
        csr, _ = make_csr(f"{service_id}.svc.internal", dns=["api.internal"], ips=["10.20.30.40", "fd00::5"],
                          key=key)
        r = admin.post(f"{API}/certificates/request",
                       json={"service_id": service_id, "csr": csr.decode(), "validity_days": 90})
        assert r.status_code == 201, r.text
        issued[name] = r.json()
    assert all("serial_number" in body for body in issued.values()), issued

    root = _write(tmp_path, "root.pem", anon.get(f"{API}/ca/root").content)
    inter = _write(tmp_path, "intermediate.pem", anon.get(f"{API}/ca/intermediate").content)
    crl = _write(tmp_path, "crl.der", anon.get(f"{API}/crl").content)
    leaves = {name: _write(tmp_path, f"{name}.pem", body["certificate"]) for name, body in issued.items()}
    for name, leaf in leaves.items():
        chain = x509.load_pem_x509_certificates(issued[name]["chain"].encode())
        assert [c.subject for c in chain] == [x509.load_pem_x509_certificate(p.read_bytes()).subject
                                              for p in (inter, root)]
        for purpose in ("sslclient", "sslserver"):
            proc = openssl_verify(root, inter, leaf, purpose=purpose)
            assert proc.returncode == 0, f"{name} {purpose}: {proc.stdout}{proc.stderr}"
        proc = openssl_verify(root, inter, leaf, crl=crl)
        assert proc.returncode == 0, f"{name} crl_check: {proc.stdout}{proc.stderr}"
    with ThreadPoolExecutor(max_workers=len(leaves)) as pool:
        findings = dict(zip(leaves, pool.map(pkilint_cert, leaves.values()), strict=False))
    assert findings == {key_0: [] for key_0 in leaves}, findings


def test_openssl_sees_an_api_revocation_in_the_served_crl(enrolled: Enrol, anon: httpx.Client,
                                                          tmp_path: Path) -> None:
    svc = enrolled()
    r = svc.client.delete(f"{API}/certificates/{svc.service_id}/revoke", params={"reason": "keyCompromise"})
    assert r.status_code == 200, r.text
    root = _write(tmp_path, "root.pem", anon.get(f"{API}/ca/root").content)
    inter = _write(tmp_path, "intermediate.pem", anon.get(f"{API}/ca/intermediate").content)
    crl = _write(tmp_path, "crl.pem", anon.get(f"{API}/crl", params={"format": "pem"}).content)
    proc = openssl_verify(root, inter, svc.cert, crl=crl)
    assert proc.returncode != 0
    assert "certificate revoked" in proc.stdout + proc.stderr
