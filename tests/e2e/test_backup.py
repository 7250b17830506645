"""Backup and restore (issue 12, SPEC §12): a backup taken while the server issues, restored
into a new home that a server then serves; the docs' disaster-recovery steps, as written."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import httpx

from conftest import CA_PASSWORD, build_home
from support import BIN, RunningServer, env_without_secrets, make_csr, tls_context
from vcc_pki_server.authority import Actor
from vcc_pki_server.home import Home


def pki_admin(*argv: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    env = env_without_secrets() | ({"VCC_PKI_CA_PASSWORD": password} if password else {})
    return subprocess.run([str(BIN / "pki-admin"), *argv], capture_output=True, text=True, env=env,
                          timeout=120, check=False, stdin=subprocess.DEVNULL)


def test_a_backup_taken_under_load_restores_into_a_home_that_serves_every_certificate(tmp_path: Path) -> None:
    home = build_home(tmp_path / "site" / "home")
    authority = home.authority(CA_PASSWORD)
    try:
        token = authority.create_admin_token(name="t", expires_days=None, actor=Actor.operator()).value
        authority.register_service("busy", san_dns=["busy"], actor=Actor.operator())
    finally:
        authority.store.close()
    (home.root / "secrets").mkdir()
    (home.root / "secrets" / "ca_password").write_text(CA_PASSWORD)  # as a --dev home keeps it
    answered: list[str] = []
    stop = threading.Event()
    with RunningServer(home, CA_PASSWORD) as server:
        def issue() -> None:  # certificates keep coming while the backup runs
            csr = make_csr("busy")[0].decode()
            with httpx.Client(base_url=server.url, verify=tls_context(home.root_cert), timeout=30,
                              headers={"Authorization": f"Bearer {token}"}) as client:
                while not stop.is_set():
                    r = client.post("/api/v1/certificates/request", json={"service_id": "busy", "csr": csr})
                    assert r.status_code == 201, r.text
                    answered.append(r.json()["serial_number"])

        load = threading.Thread(target=issue)
        load.start()
        try:
            while len(answered) < 20:
                time.sleep(0.01)
            before_backup = list(answered)
            archive = tmp_path / "pki-backup.tar.gz"
            made = pki_admin("--home", str(home.root), "backup", "--out", str(archive))
            assert made.returncode == 0, made.stderr
            assert "secrets/ left out" in made.stdout
        finally:
            stop.set()
            load.join()
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "home/pki.db" in names and "home/ca/intermediate_ca_key.pem" in names
    assert not any("secrets" in name for name in names) and "home/pki.db-wal" not in names
    again = pki_admin("--home", str(home.root), "backup", "--out", str(archive))
    assert again.returncode == 1 and "exists" in again.stderr  # never overwrites

    # Disaster recovery (docs/operations.md): a new host, the archive, the intermediate's password.
    new = tmp_path / "new-host" / "home"
    wrong = pki_admin("restore", str(archive), "--home", str(new), password="not the password")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().splitlines()[-1] == ("pki-admin: error: wrong password for the intermediate CA key "
                                                     "(intermediate_ca_key.pem)")
    assert not new.exists()
    restored = pki_admin("restore", str(archive), "--home", str(new), password=CA_PASSWORD)
    assert restored.returncode == 0, restored.stderr
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    assert pki_admin("restore", str(archive), "--home", str(new), password=CA_PASSWORD).returncode == 1  # not empty
    listed = pki_admin("--home", str(new), "cert", "list", "--service-id", "busy", "--json")
    assert listed.returncode == 0, listed.stderr
    kept = {c["serial_number"] for c in json.loads(listed.stdout)}
    assert set(before_backup) <= kept
    with RunningServer(Home(new), CA_PASSWORD) as again_serving:  # it serves, and issues new serials
        with httpx.Client(base_url=again_serving.url, verify=tls_context(Home(new).root_cert), timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            r = client.post("/api/v1/certificates/request",
                            json={"service_id": "busy", "csr": make_csr("busy")[0].decode()})
            assert r.status_code == 201 and r.json()["serial_number"] not in set(answered)

    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(os.urandom(64))
    bad = pki_admin("restore", str(garbage), "--home", str(tmp_path / "other"), password=CA_PASSWORD)
    assert bad.returncode == 1 and "not a backup" in bad.stderr and "Traceback" not in bad.stderr
