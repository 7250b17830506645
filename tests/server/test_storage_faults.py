"""Storage faults answered honestly (issue 18): a home whose store is gone refuses to start, and
a store that cannot be written gives 503 problem documents and an unhealthy /health."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import CA_PASSWORD, build_home
from support import BIN, RunningServer, env_without_secrets, free_port, make_csr, tls_context
from vcc_pki_server import cli
from vcc_pki_server.app import create_app
from vcc_pki_server.authority import Actor


class FullDisk:
    """A connection whose writes fail as SQLite's do on a full disk (reads still work); a failed
    COMMIT leaves the transaction open (SQLite "may or may not" roll it back: the harder case)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "COMMIT")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_a_home_with_a_ca_but_no_store_refuses_to_start(tmp_path: Path, damage: str) -> None:
    home = build_home(tmp_path / "h")
    home.db.unlink()
    for extra in ("-wal", "-shm"):
        Path(f"{home.db}{extra}").unlink(missing_ok=True)
    if damage == "empty":
        home.db.write_bytes(b"")
    proc = subprocess.run([str(BIN / "vcc-pki-server"), "--home", str(home.root), "--port", str(free_port())],
                          env={**env_without_secrets(), "VCC_PKI_CA_PASSWORD": CA_PASSWORD},
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is missing or empty" in lines[0] and "restore it from a backup" in lines[0]
    assert cli.main(["--home", str(home.root), "service", "list"]) == 1
    assert not home.db.exists() or home.db.stat().st_size == 0  # nothing was made in its place


@pytest.mark.parametrize(("fault", "said"), [("full", "disk is full"), ("locked", "database is locked")])
def test_a_store_that_cannot_be_written_answers_503_and_health_says_so(tmp_path: Path, fault: str,
                                                                       said: str) -> None:
    """A full disk (simulated here; a real one below) and a lock held by another process past the
    busy timeout (real: another connection's exclusive transaction; the timeout cut to 1 s)."""
    home = build_home(tmp_path / "h")
    authority = home.authority(CA_PASSWORD)
    holder = sqlite3.connect(home.db, isolation_level=None)
    try:
        token = authority.create_admin_token(name="t", expires_days=None, actor=Actor.operator()).value
        enrolment = authority.register_service("disk", san_dns=["disk"], actor=Actor.operator())[1].value
        app = create_app(authority)
        store: Any = authority.store
        healthy = store._db

        def break_store() -> None:
            if fault == "full":
                store._db = FullDisk(healthy)
            else:
                store._timeout = 1.0
                healthy.execute("PRAGMA busy_timeout=1000")
                holder.execute("BEGIN EXCLUSIVE")  # as `sqlite3 pki.db` left open in a transaction

        def mend_store() -> None:
            store._db = healthy
            if holder.in_transaction:
                holder.execute("ROLLBACK")

        async def calls() -> list[httpx.Response]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://pki",
                                         headers={"Authorization": f"Bearer {token}"}) as client:
                csr = make_csr("disk")[0].decode()
                out = [await client.get("/health")]
                break_store()
                out.append(await client.post("/api/v1/certificates/request", json={"service_id": "disk", "csr": csr}))
                out.append(await client.post("/api/v1/services/register", json={"service_id": "other"}))
                out.append(await client.get("/health"))
                out.append(await client.post("/api/v1/certificates/request", json={"service_id": "disk", "csr": csr},
                                             headers={"Authorization": f"Bearer {enrolment}"}))
                mend_store()
                out.append(await client.post("/api/v1/certificates/request", json={"service_id": "disk", "csr": csr}))
                out.append(await client.get("/health"))
                return out

        before, issue, register, sick, not_admin, again, well = asyncio.run(calls())
    finally:
        holder.close()
        authority.store.close()
    assert before.status_code == 200
    for refused in (issue, register):
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["code"] == "unavailable" and said in refused.json()["detail"]
    assert sick.status_code == 503 and sick.json()["database"] == "failing writes"
    # Anyone may ask /health, and a service is not an admin: neither learns which file or host failed.
    assert str(home.root) not in sick.text and said not in sick.text
    assert not_admin.status_code == 503 and not_admin.json()["code"] == "unavailable"
    assert str(home.root) not in not_admin.text and said not in not_admin.text
    assert again.status_code == 201 and well.status_code == 200


@pytest.mark.parametrize(("damage", "said"), [
    ("corrupt-db", "is not a usable SQLite database (file is not a database)"),
    ("bad-intermediate", "intermediate CA certificate"),
    ("bad-root", "root CA certificate"),
])
def test_a_damaged_home_is_one_line_from_the_server_and_pki_admin(tmp_path: Path, damage: str, said: str) -> None:
    home = build_home(tmp_path / "h")
    if damage == "corrupt-db":
        for extra in ("-wal", "-shm"):
            Path(f"{home.db}{extra}").unlink(missing_ok=True)
        home.db.write_bytes(b"garbage " * 64)
    else:
        (home.intermediate_cert if damage == "bad-intermediate" else home.root_cert).write_text("not a PEM\n")
    proc = subprocess.run([str(BIN / "vcc-pki-server"), "--home", str(home.root), "--port", str(free_port())],
                          env={**env_without_secrets(), "VCC_PKI_CA_PASSWORD": CA_PASSWORD},
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and said in proc.stderr, proc.stderr
    command = ["cert", "list"] if damage == "corrupt-db" else ["ca", "info"]
    assert cli.main(["--home", str(home.root), *command]) == 1


def _can_mount_a_small_disk() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"],
                          capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _can_mount_a_small_disk(), reason="no user and mount namespaces on this machine")
def test_a_really_full_disk_gives_503_an_unhealthy_health_and_recovers_losing_nothing(tmp_path: Path) -> None:
    """The server runs with its home on an 8 MiB tmpfs of its own (a mount namespace), and the
    test fills that disk through /proc/<pid>/root: real ENOSPC, not a simulated one."""
    home = build_home(tmp_path / "h")
    authority = home.authority(CA_PASSWORD)
    token = authority.create_admin_token(name="t", expires_days=None, actor=Actor.operator()).value
    authority.register_service("disk", san_dns=["disk"], actor=Actor.operator())
    authority.store.close()
    seed = tmp_path / "seed"
    shutil.copytree(home.root, seed, symlinks=True)
    small_disk = ["unshare", "-rm", "sh", "-c",
                  f'mount -t tmpfs -o size=8m none "{home.root}" && cp -a "{seed}/." "{home.root}/" && exec "$@"',
                  "sh"]
    csr = make_csr("disk")[0].decode()
    with RunningServer(home, CA_PASSWORD, wrap=small_disk) as server:
        assert server.proc is not None
        filler = Path(f"/proc/{server.proc.pid}/root{home.root}/filler")
        ctx = tls_context(home.root_cert)
        with httpx.Client(base_url=server.url, verify=ctx, timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            with filler.open("wb") as fill, contextlib.suppress(OSError):  # ENOSPC: the disk is full
                while True:
                    fill.write(b"\0" * 65536)
                    fill.flush()
            issued, refused = [], None
            for _ in range(400):  # the WAL may hold room for a few more transactions
                answer = client.post("/api/v1/certificates/request", json={"service_id": "disk", "csr": csr})
                if answer.status_code != 201:
                    refused = answer
                    break
                issued.append(answer.json()["serial_number"])
            assert refused is not None, "the full disk never refused a write"
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["code"] == "unavailable"
            sick = client.get("/health")
            assert sick.status_code == 503 and sick.json()["database"] == "failing writes"
            filler.unlink()  # the operator frees space
            again = client.post("/api/v1/certificates/request", json={"service_id": "disk", "csr": csr})
            assert again.status_code == 201, again.text
            issued.append(again.json()["serial_number"])
            assert client.get("/health").status_code == 200
            listed = client.get("/api/v1/certificates/", params={"service_id": "disk", "limit": 1000}).json()
        assert "Traceback" not in server.log()
    stored = {c["serial_number"] for c in listed["items"]}
    assert set(issued) <= stored and len(stored) == len(issued)  # every certificate handed out is kept
