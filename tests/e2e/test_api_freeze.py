"""A database that stops answering stalls the requests that need it, never the server.

With a certificate request stuck on the database, ``/health`` says so (503) and the CA's
certificates are still served, each within a second; once the database answers again the
stuck request completes. PostgreSQL: its backend processes are stopped with SIGSTOP (a hung
host, not a refused connection). SQLite: another process holds the write lock for 10 s.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import CA_PASSWORD, build_home
from support import RunningServer, make_csr, tls_context
from vcc_pki_server.authority import Actor
from vcc_pki_server.home import Home

API = "/api/v1"


def _admin_token(home: Home) -> str:
    authority = home.authority()
    try:
        authority.register_service("frozen", san_dns=["frozen.test"], actor=Actor.operator())
        return authority.create_admin_token(name="freeze", expires_days=None, actor=Actor.operator()).value
    finally:
        authority.store.close()


def _request_certificate(server: RunningServer, token: str) -> Future[httpx.Response]:
    """A certificate request sent from another thread; its future settles with the answer."""
    csr = make_csr("frozen.test", dns=["frozen.test"])[0].decode()

    def send() -> httpx.Response:
        with httpx.Client(base_url=server.url, verify=tls_context(server.home.root_cert), timeout=60,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            return client.post(f"{API}/certificates/request", json={"service_id": "frozen", "csr": csr})

    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(send)
    pool.shutdown(wait=False)
    return future


def _assert_server_answers_while_frozen(server: RunningServer, stuck: Future[httpx.Response]) -> None:
    with httpx.Client(base_url=server.url, verify=tls_context(server.home.root_cert), timeout=5) as client:
        for _ in range(3):
            start = time.monotonic()
            root = client.get(f"{API}/ca/root")
            assert root.status_code == 200 and root.text.startswith("-----BEGIN CERTIFICATE-----")
            assert time.monotonic() - start < 1.0
            start = time.monotonic()
            health = client.get("/health")
            assert time.monotonic() - start < 1.0
            _check_health(health)
            assert not stuck.done(), "the certificate request should wait for the database"


def _check_health(health: httpx.Response) -> None:
    """A frozen database: /health is 503 and names the database, or 200 if the probe's read
    needs no lock (SQLite readers do not wait for a writer)."""
    if health.status_code == 503:
        assert health.json()["database"] == "unavailable"
    else:
        assert health.status_code == 200 and health.json()["database"] == "ok"


@pytest.fixture
def pg_server(pg_database: str, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RunningServer, str, str]]:
    monkeypatch.setenv("VCC_PKI_DATABASE_URL", pg_database)
    home = build_home(tmp_path / "home")
    token = _admin_token(home)
    with RunningServer(home, CA_PASSWORD, env={"VCC_PKI_DATABASE_URL": pg_database}) as server:
        yield server, token, pg_database


def test_stopped_postgresql_stalls_issuance_not_health_or_ca_downloads(
        pg_server: tuple[RunningServer, str, str]) -> None:
    import psycopg

    server, token, dsn = pg_server
    with psycopg.connect(dsn, autocommit=True) as admin:
        backends = [pid for (pid,) in admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]
    assert backends, "the server holds no connection to stop"
    for pid in backends:
        os.kill(pid, signal.SIGSTOP)
    try:
        stuck = _request_certificate(server, token)
        time.sleep(0.5)  # the request reaches the issuer and waits on the database
        _assert_server_answers_while_frozen(server, stuck)
        with httpx.Client(base_url=server.url, verify=tls_context(server.home.root_cert), timeout=5) as client:
            assert client.get("/health").status_code == 503  # the probe's read is stuck too
    finally:
        for pid in backends:
            os.kill(pid, signal.SIGCONT)
    answer = stuck.result(timeout=30)
    assert answer.status_code == 201, answer.text
    with httpx.Client(base_url=server.url, verify=tls_context(server.home.root_cert), timeout=5) as client:
        deadline = time.monotonic() + 5
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the server did not become ready again"
            time.sleep(0.1)


def test_sqlite_write_lock_held_for_10_s_stalls_issuance_not_health_or_ca_downloads(tmp_path: Path) -> None:
    home = build_home(tmp_path / "home")
    token = _admin_token(home)
    # A deadline past the lock's 10 s: the request waits for the lock and is answered 201 (with the
    # default 10 s it may be answered 503 instead: tests/e2e/test_replicas_freeze.py).
    with RunningServer(home, CA_PASSWORD, extra_args=["--database-timeout", "30"]) as server:
        locker = sqlite3.connect(home.db, timeout=5, isolation_level=None, check_same_thread=False)
        locker.execute("BEGIN IMMEDIATE")  # the write lock, as a stuck pki-admin would hold it
        released = threading.Timer(10.0, lambda: locker.execute("ROLLBACK"))
        try:
            started = time.monotonic()
            released.start()
            stuck = _request_certificate(server, token)
            time.sleep(0.5)
            _assert_server_answers_while_frozen(server, stuck)
            answer = stuck.result(timeout=40)
            assert time.monotonic() - started >= 9.5  # it did wait for the lock
        finally:
            released.join()
            locker.close()
        assert answer.status_code == 201, answer.text
