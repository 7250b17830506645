"""SQLiteStore: the embedded store (WAL, one writer at a time, every change audited).

The statements it shares with PostgreSQL are in :mod:`.sql`; here are its schema, its
connections and locking, and its faster way to write a batch of issued certificates.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ..errors import CAError, CAUnavailable, Conflict

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]
from .group_commit import GroupCommit
from .rows import CERT_FROM, service_record, token_record
from .schema import tables
from .sql import SQLStore

log = logging.getLogger(__name__)

# Ordered forward migrations; the index + 1 is the schema version they lead to.
MIGRATIONS: tuple[str, ...] = (
    tables("sqlite"),
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
    # 3: the key of each certificate (keyCompromise revokes every certificate of the key; no
    # index: found by a scan of the unexpired, rarely, instead of slowing every issuance), and
    # decommissioned services (their rows stay for the certificates and the audit log), and the
    # lifetimes an admin sets per service; each revocation keeps its certificate's notAfter (the
    # CRL leaves out the expired without a join).
    """
    ALTER TABLE certificates ADD COLUMN key_id TEXT;
    ALTER TABLE services ADD COLUMN decommissioned_at TEXT;
    ALTER TABLE services ADD COLUMN default_validity_seconds INTEGER;
    ALTER TABLE services ADD COLUMN max_validity_seconds INTEGER;
    ALTER TABLE tokens ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE revocations ADD COLUMN not_after TEXT;
    UPDATE revocations SET not_after = (SELECT c.not_after FROM certificates c WHERE c.serial = revocations.serial)
    """,
    # 4: metrics tokens (SPEC §12: ``token create --scope metrics`` opens /metrics only). The
    # CHECK on kind is part of the table: rebuilt, as in 2.
    """
    CREATE TABLE tokens_v4 (
        token_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('admin', 'enrolment', 'metrics')),
        secret_hash TEXT NOT NULL,
        name TEXT,
        service_id TEXT,
        created_at TEXT NOT NULL,
        expires_at TEXT,
        used_at TEXT,
        revoked_at TEXT,
        refusals INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO tokens_v4 SELECT token_id, kind, secret_hash, name, service_id, created_at, expires_at,
        used_at, revoked_at, refusals FROM tokens;
    DROP TABLE tokens;
    ALTER TABLE tokens_v4 RENAME TO tokens
    """,
    # 5: state every server of the cluster shares (the server certificate and its key, the key
    # encrypted with the CA password), each value versioned for compare-and-set.
    """
    CREATE TABLE shared_state (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        value BLOB NOT NULL,
        updated_at TEXT NOT NULL
    )
    """,
    # 6: CA rotation (SPEC §13): the issuing CA of each certificate, revocation and CRL (its
    # SKI, hex). Rows from before are NULL until the store is opened with its CA
    # (:meth:`SQLStore.assign_issuer`), found through the partial index.
    """
    ALTER TABLE certificates ADD COLUMN issuer TEXT;
    ALTER TABLE revocations ADD COLUMN issuer TEXT;
    ALTER TABLE crls ADD COLUMN issuer TEXT;
    CREATE INDEX certificates_no_issuer ON certificates(id) WHERE issuer IS NULL;
    CREATE INDEX crls_issuer ON crls(issuer, number)
    """,
)


class SQLiteStore(SQLStore):
    """The default :class:`~vcc_pki_server.store.Store`: one SQLite file in WAL mode.

    Two connections per store object: one for writes, serialised by a lock, and one for reads,
    with its own lock, so that a read never waits for a write's fsync (WAL lets readers run
    beside the writer; each read sees every transaction committed before it began). Writers
    take ``BEGIN IMMEDIATE`` so that several processes (the server, ``pki-admin``, more
    workers) queue on SQLite's lock instead of failing. ``synchronous=FULL``: a committed
    certificate survives a power loss, not only a crash.

    Group commit (:mod:`.group_commit`): :meth:`submit_certificates` hands its records to one
    writer thread, which puts every record waiting at that moment into one transaction (one
    fsync) with a SAVEPOINT per record, so a record that fails (a spent enrolment token, a
    duplicate serial) fails alone; each future settles once its own record is committed or
    refused. Batches form by themselves while a commit is in flight; nobody waits for others.

    Writers of all store objects on one database (``--workers N``) also queue on an ``flock``
    of ``<db>-writer.lock``, which hands over at once where SQLite's busy handler would sleep.
    """

    MAX_BATCH = 256
    CONSTRAINT_ERRORS = (sqlite3.IntegrityError,)

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        if not self.path.exists():  # the database holds tokens' hashes: owner-only, like the keys
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._timeout = timeout
        self._writer_lock_fd: int | None = None
        self._leads: dict[str, int] = {}  # role -> the fd holding its flock
        if fcntl is not None:
            try:
                self._writer_lock_fd = os.open(f"{self.path}-writer.lock", os.O_CREAT | os.O_RDWR, 0o600)
            except OSError:  # e.g. a read-only home: SQLite's own locking still applies
                self._writer_lock_fd = None
        self._db = self._connect(timeout)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:  # "file is not a database", an unreadable file
            self._db.close()
            raise CAError(f"{self.path} is not a usable SQLite database ({exc}): restore it from a "
                          "backup (docs/operations.md)") from None
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
        self._group = GroupCommit(self._commit_batch, name="sqlite-group-commit", max_batch=self.MAX_BATCH)

    def _connect(self, timeout: float) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None,
                             check_same_thread=False, cached_statements=256)
        db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        return db

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Commit what the writer thread holds, stop it, close both connections. Idempotent."""
        self._group.close()
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()
        if self._writer_lock_fd is not None:
            os.close(self._writer_lock_fd)
            self._writer_lock_fd = None
        for fd in self._leads.values():
            os.close(fd)
        self._leads.clear()

    def _take_lead(self, role: str) -> bool:
        """:meth:`Store.lead`: an ``flock`` on ``<db>.<role>.lock`` (the workers of one host
        share the file; the kernel drops the lock with the process)."""
        if role in self._leads:
            return True
        if fcntl is None:  # pragma: no cover - non-POSIX: every process leads (work done twice at worst)
            return True
        try:
            fd = os.open(f"{self.path}.{role}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            log.warning("lead %s: lock file unusable (%s): this process takes it", role, exc.strerror)
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._leads[role] = fd
        log.info("this process leads %s (pid %d)", role, os.getpid())
        return True

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._faults("written"):
            locked = self._take_writer_lock()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    with suppress(sqlite3.Error):  # a failed COMMIT or BEGIN may have ended it already
                        self._db.execute("ROLLBACK")
                    raise
                try:
                    self._db.execute("COMMIT")
                except BaseException:  # e.g. a full disk: SQLite may or may not have rolled back
                    if self._db.in_transaction:
                        with suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
                self.write_failure = None
            finally:
                if locked and self._writer_lock_fd is not None:
                    fcntl.flock(self._writer_lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _faults(self, what: str) -> Iterator[None]:
        """A storage fault (disk full, read-only file, I/O error, a lock held past the busy
        timeout) is the store being unavailable: 503, never a 500. A failed write is
        remembered until a write succeeds, for ``/health``."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            message = f"the store {self.path} cannot be {what}: {exc}"
            if what == "written":
                self.write_failure = message
            raise CAUnavailable(message) from exc
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
                raise
            message = f"the store {self.path} is damaged: {exc}"
            if what == "written":
                self.write_failure = message
            raise CAUnavailable(message) from exc

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
        with self._read_lock, self._faults("read"):
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
    @contextmanager
    def _savepoint(self, db: sqlite3.Connection) -> Iterator[None]:
        db.execute("SAVEPOINT item")
        try:
            yield
        except sqlite3.IntegrityError as exc:  # e.g. a service that is not registered
            db.execute("ROLLBACK TO item")
            raise Conflict(f"the change conflicts with the stored data: {exc}") from None
        except BaseException:
            db.execute("ROLLBACK TO item")
            raise
        finally:
            db.execute("RELEASE item")

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
