"""What one revocation revokes (SPEC §10), on the real server: keyCompromise follows the key across
renewals and services, ``?all=true`` takes a whole service, ``DELETE /services/{id}``
decommissions one. Judged by the CRL the server publishes, read with cryptography and
``openssl verify -crl_check``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from support import make_csr, openssl_verify
from vcc_pki_server.home import Home

API = "/api/v1"


def crl_reasons(anon: httpx.Client) -> dict[str, str]:
    """Serial (hex) → reason, as the published CRL says."""
    crl = x509.load_der_x509_crl(anon.get(f"{API}/crl").content)
    out = {}
    for entry in crl:
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
        except x509.ExtensionNotFound:  # RFC 5280 §5.3.1: "unspecified" is written as no reason
            reason = "unspecified"
        out[format(entry.serial_number, "x")] = reason
    return out


def renew_same_key(admin: httpx.Client, service_id: str) -> dict[str, Any]:
    r = admin.post(f"{API}/certificates/{service_id}/renew", json={})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def statuses(admin: httpx.Client, service_id: str) -> dict[str, str]:
    page = admin.get(f"{API}/certificates/", params={"service_id": service_id, "limit": 1000}).json()
    return {c["serial_number"]: c["status"] for c in page["items"]}


def test_key_compromise_revokes_every_certificate_of_the_key(enrolled: Any, admin: httpx.Client,
                                                            anon: httpx.Client, ca_home: Home,
                                                            tmp_path: Path) -> None:
    svc = enrolled()
    first = svc.serial
    (tmp_path / "first.pem").write_bytes(svc.cert.read_bytes())
    second, third = renew_same_key(admin, svc.service_id), renew_same_key(admin, svc.service_id)
    rekeyed = admin.post(f"{API}/certificates/{svc.service_id}/renew",
                         json={"csr": make_csr(svc.service_id)[0].decode()}).json()  # another key

    r = admin.delete(f"{API}/certificates/{svc.service_id}/revoke",
                     params={"reason": "keyCompromise", "serial": third["serial_number"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["serial_number"] == third["serial_number"] and body["status"] == "revoked"
    assert body["revoked_serials"][0] == third["serial_number"]
    assert set(body["revoked_serials"]) == {first, second["serial_number"], third["serial_number"]}

    assert statuses(admin, svc.service_id) == {first: "revoked", second["serial_number"]: "revoked",
                                               third["serial_number"]: "revoked",
                                               rekeyed["serial_number"]: "valid"}
    # The older certificate of the compromised key does not become "current" again.
    assert admin.get(f"{API}/certificates/{svc.service_id}").json()["serial_number"] == rekeyed["serial_number"]
    reasons = crl_reasons(anon)
    assert {reasons[s] for s in body["revoked_serials"]} == {"key_compromise"}
    crl = tmp_path / "crl.der"
    crl.write_bytes(anon.get(f"{API}/crl").content)
    verdict = openssl_verify(ca_home.root_cert, ca_home.intermediate_cert, tmp_path / "first.pem", crl=crl)
    assert verdict.returncode == 2 and "certificate revoked" in verdict.stdout + verdict.stderr


def test_key_compromise_reaches_another_service_with_the_same_key(enrolled: Any, register: Any,
                                                                 admin: httpx.Client, anon: httpx.Client) -> None:
    a = enrolled()
    # b enrols with a CSR made from a's key (a key shared between two services).
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(a.key.read_bytes(), None)
    b_id = f"b-{a.service_id}"[:60]
    token = register(b_id)
    csr, _ = make_csr(b_id, key=key)
    b = anon.post(f"{API}/certificates/request", json={"service_id": b_id, "csr": csr.decode()},
                  headers={"Authorization": f"Bearer {token}"})
    assert b.status_code == 201, b.text
    other = enrolled()

    renewed = renew_same_key(admin, a.service_id)
    superseded = admin.delete(f"{API}/certificates/{a.service_id}/revoke",
                              params={"reason": "superseded", "serial": renewed["serial_number"]})
    assert superseded.json()["revoked_serials"] == [renewed["serial_number"]]  # no key compromise: one
    assert statuses(admin, b_id) == {b.json()["serial_number"]: "valid"}

    r = admin.delete(f"{API}/certificates/{a.service_id}/revoke", params={"reason": "keyCompromise"})
    assert r.json()["revoked_serials"] == [a.serial, b.json()["serial_number"]]
    assert statuses(admin, b_id) == {b.json()["serial_number"]: "revoked"}
    assert statuses(admin, other.service_id) == {other.serial: "valid"}
    assert crl_reasons(anon)[b.json()["serial_number"]] == "key_compromise"


def test_all_revokes_every_unexpired_certificate_of_the_service(enrolled: Any, admin: httpx.Client,
                                                               anon: httpx.Client) -> None:
    svc, other = enrolled(), enrolled()
    second = admin.post(f"{API}/certificates/{svc.service_id}/renew",
                        json={"csr": make_csr(svc.service_id)[0].decode()}).json()
    # The service itself may do it, over mTLS.
    r = svc.client.delete(f"{API}/certificates/{svc.service_id}/revoke",
                          params={"reason": "superseded", "all": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["revoked_serials"] == [second["serial_number"], svc.serial]
    assert set(statuses(admin, svc.service_id).values()) == {"revoked"}
    assert statuses(admin, other.service_id) == {other.serial: "valid"}
    reasons = crl_reasons(anon)
    assert reasons[svc.serial] == reasons[second["serial_number"]] == "superseded"
    again = admin.delete(f"{API}/certificates/{svc.service_id}/revoke", params={"all": "true"})
    assert again.status_code == 404  # nothing valid left


def test_decommission_takes_a_service_out_and_its_id_can_come_back(enrolled: Any, register: Any,
                                                                  admin: httpx.Client, anon: httpx.Client,
                                                                  problem: Any) -> None:
    svc = enrolled()
    spare = admin.post(f"{API}/services/{svc.service_id}/enrolment-token").json()["enrolment_token"]
    by_itself = svc.client.delete(f"{API}/services/{svc.service_id}")
    problem(by_itself, 403, "not_permitted")

    r = admin.delete(f"{API}/services/{svc.service_id}")
    assert r.status_code == 200, r.text
    assert r.json() == {"service_id": svc.service_id, "status": "decommissioned", "revoked_serials": [svc.serial]}
    assert crl_reasons(anon)[svc.serial] == "cessation_of_operation"
    # Gone from the registry and discovery; its history stays.
    problem(admin.get(f"{API}/services/{svc.service_id}"), 404, "unknown_service")
    listed = admin.get(f"{API}/services/", params={"limit": 1000}).json()["items"]
    assert svc.service_id not in {s["service_id"] for s in listed}
    assert statuses(admin, svc.service_id) == {svc.serial: "revoked"}
    # Its certificate, its spare enrolment token and new certificates: all refused.
    problem(svc.client.get(f"{API}/certificates/"), 401)
    csr = make_csr(svc.service_id)[0].decode()
    problem(anon.post(f"{API}/certificates/request", json={"service_id": svc.service_id, "csr": csr},
                      headers={"Authorization": f"Bearer {spare}"}), 401)
    problem(admin.post(f"{API}/certificates/request", json={"service_id": svc.service_id, "csr": csr}), 404)
    problem(admin.delete(f"{API}/services/{svc.service_id}"), 404, "unknown_service")
    problem(admin.delete(f"{API}/services/never-was"), 404, "unknown_service")

    # Registered again: a new entry, a new enrolment.
    token = register(svc.service_id)
    again = anon.post(f"{API}/certificates/request", json={"service_id": svc.service_id, "csr": csr},
                      headers={"Authorization": f"Bearer {token}"})
    assert again.status_code == 201, again.text
    assert admin.get(f"{API}/services/{svc.service_id}").json()["health"]["status"] == "unknown"


def test_cli_revoke_all_and_service_delete(enrolled: Any, admin: httpx.Client, ca_home: Home,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import CA_PASSWORD
    from vcc_pki_server import cli

    password = tmp_path / "ca.pw"
    password.write_text(CA_PASSWORD + "\n")
    g = ["--home", str(ca_home.root)]
    svc, gone = enrolled(), enrolled()
    second = renew_same_key(admin, svc.service_id)

    assert cli.main([*g, "cert", "revoke", "--service-id", svc.service_id, "--reason", "superseded", "--all",
                     "--password-file", str(password), "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["revoked_serials"] == [second["serial_number"], svc.serial]

    assert cli.main([*g, "service", "delete", "--service-id", gone.service_id,
                     "--password-file", str(password)]) == 0
    out = capsys.readouterr().out
    assert f"decommissioned service '{gone.service_id}'" in out and gone.serial in out
    assert cli.main([*g, "service", "delete", "--service-id", gone.service_id,
                     "--password-file", str(password)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown service" in err


def test_the_sdk_revokes_every_certificate_of_its_compromised_key(pki_server: Any, ca_home: Home, register: Any,
                                                                  tmp_path: Path) -> None:
    from peers import FAST, fingerprint, new_id
    from vcc_pki_client import PKIClient

    sid = new_id()
    with PKIClient(pki_server.url, sid, cert_file=tmp_path / "cert.pem", key_file=tmp_path / "key.pem",
                   root_fingerprint=fingerprint(ca_home), retry_policy=FAST) as pki:
        first = pki.enroll(register(sid))
        second = pki.renew(rekey=False)  # the same key
        record = pki.revoke("keyCompromise")
        assert record.serial_number == second.serial_number and record.status == "revoked"
        assert record.revoked_serials == [second.serial_number, first.serial_number]
        assert pki.is_revoked(int(first.serial_number, 16)) and pki.is_revoked()
