"""The testing kit (issue 14): a user's own project, its tests using the `vcc_pki` and
`vcc_pki_service` fixtures, run by pytest in a process of its own, as the user would."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from support import env_without_secrets

DOC = (Path(__file__).resolve().parents[2] / "docs" / "testing.md").read_text()

USER_TESTS = '''
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from vcc_pki_client.asgi import caller_service_id


async def items(request):
    return PlainTextResponse(f"apples for {caller_service_id(request.scope)}")


def test_two_services_speak_mtls(vcc_pki, vcc_pki_service):
    open("url.txt", "w").write(vcc_pki.url)
    inventory, billing = vcc_pki_service("inventory"), vcc_pki_service("billing")
    with inventory.serve(Starlette(routes=[Route("/items", items)])) as url, billing.httpx_client() as http:
        assert http.get(f"{url}/items").text == "apples for billing"
    assert billing.discover("inventory").endpoints == [url]


def test_revocation_refuses_the_caller_at_once(vcc_pki, vcc_pki_service):
    inventory, billing = vcc_pki_service("inventory-2"), vcc_pki_service("billing-2")
    with inventory.serve(Starlette(routes=[Route("/items", items)])) as url:
        assert [int(s, 16) for s in vcc_pki.revoke("billing-2")] == [billing.certificate.serial_number]
        with billing.httpx_client() as http, pytest.raises(httpx.HTTPError):
            http.get(f"{url}/items")


def test_a_short_lived_certificate_and_a_forced_renewal(vcc_pki_service):
    from datetime import timedelta
    reports = vcc_pki_service("reports", validity=timedelta(minutes=5))
    first = reports.certificate
    assert (first.not_valid_after_utc - first.not_valid_before_utc) <= timedelta(minutes=6)
    assert reports.renew().serial_number != f"{first.serial_number:x}"
    assert reports.is_revoked() is False
'''

WRONG_EXPECTATION = '''
def test_expects_the_wrong_caller(vcc_pki_service):
    inventory = vcc_pki_service("inventory")
    assert inventory.discover("inventory").service_name == "not what it is"
'''


def run_pytest(project: Path, *files: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=project,
                          env=env_without_secrets(), capture_output=True, text=True, timeout=120, check=False)


def test_a_users_project_passes_with_the_fixtures_and_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    project = tmp_path / "user-project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")  # the user's own settings, not this repository's
    (project / "test_services.py").write_text(USER_TESTS)
    (project / "test_wrong.py").write_text(WRONG_EXPECTATION)
    ten_lines = re.search(r"## Two services speaking mTLS, in ten lines\n.*?```python\n(.*?)```", DOC, re.S)
    assert ten_lines is not None and len(ten_lines.group(1).strip().splitlines()) <= 10
    (project / "test_from_the_docs.py").write_text(ten_lines.group(1))

    passing = run_pytest(project, "test_services.py", "test_from_the_docs.py")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "4 passed" in passing.stdout
    # The session's server is gone with the session: its port is free again.
    port = int((project / "url.txt").read_text().rsplit(":", 1)[1])
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0

    failing = run_pytest(project, "test_wrong.py")
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "1 failed" in failing.stdout and "not what it is" in failing.stdout
