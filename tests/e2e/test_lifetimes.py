"""Short-lived certificates first-class (SPEC §10): ``validity_seconds``, per-service default and
maximum lifetimes, renewals that keep the lifetime, SDK ``validity=`` and renewal at a third of
the lifetime left, CLI ``--validity 8h``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from conftest import CA_PASSWORD
from peers import FAST, fingerprint, new_id
from support import RunningServer, make_csr
from vcc_pki_client import PKIClient
from vcc_pki_server import cli
from vcc_pki_server.home import Home

API = "/api/v1"


def lifetime(body: dict[str, Any]) -> timedelta:
    """How long an Issued answer's certificate is valid from now, i.e. from its issue a moment
    ago (its notBefore is backdated, and never before the CA's own)."""
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    return cert.not_valid_after_utc - datetime.now(timezone.utc)


def near(actual: timedelta, expected: timedelta) -> bool:
    return abs(actual - expected) < timedelta(seconds=30)


def request(client: httpx.Client, service_id: str, **extra: Any) -> httpx.Response:
    return client.post(f"{API}/certificates/request",
                       json={"service_id": service_id, "csr": make_csr(service_id)[0].decode(), **extra})


def test_validity_seconds_from_five_minutes_up_to_the_policy(admin: httpx.Client, register: Callable[..., str],
                                                            problem: Any) -> None:
    sid = new_id()
    register(sid)
    r = request(admin, sid, validity_seconds=300)
    assert r.status_code == 201, r.text
    assert near(lifetime(r.json()), timedelta(minutes=5))
    assert near(lifetime(request(admin, sid, validity_seconds=8 * 3600).json()), timedelta(hours=8))
    assert "at least 300 seconds" in problem(request(admin, sid, validity_seconds=299), 422, "invalid_field")["detail"]
    assert "got -5 seconds" in problem(request(admin, sid, validity_seconds=-5), 422, "invalid_field")["detail"]
    problem(request(admin, sid, validity_seconds=-10**30), 422, "invalid_field")  # no overflow, no 500
    detail = problem(request(admin, sid, validity_seconds=366 * 86400), 422, "invalid_field")["detail"]
    assert "366 days" in detail and "maximum of 365 days (max_validity_days)" in detail
    problem(request(admin, sid, validity_seconds=600, validity_days=1), 422, "invalid_field")
    for bad in ("600", 1.5, True, [600]):
        problem(request(admin, sid, validity_seconds=bad), 422, "invalid_field")


def test_a_service_s_own_default_and_maximum(admin: httpx.Client, problem: Any) -> None:
    sid = new_id()
    r = admin.post(f"{API}/services/register", json={
        "service_id": sid, "default_validity_seconds": 8 * 3600, "max_validity_seconds": 86400})
    assert r.status_code == 201, r.text
    assert (r.json()["default_validity_seconds"], r.json()["max_validity_seconds"]) == (28800, 86400)
    token = r.json()["enrolment_token"]
    enrolled = admin.post(f"{API}/certificates/request", json={"service_id": sid, "csr": make_csr(sid)[0].decode()},
                          headers={"Authorization": f"Bearer {token}"})  # as the service, with its token
    assert enrolled.status_code == 201, enrolled.text
    assert near(lifetime(enrolled.json()), timedelta(hours=8))  # the service's default
    detail = problem(request(admin, sid, validity_days=2), 422, "invalid_field")["detail"]
    assert "this service's maximum of 1 days (max_validity_seconds)" in detail

    # PATCH by an admin changes them; nothing changes on a refused PATCH.
    problem(admin.patch(f"{API}/services/{sid}", json={"default_validity_seconds": 100}), 422, "invalid_field")
    problem(admin.patch(f"{API}/services/{sid}", json={"default_validity_seconds": 90000}), 422, "invalid_field")
    assert admin.get(f"{API}/services/{sid}").json()["default_validity_seconds"] == 28800
    r = admin.patch(f"{API}/services/{sid}", json={"default_validity_seconds": 900, "max_validity_seconds": None})
    assert r.status_code == 200, r.text
    assert (r.json()["default_validity_seconds"], r.json()["max_validity_seconds"]) == (900, None)
    assert near(lifetime(request(admin, sid).json()), timedelta(minutes=15))
    assert near(lifetime(request(admin, sid, validity_days=30).json()), timedelta(days=30))


def test_a_renewal_keeps_the_lifetime_it_renews(admin: httpx.Client, register: Callable[..., str]) -> None:
    sid = new_id()
    register(sid)
    assert request(admin, sid, validity_seconds=3600).status_code == 201
    same_key = admin.post(f"{API}/certificates/{sid}/renew", json={})
    assert near(lifetime(same_key.json()), timedelta(hours=1))  # not the 365-day default
    rekey = admin.post(f"{API}/certificates/{sid}/renew", json={"csr": make_csr(sid)[0].decode()})
    assert near(lifetime(rekey.json()), timedelta(hours=1))
    longer = admin.post(f"{API}/certificates/{sid}/renew", json={"validity_seconds": 7200})
    assert near(lifetime(longer.json()), timedelta(hours=2))


def test_an_8_hour_certificate_renews_at_a_third_of_its_life(pki_server: RunningServer, ca_home: Home,
                                                             register: Callable[..., str], tmp_path: Path) -> None:
    sid = new_id()
    token = register(sid)
    with PKIClient(pki_server.url, sid, cert_file=tmp_path / "cert.pem", key_file=tmp_path / "key.pem",
                   root_fingerprint=fingerprint(ca_home), retry_policy=FAST) as pki:
        start = datetime.now(timezone.utc)
        issued = pki.enroll(token, validity=timedelta(hours=8))
        assert near(issued.not_after - start, timedelta(hours=8))
        pki.enable_auto_renewal(check_interval=3600)  # no renew_before_days: a third left
        pki.disable_auto_renewal()
        # Jitter moves it at most a tenth of the window (16 min) earlier than 5 h 20 min.
        assert pki.renew_now(now=start + timedelta(hours=5)) is None
        renewed = pki.renew_now(now=start + timedelta(hours=5, minutes=21))
        assert renewed is not None and renewed.serial_number != issued.serial_number
        assert near(renewed.not_after - datetime.now(timezone.utc), timedelta(hours=8))


def test_cli_validity_durations(ca_home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    password = tmp_path / "ca.pw"
    password.write_text(CA_PASSWORD + "\n")
    g = ["--home", str(ca_home.root)]
    sid = new_id()
    assert cli.main([*g, "cert", "issue", "--service-id", sid, "--cn", sid, "--key-type", "ec-p256",
                     "--validity", "8h", "--password-file", str(password), "--json"]) == 0
    issued = json.loads(capsys.readouterr().out)
    hours = (datetime.fromisoformat(issued["not_after"]) - datetime.fromisoformat(issued["issued_at"]))
    assert near(hours, timedelta(hours=8))
    assert cli.main([*g, "cert", "renew", "--service-id", sid, "--password-file", str(password), "--json"]) == 0
    renewed = json.loads(capsys.readouterr().out)
    kept = datetime.fromisoformat(renewed["not_after"]) - datetime.fromisoformat(renewed["issued_at"])
    assert near(kept, timedelta(hours=8))
    assert cli.main([*g, "cert", "renew", "--service-id", sid, "--validity", "15m",
                     "--password-file", str(password), "--json"]) == 0
    short = json.loads(capsys.readouterr().out)
    assert near(datetime.fromisoformat(short["not_after"]) - datetime.fromisoformat(short["issued_at"]),
                timedelta(minutes=15))
    assert cli.main([*g, "cert", "renew", "--service-id", sid, "--validity", "8x",
                     "--password-file", str(password)]) == 2
    assert "15m, 8h or 30d" in capsys.readouterr().err
    assert cli.main([*g, "cert", "renew", "--service-id", sid, "--validity", "2m",
                     "--password-file", str(password)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least 300 seconds" in err
