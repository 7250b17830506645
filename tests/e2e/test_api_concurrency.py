"""Concurrency and crashes against the real server: parallel issuance, one enrolment token raced by
ten clients, and a SIGKILL in the middle of a burst that must lose no acknowledged certificate."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import CA_PASSWORD, build_home
from support import RunningServer, make_csr, tls_context
from vcc_pki_server.authority import Actor, Authority
from vcc_pki_server.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from tests.e2e.conftest import Register

API = "/api/v1"
REQUEST = f"{API}/certificates/request"


def _fingerprint(pem: str) -> str:
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def test_200_concurrent_issuances_succeed_with_unique_recorded_serials(
        pki_server: RunningServer, admin_token: str, authority: Authority, register: Register) -> None:
    services = [f"conc-{i}-{time.monotonic_ns() % 10**8}" for i in range(5)]
    for sid in services:
        register(sid)
    jobs = [(services[i % len(services)], make_csr(services[i % len(services)])[0].decode()) for i in range(200)]
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    with httpx.Client(base_url=pki_server.url, verify=tls_context(pki_server.home.root_cert), limits=limits,
                      headers={"Authorization": f"Bearer {admin_token}"}, timeout=60) as client, \
            ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda job: client.post(REQUEST, json={"service_id": job[0], "csr": job[1]}),
                                  jobs))
    assert [r.status_code for r in responses] == [201] * 200, {r.status_code: r.text for r in responses}
    bodies = [r.json() for r in responses]
    serials = [b["serial_number"] for b in bodies]
    assert len(set(serials)) == 200
    for (sid, _), body in zip(jobs, bodies, strict=False):
        assert body["service_id"] == sid
        assert _fingerprint(body["certificate"]) == body["fingerprint_sha256"]
        record = authority.store.get_certificate(body["serial_number"])
        assert record is not None, body["serial_number"]
        assert (record.service_id, record.fingerprint) == (sid, body["fingerprint_sha256"])
    assert sum(len(authority.store.certificates_for(sid)) for sid in services) == 200
    assert "Traceback" not in pki_server.log()


def test_one_enrolment_token_raced_by_ten_clients_issues_exactly_one_certificate(
        pki_server: RunningServer, register: Register, authority: Authority, service_id: str) -> None:
    token = register(service_id)
    csrs = [make_csr(service_id)[0].decode() for _ in range(10)]
    barrier = threading.Barrier(10)
    ctx = tls_context(pki_server.home.root_cert)

    def attempt(csr: str) -> httpx.Response:
        with httpx.Client(base_url=pki_server.url, verify=ctx, timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.get("/health").status_code == 200  # connection up before the race
            barrier.wait(timeout=10)
            return client.post(REQUEST, json={"service_id": service_id, "csr": csr})

    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(attempt, csrs))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [401] * 9, [r.text for r in responses]
    for r in responses:
        if r.status_code == 401:
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "invalid_token"
    [winner] = [r.json() for r in responses if r.status_code == 201]
    assert [c.serial for c in authority.store.certificates_for(service_id)] == [winner["serial_number"]]


def test_certificates_acknowledged_before_a_sigkill_survive_it(tmp_path: Path) -> None:
    home = build_home(tmp_path / "h")
    services = ["crash-a", "crash-b", "crash-c"]
    setup = home.authority(CA_PASSWORD)
    try:
        token = setup.create_admin_token(name="crash", expires_days=None, actor=Actor.operator()).value
        for sid in services:
            setup.register_service(sid, actor=Actor.operator())
    finally:
        setup.store.close()

    received: list[dict[str, Any]] = []
    refused: list[str] = []
    broken: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    server = RunningServer(home, CA_PASSWORD).start()
    ctx = tls_context(home.root_cert)

    def burst(worker: int) -> None:
        sid = services[worker % len(services)]
        with httpx.Client(base_url=server.url, verify=ctx, timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            while not stop.is_set():
                try:
                    r = client.post(REQUEST, json={"service_id": sid, "csr": make_csr(sid)[0].decode()})
                except httpx.HTTPError as exc:  # the kill: in flight or refused
                    with lock:
                        broken.append(type(exc).__name__)
                    return
                with lock:
                    if r.status_code == 201:
                        received.append(r.json())
                    else:
                        refused.append(r.text)

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(8)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while len(received) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        server.stop()
    assert not refused, refused[:3]
    assert len(received) >= 60
    assert broken, "the kill did not interrupt the burst"

    with RunningServer(home, CA_PASSWORD) as again:
        with httpx.Client(base_url=again.url, verify=ctx, timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.get("/health").json()["status"] == "ok"
            listed = {i["serial_number"]: i["fingerprint_sha256"] for i in
                      client.get(f"{API}/certificates/", params={"limit": 1000}).json()["items"]}
        assert "Traceback" not in again.log()
    store = SQLiteStore(home.db)
    try:
        assert store.integrity_check() == "ok"
        for body in received:
            record = store.get_certificate(body["serial_number"])
            assert record is not None, f"acknowledged certificate {body['serial_number']} was lost"
            assert record.fingerprint == body["fingerprint_sha256"] == _fingerprint(body["certificate"])
            assert listed[body["serial_number"]] == body["fingerprint_sha256"]
    finally:
        store.close()
