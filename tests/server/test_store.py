"""SQLiteStore-specific behaviour; what every backend must do is in test_store_contract.py."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from records import NOW, cert, service, token
from vcc_pki_server.errors import Conflict
from vcc_pki_server.store import CertificateQuery, CRLRecord
from vcc_pki_server.store.sqlite import SQLiteStore

CRLBuild = Callable[[int, list[tuple[str, datetime, str]]], CRLRecord]


def crl_builder() -> CRLBuild:
    """A stand-in for CA signing: the store only needs a numbered record back."""
    def build(number: int, revoked: list[tuple[str, datetime, str]]) -> CRLRecord:
        return CRLRecord(number=number, this_update=NOW, next_update=NOW + timedelta(days=7),
                         der=b"crl-%d" % number, entries=len(revoked))
    return build


def count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "pki.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(db_path)
    s.add_service(service("alpha"), actor="test")
    s.add_service(service("beta"), actor="test")
    yield s
    s.close()


# --- schema ----------------------------------------------------------------------------------

def test_database_is_in_wal_mode(store: SQLiteStore, db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --- uniqueness and atomicity ----------------------------------------------------------------

def test_batch_with_a_duplicate_serial_records_nothing(store: SQLiteStore, db_path: Path) -> None:
    existing = cert("alpha")
    store.add_certificate(existing, actor="test")
    batch = [(cert("alpha"), "test"), (cert("beta"), "test"),
             (cert("beta", serial=int(existing.serial, 16), fingerprint="e" * 64), "test")]
    with pytest.raises(Conflict):
        store.add_certificates(batch)
    assert count(db_path, "certificates") == 1
    assert all(store.get_certificate(r.serial) is None for r, _ in batch[:2])


def test_spent_token_cannot_record_a_second_certificate(store: SQLiteStore) -> None:
    store.add_token(token("alpha"), actor="test")
    store.add_certificate(cert("alpha"), actor="test", consume_token=token("alpha").token_id)
    second = cert("alpha")
    with pytest.raises(Conflict) as info:
        store.add_certificate(second, actor="test", consume_token=token("alpha").token_id)
    assert info.value.code == "invalid_token"
    assert store.get_certificate(second.serial) is None


def test_failed_crl_build_stores_nothing(store: SQLiteStore, db_path: Path) -> None:
    store.new_crl(crl_builder(), at=NOW, actor="test")
    audit_before = count(db_path, "audit_log")

    def broken(number: int, revoked: list[tuple[str, datetime, str]]) -> CRLRecord:
        raise ValueError("signing failed")

    with pytest.raises(ValueError):
        store.new_crl(broken, at=NOW, actor="test")
    assert store.latest_crl_number() == 1
    assert count(db_path, "audit_log") == audit_before
    assert store.new_crl(crl_builder(), at=NOW, actor="test").number == 2


def test_integrity_check_is_ok_after_writes(store: SQLiteStore) -> None:
    store.add_certificates([(cert("alpha"), "test") for _ in range(20)])
    store.new_crl(crl_builder(), at=NOW, actor="test")
    assert store.integrity_check() == "ok"


# --- queries ---------------------------------------------------------------------------------

# --- concurrency -----------------------------------------------------------------------------

def test_two_store_objects_writing_concurrently_lose_nothing(store: SQLiteStore, db_path: Path) -> None:
    writers = [SQLiteStore(db_path), SQLiteStore(db_path)]
    batches = [[cert("alpha") for _ in range(150)], [cert("beta") for _ in range(150)]]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def write(index: int) -> None:
        barrier.wait()
        try:
            for record in batches[index]:
                writers[index].add_certificate(record, actor=f"writer-{index}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for w in writers:
            w.close()
    assert errors == []
    stored = store.list_certificates(CertificateQuery(now=NOW, limit=1000))
    assert {r.serial for r in stored} == {r.serial for batch in batches for r in batch}
    assert len(stored) == 300
    issues = [e for e in store.audit_log(limit=1000) if e.action == "certificate.issue"]
    assert len(issues) == 300
    assert store.integrity_check() == "ok"
