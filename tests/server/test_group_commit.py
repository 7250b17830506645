"""Group commit (SQLiteStore): concurrent records all land, a failing record fails alone, close is clean.

Correctness only, no timing: batches are forced by holding the store's write lock while
records queue up behind it.
"""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from vcc_pki_server.errors import Conflict
from vcc_pki_server.store import CertificateRecord, ServiceRecord, TokenRecord
from vcc_pki_server.store.sqlite import SQLiteStore

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
_serials = itertools.count(0x2000_0000_0000_0000_0001)


def cert(service_id: str = "alpha", *, serial: int | None = None) -> CertificateRecord:
    number = next(_serials) if serial is None else serial
    return CertificateRecord(
        serial=format(number, "x"), service_id=service_id, subject=f"CN={service_id}",
        san_dns=(service_id,), san_ip=("10.0.0.1",), not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=100), fingerprint=hashlib.sha256(f"gc-{number}".encode()).hexdigest(),
        pem="-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n", issued_at=NOW)


def count(path: Path, sql: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(sql).fetchone()[0])


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "pki.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(db_path)
    for sid in ("alpha", "beta"):
        s.add_service(ServiceRecord(service_id=sid, service_name=sid, san_dns=(sid,), created_at=NOW,
                                    updated_at=NOW), actor="test")
    yield s
    s.close()


def add_token(store: SQLiteStore, token_id: str) -> None:
    store.add_token(TokenRecord(token_id=token_id, kind="enrolment", secret_hash="0" * 64,
                                service_id="alpha", created_at=NOW,
                                expires_at=NOW + timedelta(hours=24)), actor="test")


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def test_many_threads_issuing_at_once_are_all_stored_and_audited(store: SQLiteStore,
                                                                  db_path: Path) -> None:
    records = [cert("alpha" if i % 2 else "beta") for i in range(400)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda r: store.add_certificate(r, actor="test"), records))
    assert count(db_path, "SELECT COUNT(*) FROM certificates") == 400
    assert count(db_path, "SELECT COUNT(*) FROM audit_log WHERE action='certificate.issue'") == 400
    for record in records[:: 37]:
        stored = store.get_certificate(record.serial)
        assert stored is not None and stored.fingerprint == record.fingerprint


def test_a_record_is_readable_as_soon_as_add_certificate_returns(store: SQLiteStore) -> None:
    for _ in range(20):
        record = cert()
        store.add_certificate(record, actor="test")
        assert store.get_certificate(record.serial) is not None


def _queue_behind_held_lock(store: SQLiteStore, jobs: list[object]) -> list[object]:
    """Run ``jobs`` (callables) in threads while the write lock is held, so that all but the
    first queue up and are committed together; return each job's result or exception."""
    results: list[object] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            results[i] = jobs[i]()  # type: ignore[operator]
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    with store._lock:  # the writer thread blocks on it with its first batch
        threads[0].start()
        wait_for(lambda: store._group._writer is not None and not store._group._pending)
        for t in threads[1:]:
            t.start()
        wait_for(lambda: len(store._group._pending) == len(jobs) - 1)
    for t in threads:
        t.join(timeout=30)
    return results


def test_a_duplicate_serial_in_a_batch_fails_alone(store: SQLiteStore, db_path: Path) -> None:
    first = cert()
    store.add_certificate(first, actor="test")
    good = [cert() for _ in range(6)]
    duplicate = cert(serial=int(first.serial, 16))  # same serial, other fingerprint
    jobs = [lambda r=r: store.add_certificate(r, actor="test") for r in good[:3]]
    jobs.append(lambda: store.add_certificate(duplicate, actor="test"))
    jobs += [lambda r=r: store.add_certificate(r, actor="test") for r in good[3:]]
    results = _queue_behind_held_lock(store, jobs)
    assert isinstance(results[3], Conflict), results
    assert [r for i, r in enumerate(results) if i != 3] == [None] * 6
    for record in good:
        assert store.get_certificate(record.serial) is not None
    assert store.get_certificate(first.serial).fingerprint == first.fingerprint  # type: ignore[union-attr]
    assert count(db_path, "SELECT COUNT(*) FROM certificates") == 7
    assert count(db_path, "SELECT COUNT(*) FROM audit_log WHERE action='certificate.issue'") == 7


def test_a_spent_token_in_a_batch_fails_alone_and_is_spent_once(store: SQLiteStore,
                                                                  db_path: Path) -> None:
    add_token(store, "tok000000001")
    wins, loses, other = cert(), cert(), cert()
    jobs = [
        lambda: store.add_certificate(other, actor="test"),
        lambda: store.add_certificate(wins, actor="enrol", consume_token="tok000000001"),
        lambda: store.add_certificate(loses, actor="enrol", consume_token="tok000000001"),
        lambda: store.add_certificate(cert(), actor="test"),
    ]
    results = _queue_behind_held_lock(store, jobs)
    assert results[0] is None and results[1] is None and results[3] is None
    assert isinstance(results[2], Conflict) and results[2].code == "invalid_token"
    assert store.get_certificate(wins.serial) is not None
    assert store.get_certificate(loses.serial) is None
    assert store.get_token("tok000000001").used_at is not None  # type: ignore[union-attr]
    assert count(db_path, "SELECT COUNT(*) FROM certificates") == 3


def test_submitted_certificates_share_a_batch_and_fail_alone(store: SQLiteStore, db_path: Path) -> None:
    add_token(store, "tok000000002")
    first = cert()
    store.add_certificate(first, actor="test")
    records = [cert() for _ in range(10)]
    taken: list[int] = []
    commit = store._group._commit

    def spy(batch: list[object]) -> None:
        taken.append(len(batch))
        commit(batch)  # type: ignore[arg-type]

    store._group._commit = spy  # type: ignore[assignment]
    answers: list[Future[list[BaseException | None]]] = [Future(), Future()]
    with store._lock:  # everything below queues behind the first batch, then goes in together
        store.submit_certificates([(r, "test", None) for r in records], answers[0].set_result)
        store.submit_certificates([(cert(serial=int(first.serial, 16)), "test", None),
                                   (cert(), "e", "tok000000002"), (cert(), "e", "tok000000002")],
                                  answers[1].set_result)
    results = answers[0].result(timeout=30) + answers[1].result(timeout=30)  # one call each
    assert results[:10] == [None] * 10
    assert isinstance(results[10], Conflict)
    assert [isinstance(r, Conflict) for r in results[11:]] == [False, True]
    assert count(db_path, "SELECT COUNT(*) FROM certificates") == 12
    assert sum(taken) == 13 and len(taken) <= 2  # two submissions, queued behind the lock


def test_close_commits_what_is_queued_and_stops_the_writer(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    store.add_service(ServiceRecord(service_id="alpha", service_name="alpha", created_at=NOW,
                                    updated_at=NOW), actor="test")
    records = [cert() for _ in range(50)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(store.add_certificate, r, actor="test") for r in records]
        for f in futures:
            f.result(timeout=30)
    writer = store._group._writer
    assert writer is not None and writer.is_alive()
    store.close()
    assert not writer.is_alive()
    store.close()  # idempotent
    with pytest.raises(RuntimeError):
        store.add_certificate(cert(), actor="test")
    assert count(db_path, "SELECT COUNT(*) FROM certificates") == 50
    assert not [t for t in threading.enumerate() if t.name == "sqlite-group-commit" and t is writer]


def test_close_while_callers_wait_answers_every_one(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    store.add_service(ServiceRecord(service_id="alpha", service_name="alpha", created_at=NOW,
                                    updated_at=NOW), actor="test")
    records = [cert() for _ in range(8)]
    jobs = [lambda r=r: store.add_certificate(r, actor="test") for r in records]
    results: list[object] = []
    taken: list[int] = []  # sizes of the batches the writer has taken (and waits to write)
    commit_batch = store._commit_batch

    def spy(batch: list[object]) -> None:
        taken.append(len(batch))
        commit_batch(batch)  # type: ignore[arg-type]

    store._group._commit = spy  # type: ignore[assignment]
    closer = threading.Thread(target=store.close)
    with store._lock:
        threads = [threading.Thread(target=lambda j=j: results.append(j())) for j in jobs]
        for t in threads:
            t.start()
        wait_for(lambda: sum(taken) + len(store._group._pending) == len(jobs))
        closer.start()
        wait_for(lambda: store._group._closed)
    closer.join(timeout=30)
    for t in threads:
        t.join(timeout=30)
    assert not closer.is_alive()
    assert results == [None] * len(jobs)  # queued before close: committed, not dropped
    assert count(db_path, "SELECT COUNT(*) FROM certificates") == len(jobs)


def test_a_store_that_never_wrote_closes_without_a_writer_thread(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    assert store._group._writer is None
    store.close()
