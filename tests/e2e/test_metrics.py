"""``GET /metrics`` (issue 12, SPEC §12) on the real server: totals from every worker, the
store's figures, who may read it, and Prometheus's own ``promtool`` on the text."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import CA_PASSWORD, build_home, new_admin_token
from support import BIN, RunningServer, env_without_secrets, make_csr, tls_context
from vcc_pki_server.home import Home

API = "/api/v1"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus) is not installed")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels (parsed by prometheus_client)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def pki_admin(home: Home, *args: str) -> str:
    env = {**env_without_secrets(), "VCC_PKI_CA_PASSWORD": CA_PASSWORD}
    done = subprocess.run([str(BIN / "pki-admin"), "--home", str(home.root), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    """A server of its own with ``--workers 2`` (its counts are this module's alone) and an admin token."""
    home = build_home(tmp_path_factory.mktemp("metrics") / "home")
    token = new_admin_token(home, "metrics-test")
    with RunningServer(home, CA_PASSWORD, extra_args=["--workers", "2"]) as server:
        yield server, token


def scrape(server: RunningServer, token: str) -> str:
    """One scrape on a new connection (so that either worker may answer)."""
    with httpx.Client(base_url=server.url, verify=tls_context(server.home.root_cert), timeout=30) as c:
        r = c.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


def test_every_worker_reports_the_servers_totals(two_workers: tuple[RunningServer, str], tmp_path: Path) -> None:
    server, token = two_workers
    ctx = tls_context(server.home.root_cert)
    issued = 24
    with httpx.Client(base_url=server.url, verify=ctx, timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as admin:
        r = admin.post(f"{API}/services/register", json={"service_id": "metered", "san_dns": ["metered.internal"]})
        assert r.status_code == 201, r.text
        assert admin.post(f"{API}/services/register", json={"service_id": "unenrolled"}).status_code == 201
        enrolment = r.json()["enrolment_token"]
        with httpx.Client(base_url=server.url, verify=ctx, timeout=30) as fresh:  # enrol: its own request
            r = fresh.post(f"{API}/certificates/request", headers={"Authorization": f"Bearer {enrolment}"},
                           json={"service_id": "metered", "csr": make_csr("metered")[0].decode()})
            assert r.status_code == 201, r.text
        for _ in range(issued):
            r = admin.post(f"{API}/certificates/request",
                           json={"service_id": "metered", "csr": make_csr("metered")[0].decode()})
            assert r.status_code == 201, r.text
        assert admin.post(f"{API}/certificates/metered/renew").status_code == 201
        r = admin.post(f"{API}/certificates/metered/renew", json={"csr": make_csr("metered")[0].decode()})
        assert r.status_code == 201, r.text
        current = r.json()
        refused = admin.post(f"{API}/certificates/request", json={"service_id": "metered", "csr": "junk"})
        assert refused.status_code == 400
        revoked = admin.delete(f"{API}/certificates/metered/revoke", params={"reason": "superseded",
                                                                             "serial": current["serial_number"]})
        assert revoked.status_code == 200, revoked.text
        crl_number = admin.get("/health").json()["crl_number"]
        now_current = admin.get(f"{API}/certificates/metered").json()

    for _ in range(8):  # several connections: both workers answer some of them, each with the totals
        text = scrape(server, token)
        got = samples(text)
        route = "/api/v1/certificates/request"
        assert got[("vcc_pki_certificates_issued_total", (("operation", "issue"),))] == issued
        assert got[("vcc_pki_certificates_issued_total", (("operation", "enroll"),))] == 1
        assert got[("vcc_pki_certificates_issued_total", (("operation", "renew"),))] == 1
        assert got[("vcc_pki_certificates_issued_total", (("operation", "rekey"),))] == 1
        assert got[("vcc_pki_requests_total", (("route", route), ("status", "201")))] == issued + 1
        assert got[("vcc_pki_requests_total", (("route", route), ("status", "400")))] == 1
        assert got[("vcc_pki_request_duration_seconds_count", (("route", route),))] == issued + 2
        assert got[("vcc_pki_revocations_total", (("reason", "superseded"),))] == 1
        assert got[("vcc_pki_crl_number", ())] == crl_number
        assert got[("vcc_pki_crl_entries", ())] == 1
        assert got[("vcc_pki_service_health", (("service_id", "metered"),))] == -1  # never probed
        assert got[("vcc_pki_certificate_expiry_timestamp_seconds", (("service_id", "metered"),))] == \
            pytest.approx(_unix(now_current["not_after"]))
        assert got[("vcc_pki_certificate_not_before_timestamp_seconds", (("service_id", "metered"),))] == \
            pytest.approx(_unix(now_current["not_before"]))
        # The one server leads the cluster's CRL refresh and health probes (one of its workers).
        assert got[("vcc_pki_lead", (("role", "crl"),))] == 1
        assert got[("vcc_pki_lead", (("role", "health"),))] == 1
        # A service without a certificate: its health (unknown), no expiry.
        assert got[("vcc_pki_service_health", (("service_id", "unenrolled"),))] == -1
        assert ("vcc_pki_certificate_expiry_timestamp_seconds", (("service_id", "unenrolled"),)) not in got
        root = server.home.root_certificate()
        assert got[("vcc_pki_ca_expiry_timestamp_seconds", (("ca", "root"),))] == \
            root.not_valid_after_utc.timestamp()
    assert "Traceback" not in server.log()


def _unix(text: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@needs_promtool
def test_promtool_accepts_the_exposition(two_workers: tuple[RunningServer, str], tmp_path: Path) -> None:
    server, token = two_workers
    text = scrape(server, token)
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_metrics_need_an_admin_or_a_metrics_token(two_workers: tuple[RunningServer, str]) -> None:
    server, _ = two_workers
    metrics_token = pki_admin(server.home, "token", "create", "--name", "prometheus", "--scope", "metrics")
    assert metrics_token.startswith("vcc_met_")
    listed = pki_admin(server.home, "token", "list", "--kind", "metrics")
    assert "prometheus" in listed and "metrics" in listed
    ctx = tls_context(server.home.root_cert)
    with httpx.Client(base_url=server.url, verify=ctx, timeout=30) as anon:
        r = anon.get("/metrics")
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json", r.text
        r = anon.get("/metrics", headers={"Authorization": "Bearer vcc_met_nonsense"})
        assert r.status_code == 401 and r.json()["code"] == "invalid_token"
        with_metrics = {"Authorization": f"Bearer {metrics_token}"}
        assert anon.get("/metrics", headers=with_metrics).status_code == 200
        # ... and nothing else: the token opens /metrics only.
        for method, path in (("GET", f"{API}/certificates/"), ("GET", f"{API}/services/"),
                             ("GET", f"{API}/audit"), ("POST", f"{API}/services/register")):
            r = anon.request(method, path, headers=with_metrics, json={"service_id": "x"})
            assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json", (path, r.text)
        r = anon.post(f"{API}/certificates/request", headers=with_metrics,
                      json={"service_id": "metered", "csr": make_csr("metered")[0].decode()})
        assert r.status_code == 403, r.text
    pki_admin(server.home, "token", "revoke", metrics_token)
    with httpx.Client(base_url=server.url, verify=ctx, timeout=30) as anon:
        assert anon.get("/metrics", headers={"Authorization": f"Bearer {metrics_token}"}).status_code == 401


def test_a_service_certificate_does_not_open_metrics(two_workers: tuple[RunningServer, str], tmp_path: Path) -> None:
    server, token = two_workers
    ctx = tls_context(server.home.root_cert)
    with httpx.Client(base_url=server.url, verify=ctx, timeout=30,
                      headers={"Authorization": f"Bearer {token}"}) as admin:
        r = admin.post(f"{API}/services/register", json={"service_id": "nosy"})
        assert r.status_code == 201, r.text
        csr, key = make_csr("nosy")
        r = admin.post(f"{API}/certificates/request", json={"service_id": "nosy", "csr": csr.decode()})
        assert r.status_code == 201, r.text
    from vcc_pki_server.home import key_pem
    (tmp_path / "cert.pem").write_text(r.json()["certificate"])
    (tmp_path / "key.pem").write_bytes(key_pem(key, None))
    with httpx.Client(base_url=server.url, timeout=30,
                      verify=tls_context(server.home.root_cert, tmp_path / "cert.pem", tmp_path / "key.pem")) as svc:
        r = svc.get("/metrics")
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json", r.text


def test_a_new_leader_shows_in_the_metrics_when_the_leading_worker_dies(tmp_path: Path) -> None:
    """Issue 15's leads, visible in /metrics: the worker leading the health probes is killed; the
    other takes the lead at its next round, and the dead worker's gauge no longer counts."""
    home = build_home(tmp_path / "home")
    token = new_admin_token(home, "lead")
    with RunningServer(home, CA_PASSWORD, extra_args=["--workers", "2", "--health-interval", "0.5"]) as server:
        leaders = re.compile(r"this process leads health \(pid (\d+)\)")
        first = leaders.findall(server.log_once(lambda log: bool(leaders.search(log))))
        assert len(first) == 1, server.log()
        assert samples(scrape(server, token))[("vcc_pki_lead", (("role", "health"),))] == 1
        os.kill(int(first[0]), signal.SIGKILL)
        log = server.log_once(lambda log: len(leaders.findall(log)) >= 2, timeout=10)
        second = leaders.findall(log)
        assert len(second) == 2 and second[1] != first[0], log
        assert samples(scrape(server, token))[("vcc_pki_lead", (("role", "health"),))] == 1
