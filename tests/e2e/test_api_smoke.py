"""The API over real TLS: enrol with a token, then use the mTLS identity."""

from __future__ import annotations

from pathlib import Path

import httpx

from support import RunningServer, make_csr, tls_context
from vcc_pki_server.home import key_pem


def test_enrol_then_renew_over_mtls(pki_server: RunningServer, admin_token: str, service_id: str,
                                    tmp_path: Path) -> None:
    root = tls_context(pki_server.home.root_cert)
    admin = {"Authorization": f"Bearer {admin_token}"}
    r = httpx.post(f"{pki_server.url}/api/v1/services/register", verify=root, headers=admin,
                   json={"service_id": service_id, "service_name": "Smoke", "san_dns": [service_id]})
    assert r.status_code == 201, r.text
    token = r.json()["enrolment_token"]
    csr, key = make_csr(service_id)
    r = httpx.post(f"{pki_server.url}/api/v1/certificates/request", verify=root,
                   headers={"Authorization": f"Bearer {token}"},
                   json={"service_id": service_id, "csr": csr.decode()})
    assert r.status_code == 201, r.text
    (tmp_path / "cert.pem").write_text(r.json()["certificate"])
    (tmp_path / "key.pem").write_bytes(key_pem(key, None))
    mtls_ctx = tls_context(pki_server.home.root_cert, tmp_path / "cert.pem", tmp_path / "key.pem")
    with httpx.Client(verify=mtls_ctx) as mtls:
        renewed = mtls.post(f"{pki_server.url}/api/v1/certificates/{service_id}/renew")
        assert renewed.status_code == 201, renewed.text
        assert renewed.json()["serial_number"] != r.json()["serial_number"]
        other = mtls.post(f"{pki_server.url}/api/v1/certificates/pki-server/renew")
        assert other.status_code == 403
        assert other.headers["content-type"] == "application/problem+json"
