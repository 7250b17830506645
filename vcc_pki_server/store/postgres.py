"""PostgresStore: the store of several server replicas sharing one PostgreSQL database (SPEC §9)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    import psycopg
    from psycopg import conninfo as _conninfo
    from psycopg import errors as pgerrors
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise ImportError("the PostgreSQL store needs psycopg: pip install 'vcc-pki[postgres]'") from exc

from ..errors import CAError, CAUnavailable, Conflict, InvalidRequest
from .group_commit import GroupCommit
from .schema import tables
from .sql import SQLStore

# Ordered forward migrations; the index + 1 is the schema version they lead to (the tables of
# version 1 are SQLiteStore's, from .schema).
MIGRATIONS: tuple[str, ...] = (
    tables("postgres"),
    # 2: no UNIQUE index on fingerprint (certificates are found by serial; see the SQLite store).
    """
    ALTER TABLE certificates DROP CONSTRAINT IF EXISTS certificates_fingerprint_key
    """,
    # 3: the key of each certificate, decommissioned services, per-service lifetimes (see the
    # SQLite store).
    """
    ALTER TABLE certificates ADD COLUMN IF NOT EXISTS key_id TEXT COLLATE "C";
    ALTER TABLE services ADD COLUMN IF NOT EXISTS decommissioned_at TEXT COLLATE "C";
    ALTER TABLE services ADD COLUMN IF NOT EXISTS default_validity_seconds INTEGER;
    ALTER TABLE services ADD COLUMN IF NOT EXISTS max_validity_seconds INTEGER;
    ALTER TABLE tokens ADD COLUMN IF NOT EXISTS refusals INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE revocations ADD COLUMN IF NOT EXISTS not_after TEXT COLLATE "C";
    UPDATE revocations SET not_after = (SELECT c.not_after FROM certificates c WHERE c.serial = revocations.serial)
    """,
    # 4: metrics tokens (see the SQLite store).
    """
    ALTER TABLE tokens DROP CONSTRAINT IF EXISTS tokens_kind_check;
    ALTER TABLE tokens ADD CONSTRAINT tokens_kind_check CHECK (kind IN ('admin', 'enrolment', 'metrics'))
    """,
    # 5: state every replica shares (see the SQLite store).
    """
    CREATE TABLE IF NOT EXISTS shared_state (
        name TEXT COLLATE "C" PRIMARY KEY,
        version INTEGER NOT NULL,
        value BYTEA NOT NULL,
        updated_at TEXT COLLATE "C" NOT NULL
    )
    """,
    # 6: the issuing CA of each certificate, revocation and CRL (see the SQLite store).
    """
    ALTER TABLE certificates ADD COLUMN IF NOT EXISTS issuer TEXT COLLATE "C";
    ALTER TABLE revocations ADD COLUMN IF NOT EXISTS issuer TEXT COLLATE "C";
    ALTER TABLE crls ADD COLUMN IF NOT EXISTS issuer TEXT COLLATE "C";
    CREATE INDEX IF NOT EXISTS certificates_no_issuer ON certificates(id) WHERE issuer IS NULL;
    CREATE INDEX IF NOT EXISTS crls_issuer ON crls(issuer, number)
    """,
)

# Transaction-level advisory lock keys (bigint; ASCII "vccpki" and a number).
MIGRATION_LOCK = 0x7663_6370_6B69_0001
CRL_LOCK = 0x7663_6370_6B69_0002
# Session-level advisory locks of the cluster's leads (Store.lead), one per role.
LEAD_LOCKS = {"health": 0x7663_6370_6B69_0101, "crl": 0x7663_6370_6B69_0102}

Row = tuple[Any, ...]
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """A statement of :mod:`.sql` (``?`` placeholders) in psycopg's ``%s`` style."""
    return sql.replace("?", "%s")


def _connection_settings(dsn: str, connect_timeout: float, statement_timeout: float) -> dict[str, Any]:
    """libpq settings for every connection; those given in the URL win (``connect_timeout``,
    ``options=-c statement_timeout=...``, ``keepalives_idle``...). Defaults: 5 s to connect, 10 s
    per statement (enforced by the server: a query stuck behind a lock gives up, and the
    request gets a 503 instead of holding its thread), TCP keepalives after 10 s idle."""
    try:
        given = _conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        given = {}
    settings: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout)), "keepalives": 1,
                                "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
    settings = {key: value for key, value in settings.items() if key not in given}
    if "statement_timeout" not in str(given.get("options", "")):
        settings["options"] = f"{given.get('options', '')} -c statement_timeout={int(statement_timeout * 1000)}".strip()
    return settings


def _dropped(conn: psycopg.Connection[Any]) -> bool:
    """An idle connection whose socket is readable: the server closed it (or sent an error)."""
    try:
        return bool(select.select([conn.pgconn.socket], [], [], 0)[0])
    except (OSError, ValueError, psycopg.Error):
        return True


def describe(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, for messages: never its password."""
    try:
        parts = _conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(unparsable database_url)"
    return f"{parts.get('host') or 'localhost'}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"


class PostgresStore(SQLStore):
    """A :class:`~vcc_pki_server.store.Store` in a PostgreSQL database shared by server replicas.

    Takes a libpq DSN or URL (``postgresql://user:pass@host:5432/vcc_pki``); raises
    :class:`~vcc_pki_server.errors.CAUnavailable` if the database cannot be reached and
    :class:`~vcc_pki_server.errors.CAError` if its schema is newer than this program.

    Two connections per store object, like :class:`.sqlite.SQLiteStore`: one for writes and one
    for reads, each behind its own lock, both in autocommit mode with every write method one
    explicit transaction (audit row included). A connection lost (database restart, failover)
    is reopened on the next call; the call that saw it fails with ``CAUnavailable``.

    Across replicas: migrations run under a transaction-level advisory lock, so replicas
    starting together migrate once; :meth:`new_crl` builds under another, so CRL numbers
    strictly increase and each CRL holds every revocation committed before it; an enrolment
    token is spent by a conditional ``UPDATE``, so it yields one certificate in the whole
    cluster. Known limit: ids come from sequences, so a row committed late may get a lower id
    than one already listed; a cursor page (``after``) taken meanwhile can miss it.

    >>> store = PostgresStore("postgresql://vcc@db.internal/vcc_pki")   # doctest: +SKIP
    """

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0, statement_timeout: float = 10.0) -> None:
        self.dsn = dsn
        self._settings = _connection_settings(dsn, connect_timeout, statement_timeout)
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._lead_lock = threading.Lock()
        self._leads: dict[str, psycopg.Connection[Row]] = {}  # role -> the connection holding its lock
        self._db = self._connect()
        try:
            self._migrate()
            self._reader = self._connect()
        except BaseException:
            self._db.close()
            raise
        self._group = GroupCommit(self._commit_batch, name="postgres-group-commit")

    def __repr__(self) -> str:
        return f"PostgresStore({describe(self.dsn)!r})"

    def _take_lead(self, role: str) -> bool:
        """:meth:`Store.lead`: a session-level advisory lock on a connection of its own, kept
        while this process lives. PostgreSQL drops it with the connection: when the leader dies
        (or its connection is cut) another replica takes the lead at its next try."""
        with self._lead_lock:
            held = self._leads.get(role)
            if held is not None:
                try:
                    held.execute("SELECT 1")
                    return True
                except psycopg.Error:
                    log.warning("lost the %s lead: its database connection broke", role)
                    with contextlib.suppress(psycopg.Error):
                        held.close()
                    del self._leads[role]
            conn = self._connect()
            try:
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEAD_LOCKS[role],)).fetchone()
            except psycopg.Error as exc:
                conn.close()
                raise CAUnavailable(f"cannot ask for the {role} lead: {_first_line(exc)}") from None
            if not (row and row[0]):
                conn.close()
                return False
            self._leads[role] = conn
            log.info("this replica leads %s (pid %d)", role, os.getpid())
            return True

    def _connect(self) -> psycopg.Connection[Row]:
        try:
            return psycopg.connect(self.dsn, autocommit=True, **self._settings)
        except psycopg.Error as exc:
            raise CAUnavailable(f"cannot connect to PostgreSQL at {describe(self.dsn)}: "
                                f"{_first_line(exc)}") from None

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Commit what the writer thread holds, stop it, close both connections. Idempotent."""
        if hasattr(self, "_group"):
            self._group.close()
        with self._lock:
            self._closed = True
            self._db.close()
        if hasattr(self, "_reader"):
            with self._read_lock:
                self._reader.close()
        with self._lead_lock:
            for conn in self._leads.values():
                conn.close()
            self._leads.clear()

    def _usable(self, conn: psycopg.Connection[Row]) -> psycopg.Connection[Row]:
        """``conn``, or a new connection when it was lost: closed, or dropped by the server
        while idle (a restart or failover: its socket is readable with nothing asked), so that
        the first request after the database comes back does not fail on a dead connection."""
        if self._closed:
            raise RuntimeError("the store is closed")
        if not conn.closed and not _dropped(conn):
            return conn
        with contextlib.suppress(psycopg.Error):
            conn.close()
        return self._connect()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate what psycopg raises into the core's errors, once, at the boundary."""
        try:
            yield
        except pgerrors.IntegrityError as exc:  # a constraint the method did not expect
            raise Conflict(f"the change conflicts with the stored data: {_first_line(exc)}") from exc
        except psycopg.DataError as exc:  # e.g. a NUL character, which PostgreSQL text cannot hold
            raise InvalidRequest(f"value cannot be stored: {_first_line(exc)}") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise CAUnavailable(f"PostgreSQL at {describe(self.dsn)}: {_first_line(exc)}") from exc
        except psycopg.Error as exc:
            raise CAError(f"PostgreSQL error: {_first_line(exc)}") from exc

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection[Row]]:
        """One transaction on the write connection; rolled back if the block raises."""
        with self._lock:
            try:
                with self._errors():
                    self._db = self._usable(self._db)
                    with self._db.transaction():
                        yield self._db
            except CAUnavailable as exc:
                self.write_failure = exc.message
                raise
            self.write_failure = None

    def _read(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[Row]:
        with self._read_lock, self._errors():
            self._reader = self._usable(self._reader)
            return self._reader.execute(_pg(sql), params).fetchall()

    @staticmethod
    def _exec(db: psycopg.Connection[Row], sql: str, params: tuple[Any, ...] | list[Any] = ()) -> psycopg.Cursor[Row]:
        return db.execute(_pg(sql), params)

    @contextmanager
    def _duplicate(self, db: psycopg.Connection[Row], message: str) -> Iterator[None]:
        try:
            with db.transaction():  # a savepoint: after the error the transaction goes on
                yield
        except pgerrors.UniqueViolation:
            raise Conflict(message) from None

    EMPTY_BLOB = "''::bytea"
    # Two replicas revoking one serial queue on the row; the second sees the first's revocation.
    LOCK_ROW = " FOR UPDATE OF c"

    def _lock_crl_numbers(self, db: psycopg.Connection[Row]) -> None:
        db.execute("SELECT pg_advisory_xact_lock(%s)", (CRL_LOCK,))

    def _migrate(self) -> None:
        with self._write() as db:
            # Replicas starting together queue here; the second finds the schema up to date.
            db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = int(row[0]) if row else 0
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (0)")
            if version > len(MIGRATIONS):
                raise CAError(f"PostgreSQL database {describe(self.dsn)} has schema version {version}, "
                              "newer than this program; upgrade vcc-pki")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement.encode())
                db.execute("UPDATE schema_version SET version = %s", (number,))

    def integrity_check(self) -> str:
        """``"ok"`` when the database answers (PostgreSQL checks its own pages)."""
        return "ok" if self._read("SELECT 1")[0][0] == 1 else "no answer"

    @contextmanager
    def _savepoint(self, db: psycopg.Connection[Row]) -> Iterator[None]:
        with self._errors(), db.transaction():
            yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
