"""PostgresStore: the store of several server replicas sharing one PostgreSQL database (SPEC §9)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import attrs

try:
    import psycopg
    from psycopg import conninfo as _conninfo
    from psycopg import errors as pgerrors
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise ImportError("the PostgreSQL store needs psycopg: pip install 'vcc-pki[postgres]'") from exc

from ..errors import CAError, CAUnavailable, Conflict, InvalidRequest, NotFound
from . import (AuditEntry, CertificateQuery, CertificateRecord, CRLRecord, Health, ServiceRecord,
               TokenRecord, dumps, parse_utc, utc_text)
from .rows import (AUDIT_COLUMNS, CERT_COLUMNS, CERT_FROM, CRL_COLUMNS, SERVICE_COLUMNS, TOKEN_COLUMNS,
                   audit_entry, certificate_record, crl_record, opt_text, service_params,
                   service_record, token_record)

# Ordered forward migrations; the index + 1 is the schema version they lead to. The tables and
# columns are SQLiteStore's: times are RFC 3339 'Z' text (COLLATE "C": sorted and compared as
# bytes, like SQLite, whatever the database's locale), lists and objects are JSON text.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE services (
        service_id TEXT COLLATE "C" PRIMARY KEY,
        service_name TEXT NOT NULL,
        endpoints TEXT NOT NULL DEFAULT '[]',
        health_check_url TEXT,
        version TEXT,
        owner TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        san_dns TEXT NOT NULL DEFAULT '[]',
        san_ip TEXT NOT NULL DEFAULT '[]',
        created_at TEXT COLLATE "C" NOT NULL,
        updated_at TEXT COLLATE "C" NOT NULL,
        health_status TEXT NOT NULL DEFAULT 'unknown',
        last_checked TEXT COLLATE "C",
        last_error TEXT,
        consecutive_failures INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE certificates (
        id BIGSERIAL PRIMARY KEY,
        serial TEXT COLLATE "C" NOT NULL UNIQUE,
        service_id TEXT COLLATE "C" NOT NULL REFERENCES services(service_id),
        subject TEXT NOT NULL,
        san_dns TEXT NOT NULL,
        san_ip TEXT NOT NULL,
        not_before TEXT COLLATE "C" NOT NULL,
        not_after TEXT COLLATE "C" NOT NULL,
        fingerprint TEXT COLLATE "C" NOT NULL UNIQUE,
        pem TEXT NOT NULL,
        issued_at TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX certificates_service ON certificates(service_id, id);
    CREATE INDEX certificates_not_after ON certificates(not_after);
    CREATE TABLE revocations (
        serial TEXT COLLATE "C" PRIMARY KEY REFERENCES certificates(serial),
        revoked_at TEXT COLLATE "C" NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE TABLE crls (
        number BIGINT PRIMARY KEY,
        this_update TEXT COLLATE "C" NOT NULL,
        next_update TEXT COLLATE "C" NOT NULL,
        entries INTEGER NOT NULL,
        der BYTEA NOT NULL
    );
    CREATE TABLE tokens (
        token_id TEXT COLLATE "C" PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('admin', 'enrolment')),
        secret_hash TEXT NOT NULL,
        name TEXT,
        service_id TEXT COLLATE "C",
        created_at TEXT COLLATE "C" NOT NULL,
        expires_at TEXT COLLATE "C",
        used_at TEXT COLLATE "C",
        revoked_at TEXT COLLATE "C"
    );
    CREATE TABLE audit_log (
        id BIGSERIAL PRIMARY KEY,
        at TEXT COLLATE "C" NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        service_id TEXT COLLATE "C",
        serial TEXT COLLATE "C",
        details TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_service ON audit_log(service_id, id);
    """,
    # 2: no UNIQUE index on fingerprint (certificates are found by serial; see the SQLite store).
    """
    ALTER TABLE certificates DROP CONSTRAINT IF EXISTS certificates_fingerprint_key
    """,
)

# Transaction-level advisory lock keys (bigint; ASCII "vccpki" and a number).
MIGRATION_LOCK = 0x7663_6370_6B69_0001
CRL_LOCK = 0x7663_6370_6B69_0002

_INSERT_CERTIFICATE = ("INSERT INTO certificates (serial, service_id, subject, san_dns, san_ip, "
                       "not_before, not_after, fingerprint, pem, issued_at) "
                       "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)")
_INSERT_AUDIT = ("INSERT INTO audit_log (at, actor, action, service_id, serial, details) "
                 "VALUES (%s,%s,%s,%s,%s,%s)")

Row = tuple[Any, ...]


def describe(dsn: str) -> str:
    """``host:port/dbname`` of a DSN, for messages: never its password."""
    try:
        parts = _conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(unparsable database_url)"
    return f"{parts.get('host') or 'localhost'}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"


class PostgresStore:
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

    def __init__(self, dsn: str, *, connect_timeout: float = 10.0) -> None:
        self.dsn = dsn
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._db = self._connect()
        try:
            self._migrate()
            self._reader = self._connect()
        except BaseException:
            self._db.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresStore({describe(self.dsn)!r})"

    def _connect(self) -> psycopg.Connection[Row]:
        try:
            return psycopg.connect(self.dsn, autocommit=True,
                                   connect_timeout=max(1, int(self._connect_timeout)))
        except psycopg.Error as exc:
            raise CAUnavailable(f"cannot connect to PostgreSQL at {describe(self.dsn)}: "
                                f"{_first_line(exc)}") from None

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close both connections. Idempotent."""
        with self._lock:
            self._closed = True
            self._db.close()
        if hasattr(self, "_reader"):
            with self._read_lock:
                self._reader.close()

    def _usable(self, conn: psycopg.Connection[Row]) -> psycopg.Connection[Row]:
        if self._closed:
            raise RuntimeError("the store is closed")
        return conn if not conn.closed else self._connect()

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
        with self._lock, self._errors():
            self._db = self._usable(self._db)
            with self._db.transaction():
                yield self._db

    def _read(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[Row]:
        with self._read_lock, self._errors():
            self._reader = self._usable(self._reader)
            return self._reader.execute(sql, params).fetchall()

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

    def schema_version(self) -> int:
        return int(self._read("SELECT version FROM schema_version")[0][0])

    def integrity_check(self) -> str:
        """``"ok"`` when the database answers (PostgreSQL checks its own pages)."""
        return "ok" if self._read("SELECT 1")[0][0] == 1 else "no answer"

    @staticmethod
    def _audit(db: psycopg.Connection[Row], entry: AuditEntry) -> None:
        db.execute(_INSERT_AUDIT, (utc_text(entry.at), entry.actor, entry.action, entry.service_id,
                                   entry.serial, dumps(entry.details)))

    def audit(self, entry: AuditEntry) -> None:
        with self._write() as db:
            self._audit(db, entry)

    def audit_log(self, *, limit: int = 100, service_id: str | None = None) -> list[AuditEntry]:
        where, params = ("WHERE service_id = %s", [service_id]) if service_id else ("", [])
        rows = self._read(f"SELECT {AUDIT_COLUMNS} FROM audit_log {where} ORDER BY id DESC LIMIT %s",
                          [*params, limit])
        return [audit_entry(r) for r in rows]

    # -- services ---------------------------------------------------------------------------
    _service_row = staticmethod(service_params)

    _service = staticmethod(service_record)

    def add_service(self, service: ServiceRecord, *, actor: str, token: TokenRecord | None = None) -> None:
        with self._write() as db:
            try:
                with db.transaction():  # a savepoint: the duplicate is reported, not re-raised raw
                    db.execute(
                        "INSERT INTO services (service_name, endpoints, health_check_url, version, owner, "
                        "metadata, san_dns, san_ip, created_at, updated_at, service_id) "
                        "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", self._service_row(service))
            except pgerrors.UniqueViolation:
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
                "UPDATE services SET service_name=%s, endpoints=%s, health_check_url=%s, version=%s, "
                "owner=%s, metadata=%s, san_dns=%s, san_ip=%s, created_at=%s, updated_at=%s "
                "WHERE service_id=%s", self._service_row(service))
            if cur.rowcount == 0:
                raise NotFound(f"unknown service '{service.service_id}'", code="unknown_service")
            self._audit(db, AuditEntry(at=service.updated_at, actor=actor, action=action,
                                       service_id=service.service_id))

    def get_service(self, service_id: str) -> ServiceRecord | None:
        rows = self._read(f"SELECT {SERVICE_COLUMNS} FROM services WHERE service_id=%s", (service_id,))
        return self._service(rows[0]) if rows else None

    def list_services(self, *, healthy: bool | None = None, limit: int = 100,
                      after: str | None = None) -> list[ServiceRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        if healthy is not None:
            clauses.append("health_status = 'healthy'" if healthy else "health_status != 'healthy'")
        if after is not None:
            clauses.append("service_id > %s")
            params.append(after)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._read(f"SELECT {SERVICE_COLUMNS} FROM services {where} "
                          f"ORDER BY service_id LIMIT %s", [*params, limit])
        return [self._service(r) for r in rows]

    def record_health(self, service_id: str, health: Health, *, event: str | None) -> None:
        with self._write() as db:
            db.execute("UPDATE services SET health_status=%s, last_checked=%s, last_error=%s, "
                       "consecutive_failures=%s WHERE service_id=%s",
                       (health.status, opt_text(health.last_checked), health.last_error,
                        health.consecutive_failures, service_id))
            if event and health.last_checked is not None:
                details = {"error": health.last_error} if health.last_error else {}
                self._audit(db, AuditEntry(at=health.last_checked, actor="health-checker",
                                           action=event, service_id=service_id, details=details))

    # -- certificates -----------------------------------------------------------------------
    _cert = staticmethod(certificate_record)

    @staticmethod
    def _insert_certificate(db: psycopg.Connection[Row], record: CertificateRecord, actor: str) -> None:
        issued_at, not_after = utc_text(record.issued_at), utc_text(record.not_after)
        try:
            with db.transaction():  # a savepoint, so the constraint error can be reported
                db.execute(_INSERT_CERTIFICATE, (
                    record.serial, record.service_id, record.subject, dumps(list(record.san_dns)),
                    dumps(list(record.san_ip)), utc_text(record.not_before), not_after,
                    record.fingerprint, record.pem, issued_at))
        except pgerrors.UniqueViolation as exc:
            raise Conflict(f"certificate serial {record.serial} is already in the store: "
                           f"{_first_line(exc)}") from None
        except pgerrors.ForeignKeyViolation:
            raise Conflict(f"certificate serial {record.serial}: service '{record.service_id}' "
                           "is not registered") from None
        db.execute(_INSERT_AUDIT, (issued_at, actor, "certificate.issue", record.service_id,
                                   record.serial, dumps({"not_after": not_after})))

    def add_certificate(self, record: CertificateRecord, *, actor: str,
                        consume_token: str | None = None, now: datetime | None = None) -> None:
        """Record an issued certificate; with ``consume_token`` the enrolment token is spent in
        the same transaction, and a token already spent (by any replica) makes the whole call
        fail (``Conflict``, code ``invalid_token``). Returns once committed."""
        with self._write() as db:
            if consume_token is not None:
                cur = db.execute("UPDATE tokens SET used_at=%s WHERE token_id=%s AND used_at IS NULL "
                                 "AND revoked_at IS NULL",
                                 (utc_text(now or record.issued_at), consume_token))
                if cur.rowcount != 1:
                    raise Conflict("enrolment token already used", code="invalid_token")
            self._insert_certificate(db, record, actor)

    async def add_certificate_async(self, record: CertificateRecord, *, actor: str,
                                    consume_token: str | None = None,
                                    now: datetime | None = None) -> None:
        """:meth:`add_certificate` in a worker thread (no group commit here: PostgreSQL commits
        concurrent transactions from many connections itself); returns once committed."""
        await asyncio.to_thread(self.add_certificate, record, actor=actor,
                                consume_token=consume_token, now=now)

    def add_certificates(self, records: list[tuple[CertificateRecord, str]]) -> None:
        """Record several certificates in one transaction: all or none."""
        with self._write() as db:
            for record, actor in records:
                self._insert_certificate(db, record, actor)

    def get_certificate(self, serial: str) -> CertificateRecord | None:
        rows = self._read(f"SELECT {CERT_COLUMNS} FROM {CERT_FROM} WHERE c.serial=%s", (serial,))
        return self._cert(rows[0]) if rows else None

    def certificates_for(self, service_id: str) -> list[CertificateRecord]:
        rows = self._read(f"SELECT {CERT_COLUMNS} FROM {CERT_FROM} WHERE c.service_id=%s "
                          f"ORDER BY c.id DESC", (service_id,))
        return [self._cert(r) for r in rows]

    def list_certificates(self, query: CertificateQuery) -> list[CertificateRecord]:
        clauses: list[str] = []
        params: list[Any] = []
        now = utc_text(query.now)
        if query.service_id is not None:
            clauses.append("c.service_id = %s")
            params.append(query.service_id)
        if query.status == "revoked":
            clauses.append("r.serial IS NOT NULL")
        elif query.status == "expired":
            clauses.append("r.serial IS NULL AND c.not_after <= %s")
            params.append(now)
        elif query.status == "valid":
            clauses.append("r.serial IS NULL AND c.not_after > %s AND c.not_before <= %s")
            params += [now, now]
        if query.expiring_before is not None:
            clauses.append("r.serial IS NULL AND c.not_after > %s AND c.not_after <= %s")
            params += [now, utc_text(query.expiring_before)]
        if query.after is not None:
            clauses.append("c.id > %s")
            params.append(query.after)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._read(f"SELECT {CERT_COLUMNS} FROM {CERT_FROM} {where} ORDER BY c.id LIMIT %s",
                          [*params, query.limit])
        return [self._cert(r) for r in rows]

    def revoke_certificate(self, serial: str, *, reason: str, at: datetime, actor: str) -> CertificateRecord:
        with self._write() as db:
            # FOR UPDATE OF c: two replicas revoking one serial queue here; the second sees the first's row.
            row = db.execute(f"SELECT {CERT_COLUMNS} FROM {CERT_FROM} WHERE c.serial=%s FOR UPDATE OF c",
                             (serial,)).fetchone()
            if row is None:
                raise NotFound(f"unknown certificate serial {serial}", code="unknown_certificate")
            record = self._cert(row)
            if record.revoked_at is not None:
                raise Conflict(f"certificate {serial} of '{record.service_id}' is already revoked "
                               f"({record.revocation_reason})", code="already_revoked")
            db.execute("INSERT INTO revocations (serial, revoked_at, reason) VALUES (%s,%s,%s)",
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
        """Build and store the next CRL inside one transaction holding an advisory lock.

        ``build(number, revoked)`` signs it. The lock is taken before anything is read, and
        under READ COMMITTED every later statement sees all that was committed before it: so
        the number follows the newest CRL of any replica, and the revocations include every
        one committed before this CRL (one committed meanwhile makes its own, newer CRL).
        """
        with self._write() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (CRL_LOCK,))
            row = db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM crls").fetchone()
            assert row is not None
            number = int(row[0])
            rows = db.execute("SELECT serial, revoked_at, reason FROM revocations").fetchall()
            crl = build(number, [(r[0], parse_utc(r[1]), r[2]) for r in rows])
            db.execute("INSERT INTO crls (number, this_update, next_update, entries, der) "
                       "VALUES (%s,%s,%s,%s,%s)", (crl.number, utc_text(crl.this_update),
                                                   utc_text(crl.next_update), crl.entries, crl.der))
            # As SQLiteStore: 50 rows of history for `crl list`, bodies of the newest two only.
            db.execute("DELETE FROM crls WHERE number < %s", (crl.number - 50,))
            db.execute("UPDATE crls SET der = ''::bytea WHERE number < %s AND length(der) > 0",
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
        rows = self._read("SELECT number, this_update, next_update, ''::bytea, entries FROM crls "
                          "ORDER BY number DESC LIMIT %s", (limit,))
        return [self._crl(r) for r in rows]

    # -- tokens -----------------------------------------------------------------------------
    @staticmethod
    def _insert_token(db: psycopg.Connection[Row], token: TokenRecord, actor: str) -> None:
        try:
            with db.transaction():
                db.execute("INSERT INTO tokens (token_id, kind, secret_hash, name, service_id, created_at, "
                           "expires_at, used_at, revoked_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                           (token.token_id, token.kind, token.secret_hash, token.name, token.service_id,
                            utc_text(token.created_at), opt_text(token.expires_at),
                            opt_text(token.used_at), opt_text(token.revoked_at)))
        except pgerrors.UniqueViolation:
            raise Conflict(f"token {token.token_id} already exists") from None
        PostgresStore._audit(db, AuditEntry(at=token.created_at, actor=actor,
                                            action=f"token.create.{token.kind}",
                                            service_id=token.service_id,
                                            details={"token_id": token.token_id}))

    def add_token(self, token: TokenRecord, *, actor: str) -> None:
        with self._write() as db:
            self._insert_token(db, token, actor)

    _token = staticmethod(token_record)

    def get_token(self, token_id: str) -> TokenRecord | None:
        rows = self._read(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id=%s", (token_id,))
        return self._token(rows[0]) if rows else None

    def list_tokens(self, kind: str | None = None) -> list[TokenRecord]:
        where, params = ("WHERE kind=%s", (kind,)) if kind else ("", ())
        rows = self._read(f"SELECT {TOKEN_COLUMNS} FROM tokens {where} ORDER BY created_at", params)
        return [self._token(r) for r in rows]

    def revoke_token(self, token_id: str, *, at: datetime, actor: str) -> TokenRecord:
        with self._write() as db:
            row = db.execute(f"UPDATE tokens SET revoked_at=%s WHERE token_id=%s AND revoked_at IS NULL "
                             f"RETURNING {TOKEN_COLUMNS}", (utc_text(at), token_id)).fetchone()
            if row is None:
                exists = db.execute("SELECT 1 FROM tokens WHERE token_id=%s", (token_id,)).fetchone()
                if exists:
                    raise Conflict(f"token {token_id} is already revoked")
                raise NotFound(f"unknown token '{token_id}'")
            token = self._token(row)
            self._audit(db, AuditEntry(at=at, actor=actor, action=f"token.revoke.{token.kind}",
                                       service_id=token.service_id, details={"token_id": token_id}))
        return token


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
