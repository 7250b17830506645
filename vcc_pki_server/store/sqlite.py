"""SQLiteStore: the embedded store (WAL, one writer at a time, every change audited). The only SQL."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs

from ..errors import CAError, Conflict, NotFound

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]
from . import (AuditEntry, CertificateQuery, CertificateRecord, CRLRecord, Health, ServiceRecord,
               TokenRecord, dumps, parse_utc, utc_text)
from .rows import (AUDIT_COLUMNS, CERT_COLUMNS, CERT_FROM, CRL_COLUMNS, SERVICE_COLUMNS, TOKEN_COLUMNS,
                   audit_entry, certificate_record, crl_record, opt_text, service_params,
                   service_record, token_record)

log = logging.getLogger(__name__)

# Ordered forward migrations; the index + 1 is the schema version they lead to.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE services (
        service_id TEXT PRIMARY KEY,
        service_name TEXT NOT NULL,
        endpoints TEXT NOT NULL DEFAULT '[]',
        health_check_url TEXT,
        version TEXT,
        owner TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        san_dns TEXT NOT NULL DEFAULT '[]',
        san_ip TEXT NOT NULL DEFAULT '[]',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        health_status TEXT NOT NULL DEFAULT 'unknown',
        last_checked TEXT,
        last_error TEXT,
        consecutive_failures INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE certificates (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        serial TEXT NOT NULL UNIQUE,
        service_id TEXT NOT NULL REFERENCES services(service_id),
        subject TEXT NOT NULL,
        san_dns TEXT NOT NULL,
        san_ip TEXT NOT NULL,
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        fingerprint TEXT NOT NULL UNIQUE,
        pem TEXT NOT NULL,
        issued_at TEXT NOT NULL
    );
    CREATE INDEX certificates_service ON certificates(service_id, id);
    CREATE INDEX certificates_not_after ON certificates(not_after);
    CREATE TABLE revocations (
        serial TEXT PRIMARY KEY REFERENCES certificates(serial),
        revoked_at TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE TABLE crls (
        number INTEGER PRIMARY KEY,
        this_update TEXT NOT NULL,
        next_update TEXT NOT NULL,
        entries INTEGER NOT NULL,
        der BLOB NOT NULL
    );
    CREATE TABLE tokens (
        token_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('admin', 'enrolment')),
        secret_hash TEXT NOT NULL,
        name TEXT,
        service_id TEXT,
        created_at TEXT NOT NULL,
        expires_at TEXT,
        used_at TEXT,
        revoked_at TEXT
    );
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        service_id TEXT,
        serial TEXT,
        details TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_service ON audit_log(service_id, id);
    """,
    # 2: no UNIQUE index on fingerprint. Certificates are found by serial (itself unique, and a
    # fingerprint is of the whole DER, serial included); a second index of random keys cost
    # every issuance half as many WAL pages again (4.5 against 3.0 per certificate in batches
    # of 16) and the commit about twice the CPU. SQLite cannot drop a constraint's index, so
    # the table is rebuilt (sqlite.org/lang_altertable.html, "other kinds of table schema
    # changes"; foreign keys are off during migrations and checked after them).
    """
    CREATE TABLE certificates_v2 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        serial TEXT NOT NULL UNIQUE,
        service_id TEXT NOT NULL REFERENCES services(service_id),
        subject TEXT NOT NULL,
        san_dns TEXT NOT NULL,
        san_ip TEXT NOT NULL,
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        pem TEXT NOT NULL,
        issued_at TEXT NOT NULL
    );
    INSERT INTO certificates_v2 SELECT id, serial, service_id, subject, san_dns, san_ip, not_before,
        not_after, fingerprint, pem, issued_at FROM certificates ORDER BY id;
    DROP TABLE certificates;
    ALTER TABLE certificates_v2 RENAME TO certificates;
    CREATE INDEX certificates_service ON certificates(service_id, id);
    CREATE INDEX certificates_not_after ON certificates(not_after)
    """,
)


_INSERT_CERTIFICATE = ("INSERT INTO certificates (serial, service_id, subject, san_dns, san_ip, "
                       "not_before, not_after, fingerprint, pem, issued_at) VALUES (?,?,?,?,?,?,?,?,?,?)")
_INSERT_AUDIT = "INSERT INTO audit_log (at, actor, action, service_id, serial, details) VALUES (?,?,?,?,?,?)"


def _insert_rows(db: sqlite3.Connection, insert: str, rows: list[tuple[Any, ...]]) -> None:
    """``executemany(insert, rows)`` as multi-row INSERTs of at most 32 rows.

    Fewer statements: the sqlite3 module lets go of the GIL around every step, and in the
    writer thread each step means waiting for the event loop's thread to hand it back. The 64
    possible statements stay in the connection's statement cache (256, see ``_connect``).
    """
    head, _, values = insert.partition(" VALUES ")
    for at in range(0, len(rows), 32):
        chunk = rows[at:at + 32]
        db.execute(f"{head} VALUES {','.join([values] * len(chunk))}", [v for row in chunk for v in row])


def _certificate_rows(record: CertificateRecord, actor: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The ``certificates`` row of a record and its ``certificate.issue`` audit row."""
    issued_at, not_after = utc_text(record.issued_at), utc_text(record.not_after)
    row = (record.serial, record.service_id, record.subject, dumps(list(record.san_dns)),
           dumps(list(record.san_ip)), utc_text(record.not_before), not_after,
           record.fingerprint, record.pem, issued_at)
    audit = (issued_at, actor, "certificate.issue", record.service_id, record.serial,
             dumps({"not_after": not_after}))
    return row, audit


class _PendingCertificate:
    """One certificate waiting for the group-commit writer thread, its rows made by the caller.

    Its outcome goes to ``future`` (a thread waits on it) or, for an asyncio caller, to
    ``afuture`` on ``loop`` (settled with one ``call_soon_threadsafe`` per loop and batch).
    """

    __slots__ = ("record", "row", "audit", "consume_token", "used_at", "future", "loop", "afuture",
                 "error")

    def __init__(self, record: CertificateRecord, actor: str, consume_token: str | None,
                 now: datetime | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.record = record
        self.row, self.audit = _certificate_rows(record, actor)
        self.consume_token = consume_token
        self.used_at = utc_text(now or record.issued_at)
        self.error: BaseException | None = None
        self.loop = loop
        self.future: Future[None] | None = None
        self.afuture: asyncio.Future[None] | None = None
        if loop is None:
            self.future = Future()
            self.future.set_running_or_notify_cancel()
        else:
            self.afuture = loop.create_future()


def _settle(items: list[_PendingCertificate]) -> None:
    """In an event loop: hand each asyncio caller its outcome."""
    for item in items:
        assert item.afuture is not None
        if item.afuture.done():  # the caller stopped waiting (cancelled)
            continue
        if item.error is None:
            item.afuture.set_result(None)
        else:
            item.afuture.set_exception(item.error)


class SQLiteStore:
    """The default :class:`~vcc_pki_server.store.Store`: one SQLite file in WAL mode.

    Two connections per store object: one for writes, serialised by a lock, and one for reads,
    with its own lock, so that a read never waits for a write's fsync (WAL lets readers run
    beside the writer; each read sees every transaction committed before it began). Writers
    take ``BEGIN IMMEDIATE`` so that several processes (the server, ``pki-admin``, more
    workers) queue on SQLite's lock instead of failing. ``synchronous=FULL``: a committed
    certificate survives a power loss, not only a crash.

    Group commit: :meth:`add_certificate` hands its record to one writer thread, which puts
    every record waiting at that moment into one transaction (one fsync) with a SAVEPOINT per
    record, so a record that fails (a spent enrolment token, a duplicate serial) fails alone.
    Each caller returns, or raises, only once its own record is committed or refused. Batches
    form by themselves while a commit is in flight; no caller waits for others to arrive.

    Writers of all store objects on one database (``--workers N``) also queue on an ``flock``
    of ``<db>-writer.lock``, which hands over at once where SQLite's busy handler would sleep.
    """

    MAX_BATCH = 256

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        if not self.path.exists():  # the database holds tokens' hashes: owner-only, like the keys
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._timeout = timeout
        self._writer_lock_fd: int | None = None
        if fcntl is not None:
            try:
                self._writer_lock_fd = os.open(f"{self.path}-writer.lock", os.O_CREAT | os.O_RDWR, 0o600)
            except OSError:  # e.g. a read-only home: SQLite's own locking still applies
                self._writer_lock_fd = None
        self._db = self._connect(timeout)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # Statement journals (a multi-row INSERT that may fail halfway) in memory, not temp files.
        self._db.execute("PRAGMA temp_store=MEMORY")
        try:
            self._migrate()  # and then foreign_keys=ON
        except BaseException:
            self._db.close()
            if self._writer_lock_fd is not None:
                os.close(self._writer_lock_fd)
            raise
        self._reader = self._connect(timeout)
        self._reader.execute("PRAGMA query_only=ON")
        # Group commit: records waiting for the writer thread, and whether it may still take some.
        self._pending: deque[_PendingCertificate] = deque()
        self._pending_cv = threading.Condition(threading.Lock())
        self._writer: threading.Thread | None = None
        self._closed = False
        # asyncio callers' records not yet handed to the writer, per event loop.
        self._loop_batches: dict[asyncio.AbstractEventLoop, list[_PendingCertificate]] = {}

    def _connect(self, timeout: float) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None,
                             check_same_thread=False, cached_statements=256)
        db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        return db

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Commit what the writer thread holds, stop it, close both connections. Idempotent."""
        with self._pending_cv:
            self._closed = True
            writer = self._writer
            self._pending_cv.notify_all()
        if writer is not None and writer is not threading.current_thread():
            writer.join()
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()
        if self._writer_lock_fd is not None:
            os.close(self._writer_lock_fd)
            self._writer_lock_fd = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            locked = self._take_writer_lock()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if locked and self._writer_lock_fd is not None:
                    fcntl.flock(self._writer_lock_fd, fcntl.LOCK_UN)

    def _take_writer_lock(self) -> bool:
        """Queue for writing behind other store objects (other workers) on an ``flock``.

        SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries, which several
        processes writing at once (``--workers N``) turn into latency; the lock file hands
        over within microseconds instead. Advisory only: after the busy timeout (or without
        fcntl) the write goes ahead and SQLite's locking decides, as for ``pki-admin``."""
        fd = self._writer_lock_fd
        if fd is None:
            return False
        pause, deadline = 0.00005, time.monotonic() + self._timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.001)

    def _read(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        with self._read_lock:
            cur = self._reader.execute(sql, params)
            return cur.fetchall()  # plain tuples: no row_factory is set

    def _migrate(self) -> None:
        # Foreign keys cannot be switched inside a transaction; a table rebuild needs them off.
        self._db.execute("PRAGMA foreign_keys=OFF")
        try:
            self._migrate_schema()
        finally:
            self._db.execute("PRAGMA foreign_keys=ON")

    def _migrate_schema(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (0)")
            if version > len(MIGRATIONS):
                raise CAError(f"{self.path} has schema version {version}, newer than this program; upgrade vcc-pki")
            if 0 < version < len(MIGRATIONS):  # a new file needs no word; an existing one may take seconds
                log.info("store %s: migrating from schema version %d to %d (about 2 s per 100,000 "
                         "certificates)", self.path, version, len(MIGRATIONS))
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
                db.execute("UPDATE schema_version SET version = ?", (number,))
            broken = db.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise CAError(f"{self.path}: migration left {len(broken)} rows with broken references "
                              f"(first: {broken[0]}); nothing was changed")

    def schema_version(self) -> int:
        return int(self._read("SELECT version FROM schema_version")[0][0])

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])

    @staticmethod
    def _audit(db: sqlite3.Connection, entry: AuditEntry) -> None:
        db.execute(
            "INSERT INTO audit_log (at, actor, action, service_id, serial, details) VALUES (?,?,?,?,?,?)",
            (utc_text(entry.at), entry.actor, entry.action, entry.service_id, entry.serial,
             dumps(entry.details)),
        )

    def audit(self, entry: AuditEntry) -> None:
        with self._write() as db:
            self._audit(db, entry)

    def audit_log(self, *, limit: int = 100, service_id: str | None = None) -> list[AuditEntry]:
        where, params = ("WHERE service_id = ?", [service_id]) if service_id else ("", [])
        rows = self._read(f"SELECT {AUDIT_COLUMNS} FROM audit_log {where} ORDER BY id DESC LIMIT ?",
                          [*params, limit])
        return [audit_entry(r) for r in rows]

    # -- services ---------------------------------------------------------------------------
    _service_row = staticmethod(service_params)

    # Remembered by row: the same rows are read on every request, and records are immutable.
    _service = staticmethod(functools.lru_cache(maxsize=512)(service_record))

    def add_service(self, service: ServiceRecord, *, actor: str, token: TokenRecord | None = None) -> None:
        with self._write() as db:
            try:
                db.execute(
                    "INSERT INTO services (service_name, endpoints, health_check_url, version, owner, "
                    "metadata, san_dns, san_ip, created_at, updated_at, service_id) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)", self._service_row(service))
            except sqlite3.IntegrityError:
                raise Conflict(f"service '{service.service_id}' is already registered") from None
            self._audit(db, AuditEntry(at=service.created_at, actor=actor, action="service.register",
                                       service_id=service.service_id,
                                       details={"san_dns": list(service.san_dns),
                                                "san_ip": list(service.san_ip)}))
            if token is not None:
                self._insert_token(db, token, actor)

    def update_service(self, service: ServiceRecord, *, actor: str, action: str = "service.update") -> None:
        with self._write() as db:
            cur = db.execute(
                "UPDATE services SET service_name=?, endpoints=?, health_check_url=?, version=?, "
                "owner=?, metadata=?, san_dns=?, san_ip=?, created_at=?, updated_at=? "
                "WHERE service_id=?", self._service_row(service))
            if cur.rowcount == 0:
                raise NotFound(f"unknown service '{service.service_id}'", code="unknown_service")
            self._audit(db, AuditEntry(at=service.updated_at, actor=actor, action=action,
                                       service_id=service.service_id))

    def get_service(self, service_id: str) -> ServiceRecord | None:
        rows = self._read(f"SELECT {SERVICE_COLUMNS} FROM services WHERE service_id=?", (service_id,))
        return self._service(rows[0]) if rows else None

    def list_services(self, *, healthy: bool | None = None, limit: int = 100,
                      after: str | None = None) -> list[ServiceRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if healthy is not None:
            clauses.append("health_status = 'healthy'" if healthy else "health_status != 'healthy'")
        if after is not None:
            clauses.append("service_id > ?")
            params.append(after)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._read(f"SELECT {SERVICE_COLUMNS} FROM services {where} "
                          f"ORDER BY service_id LIMIT ?", [*params, limit])
        return [self._service(r) for r in rows]

    def record_health(self, service_id: str, health: Health, *, event: str | None) -> None:
        with self._write() as db:
            db.execute("UPDATE services SET health_status=?, last_checked=?, last_error=?, "
                       "consecutive_failures=? WHERE service_id=?",
                       (health.status, opt_text(health.last_checked), health.last_error,
                        health.consecutive_failures, service_id))
            if event and health.last_checked is not None:
                details = {"error": health.last_error} if health.last_error else {}
                self._audit(db, AuditEntry(at=health.last_checked, actor="health-checker",
                                           action=event, service_id=service_id, details=details))

    # -- certificates -----------------------------------------------------------------------
    _cert = staticmethod(certificate_record)

    def _insert_certificate(self, db: sqlite3.Connection, record: CertificateRecord, actor: str) -> None:
        row, audit = _certificate_rows(record, actor)
        try:
            db.execute(_INSERT_CERTIFICATE, row)
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"certificate serial {record.serial} is already in the store: {exc}") from None
        db.execute(_INSERT_AUDIT, audit)

    def add_certificate(self, record: CertificateRecord, *, actor: str,
                        consume_token: str | None = None, now: datetime | None = None) -> None:
        """Record an issued certificate; with ``consume_token`` the enrolment token is spent in
        the same transaction, and a token already spent makes the whole call fail (Conflict).

        Returns once the record is committed (group commit, see the class docs)."""
        item = _PendingCertificate(record, actor, consume_token, now)
        self._submit(item)
        assert item.future is not None
        item.future.result()

    async def add_certificate_async(self, record: CertificateRecord, *, actor: str,
                                    consume_token: str | None = None,
                                    now: datetime | None = None) -> None:
        """:meth:`add_certificate` for a coroutine: the event loop runs on while the record
        waits for its commit; returns (or raises) once it is committed (or refused)."""
        loop = asyncio.get_running_loop()
        item = _PendingCertificate(record, actor, consume_token, now, loop)
        if self._closed:
            raise RuntimeError("the store is closed")
        # Records submitted during one pass of the event loop go to the writer together, with
        # one wake-up, at the start of the next pass (no timer, no added wait).
        queued = self._loop_batches.setdefault(loop, [])
        queued.append(item)
        if len(queued) == 1:
            loop.call_soon(self._flush_loop_batch, loop)
        assert item.afuture is not None
        await item.afuture

    def _flush_loop_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        items = self._loop_batches.pop(loop, [])
        try:
            self._submit(*items)
        except RuntimeError as exc:  # closed meanwhile
            for item in items:
                item.error = exc
            _settle(items)

    def _submit(self, *items: _PendingCertificate) -> None:
        with self._pending_cv:
            if self._closed:
                raise RuntimeError("the store is closed")
            self._pending.extend(items)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="sqlite-group-commit",
                                                daemon=True)
                self._writer.start()
            else:
                self._pending_cv.notify()

    def _write_loop(self) -> None:
        """The writer thread: commit batches of pending certificates until the store closes."""
        while True:
            with self._pending_cv:
                while not self._pending and not self._closed:
                    self._pending_cv.wait()
                if not self._pending:  # closed, and nothing left to commit
                    return
                batch = [self._pending.popleft()
                         for _ in range(min(len(self._pending), self.MAX_BATCH))]
            try:
                self._commit_batch(batch)
            except BaseException as exc:  # BEGIN or COMMIT failed: nothing of this batch is stored
                # (The writer thread goes on: every later caller still gets an answer.)
                for item in batch:
                    item.error = exc
            self._answer(batch)

    def _commit_batch(self, batch: list[_PendingCertificate]) -> None:
        """One transaction for the whole batch; each item's ``error`` says whether it failed.

        Fast path: the records that spend no token go in with one multi-row INSERT per table
        (few statements: in this thread each one waits for the event loop to hand back the
        GIL). If a row breaks a constraint (a duplicate serial), that transaction is rolled
        back and the batch is written again one SAVEPOINT per record, so that only the failing
        record fails. Other errors (disk, lock timeout) fail the whole batch."""
        simple = [item for item in batch if item.consume_token is None]
        if simple:
            try:
                with self._write() as db:
                    _insert_rows(db, _INSERT_CERTIFICATE, [item.row for item in simple])
                    _insert_rows(db, _INSERT_AUDIT, [item.audit for item in simple])
                    self._record_each(db, [item for item in batch if item.consume_token is not None])
                return
            except sqlite3.IntegrityError:
                for item in batch:
                    item.error = None
        with self._write() as db:
            self._record_each(db, batch)

    def _record_each(self, db: sqlite3.Connection, items: list[_PendingCertificate]) -> None:
        for item in items:
            db.execute("SAVEPOINT item")
            try:
                self._record_certificate(db, item)
            except Exception as exc:
                db.execute("ROLLBACK TO item")
                item.error = exc
            db.execute("RELEASE item")

    @staticmethod
    def _answer(batch: list[_PendingCertificate]) -> None:
        """Wake the callers: threads through their futures, each event loop once per batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_PendingCertificate]] = {}
        for item in batch:
            if item.loop is not None:
                by_loop.setdefault(item.loop, []).append(item)
            elif item.future is not None:
                if item.error is None:
                    item.future.set_result(None)
                else:
                    item.future.set_exception(item.error)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, items)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def _record_certificate(self, db: sqlite3.Connection, item: _PendingCertificate) -> None:
        if item.consume_token is not None:
            cur = db.execute("UPDATE tokens SET used_at=? WHERE token_id=? AND used_at IS NULL "
                             "AND revoked_at IS NULL", (item.used_at, item.consume_token))
            if cur.rowcount != 1:
                raise Conflict("enrolment token already used", code="invalid_token")
        try:
            db.execute(_INSERT_CERTIFICATE, item.row)
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"certificate serial {item.record.serial} is already in the store: {exc}") from None
        db.execute(_INSERT_AUDIT, item.audit)

    def add_certificates(self, records: list[tuple[CertificateRecord, str]]) -> None:
        """Record several certificates in one transaction (one fsync): group commit."""
        with self._write() as db:
            for record, actor in records:
                self._insert_certificate(db, record, actor)

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        rows = self._read(f"SELECT {CERT_COLUMNS} FROM {CERT_FROM} WHERE c.serial=?", (serial,))
        return self._cert(rows[0]) if rows else None

    def certificates_for(self, service_id: str) -> list[CertificateRecord]:
        rows = self._read(f"SELECT {CERT_COLUMNS} FROM {CERT_FROM} WHERE c.service_id=? "
                          f"ORDER BY c.id DESC", (service_id,))
        return [self._cert(r) for r in rows]

    def list_certificates(self, query: CertificateQuery) -> list[CertificateRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        now = utc_text(query.now)
        if query.service_id is not None:
            clauses.append("c.service_id = ?")
            params.append(query.service_id)
        if query.status == "revoked":
            clauses.append("r.serial IS NOT NULL")
        elif query.status == "expired":
            clauses.append("r.serial IS NULL AND c.not_after <= ?")
            params.append(now)
        elif query.status == "valid":
            clauses.append("r.serial IS NULL AND c.not_after > ? AND c.not_before <= ?")
            params += [now, now]
        if query.expiring_before is not None:
            clauses.append("r.serial IS NULL AND c.not_after > ? AND c.not_after <= ?")
            params += [now, utc_text(query.expiring_before)]
        if query.after is not None:
            clauses.append("c.id > ?")
            params.append(query.after)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._read(f"SELECT {CERT_COLUMNS} FROM {self._listing_source(query.status, now)} {where} "
                          f"ORDER BY c.id LIMIT ?", [*params, query.limit])
        return [self._cert(r) for r in rows]

    # Up to this many revoked (or expired) certificates, a status=revoked (expired) page is
    # found from those rows and sorted, rather than by walking every certificate in id order.
    SPARSE_STATUS = 10_000

    def _listing_source(self, status: str | None, now: str) -> str:
        """The FROM clause of a listing. In id order a page ends after ``limit`` matches, which
        is quick while matches are common; when they are rare (a few revoked or expired
        certificates among 100,000) the walk reads the whole table: 33 ms at 100k. Then the
        few are read from their own index and sorted instead. Counting stops at
        ``SPARSE_STATUS + 1`` so that it costs little either way."""
        bound = self.SPARSE_STATUS + 1
        if status == "revoked":
            few = self._read("SELECT count(*) FROM (SELECT 1 FROM revocations LIMIT ?)", (bound,))
            if few[0][0] < bound:  # CROSS JOIN: SQLite keeps revocations as the outer loop
                return "revocations r CROSS JOIN certificates c ON c.serial = r.serial"
        elif status == "expired":
            few = self._read("SELECT count(*) FROM (SELECT 1 FROM certificates WHERE not_after <= ? "
                             "LIMIT ?)", (now, bound))
            if few[0][0] < bound:
                return ("certificates c INDEXED BY certificates_not_after "
                        "LEFT JOIN revocations r ON r.serial = c.serial")
        return CERT_FROM

    def revoke_certificate(self, serial: str, *, reason: str, at: datetime, actor: str) -> CertificateRecord:
        with self._write() as db:
            row = db.execute(f"SELECT {CERT_COLUMNS} FROM {CERT_FROM} WHERE c.serial=?", (serial,)).fetchone()
            if row is None:
                raise NotFound(f"unknown certificate serial {serial}", code="unknown_certificate")
            record = self._cert(row)
            if record.revoked_at is not None:
                raise Conflict(f"certificate {serial} of '{record.service_id}' is already revoked "
                               f"({record.revocation_reason})", code="already_revoked")
            db.execute("INSERT INTO revocations (serial, revoked_at, reason) VALUES (?,?,?)",
                       (serial, utc_text(at), reason))
            self._audit(db, AuditEntry(at=at, actor=actor, action="certificate.revoke",
                                       service_id=record.service_id, serial=serial,
                                       details={"reason": reason}))
        return attrs.evolve(record, revoked_at=parse_utc(utc_text(at)), revocation_reason=reason)

    def revoked(self) -> list[tuple[str, datetime, str]]:
        rows = self._read("SELECT serial, revoked_at, reason FROM revocations ORDER BY revoked_at, serial")
        return [(r[0], parse_utc(r[1]), r[2]) for r in rows]

    # -- CRLs -------------------------------------------------------------------------------
    def new_crl(self, build: Callable[[int, list[tuple[str, datetime, str]]], CRLRecord], *,
                actor: str) -> CRLRecord:
        """Build and store the next CRL inside one write transaction.

        ``build(number, revoked)`` signs it; holding the write lock while it runs keeps CRL
        numbers strictly increasing *and* makes the newest CRL contain every revocation
        committed before it, even with several processes revoking at once.
        """
        with self._write() as db:
            number = int(db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM crls").fetchone()[0])
            rows = db.execute("SELECT serial, revoked_at, reason FROM revocations").fetchall()
            crl = build(number, [(r[0], parse_utc(r[1]), r[2]) for r in rows])
            db.execute("INSERT INTO crls (number, this_update, next_update, entries, der) "
                       "VALUES (?,?,?,?,?)", (crl.number, utc_text(crl.this_update),
                                              utc_text(crl.next_update), crl.entries, crl.der))
            # Superseded CRLs: keep 50 rows of history for `crl list` but only the newest two
            # bodies; with 100k revocations every body is 5 MB.
            db.execute("DELETE FROM crls WHERE number < ?", (crl.number - 50,))
            db.execute("UPDATE crls SET der = x'' WHERE number < ? AND length(der) > 0",
                       (crl.number - 1,))
            self._audit(db, AuditEntry(at=crl.this_update, actor=actor, action="crl.generate",
                                       details={"number": crl.number, "entries": crl.entries}))
        return crl

    def latest_crl_number(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(number), 0) FROM crls")[0][0])

    _crl = staticmethod(crl_record)

    def latest_crl(self) -> CRLRecord | None:
        rows = self._read(f"SELECT {CRL_COLUMNS} FROM crls ORDER BY number DESC LIMIT 1")
        return self._crl(rows[0]) if rows else None

    def list_crls(self, limit: int = 20) -> list[CRLRecord]:
        """The newest CRLs' numbers, dates and sizes, without their bodies (``der`` is empty)."""
        rows = self._read("SELECT number, this_update, next_update, x'', entries FROM crls "
                          "ORDER BY number DESC LIMIT ?", (limit,))
        return [self._crl(r) for r in rows]

    # -- tokens -----------------------------------------------------------------------------
    @staticmethod
    def _insert_token(db: sqlite3.Connection, token: TokenRecord, actor: str) -> None:
        db.execute("INSERT INTO tokens (token_id, kind, secret_hash, name, service_id, created_at, "
                   "expires_at, used_at, revoked_at) VALUES (?,?,?,?,?,?,?,?,?)",
                   (token.token_id, token.kind, token.secret_hash, token.name, token.service_id,
                    utc_text(token.created_at), opt_text(token.expires_at),
                    opt_text(token.used_at), opt_text(token.revoked_at)))
        SQLiteStore._audit(db, AuditEntry(at=token.created_at, actor=actor,
                                          action=f"token.create.{token.kind}",
                                          service_id=token.service_id,
                                          details={"token_id": token.token_id}))

    def add_token(self, token: TokenRecord, *, actor: str) -> None:
        with self._write() as db:
            self._insert_token(db, token, actor)

    # Remembered by row (all of it, so a revocation or use is a different row).
    _token = staticmethod(functools.lru_cache(maxsize=512)(token_record))

    def get_token(self, token_id: str) -> TokenRecord | None:
        rows = self._read(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id=?", (token_id,))
        return self._token(rows[0]) if rows else None

    def list_tokens(self, kind: str | None = None) -> list[TokenRecord]:
        where, params = ("WHERE kind=?", (kind,)) if kind else ("", ())
        rows = self._read(f"SELECT {TOKEN_COLUMNS} FROM tokens {where} ORDER BY created_at", params)
        return [self._token(r) for r in rows]

    def revoke_token(self, token_id: str, *, at: datetime, actor: str) -> TokenRecord:
        with self._write() as db:
            cur = db.execute("UPDATE tokens SET revoked_at=? WHERE token_id=? AND revoked_at IS NULL",
                             (utc_text(at), token_id))
            if cur.rowcount != 1:
                exists = db.execute("SELECT 1 FROM tokens WHERE token_id=?", (token_id,)).fetchone()
                if exists:
                    raise Conflict(f"token {token_id} is already revoked")
                raise NotFound(f"unknown token '{token_id}'")
            row = db.execute(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id=?", (token_id,)).fetchone()
            token = self._token(row)
            self._audit(db, AuditEntry(at=at, actor=actor, action=f"token.revoke.{token.kind}",
                                       service_id=token.service_id, details={"token_id": token_id}))
        return token

