"""The Store contract, run against both backends: SQLite (a temp file) and PostgreSQL (a fresh database)."""

from __future__ import annotations

import contextlib
import itertools
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
from vcc_pki_server.store import CertificateQuery, CRLRecord, Health, Store
from vcc_pki_server.store.sqlite import MIGRATIONS, SQLiteStore


@attrs.frozen
class Backend:
    """One database, and how to open store objects on it and look inside it directly."""

    name: str
    open: Callable[[], Store]
    rows: Callable[[str], list[tuple[Any, ...]]]
    schema_stamp: Callable[[], Any]  # changes if a migration runs again

    def count(self, table: str) -> int:
        return int(self.rows(f"SELECT COUNT(*) FROM {table}")[0][0])


def _sqlite(path: Path) -> Backend:
    def rows(sql: str) -> list[tuple[Any, ...]]:
        db = sqlite3.connect(path)
        try:
            with db:
                return list(db.execute(sql).fetchall())
        finally:
            db.close()

    return Backend("sqlite", lambda: SQLiteStore(path), rows,
                   lambda: rows("PRAGMA schema_version")[0][0])


def _postgres(dsn: str) -> Backend:
    import psycopg

    from vcc_pki_server.store.postgres import PostgresStore

    def rows(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn, autocommit=True) as db:
            cur = db.execute(sql.encode())
            return list(cur.fetchall()) if cur.description else []

    return Backend("postgres", lambda: PostgresStore(dsn), rows,
                   lambda: rows("SELECT (SELECT oid FROM pg_class WHERE relname = 'certificates'), "
                                "(SELECT xmin::text FROM schema_version)"))


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return _sqlite(tmp_path / "pki.db")
    return _postgres(request.getfixturevalue("pg_database"))


@pytest.fixture
def store(backend: Backend) -> Iterator[Store]:
    s = backend.open()
    s.add_service(service("alpha"), actor="test")
    s.add_service(service("beta"), actor="test")
    yield s
    s.close()


def crl_builder(seen: dict[int, set[str]] | None = None) -> Callable[..., CRLRecord]:
    def build(number: int, revoked: list[tuple[str, datetime, str]]) -> CRLRecord:
        if seen is not None:
            seen[number] = {serial for serial, _, _ in revoked}
        return CRLRecord(number=number, this_update=NOW, next_update=NOW + timedelta(days=7),
                         der=b"crl-%d" % number, entries=len(revoked))
    return build


def run_threads(count: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()


# --- schema ----------------------------------------------------------------------------------

def test_schema_is_at_the_latest_version_and_reopening_does_not_migrate_again(backend: Backend) -> None:
    first = backend.open()
    record = cert("alpha")
    try:
        assert first.schema_version() == len(MIGRATIONS)  # type: ignore[attr-defined]
        assert first.integrity_check() == "ok"  # type: ignore[attr-defined]
        first.add_service(service("alpha"), actor="test")
        first.add_certificate(record, actor="test")
    finally:
        first.close()
        first.close()  # idempotent
    stamp = backend.schema_stamp()
    again = backend.open()
    try:
        assert again.schema_version() == len(MIGRATIONS)  # type: ignore[attr-defined]
        stored = again.get_certificate(record.serial)
        assert stored is not None and attrs.evolve(stored, row_id=None) == record
    finally:
        again.close()
    assert backend.schema_stamp() == stamp


def test_postgres_stores_opened_together_on_a_new_database_migrate_once(pg_database: str) -> None:
    # PostgreSQL only: replicas starting together queue on an advisory lock. (SQLite's switch to
    # WAL on a brand-new file can fail with "database is locked" under concurrent first opens;
    # there `init` creates the file before any worker starts.)
    backend = _postgres(pg_database)
    opened: list[Store] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start(_: int) -> None:
        barrier.wait()
        try:
            opened.append(backend.open())
        except BaseException as exc:  # reported below
            errors.append(exc)

    run_threads(4, start)
    try:
        assert errors == []
        assert backend.rows("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]
    finally:
        for s in opened:
            s.close()


def _fingerprint_indexes(backend: Backend) -> list[str]:
    if backend.name == "sqlite":
        return [name for (name,) in backend.rows("SELECT name FROM pragma_index_list('certificates')")
                if ("fingerprint",) in backend.rows(f"SELECT name FROM pragma_index_info('{name}')")]
    return [d for (d,) in backend.rows("SELECT indexdef FROM pg_indexes WHERE tablename = 'certificates'")
            if "fingerprint" in d]


def _sql_text(value: Any) -> str:
    return "NULL" if value is None else "'" + str(value).replace("'", "''") + "'"


def test_a_version_1_database_migrates_keeping_every_row(backend: Backend, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # Version 1 had a UNIQUE index on fingerprint (2 drops it); 3 adds certificates.key_id and
    # services.decommissioned_at. The version-1 rows are written as version 1 wrote them.
    from vcc_pki_server.store import postgres, sqlite, utc_text
    from vcc_pki_server.store.rows import certificate_rows, service_params

    module = sqlite if backend.name == "sqlite" else postgres
    with monkeypatch.context() as patch:
        patch.setattr(module, "MIGRATIONS", module.MIGRATIONS[:1])
        backend.open().close()
    records = [attrs.evolve(cert("alpha"), key_id="") for _ in range(3)]
    v1_service = service_params(service("alpha"))[:10] + service_params(service("alpha"))[-1:]
    backend.rows("INSERT INTO services (service_name, endpoints, health_check_url, version, owner, metadata, "
                 "san_dns, san_ip, created_at, updated_at, service_id) VALUES ("
                 + ",".join(map(_sql_text, v1_service)) + ")")
    for record in records:
        row = certificate_rows(record, "test")[0][:10]  # without key_id
        backend.rows("INSERT INTO certificates (serial, service_id, subject, san_dns, san_ip, not_before, "
                     "not_after, fingerprint, pem, issued_at) VALUES (" + ",".join(map(_sql_text, row)) + ")")
    backend.rows(f"INSERT INTO revocations (serial, revoked_at, reason) VALUES "
                 f"({_sql_text(records[1].serial)}, {_sql_text(utc_text(NOW))}, 'keyCompromise')")
    assert backend.rows("SELECT version FROM schema_version") == [(1,)]
    assert _fingerprint_indexes(backend) != []

    with caplog.at_level("INFO", logger="vcc_pki_server.store"):
        migrated = backend.open()
    if backend.name == "sqlite":  # the table rebuild takes seconds on a large store: said first
        assert "migrating from schema version 1 to 6" in caplog.text
    try:
        assert migrated.schema_version() == len(MIGRATIONS) == 6  # type: ignore[attr-defined]
        kept = {r.serial: attrs.evolve(r, row_id=None, revoked_at=None, revocation_reason=None)
                for r in migrated.certificates_for("alpha")}
        assert kept == {r.serial: r for r in records}
        assert [serial for serial, _, _ in migrated.revoked()] == [records[1].serial]
        # The revocation learnt its certificate's notAfter (what the CRL's query reads).
        assert backend.rows("SELECT not_after FROM revocations") == [(utc_text(records[1].not_after),)]
        newer = cert("alpha")
        migrated.add_certificate(newer, actor="test")
        stored = migrated.get_certificate(newer.serial)
        assert stored is not None and stored.row_id is not None and stored.key_id == newer.key_id != ""
        assert stored.row_id > max(r.row_id or 0 for r in migrated.certificates_for("alpha") if r != stored)
        with pytest.raises(Conflict):  # the serial is still unique
            migrated.add_certificate(attrs.evolve(cert("alpha"), serial=newer.serial), actor="test")
    finally:
        migrated.close()
    assert _fingerprint_indexes(backend) == []
    if backend.name == "sqlite":
        assert backend.rows("PRAGMA foreign_key_check") == []
        assert backend.rows("PRAGMA integrity_check") == [("ok",)]


def test_a_database_from_a_newer_version_is_refused(backend: Backend) -> None:
    backend.open().close()
    backend.rows(f"UPDATE schema_version SET version = {len(MIGRATIONS) + 1}")
    with pytest.raises(CAError, match="newer"):
        backend.open()


# --- uniqueness and atomicity ----------------------------------------------------------------

def test_same_serial_twice_is_a_conflict_and_nothing_is_half_written(store: Store, backend: Backend) -> None:
    first = cert("alpha")
    store.add_token(token("alpha"), actor="test")
    store.add_certificate(first, actor="test")
    audit_before = backend.count("audit_log")
    duplicate = cert("beta", serial=int(first.serial, 16), fingerprint="f" * 64)
    with pytest.raises(Conflict, match=first.serial):
        store.add_certificate(duplicate, actor="test", consume_token=token("alpha").token_id)
    assert backend.count("certificates") == 1
    assert backend.count("audit_log") == audit_before
    kept = store.get_token(token("alpha").token_id)
    assert kept is not None and kept.used_at is None  # the token survived the failed write
    batch = [(cert("alpha"), "test"), (duplicate, "test")]
    with pytest.raises(Conflict):
        store.add_certificates(batch)
    assert backend.count("certificates") == 1
    assert store.get_certificate(batch[0][0].serial) is None


def test_revoke_then_again_is_already_revoked_and_unknown_serial_is_not_found(store: Store) -> None:
    record = cert("alpha")
    store.add_certificate(record, actor="test")
    revoked = store.revoke_certificates(record.serial, reason="keyCompromise", at=NOW, actor="test").record
    assert revoked.revoked_at == NOW and revoked.status(NOW) == "revoked"
    with pytest.raises(Conflict) as info:
        store.revoke_certificates(record.serial, reason="superseded", at=NOW, actor="test")
    assert info.value.code == "already_revoked"
    with pytest.raises(NotFound):
        store.revoke_certificates("abcdef", reason="superseded", at=NOW, actor="test")
    assert store.revoked() == [(record.serial, NOW, "keyCompromise")]


def test_a_token_is_consumed_exactly_once_by_eight_concurrent_writers(store: Store, backend: Backend) -> None:
    store.add_token(token("alpha"), actor="test")
    writers = [backend.open() for _ in range(4)]  # two threads per store object
    records = [cert("alpha") for _ in range(8)]
    outcomes: list[str] = [""] * 8
    barrier = threading.Barrier(8)

    def enrol(index: int) -> None:
        barrier.wait()
        try:
            writers[index % 4].add_certificate(records[index], actor="enrolment",
                                               consume_token=token("alpha").token_id)
            outcomes[index] = "ok"
        except Conflict as exc:
            outcomes[index] = exc.code

    try:
        run_threads(8, enrol)
    finally:
        for w in writers:
            w.close()
    assert sorted(outcomes) == ["invalid_token"] * 7 + ["ok"]
    assert len(store.certificates_for("alpha")) == 1
    spent = store.get_token(token("alpha").token_id)
    assert spent is not None and spent.used_at == NOW
    issues = [e for e in store.audit_log(limit=100) if e.action == "certificate.issue"]
    assert len(issues) == 1


def test_text_a_backend_cannot_hold_is_a_core_error_not_a_driver_error(store: Store) -> None:
    # PostgreSQL text cannot hold NUL; SQLite can. Either way no driver exception escapes.
    with contextlib.suppress(CAError):
        store.add_service(service("nul\x00id"), actor="test")
    with contextlib.suppress(CAError):
        store.get_service("nul\x00id")


# --- queries ---------------------------------------------------------------------------------

def test_list_certificates_filters_and_paginates_by_cursor(store: Store) -> None:
    valid = cert("alpha")
    expiring = cert("alpha", not_after=NOW + timedelta(days=10))
    expired = cert("alpha", not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1))
    revoked = cert("alpha")
    future = cert("alpha", not_before=NOW + timedelta(days=1))
    other = cert("beta", not_after=NOW + timedelta(days=5))
    store.add_certificates([(r, "test") for r in (valid, expiring, expired, revoked, future, other)])
    store.revoke_certificates(revoked.serial, reason="superseded", at=NOW, actor="test")

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

    records = [cert("alpha" if i % 2 == 0 else "beta") for i in range(250)]
    store.add_certificates([(r, "test") for r in records])
    for service_id in (None, "alpha"):
        wanted = [r.serial for r in records if service_id is None or r.service_id == service_id]
        seen: list[str] = []
        after = max(r.row_id or 0 for r in store.list_certificates(CertificateQuery(now=NOW, limit=6)))
        while page := store.list_certificates(
                CertificateQuery(now=NOW, service_id=service_id, limit=37, after=after)):
            assert len(page) <= 37
            seen += [r.serial for r in page]
            after = page[-1].row_id
        assert seen == wanted and len(set(seen)) == len(wanted)



@pytest.mark.parametrize("sparse_status", [SQLiteStore.SPARSE_STATUS, 0])
def test_sqlite_lists_rare_statuses_the_same_whichever_way_it_finds_them(tmp_path: Path,
                                                                          sparse_status: int) -> None:
    # Few revoked or expired among many: found from their own rows (the default), or by walking
    # all certificates in id order (SPARSE_STATUS 0); the pages must be the same.
    store = SQLiteStore(tmp_path / "pki.db")
    store.SPARSE_STATUS = sparse_status  # type: ignore[misc]
    try:
        store.add_service(service("alpha"), actor="test")
        records = [cert("alpha", not_after=NOW - timedelta(days=1)) if i % 40 == 7 else cert("alpha")
                   for i in range(400)]
        store.add_certificates([(r, "test") for r in records])
        revoked = [r.serial for r in records[3::50]]
        for serial in reversed(revoked):  # revoked out of id order
            store.revoke_certificates(serial, reason="superseded", at=NOW, actor="test")
        expired = [r.serial for r in records if r.not_after < NOW and r.serial not in revoked]

        def pages(status: str) -> list[str]:
            seen: list[str] = []
            after = None
            for _ in range(20):  # a cursor that does not move must fail, not hang
                page = store.list_certificates(CertificateQuery(now=NOW, status=status, limit=3, after=after))
                if not page:
                    return seen
                seen += [r.serial for r in page]
                after = page[-1].row_id
            raise AssertionError(f"status={status}: pages never ended: {seen}")

        assert pages("revoked") == revoked and len(revoked) == 8
        assert pages("expired") == expired and len(expired) == 10
        listed = store.list_certificates(CertificateQuery(now=NOW, status="revoked", limit=1))
        assert listed[0].revocation_reason == "superseded" and listed[0].revoked_at == NOW
    finally:
        store.close()

def test_services_add_update_list_and_filter_by_health(store: Store) -> None:
    with pytest.raises(Conflict):
        store.add_service(service("alpha"), actor="test")
    gamma = attrs.evolve(service("gamma"), metadata={"team": "pay", "tier": 1}, endpoints=("https://g",))
    store.add_service(gamma, actor="test")
    updated = attrs.evolve(gamma, version="2.0", updated_at=NOW + timedelta(hours=1))
    store.update_service(updated, actor="test")
    with pytest.raises(NotFound):
        store.update_service(service("nobody"), actor="test")
    assert store.get_service("gamma") == updated
    assert store.get_service("nobody") is None
    store.record_health("beta", Health(status="healthy", last_checked=NOW, consecutive_failures=0),
                        event="service.healthy")
    assert [s.service_id for s in store.list_services(healthy=True)] == ["beta"]
    assert [s.service_id for s in store.list_services(healthy=False)] == ["alpha", "gamma"]
    assert [s.service_id for s in store.list_services(limit=2)] == ["alpha", "beta"]
    assert [s.service_id for s in store.list_services(after="beta")] == ["gamma"]
    beta = store.get_service("beta")
    assert beta is not None and beta.health == Health(status="healthy", last_checked=NOW)


def test_tokens_duplicate_revoke_twice_and_unknown_are_clear_errors_that_change_nothing(
        store: Store, backend: Backend) -> None:
    first = token("alpha")
    store.add_token(first, actor="admin:1")
    audit_rows = backend.count("audit_log")
    with pytest.raises(Conflict, match="already exists"):
        store.add_token(attrs.evolve(first, name="again"), actor="admin:1")
    assert backend.count("tokens") == 1 and backend.count("audit_log") == audit_rows
    revoked = store.revoke_token(first.token_id, at=NOW, actor="admin:1")
    assert revoked.revoked_at == NOW and store.get_token(first.token_id) == revoked
    with pytest.raises(Conflict, match="already revoked"):
        store.revoke_token(first.token_id, at=NOW + timedelta(hours=1), actor="admin:1")
    with pytest.raises(NotFound):
        store.revoke_token("nosuchtoken", at=NOW, actor="admin:1")
    assert store.get_token(first.token_id) == revoked
    assert backend.count("audit_log") == audit_rows + 1
    assert [t.token_id for t in store.list_tokens("enrolment")] == [first.token_id]
    assert store.list_tokens("admin") == []

def test_every_change_writes_its_audit_row(store: Store) -> None:
    record = cert("alpha")
    store.add_token(token("alpha"), actor="admin:1")
    store.add_certificate(record, actor="enrolment:1", consume_token=token("alpha").token_id)
    store.update_service(service("alpha"), actor="admin:1")
    store.revoke_certificates(record.serial, reason="superseded", at=NOW, actor="admin:1")
    store.new_crl(crl_builder(), at=NOW, actor="system:crl")
    store.revoke_token(token("alpha").token_id, at=NOW, actor="admin:1")
    entries = store.audit_log(limit=100)
    assert [e.action for e in entries][::-1] == [
        "service.register", "service.register", "token.create.enrolment", "certificate.issue",
        "service.update", "certificate.revoke", "crl.generate", "token.revoke.enrolment"]
    assert entries[2].serial == record.serial and entries[2].details == {"reason": "superseded"}
    assert [e.action for e in store.audit_log(service_id="beta")] == ["service.register"]


# --- CRLs ------------------------------------------------------------------------------------

def test_crl_numbers_strictly_increase_and_the_newest_sees_every_revocation(store: Store,
                                                                           backend: Backend) -> None:
    records = [cert("alpha") for _ in range(10)]
    store.add_certificates([(r, "test") for r in records])
    stores = [backend.open(), backend.open()]
    seen: dict[int, set[str]] = {}
    numbers: list[list[int]] = [[], [], []]
    barrier = threading.Barrier(3)

    def work(index: int) -> None:
        barrier.wait()
        if index < 2:
            for _ in range(12):
                numbers[index].append(stores[index].new_crl(crl_builder(seen), at=NOW, actor=f"t{index}").number)
        else:  # revoke, then publish, as the authority does
            for record in records:
                store.revoke_certificates(record.serial, reason="superseded", at=NOW, actor="t2")
                numbers[2].append(store.new_crl(crl_builder(seen), at=NOW, actor="t2").number)

    try:
        run_threads(3, work)
    finally:
        for s in stores:
            s.close()
    for per_thread in numbers:
        assert per_thread == sorted(per_thread) and len(set(per_thread)) == len(per_thread)
    assert sorted(numbers[0] + numbers[1] + numbers[2]) == list(range(1, 35))
    # A CRL never drops what an earlier one listed, and the newest lists every revocation.
    ordered = [seen[n] for n in sorted(seen)]
    assert all(a <= b for a, b in itertools.pairwise(ordered))
    assert ordered[-1] == {r.serial for r in records}
    latest = store.latest_crl()
    assert latest is not None and latest.number == 34 and latest.entries == 10


def test_crl_history_keeps_fifty_rows_and_two_bodies(store: Store, backend: Backend) -> None:
    made = [store.new_crl(crl_builder(), at=NOW, actor="t") for _ in range(53)]
    bodies = dict(backend.rows("SELECT number, length(der) FROM crls"))
    assert sorted(bodies) == list(range(3, 54))
    assert {n for n, size in bodies.items() if size} == {52, 53}
    assert store.latest_crl() == made[-1]
    assert [c.number for c in store.list_crls(limit=3)] == [53, 52, 51]
    assert all(c.der == b"" for c in store.list_crls(limit=3))
    assert store.latest_crl_number() == 53


# --- selecting the backend -------------------------------------------------------------------

def test_home_opens_postgres_from_the_environment_before_config_toml(
        pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vcc_pki_server.config import Config
    from vcc_pki_server.errors import CAUnavailable
    from vcc_pki_server.home import Home
    from vcc_pki_server.store.postgres import PostgresStore

    monkeypatch.delenv("VCC_PKI_DATABASE_URL", raising=False)
    home = Home(tmp_path / "home")
    home.ensure()
    s = home.open_store()
    assert isinstance(s, SQLiteStore)
    s.close()
    unreachable = "postgresql://vcc:secret-pw@127.0.0.1:1/vcc"
    home.save_config(Config(database_url=unreachable))
    assert home.config().database_url == unreachable and "secret-pw" not in repr(home.config())
    with pytest.raises(CAUnavailable) as info:
        home.open_store()
    assert "127.0.0.1:1/vcc" in str(info.value) and "secret-pw" not in str(info.value)
    monkeypatch.setenv("VCC_PKI_DATABASE_URL", pg_database)
    s = home.open_store()
    try:
        assert isinstance(s, PostgresStore)
    finally:
        s.close()


def test_a_crl_lists_a_revoked_certificate_until_its_not_after(store: Store) -> None:
    """CRL hygiene (SPEC §10): an expired certificate leaves the first CRL built after its notAfter."""
    store.add_service(service("hyg"), actor="test")
    short = cert("hyg", not_after=NOW + timedelta(hours=1))
    long = cert("hyg", not_after=NOW + timedelta(days=30))
    for record in (short, long):
        store.add_certificate(record, actor="test")
        store.revoke_certificates(record.serial, reason="superseded", at=NOW, actor="test")
    seen: dict[int, set[str]] = {}
    first = store.new_crl(crl_builder(seen), at=NOW, actor="t")
    at_expiry = store.new_crl(crl_builder(seen), at=short.not_after, actor="t")
    later = store.new_crl(crl_builder(seen), at=NOW + timedelta(days=2), actor="t")
    assert seen[first.number] == {short.serial, long.serial} and first.entries == 2
    assert seen[at_expiry.number] == {long.serial} == seen[later.number]
    assert later.entries == 1
    assert {serial for serial, _, _ in store.revoked()} == {short.serial, long.serial}  # the record stays


def test_a_revocation_and_its_crl_are_stored_together_or_not_at_all(store: Store) -> None:
    """SPEC §10 / issue 18: no crash between the two can leave a revoked serial off the CRL."""
    store.add_service(service("atom"), actor="test")
    record = cert("atom")
    store.add_certificate(record, actor="test")

    def broken(number: int, revoked: list[tuple[str, datetime, str]]) -> CRLRecord:
        raise RuntimeError("the signing failed half way")

    with pytest.raises(RuntimeError):
        store.revoke_certificates(record.serial, reason="superseded", at=NOW, actor="t",
                                  publish=lambda issuer: broken)
    assert store.revoked() == [] and store.latest_crl() is None  # nothing of it stayed
    seen: dict[int, set[str]] = {}
    done = store.revoke_certificates(record.serial, reason="superseded", at=NOW, actor="t",
                                     publish=lambda issuer: crl_builder(seen))
    assert done.crl is not None and seen[done.crl.number] == {record.serial}
    assert store.latest_crl_number() == done.crl.number


def test_shared_state_is_compare_and_set(store: Store) -> None:
    """What every server of a cluster shares (the server certificate): a version per value, and
    a write that expected another version changes nothing."""
    assert store.shared_state("thing") is None
    assert store.put_shared_state("thing", b"first", replaces=0, at=NOW, actor="test")
    assert not store.put_shared_state("thing", b"second first", replaces=0, at=NOW, actor="test")
    assert store.shared_state("thing") == (1, b"first")
    assert store.put_shared_state("thing", b"\x00binary\xff", replaces=1, at=NOW, actor="test")
    assert not store.put_shared_state("thing", b"stale", replaces=1, at=NOW, actor="test")
    assert store.shared_state("thing") == (2, b"\x00binary\xff")
    assert [e.action for e in store.audit_log(limit=2)] == ["shared_state.update", "shared_state.update"]
