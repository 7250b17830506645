"""Three replicas on one PostgreSQL that hangs for 20 s under traffic (issue 15).

The whole database cluster (postmaster and backends) is stopped with SIGSTOP — a hung host or a
black-holed network: no error, no answer. On every replica, `/health/live` and the CA's root keep
answering within a second; requests that need the database (certificate requests, a certificate
read) get 503 problem documents within the database deadline (`--database-timeout 2`), and once
the database runs again every request succeeds: no failed request outside the frozen window.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import pytest

from conftest import CA_PASSWORD, build_home
from support import RunningServer, make_csr, tls_context
from vcc_pki_server.authority import Actor
from vcc_pki_server.home import Home

API = "/api/v1"
DEADLINE = 2.0  # --database-timeout of the replicas
FROZEN = 20.0


@attrs.define
class Answer:
    replica: int
    what: str
    sent: float
    seconds: float
    status: int  # 0: no HTTP answer (connection error or client timeout)


def cluster_processes(dsn: str) -> list[int]:
    """The postmaster of ``dsn``'s cluster and every process it started."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    postmaster = int((Path(row[0]) / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                children.append(int(entry))
    return [postmaster, *children]


@pytest.fixture
def three_replicas(pg_database: str, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[RunningServer], str]]:
    monkeypatch.setenv("VCC_PKI_DATABASE_URL", pg_database)
    first = build_home(tmp_path / "r0" / "home")
    authority = first.authority()
    try:
        token = authority.create_admin_token(name="freeze", expires_days=None, actor=Actor.operator()).value
        authority.register_service("steady", san_dns=["steady.internal"], actor=Actor.operator())
    finally:
        authority.store.close()
    homes = [first]
    for n in (1, 2):
        (tmp_path / f"r{n}").mkdir()
        homes.append(Home(shutil.copytree(first.root, tmp_path / f"r{n}" / "home")))
    env = {"VCC_PKI_DATABASE_URL": pg_database}
    servers = [RunningServer(home, CA_PASSWORD, env=env, extra_args=["--database-timeout", str(DEADLINE)])
               for home in homes]
    try:
        for server in servers:
            server.start()
        yield servers, token
    finally:
        for server in servers:
            server.stop()


def test_a_hung_database_gives_fast_503s_and_everything_recovers(
        three_replicas: tuple[list[RunningServer], str], pg_database: str) -> None:
    servers, token = three_replicas
    ctx = tls_context(servers[0].home.root_cert)
    answers: list[Answer] = []
    lock = threading.Lock()
    stop = threading.Event()
    csr = make_csr("steady", dns=["steady.internal"])[0].decode()

    def traffic(n: int) -> None:  # what services do: certificate requests and reads, all the time
        bearer = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=servers[n].url, verify=ctx, timeout=30, headers=bearer) as client:
            while not stop.is_set():
                for what, call in (("issue", lambda: client.post(f"{API}/certificates/request",
                                                                 json={"service_id": "steady", "csr": csr})),
                                   ("read", lambda: client.get(f"{API}/certificates/steady"))):
                    sent = time.monotonic()
                    try:
                        status = call().status_code
                    except httpx.HTTPError:
                        status = 0
                    with lock:
                        answers.append(Answer(n, what, sent, time.monotonic() - sent, status))
                time.sleep(0.05)

    def probes(n: int) -> None:  # a load balancer's liveness checks and a client fetching the root
        with httpx.Client(base_url=servers[n].url, verify=ctx, timeout=5) as client:
            while not stop.is_set():
                for what, path in (("live", "/health/live"), ("root", f"{API}/ca/root")):
                    sent = time.monotonic()
                    try:
                        status = client.get(path).status_code
                    except httpx.HTTPError:
                        status = 0
                    with lock:
                        answers.append(Answer(n, what, sent, time.monotonic() - sent, status))
                time.sleep(0.2)

    threads = [threading.Thread(target=f, args=(n,)) for n in range(3) for f in (traffic, probes)]
    for thread in threads:
        thread.start()
    stopped: list[int] = []
    try:
        time.sleep(2)
        stopped = cluster_processes(pg_database)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        time.sleep(FROZEN)
        thawed_at = time.monotonic()
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped = []
        time.sleep(5)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    def during(a: Answer) -> bool:
        return frozen_at <= a.sent < thawed_at

    for n in range(3):
        mine = [a for a in answers if a.replica == n]
        # Liveness and the root: every answer 200 within a second, frozen or not.
        for kind in ("live", "root"):
            checks = [a for a in mine if a.what == kind]
            assert sum(during(a) for a in checks) >= 40, f"replica {n}: too few {kind} checks"
            slow = [a for a in checks if a.status != 200 or a.seconds >= 1.0]
            assert not slow, f"replica {n} {kind}: {slow[:5]}"
        # The database's routes while frozen: 503, each within the deadline (and a margin).
        frozen = [a for a in mine if a.what in ("issue", "read") and during(a) and a.sent + DEADLINE + 1 < thawed_at]
        assert len(frozen) >= 5, f"replica {n}: {len(frozen)} database requests while frozen"
        late = [(a.what, a.status, round(a.seconds, 2)) for a in frozen
                if a.status != 503 or a.seconds >= DEADLINE + 1.0]
        assert not late, f"replica {n}: {late[:5]}"
        # Before and after the window: nothing fails.
        outside = [a for a in mine if a.what in ("issue", "read") and (a.sent + a.seconds < frozen_at
                                                                       or a.sent >= thawed_at)]
        failed = [(a.what, a.status, round(a.sent - thawed_at, 2)) for a in outside
                  if a.status not in (200, 201)]
        assert not failed, f"replica {n}: failed outside the frozen window: {failed[:5]}"
        assert sum(a.sent >= thawed_at for a in outside) >= 10, f"replica {n}: too little traffic after"
    for server in servers:
        assert "Traceback" not in server.log()
