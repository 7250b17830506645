"""SQLiteStore: schema, uniqueness, filters, pagination, WAL, and concurrent writers losing nothing."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest

from records import NOW, cert, service, token
from vcc_pki_server.errors import CAError, Conflict, NotFound
from vcc_pki_server.store import CertificateQuery, CRLRecord
from vcc_pki_server.store.sqlite import MIGRATIONS, SQLiteStore

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

def test_new_store_is_at_the_latest_schema_version(store: SQLiteStore) -> None:
    assert store.schema_version() == len(MIGRATIONS)
    assert store.integrity_check() == "ok"


def test_reopening_keeps_data_and_does_not_rerun_migrations(store: SQLiteStore, db_path: Path) -> None:
    record = cert("alpha")
    store.add_certificate(record, actor="test")
    store.close()
    with sqlite3.connect(db_path) as db:
        cookie = db.execute("PRAGMA schema_version").fetchone()[0]
    reopened = SQLiteStore(db_path)
    try:
        assert reopened.schema_version() == len(MIGRATIONS)
        stored = reopened.get_certificate(record.serial)
        assert stored is not None
        assert attrs.evolve(stored, row_id=None) == record
        assert [s.service_id for s in reopened.list_services()] == ["alpha", "beta"]
    finally:
        reopened.close()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA schema_version").fetchone()[0] == cookie


def test_store_refuses_a_database_from_a_newer_version(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS) + 1,))
    with pytest.raises(CAError, match="newer"):
        SQLiteStore(db_path)


def test_database_is_in_wal_mode(store: SQLiteStore, db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --- uniqueness and atomicity ----------------------------------------------------------------

def test_same_serial_twice_is_a_conflict_and_nothing_is_half_written(store: SQLiteStore,
                                                                     db_path: Path) -> None:
    first = cert("alpha")
    store.add_token(token("alpha"), actor="test")
    store.add_certificate(first, actor="test")
    audit_before = count(db_path, "audit_log")
    duplicate = cert("beta", serial=int(first.serial, 16), fingerprint="f" * 64)
    with pytest.raises(Conflict, match=first.serial):
        store.add_certificate(duplicate, actor="test", consume_token=token("alpha").token_id)
    assert count(db_path, "certificates") == 1
    assert count(db_path, "audit_log") == audit_before
    spent = store.get_token(token("alpha").token_id)
    assert spent is not None and spent.used_at is None  # the token survived the failed write
    stored = store.get_certificate(first.serial)
    assert stored is not None and stored.service_id == "alpha"


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


def test_revoking_twice_is_a_conflict_and_unknown_serial_is_not_found(store: SQLiteStore) -> None:
    record = cert("alpha")
    store.add_certificate(record, actor="test")
    store.revoke_certificate(record.serial, reason="keyCompromise", at=NOW, actor="test")
    with pytest.raises(Conflict) as info:
        store.revoke_certificate(record.serial, reason="superseded", at=NOW, actor="test")
    assert info.value.code == "already_revoked"
    with pytest.raises(NotFound):
        store.revoke_certificate("abcdef", reason="superseded", at=NOW, actor="test")
    assert store.revoked() == [(record.serial, NOW, "keyCompromise")]


def test_failed_crl_build_stores_nothing(store: SQLiteStore, db_path: Path) -> None:
    store.new_crl(crl_builder(), actor="test")
    audit_before = count(db_path, "audit_log")

    def broken(number: int, revoked: list[tuple[str, datetime, str]]) -> CRLRecord:
        raise ValueError("signing failed")

    with pytest.raises(ValueError):
        store.new_crl(broken, actor="test")
    assert store.latest_crl_number() == 1
    assert count(db_path, "audit_log") == audit_before
    assert store.new_crl(crl_builder(), actor="test").number == 2


def test_integrity_check_is_ok_after_writes(store: SQLiteStore) -> None:
    store.add_certificates([(cert("alpha"), "test") for _ in range(20)])
    store.new_crl(crl_builder(), actor="test")
    assert store.integrity_check() == "ok"


# --- queries ---------------------------------------------------------------------------------

def test_list_certificates_filters_by_status_expiry_and_service(store: SQLiteStore) -> None:
    valid = cert("alpha")
    expiring = cert("alpha", not_after=NOW + timedelta(days=10))
    expired = cert("alpha", not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1))
    revoked = cert("alpha")
    future = cert("alpha", not_before=NOW + timedelta(days=1))
    other = cert("beta", not_after=NOW + timedelta(days=5))
    store.add_certificates([(r, "test") for r in (valid, expiring, expired, revoked, future, other)])
    store.revoke_certificate(revoked.serial, reason="superseded", at=NOW, actor="test")

    def serials(**kwargs: Any) -> list[str]:
        return [r.serial for r in store.list_certificates(CertificateQuery(now=NOW, **kwargs))]

    assert serials(status="valid") == [valid.serial, expiring.serial, other.serial]
    assert serials(status="revoked") == [revoked.serial]
    assert serials(status="expired") == [expired.serial]
    assert serials(expiring_before=NOW + timedelta(days=30)) == [expiring.serial, other.serial]
    assert serials(service_id="beta") == [other.serial]
    assert serials(service_id="alpha", expiring_before=NOW + timedelta(days=30)) == [expiring.serial]
    assert len(serials()) == 6
    # The same rows seen from a later moment: what was valid has expired.
    later = [r.serial for r in store.list_certificates(
        CertificateQuery(now=NOW + timedelta(days=200), status="expired"))]
    assert later == [valid.serial, expiring.serial, expired.serial, future.serial, other.serial]
    statuses = {r.serial: r.status(NOW) for r in store.certificates_for("alpha")}
    assert statuses[future.serial] == "not_yet_valid" and statuses[revoked.serial] == "revoked"


@pytest.mark.parametrize(("service_id", "expected"), [(None, 250), ("alpha", 125)])
def test_cursor_pagination_has_no_duplicates_or_gaps(store: SQLiteStore, service_id: str | None,
                                                     expected: int) -> None:
    records = [cert("alpha" if i % 2 == 0 else "beta") for i in range(250)]
    store.add_certificates([(r, "test") for r in records])
    wanted = [r.serial for r in records if service_id is None or r.service_id == service_id]
    seen: list[str] = []
    after: int | None = None
    pages = 0
    while True:
        query = CertificateQuery(now=NOW, service_id=service_id, limit=37, after=after)
        page = store.list_certificates(query)
        if not page:
            break
        pages += 1
        assert len(page) <= 37
        seen += [r.serial for r in page]
        after = page[-1].row_id
    assert seen == wanted
    assert len(seen) == expected == len(set(seen))
    assert pages == -(-expected // 37)


# --- concurrency -----------------------------------------------------------------------------

@pytest.mark.parametrize("separate_stores", [False, True], ids=["one-store", "two-stores"])
def test_crl_numbers_strictly_increase_under_concurrent_generation(db_path: Path,
                                                                   separate_stores: bool) -> None:
    stores = [SQLiteStore(db_path)]
    stores.append(SQLiteStore(db_path) if separate_stores else stores[0])
    numbers: list[list[int]] = [[], []]
    barrier = threading.Barrier(2)

    def generate(index: int) -> None:
        barrier.wait()
        for _ in range(20):
            numbers[index].append(stores[index].new_crl(crl_builder(), actor=f"t{index}").number)

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        for per_thread in numbers:
            assert per_thread == sorted(per_thread) and len(set(per_thread)) == 20
        assert sorted(numbers[0] + numbers[1]) == list(range(1, 41))
        assert stores[0].latest_crl_number() == 40
        assert [c.number for c in stores[0].list_crls(limit=100)] == list(range(40, 0, -1))
    finally:
        for s in {id(s): s for s in stores}.values():
            s.close()


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


def test_superseded_crl_bodies_are_dropped_but_their_history_is_listed(store: SQLiteStore,
                                                                       db_path: Path) -> None:
    made = [store.new_crl(crl_builder(), actor="t") for _ in range(5)]
    with sqlite3.connect(db_path) as db:
        bodies = dict(db.execute("SELECT number, length(der) FROM crls").fetchall())
    db.close()
    assert bodies == {1: 0, 2: 0, 3: 0, 4: len(made[3].der), 5: len(made[4].der)}
    assert store.latest_crl() == made[4]
    assert [(c.number, c.entries) for c in store.list_crls()] == [(c.number, c.entries) for c in made[::-1]]
