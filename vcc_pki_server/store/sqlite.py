"""SQLiteStore: the embedded store (WAL, one writer at a time, every change audited).

The statements it shares with PostgreSQL are in :mod:`.sql`; here are its schema, its
connections and locking, and the group commit of issued certificates.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import CAError, Conflict

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]
from . import CertificateRecord, utc_text
from .rows import CERT_FROM, service_record, token_record
from .sql import INSERT_AUDIT, INSERT_CERTIFICATE, SQLStore, certificate_rows

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


class _PendingCertificate:
    """One certificate waiting for the group-commit writer thread, its rows made by the caller.

    Its outcome goes to ``future`` (a thread waits on it) or, for an asyncio caller, to
    ``afuture`` on ``loop`` (settled with one ``call_soon_threadsafe`` per loop and batch).
    """

    __slots__ = (
        "afuture",
        "audit",
        "consume_token",
        "error",
        "future",
        "loop",
        "record",
        "row",
        "used_at",
    )

    def __init__(self, record: CertificateRecord, actor: str, consume_token: str | None,
                 now: datetime | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.record = record
        self.row, self.audit = certificate_rows(record, actor)
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


class SQLiteStore(SQLStore):
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

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])

    @staticmethod
    def _exec(db: sqlite3.Connection, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> sqlite3.Cursor:
        return db.execute(sql, params)

    @contextmanager
    def _duplicate(self, db: sqlite3.Connection, message: str) -> Iterator[None]:
        # A failed statement is undone by itself in SQLite; the transaction goes on.
        try:
            yield
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" not in str(exc):
                raise
            raise Conflict(message) from None

    # Remembered by row: the same rows are read on every request, and records are immutable;
    # tokens by the whole row, so a revocation or use is a different row.
    _service = staticmethod(functools.lru_cache(maxsize=512)(service_record))
    _token = staticmethod(functools.lru_cache(maxsize=512)(token_record))

    # -- certificates -----------------------------------------------------------------------
    def _insert_certificate(self, db: sqlite3.Connection, record: CertificateRecord, actor: str) -> None:
        row, audit = certificate_rows(record, actor)
        try:
            db.execute(INSERT_CERTIFICATE, row)
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"certificate serial {record.serial} is already in the store: {exc}") from None
        db.execute(INSERT_AUDIT, audit)

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
                    _insert_rows(db, INSERT_CERTIFICATE, [item.row for item in simple])
                    _insert_rows(db, INSERT_AUDIT, [item.audit for item in simple])
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
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, items)

    def _record_certificate(self, db: sqlite3.Connection, item: _PendingCertificate) -> None:
        if item.consume_token is not None:
            cur = db.execute("UPDATE tokens SET used_at=? WHERE token_id=? AND used_at IS NULL "
                             "AND revoked_at IS NULL", (item.used_at, item.consume_token))
            if cur.rowcount != 1:
                raise Conflict("enrolment token already used", code="invalid_token")
        try:
            db.execute(INSERT_CERTIFICATE, item.row)
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"certificate serial {item.record.serial} is already in the store: {exc}") from None
        db.execute(INSERT_AUDIT, item.audit)

    def add_certificates(self, records: list[tuple[CertificateRecord, str]]) -> None:
        """Record several certificates in one transaction (one fsync): group commit."""
        with self._write() as db:
            for record, actor in records:
                self._insert_certificate(db, record, actor)

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
