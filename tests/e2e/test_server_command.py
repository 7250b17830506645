"""vcc-pki-server as an operator runs it: --dev on an empty home, passwords, workers, SIGTERM."""

from __future__ import annotations

import re
import signal
import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
from cryptography import x509

from conftest import CA_PASSWORD, build_home
from support import (
    BIN,
    RunningServer,
    env_without_secrets,
    free_port,
    presented_serial,
    replace_server_certificate,
    tls_context,
)
from vcc_pki_server.authority import Authority
from vcc_pki_server.config import Config
from vcc_pki_server.home import Home


def test_dev_mode_creates_a_ca_keeps_its_admin_token_out_of_the_log_and_stops_cleanly(tmp_path: Path) -> None:
    home = Home(tmp_path / "pki-data")
    server = RunningServer(home, password="", extra_args=["--dev"])
    server.start()
    try:
        # stderr is a file here, not a terminal: the token is in secrets/, not in the log.
        token = (home.secrets_dir / "admin_token").read_text().strip()
        assert token.startswith("vcc_adm_") and token not in server.log()
        assert f"admin token written to {home.secrets_dir / 'admin_token'}" in server.log()
        assert stat.S_IMODE((home.secrets_dir / "admin_token").stat().st_mode) == 0o600
        ctx = tls_context(home.root_cert)
        r = httpx.get(f"{server.url}/api/v1/services/", verify=ctx,
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert [s["service_id"] for s in r.json()["items"]] == ["pki-server"]
        for secret in ("root_password", "ca_password"):
            assert stat.S_IMODE((home.secrets_dir / secret).stat().st_mode) == 0o600
        assert stat.S_IMODE(home.intermediate_key.stat().st_mode) == 0o400
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0
    assert "Traceback" not in server.log()
    # A second start reuses the home: no new CA, no second admin token.
    again = RunningServer(home, password="", extra_args=["--dev"])
    with again:
        pass
    assert "admin token" not in again.log()
    assert "creating a dev CA" not in again.log()


def test_wrong_ca_password_fails_with_one_line(tmp_path: Path) -> None:
    home = build_home(tmp_path / "h")
    proc = subprocess.run([str(BIN / "vcc-pki-server"), "--home", str(home.root), "--port", str(free_port())],
                          env={**env_without_secrets(), "VCC_PKI_CA_PASSWORD": "not-it"},
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["vcc-pki-server: error: wrong password for the "
                                                "intermediate CA key (intermediate_ca_key.pem)"]


def test_two_workers_serve_and_stop_on_sigterm(tmp_path: Path) -> None:
    home = build_home(tmp_path / "h")
    server = RunningServer(home, CA_PASSWORD, extra_args=["--workers", "2"])
    server.start()
    try:
        with httpx.Client(verify=tls_context(home.root_cert)) as client:
            for _ in range(20):
                assert client.get(f"{server.url}/health").status_code == 200
        deadline = time.monotonic() + 15
        while len(_workers_started(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_workers_started(server)) == 2, server.log()
    finally:
        assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.log()


def _workers_started(server: RunningServer) -> set[str]:
    return set(re.findall(r"Application startup complete", server.log())) and set(
        re.findall(r"Started server process \[(\d+)\]", server.log()))


def test_a_server_certificate_with_a_third_of_its_life_left_is_renewed_at_start(tmp_path: Path) -> None:
    issued_nine_days_ago = datetime.now(timezone.utc) - timedelta(days=9)
    home = build_home(tmp_path / "h", ca_made=issued_nine_days_ago - timedelta(days=1))
    ten_days = Config(default_validity_days=10, max_validity_days=10)
    authority = Authority(home.open_store(), home.load_ca(CA_PASSWORD), policy=ten_days.policy(),
                          clock=lambda: issued_nine_days_ago)
    home.issue_server_certificate(authority, ten_days)
    authority.store.close()
    before = x509.load_pem_x509_certificate(home.server_cert.read_bytes())
    with RunningServer(home, CA_PASSWORD) as server:
        presented = presented_serial(server)
    assert presented != before.serial_number
    after = x509.load_pem_x509_certificate(home.server_cert.read_bytes())
    assert after.serial_number == presented
    assert after.not_valid_after_utc - before.not_valid_after_utc > timedelta(days=300)
    assert "server certificate renewed" in server.log()


def test_every_worker_presents_a_server_certificate_replaced_while_running(tmp_path: Path) -> None:
    """SPEC §10: the running server's own certificate changes without a restart, in every worker
    (here another process replaced it, as a worker that renewed it does)."""
    home = build_home(tmp_path / "h")
    before = x509.load_pem_x509_certificate(home.server_cert.read_bytes()).serial_number
    with RunningServer(home, CA_PASSWORD, extra_args=["--workers", "2", "--cert-check-interval", "0.2"]) as server:
        assert {presented_serial(server) for _ in range(6)} == {before}
        new = replace_server_certificate(home, CA_PASSWORD)
        deadline = time.monotonic() + 5
        while True:
            seen = [presented_serial(server) for _ in range(10)]  # new connections, either worker
            if set(seen) == {new}:
                break
            assert time.monotonic() < deadline, f"still presented after 5 s: {set(seen) - {new}}"
            time.sleep(0.1)
        assert server.log_once(lambda log: log.count("server certificate reloaded") >= 2).count(
            "server certificate reloaded") >= 2  # one line per worker


def test_home_without_a_ca_fails_with_one_line_and_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "empty"
    proc = subprocess.run([str(BIN / "vcc-pki-server"), "--home", str(home), "--port", str(free_port())],
                          env=env_without_secrets(), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"vcc-pki-server: error: {home} has no CA: run `pki-admin init` (or `pki-admin ca init-root` "
        "and `pki-admin ca create-intermediate`), or start with --dev"]
    assert not home.exists()


def test_a_home_made_step_by_step_serves(tmp_path: Path) -> None:
    """SPEC §10: `ca init-root`, `ca create-intermediate`, then the server, which makes its own
    TLS certificate (and a first CRL) on its first start."""
    from vcc_pki_server import cli

    root = tmp_path / "root.pw"
    root.write_text("root secret\n")
    ca = tmp_path / "ca.pw"
    ca.write_text(CA_PASSWORD + "\n")
    g = ["--home", str(tmp_path / "steps")]
    assert cli.main([*g, "ca", "init-root", "--key-type", "ec-p384", "--root-password-file", str(root)]) == 0
    assert cli.main([*g, "ca", "create-intermediate", "--key-type", "ec-p256", "--root-password-file", str(root),
                     "--password-file", str(ca)]) == 0
    home = Home(tmp_path / "steps")
    assert not home.server_cert.exists()
    with RunningServer(home, CA_PASSWORD) as server:
        ctx = tls_context(home.root_cert)
        with httpx.Client(verify=ctx, timeout=10) as client:
            health = client.get(f"{server.url}/health").json()
            assert health["status"] == "ok" and health["crl_number"] >= 1
            crl = x509.load_der_x509_crl(client.get(f"{server.url}/api/v1/crl").content)
            assert crl.issuer == home.intermediate_certificate().subject
        assert "server certificate made" in server.log_once(lambda log: "server certificate made" in log)
    assert home.server_cert.exists()


def test_loose_modes_on_the_home_and_key_files_are_warned_about(tmp_path: Path) -> None:
    home = build_home(tmp_path / "h")
    home.intermediate_key.chmod(0o644)
    home.root.chmod(0o777)
    try:
        with RunningServer(home, CA_PASSWORD) as server:
            log = server.log_once(lambda log: "world-writable" in log and "readable or writable by others" in log)
        assert f"key file {home.intermediate_key} is readable or writable by others (mode 644)" in log
        assert "world-writable (mode 777)" in log
    finally:
        home.root.chmod(0o700)


def test_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    """Issue 18: with --workers 2, a worker killed while serving is replaced, and the server
    still stops cleanly."""
    import os

    home = build_home(tmp_path / "h")
    server = RunningServer(home, CA_PASSWORD, extra_args=["--workers", "2"]).start()
    try:
        assert server.proc is not None
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
        deadline = time.monotonic() + 10
        while len(workers := [int(p) for p in children.read_text().split()]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(workers[0], signal.SIGKILL)
        while True:
            now = [int(p) for p in children.read_text().split()]
            if len(now) == 2 and workers[0] not in now:
                break
            assert time.monotonic() < deadline, f"workers now {now}"
            time.sleep(0.1)
        time.sleep(1.0)  # the new worker takes requests once started
        for _ in range(6):
            assert presented_serial(server)
        assert "starting a new one" in server.log_once(lambda log: "starting a new one" in log)
    finally:
        code = server.stop()
    assert code == 0, server.log()[-2000:]


def test_log_format_json_writes_one_object_per_line_with_the_text_forms_fields(tmp_path: Path) -> None:
    """Issue 12: `--log-format json`: every line an object (time, level, logger, message), the
    access lines and the dev admin token's announcement among them, and no secret."""
    import json

    home = Home(tmp_path / "pki-data")
    server = RunningServer(home, password="", extra_args=["--dev", "--log-format", "json"])
    server.start()
    try:
        token = (home.secrets_dir / "admin_token").read_text().strip()
        httpx.get(f"{server.url}/api/v1/services/", verify=tls_context(home.root_cert),
                  headers={"Authorization": f"Bearer {token}"}).raise_for_status()
        log = server.log_once(lambda text: "/api/v1/services/" in text)
    finally:
        assert server.stop() == 0
    lines = [line for line in log.splitlines() if line.strip()]
    objects = [json.loads(line) for line in lines]  # every line parses
    assert all(set(o) >= {"time", "level", "logger", "message"} for o in objects)
    assert all(o["time"].endswith("Z") and o["level"] in ("DEBUG", "INFO", "WARNING", "ERROR") for o in objects)
    assert any("/api/v1/services/" in o["message"] and o["logger"] == "vcc_pki_server.access" for o in objects)
    assert token not in log and (home.secrets_dir / "ca_password").read_text() not in log
