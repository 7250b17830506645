"""deploy/prometheus and deploy/grafana (issue 12): the alert rules pass their ``promtool`` unit
tests, and a real Prometheus, configured from deploy/prometheus/prometheus.yml, scrapes a real
server over TLS with a metrics token and answers every query of the Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from support import RunningServer, free_port
from vcc_pki_server.authority import Actor, Authority

if TYPE_CHECKING:
    from tests.e2e.conftest import Enrol

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus) is not installed")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_alert_rules_pass_their_unit_tests() -> None:
    checked = promtool("check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def dashboard_queries(job: str) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` of every target of the Grafana dashboard, ``$job`` filled in."""
    board = json.loads((DEPLOY / "grafana" / "vcc-pki.json").read_text())
    return [(panel["title"], target["expr"].replace("$job", job))
            for panel in board["panels"] for target in panel["targets"]]


def names_used() -> set[str]:
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text() + json.dumps(dashboard_queries("x"))
    return set(re.findall(r"\bvcc_pki_[a-z_]+", text))


@pytest.fixture
def prometheus(pki_server: RunningServer, authority: Authority, tmp_path: Path) -> Iterator[str]:
    """Prometheus from deploy/prometheus/prometheus.yml: the targets, files and intervals changed
    for this test, nothing else. Yields its URL."""
    if PROMETHEUS is None:
        pytest.skip("prometheus (Debian's package) is not installed")
    token = authority.create_admin_token(name="prometheus", expires_days=1, actor=Actor.operator(),
                                         scope="metrics").value
    (tmp_path / "token").write_text(token + "\n")
    shutil.copy(pki_server.home.root_cert, tmp_path / "root.pem")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    config = config.replace("/etc/prometheus/vcc-pki-metrics.token", str(tmp_path / "token"))
    config = config.replace("/etc/prometheus/vcc-pki-root.pem", str(tmp_path / "root.pem"))
    config = config.replace("30s", "1s")
    config = re.sub(r"- targets:\n(\s+- pki-\d\.internal:8443\n)+",
                    f"- targets: ['localhost:{pki_server.port}']\n", config)
    assert str(pki_server.port) in config and "/etc/prometheus" not in config
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def query(url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, (expr, r.text)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]  # type: ignore[no-any-return]


def test_prometheus_scrapes_the_server_and_answers_the_dashboard(prometheus: str, pki_server: RunningServer,
                                                                 admin: httpx.Client, enrolled: Enrol) -> None:
    service = enrolled()  # something to show: an enrolment, a renewal, a revocation
    r = admin.post(f"/api/v1/certificates/{service.service_id}/renew")
    assert r.status_code == 201, r.text
    r = admin.delete(f"/api/v1/certificates/{service.service_id}/revoke",
                     params={"serial": service.serial, "reason": "superseded"})
    assert r.status_code == 200, r.text
    exposed = admin.get("/metrics").text
    missing = {name for name in names_used()
               if not re.search(rf"^{name}(_bucket|_count|_sum)?[{{ ]", exposed, re.M)}
    assert not missing, f"the rules or the dashboard use metrics the server does not expose: {missing}"

    deadline = time.monotonic() + 60
    up: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            up = query(prometheus, 'up{job="vcc-pki"} == 1')
        except httpx.HTTPError:  # not listening yet
            up = []
        if up and query(prometheus, "vcc_pki_ca_expiry_timestamp_seconds"):
            break
        time.sleep(0.5)
    assert up, "Prometheus did not scrape the server (see its log)"
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} >= {
        "VccPkiCertificateNotRenewed", "VccPkiCrlNearNextUpdate", "VccPkiCaExpiresSoon",
        "VccPkiServiceUnhealthy", "VccPkiIssuanceErrors"}
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
    time.sleep(2.5)  # two more scrapes: rate() needs two samples
    empty = [title for title, expr in dashboard_queries("vcc-pki") if not query(prometheus, expr)]
    # Every panel has data on a server that has issued and revoked.
    assert not empty, f"dashboard panels without data: {empty}"
