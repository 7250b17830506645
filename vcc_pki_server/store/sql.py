"""What the SQL backends share: every store method whose statements are the same in SQLite and
PostgreSQL, written once with ``?`` placeholders.

A backend supplies the connection handling (:meth:`SQLStore._write`, :meth:`SQLStore._read`,
:meth:`SQLStore._exec`, the last two turning ``?`` into its own placeholder) and the few
spots where the dialects differ: how a duplicate key is reported (:meth:`SQLStore._duplicate`),
an empty blob literal, locking a row or the CRL sequence across processes. Certificates
are recorded by group commit (:mod:`.group_commit`) in both; migrations stay with each backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import attrs

from ..encoding import public_key_id_of_pem
from ..errors import Conflict, NotFound
from . import (
    AuditEntry,
    BuildCRL,
    CertificateQuery,
    CertificateRecord,
    CRLRecord,
    Health,
    NewCertificate,
    Outcomes,
    Publisher,
    Revoked,
    ServiceRecord,
    ServiceState,
    TokenRecord,
    dumps,
    opt_text,
    parse_utc,
    utc_text,
)
from .group_commit import GroupCommit, PendingCertificate
from .rows import (
    AUDIT_COLUMNS,
    CERT_COLUMNS,
    CERT_FROM,
    CRL_COLUMNS,
    SERVICE_COLUMNS,
    SERVICE_WRITE,
    TOKEN_COLUMNS,
    Row,
    audit_entry,
    certificate_record,
    certificate_rows,
    crl_record,
    service_params,
    service_record,
    token_record,
)

INSERT_AUDIT = "INSERT INTO audit_log (at, actor, action, service_id, serial, details) VALUES (?,?,?,?,?,?)"
INSERT_CERTIFICATE = ("INSERT INTO certificates (serial, service_id, subject, san_dns, san_ip, "
                      "not_before, not_after, fingerprint, pem, issued_at, key_id, issuer) "
                      "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")


# A revocation keeps its certificate's notAfter and issuer, so that the CRL's query reads one table.
INSERT_REVOCATION = ("INSERT INTO revocations (serial, revoked_at, reason, not_after, issuer) "
                     "SELECT ?, ?, ?, not_after, issuer FROM certificates WHERE serial = ?")
_SET_SERVICE = ", ".join(f"{column}=?" for column in SERVICE_WRITE[:-1])


# The join condition of ``certificates c`` to the current certificate of service ``s`` (the
# newest valid at the two ``?``, a time given twice): per service, the index on
# ``(service_id, id)`` is walked from the newest row to the first valid one.
_CURRENT = ("c.id = (SELECT v.id FROM certificates v WHERE v.service_id = s.service_id AND v.not_after > ? "
            "AND v.not_before <= ? AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.serial = v.serial) "
            "ORDER BY v.id DESC LIMIT 1)")


def _where(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause of the conditions whose value is not None (``("x = ?", value)``), and its
    parameters; "" when there are none."""
    used = [(clause, value) for clause, value in conditions if value is not None]
    where = ("WHERE " + " AND ".join(clause for clause, _ in used)) if used else ""
    return where, [value for _, value in used]


class SQLStore:
    """The shared half of :class:`.sqlite.SQLiteStore` and :class:`.postgres.PostgresStore`."""

    # Why the last write failed (the store was unavailable), until a write succeeds: /health
    # reports it, since a read can succeed on a full disk or a read-only file.
    write_failure: str | None = None

    # Told of every answer of :meth:`lead` (role, held): /metrics shows which process leads.
    lead_watcher: Callable[[str, bool], None] | None = None

    # Dialect differences, set by each backend.
    EMPTY_BLOB = "x''"  # a zero-length blob literal
    LOCK_ROW = ""  # appended to a SELECT of a row the transaction is about to change

    # Row conversions (a backend may remember them by row).
    _service = staticmethod(service_record)
    _token = staticmethod(token_record)
    _cert = staticmethod(certificate_record)
    _crl = staticmethod(crl_record)

    def lead(self, role: str) -> bool:
        """:meth:`Store.lead` (each backend's :meth:`_take_lead`), told to :attr:`lead_watcher`."""
        held = self._take_lead(role)
        if self.lead_watcher is not None:
            self.lead_watcher(role, held)
        return held

    # -- what a backend provides ------------------------------------------------------------
    def _take_lead(self, role: str) -> bool:
        """Whether this store object holds ``role``'s lead, taking it if it is free."""
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Any]:
        """One write transaction; yields the connection."""
        raise NotImplementedError

    def _read(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[Row]:
        """All rows of one read-only statement (``?`` placeholders)."""
        raise NotImplementedError

    @staticmethod
    def _exec(db: Any, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> Any:
        """Run one statement (``?`` placeholders) in the transaction of ``db``; the cursor."""
        raise NotImplementedError

    def _duplicate(self, db: Any, message: str) -> AbstractContextManager[None]:
        """Around an INSERT: a duplicate key raises ``Conflict(message)`` and leaves the
        transaction usable."""
        raise NotImplementedError

    def _savepoint(self, db: Any) -> AbstractContextManager[None]:
        """Around one certificate of a group commit: if the block raises, its statements are
        undone, the transaction goes on, and the error is one of the core's."""
        raise NotImplementedError

    def _lock_crl_numbers(self, db: Any) -> None:
        """Serialise CRL generation across processes sharing the database (if needed)."""

    def _listing_source(self, status: str | None, now: str) -> str:
        """The FROM clause of :meth:`list_certificates`."""
        return CERT_FROM

    # -- schema and audit -------------------------------------------------------------------
    def schema_version(self) -> int:
        return int(self._read("SELECT version FROM schema_version")[0][0])

    @classmethod
    def _audit(cls, db: Any, entry: AuditEntry) -> None:
        cls._exec(db, INSERT_AUDIT, (utc_text(entry.at), entry.actor, entry.action, entry.service_id,
                                     entry.serial, dumps(entry.details)))

    def audit(self, entry: AuditEntry) -> None:
        with self._write() as db:
            self._audit(db, entry)

    def audit_log(self, *, limit: int = 100, service_id: str | None = None) -> list[AuditEntry]:
        return [entry for _, entry in self.audit_page(limit=limit, service_id=service_id)]

    def audit_page(self, *, limit: int = 100, service_id: str | None = None, since: datetime | None = None,
                   before: int | None = None) -> list[tuple[int, AuditEntry]]:
        """Audit entries, newest first, with their ids: of ``service_id`` only, at or after
        ``since``, with an id below ``before`` (the cursor of the previous page)."""
        where, params = _where(("service_id = ?", service_id or None),
                               ("at >= ?", utc_text(since) if since is not None else None), ("id < ?", before))
        rows = self._read(f"SELECT id, {AUDIT_COLUMNS} FROM audit_log {where} ORDER BY id DESC LIMIT ?",
                          [*params, limit])
        return [(int(r[0]), audit_entry(r[1:])) for r in rows]

    # -- services ---------------------------------------------------------------------------
    def add_service(self, service: ServiceRecord, *, actor: str, token: TokenRecord | None = None) -> None:
        """Register a service; an id that was decommissioned is registered again (same row:
        its certificates and audit history stay, its health starts afresh)."""
        with self._write() as db:
            again = self._exec(db, f"UPDATE services SET {_SET_SERVICE}, health_status='unknown', "
                                   "last_checked=NULL, last_error=NULL, consecutive_failures=0, "
                                   "decommissioned_at=NULL WHERE service_id=? AND decommissioned_at IS NOT NULL",
                               service_params(service)).rowcount
            if not again:
                with self._duplicate(db, f"service '{service.service_id}' is already registered"):
                    self._exec(db, f"INSERT INTO services ({', '.join(SERVICE_WRITE)}) "
                                   f"VALUES ({','.join('?' * len(SERVICE_WRITE))})", service_params(service))
            self._audit(db, AuditEntry(at=service.created_at, actor=actor, action="service.register",
                                       service_id=service.service_id,
                                       details={"san_dns": list(service.san_dns),
                                                "san_ip": list(service.san_ip)}))
            if token is not None:
                self._insert_token(db, token, actor)

    def update_service(self, service: ServiceRecord, *, actor: str, action: str = "service.update") -> None:
        with self._write() as db:
            cur = self._exec(db, f"UPDATE services SET {_SET_SERVICE} WHERE service_id=? "
                                 "AND decommissioned_at IS NULL", service_params(service))
            if cur.rowcount == 0:
                raise NotFound(f"unknown service '{service.service_id}'", code="unknown_service")
            self._audit(db, AuditEntry(at=service.updated_at, actor=actor, action=action,
                                       service_id=service.service_id))

    def get_service(self, service_id: str) -> ServiceRecord | None:
        rows = self._read(f"SELECT {SERVICE_COLUMNS} FROM services WHERE service_id=? "
                          "AND decommissioned_at IS NULL", (service_id,))
        return self._service(rows[0]) if rows else None

    def list_services(self, *, healthy: bool | None = None, limit: int = 100,
                      after: str | None = None) -> list[ServiceRecord]:
        clauses: list[str] = ["decommissioned_at IS NULL"]
        params: list[Any] = []
        if healthy is not None:
            clauses.append("health_status = 'healthy'" if healthy else "health_status != 'healthy'")
        if after is not None:
            clauses.append("service_id > ?")
            params.append(after)
        where = "WHERE " + " AND ".join(clauses)
        rows = self._read(f"SELECT {SERVICE_COLUMNS} FROM services {where} "
                          f"ORDER BY service_id LIMIT ?", [*params, limit])
        return [self._service(r) for r in rows]

    def record_health(self, service_id: str, health: Health, *, event: str | None) -> None:
        with self._write() as db:
            self._exec(db, "UPDATE services SET health_status=?, last_checked=?, last_error=?, "
                           "consecutive_failures=? WHERE service_id=?",
                       (health.status, opt_text(health.last_checked), health.last_error,
                        health.consecutive_failures, service_id))
            if event and health.last_checked is not None:
                details = {"error": health.last_error} if health.last_error else {}
                self._audit(db, AuditEntry(at=health.last_checked, actor="health-checker",
                                           action=event, service_id=service_id, details=details))

    # -- certificates -----------------------------------------------------------------------
    _group: GroupCommit  # made by each backend's constructor, closed by its close()

    def submit_certificates(self, batch: Sequence[NewCertificate], done: Outcomes) -> None:
        """Queue issued certificates for the group commit, all in one go (so that they share a
        transaction); ``done`` gets the error of each (``None``: recorded) once all are
        committed or refused. A token to consume is spent in the same transaction, and a token
        already spent (by any process) fails that certificate alone (``Conflict``, code
        ``invalid_token``)."""
        self._group.submit([PendingCertificate(record, actor, token) for record, actor, token in batch], done)

    def add_certificate(self, record: CertificateRecord, *, actor: str, consume_token: str | None = None) -> None:
        """Record one certificate; returns once it is committed."""
        answer: Future[list[BaseException | None]] = Future()
        self.submit_certificates([(record, actor, consume_token)], answer.set_result)
        if (error := answer.result()[0]) is not None:
            raise error

    def add_certificates(self, records: list[tuple[CertificateRecord, str]]) -> None:
        """Record several certificates in one transaction: all or none (imports, benchmarks)."""
        with self._write() as db:
            for record, actor in records:
                self._insert_certificate(db, record.serial, *certificate_rows(record, actor))

    # What a backend's _write raises when a row breaks a constraint (the fast path's fallback).
    CONSTRAINT_ERRORS: tuple[type[Exception], ...] = (Conflict,)

    def _commit_batch(self, batch: list[PendingCertificate]) -> None:
        """The group commit's writer: one transaction for the whole batch; each item's
        ``error`` says whether it failed.

        Fast path: the records that spend no token go in with one multi-row INSERT per table
        (few statements: each one is a round trip to PostgreSQL, and in this thread a wait for
        the event loop to hand back the GIL). If a row breaks a constraint (a duplicate serial),
        that transaction is rolled back and the batch is written again one SAVEPOINT per record,
        so that only the failing record fails. Other errors (disk, lock timeout, a lost
        connection) fail the whole batch."""
        simple = [item for item in batch if item.consume_token is None]
        if simple:
            try:
                with self._write() as db:
                    self._insert_rows(db, INSERT_CERTIFICATE, [item.row for item in simple])
                    self._insert_rows(db, INSERT_AUDIT, [item.audit for item in simple])
                    self._record_each(db, [item for item in batch if item.consume_token is not None])
                return
            except self.CONSTRAINT_ERRORS:
                for item in batch:
                    item.error = None
        with self._write() as db:
            self._record_each(db, batch)

    def _insert_rows(self, db: Any, insert: str, rows: list[Row]) -> None:
        """``executemany(insert, rows)`` as multi-row INSERTs of at most 32 rows. The 64
        statements this can make stay in SQLite's statement cache (256) and are prepared once
        by PostgreSQL's driver."""
        head, _, values = insert.partition(" VALUES ")
        for at in range(0, len(rows), 32):
            chunk = rows[at:at + 32]
            self._exec(db, f"{head} VALUES {','.join([values] * len(chunk))}", [v for row in chunk for v in row])

    def _record_each(self, db: Any, items: list[PendingCertificate]) -> None:
        for item in items:
            try:
                with self._savepoint(db):
                    self._record_certificate(db, item)
            except Exception as exc:  # this certificate alone fails; its caller gets the error
                item.error = exc

    def _record_certificate(self, db: Any, item: PendingCertificate) -> None:
        if item.consume_token is not None:
            cur = self._exec(db, "UPDATE tokens SET used_at=? WHERE token_id=? AND used_at IS NULL "
                                 "AND revoked_at IS NULL", (item.used_at, item.consume_token))
            if cur.rowcount != 1:
                raise Conflict("enrolment token already used", code="invalid_token")
        self._insert_certificate(db, item.record.serial, item.row, item.audit)

    def _insert_certificate(self, db: Any, serial: str, row: Row, audit: Row) -> None:
        with self._duplicate(db, f"certificate serial {serial} is already in the store"):
            self._exec(db, INSERT_CERTIFICATE, row)
        self._exec(db, INSERT_AUDIT, audit)

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

    def revoke_certificates(self, serial: str, *, reason: str, at: datetime, actor: str,
                            service_wide: bool = False, same_key: bool = False,
                            publish: Publisher | None = None) -> Revoked:
        """Revoke ``serial`` and, in the same transaction, with ``service_wide`` every other
        unexpired certificate of its service, with ``same_key`` every unexpired certificate
        (of any service) with the public key of one revoked here. Each gets ``reason`` and an
        audit entry. With ``publish`` the next CRL of each issuer of those certificates is built
        and stored in that transaction too: a crash leaves both or neither, never a revocation
        missing from the CRL. 404 for an unknown serial, 409 if it is already revoked."""
        with self._write() as db:
            row = self._exec(db, f"SELECT {CERT_COLUMNS} FROM {CERT_FROM} WHERE c.serial=?{self.LOCK_ROW}",
                             (serial,)).fetchone()
            if row is None:
                raise NotFound(f"unknown certificate serial {serial}", code="unknown_certificate")
            record = self._cert(row)
            if record.revoked_at is not None:
                raise Conflict(f"certificate {serial} of '{record.service_id}' is already revoked "
                               f"({record.revocation_reason})", code="already_revoked")
            now = utc_text(at)
            targets = {serial: record.service_id}
            if service_wide:
                targets.update(self._live_serials(db, "c.service_id = ?", (record.service_id,), now))
            if same_key:
                keys = {record.key_id or public_key_id_of_pem(record.pem)}
                if service_wide:
                    keys |= self._keys_of(db, list(targets))
                targets.update(self._same_key(db, keys, now))
            for target, service_id in targets.items():
                self._exec(db, INSERT_REVOCATION, (target, now, reason, target))
                details: dict[str, Any] = {"reason": reason}
                if target != serial:
                    details["with"] = serial
                self._audit(db, AuditEntry(at=at, actor=actor, action="certificate.revoke",
                                           service_id=service_id, serial=target, details=details))
            crls = self._publish_crls(db, publish, [record.issuer], list(targets), at, actor)
        return Revoked(attrs.evolve(record, revoked_at=parse_utc(now), revocation_reason=reason),
                       tuple(targets), crls)

    def _publish_crls(self, db: Any, publish: Publisher | None, first: list[str], serials: list[str],
                      at: datetime, actor: str) -> tuple[CRLRecord, ...]:
        """The next CRL of every issuer of ``serials`` (``first`` first), in the transaction ``db``."""
        if publish is None or not serials:
            return ()
        marks = ",".join("?" * len(serials))
        found = {r[0] for r in self._exec(db, f"SELECT DISTINCT issuer FROM certificates WHERE serial IN "
                                                    f"({marks})", tuple(serials)).fetchall()}
        issuers = [*(i for i in first if i in found), *sorted(found - set(first))]
        return tuple(self._publish_crl(db, publish(issuer), issuer, at, actor) for issuer in issuers)

    def decommission_service(self, service_id: str, *, at: datetime, actor: str,
                             publish: Publisher | None = None) -> tuple[list[str], tuple[CRLRecord, ...]]:
        """Revoke every unexpired certificate of the service (cessationOfOperation), spend its
        enrolment tokens, and take it out of the registry; returns the serials revoked and,
        with ``publish``, the CRLs stored in the same transaction (as :meth:`revoke_certificates`).
        Its certificates and audit history stay. 404 for an unknown (or decommissioned) id."""
        now = utc_text(at)
        with self._write() as db:
            cur = self._exec(db, "UPDATE services SET decommissioned_at=? WHERE service_id=? "
                                 "AND decommissioned_at IS NULL", (now, service_id))
            if cur.rowcount == 0:
                raise NotFound(f"unknown service '{service_id}'", code="unknown_service")
            serials = list(self._live_serials(db, "c.service_id = ?", (service_id,), now))
            for serial in serials:
                self._exec(db, INSERT_REVOCATION, (serial, now, "cessationOfOperation", serial))
            self._exec(db, "UPDATE tokens SET revoked_at=? WHERE service_id=? AND kind='enrolment' "
                           "AND used_at IS NULL AND revoked_at IS NULL", (now, service_id))
            self._audit(db, AuditEntry(at=at, actor=actor, action="service.decommission", service_id=service_id,
                                       details={"revoked_serials": serials}))
            crls = self._publish_crls(db, publish, [], serials, at, actor)
        return serials, crls

    def _live_serials(self, db: Any, where: str, params: tuple[Any, ...], now: str) -> dict[str, str]:
        """Serial → service of the unexpired, unrevoked certificates matching ``where``."""
        rows = self._exec(db, f"SELECT c.serial, c.service_id FROM {CERT_FROM} WHERE r.serial IS NULL "
                              f"AND c.not_after > ? AND {where} ORDER BY c.id", (now, *params)).fetchall()
        return {r[0]: r[1] for r in rows}

    def _keys_of(self, db: Any, serials: list[str]) -> set[str]:
        marks = ",".join("?" * len(serials))
        rows = self._exec(db, f"SELECT key_id, pem FROM certificates WHERE serial IN ({marks})",
                          tuple(serials)).fetchall()
        return {r[0] or public_key_id_of_pem(r[1]) for r in rows}

    def _same_key(self, db: Any, keys: set[str], now: str) -> dict[str, str]:
        """Unexpired, unrevoked certificates of any of ``keys`` (a scan of the unexpired: no
        index slows issuance for this rare question; rows from before schema v3 are judged
        by their PEM)."""
        marks = ",".join("?" * len(keys))
        # Only the matching rows come back, and a PEM only for a row without its key_id.
        rows = self._exec(db, f"SELECT c.serial, c.service_id, c.key_id, "
                              f"CASE WHEN c.key_id IS NULL THEN c.pem END FROM {CERT_FROM} "
                              f"WHERE r.serial IS NULL AND c.not_after > ? "
                              f"AND (c.key_id IN ({marks}) OR c.key_id IS NULL) ORDER BY c.id",
                          (now, *sorted(keys))).fetchall()
        return {r[0]: r[1] for r in rows if (r[2] or public_key_id_of_pem(r[3])) in keys}

    def revoked(self, *, unexpired_at: datetime | None = None,
                issuer: str | None = None) -> list[tuple[str, datetime, str]]:
        """Every revocation ``(serial, revoked_at, reason)``; with ``unexpired_at``, those a CRL
        built then lists; with ``issuer``, those of that CA's certificates."""
        where, params = _where(("not_after > ?", utc_text(unexpired_at) if unexpired_at else None),
                               ("issuer = ?", issuer))
        rows = self._read(f"SELECT serial, revoked_at, reason FROM revocations {where} "
                          "ORDER BY revoked_at, serial", params)
        return [(r[0], parse_utc(r[1]), r[2]) for r in rows]

    def assign_issuer(self, issuer: str) -> int:
        if not (self._read("SELECT 1 FROM certificates WHERE issuer IS NULL LIMIT 1")
                or self._read("SELECT 1 FROM crls WHERE issuer IS NULL LIMIT 1")):
            return 0
        with self._write() as db:
            count = int(self._exec(db, "UPDATE certificates SET issuer = ? WHERE issuer IS NULL", (issuer,)).rowcount)
            self._exec(db, "UPDATE revocations SET issuer = ? WHERE issuer IS NULL", (issuer,))
            self._exec(db, "UPDATE crls SET issuer = ? WHERE issuer IS NULL", (issuer,))
        return count

    def issuer_counts(self, now: datetime) -> dict[str, int]:
        """Per issuer, the registered services whose current certificate (as :meth:`fleet`
        finds it) it issued."""
        at = utc_text(now)
        rows = self._read(f"SELECT c.issuer, COUNT(*) FROM services s JOIN certificates c ON {_CURRENT} "
                          "WHERE s.decommissioned_at IS NULL GROUP BY c.issuer", (at, at))
        return {r[0] or "": int(r[1]) for r in rows}

    # -- CRLs -------------------------------------------------------------------------------
    def new_crl(self, build: BuildCRL, *, at: datetime, actor: str, issuer: str = "") -> CRLRecord:
        """Build and store the next CRL of ``issuer`` inside one write transaction.

        ``build(number, revoked)`` signs it; ``revoked`` holds the revoked certificates still
        unexpired ``at`` (the CRL's thisUpdate): an expired one leaves the first CRL built
        after its notAfter (RFC 5280 §3.3 allows it, and 90 % expired revocations would
        otherwise make every CRL and every handshake that checks it ten times the cost).

        The transaction holds the write lock (SQLite) or an advisory lock taken before
        anything is read (PostgreSQL, where under READ
        COMMITTED every later statement sees all committed before it): CRL numbers strictly
        increase, and the newest CRL holds every revocation committed before it, even with
        several processes or replicas revoking at once.
        """
        with self._write() as db:
            return self._publish_crl(db, build, issuer, at, actor)

    def _publish_crl(self, db: Any, build: BuildCRL, issuer: str, at: datetime, actor: str) -> CRLRecord:
        """Build and store the next CRL of ``issuer`` in the transaction ``db`` (see :meth:`new_crl`)."""
        self._lock_crl_numbers(db)
        number = int(self._exec(db, "SELECT COALESCE(MAX(number), 0) + 1 FROM crls").fetchone()[0])
        rows = self._exec(db, "SELECT serial, revoked_at, reason FROM revocations WHERE not_after > ? "
                              "AND issuer = ?", (utc_text(at), issuer)).fetchall()
        crl = attrs.evolve(build(number, [(r[0], parse_utc(r[1]), r[2]) for r in rows]), issuer=issuer)
        self._exec(db, "INSERT INTO crls (number, this_update, next_update, entries, der, issuer) "
                       "VALUES (?,?,?,?,?,?)", (crl.number, utc_text(crl.this_update),
                                                utc_text(crl.next_update), crl.entries, crl.der, issuer))
        # Superseded CRLs: keep 50 rows of history per issuer for `crl list` but only the
        # newest two bodies; with 100k revocations every body is 5 MB.
        self._exec(db, "DELETE FROM crls WHERE issuer = ? AND number < (SELECT MIN(number) FROM (SELECT number "
                       "FROM crls WHERE issuer = ? ORDER BY number DESC LIMIT 51) AS kept)", (issuer, issuer))
        self._exec(db, f"UPDATE crls SET der = {self.EMPTY_BLOB} WHERE issuer = ? AND number < ? "
                       "AND length(der) > 0 AND number < (SELECT MAX(number) FROM crls WHERE issuer = ? "
                       "AND number < ?)", (issuer, crl.number, issuer, crl.number))
        self._audit(db, AuditEntry(at=crl.this_update, actor=actor, action="crl.generate",
                                   details={"number": crl.number, "entries": crl.entries, "issuer": issuer}))
        return crl

    def latest_crl_number(self, issuer: str | None = None) -> int:
        """The newest CRL number of ``issuer`` (None: of any); 0 before any."""
        where, params = _where(("issuer = ?", issuer))
        return int(self._read(f"SELECT COALESCE(MAX(number), 0) FROM crls {where}", params)[0][0])

    def latest_crl(self, issuer: str | None = None) -> CRLRecord | None:
        """The newest CRL of ``issuer`` (None: of any)."""
        where, params = _where(("issuer = ?", issuer))
        rows = self._read(f"SELECT {CRL_COLUMNS} FROM crls {where} ORDER BY number DESC LIMIT 1", params)
        return self._crl(rows[0]) if rows else None

    def list_crls(self, limit: int = 20) -> list[CRLRecord]:
        """The newest CRLs' numbers, dates and sizes, without their bodies (``der`` is empty)."""
        rows = self._read(f"SELECT number, this_update, next_update, {self.EMPTY_BLOB}, entries, issuer FROM crls "
                          "ORDER BY number DESC LIMIT ?", (limit,))
        return [self._crl(r) for r in rows]

    # -- state the servers share ---------------------------------------------------------------
    def shared_state(self, name: str) -> tuple[int, bytes] | None:
        rows = self._read("SELECT version, value FROM shared_state WHERE name=?", (name,))
        return (int(rows[0][0]), bytes(rows[0][1])) if rows else None

    def put_shared_state(self, name: str, value: bytes, *, replaces: int, at: datetime, actor: str) -> bool:
        when = utc_text(at)
        with self._write() as db:
            if replaces == 0:
                cur = self._exec(db, "INSERT INTO shared_state (name, version, value, updated_at) VALUES (?,1,?,?) "
                                     "ON CONFLICT (name) DO NOTHING", (name, value, when))
            else:
                cur = self._exec(db, "UPDATE shared_state SET version=?, value=?, updated_at=? "
                                     "WHERE name=? AND version=?", (replaces + 1, value, when, name, replaces))
            if cur.rowcount != 1:
                return False
            self._audit(db, AuditEntry(at=at, actor=actor, action="shared_state.update",
                                       details={"name": name, "version": replaces + 1}))
        return True

    # -- figures (/metrics) -----------------------------------------------------------------
    def fleet(self, now: datetime) -> list[ServiceState]:
        """Every registered service with its health and the validity of its current certificate
        (:func:`~vcc_pki_server.store.current_certificate`: the newest valid at ``now``). One
        statement: per service, the index on ``(service_id, id)`` is walked from the newest."""
        at = utc_text(now)
        rows = self._read(f"SELECT s.service_id, s.health_status, c.not_before, c.not_after FROM services s "
                          f"LEFT JOIN certificates c ON {_CURRENT} "
                          "WHERE s.decommissioned_at IS NULL ORDER BY s.service_id", (at, at))
        return [ServiceState(service_id=r[0], health_status=r[1],
                             not_before=parse_utc(r[2]) if r[2] else None,
                             not_after=parse_utc(r[3]) if r[3] else None) for r in rows]

    def revocation_counts(self) -> dict[str, int]:
        return {reason: int(n) for reason, n in self._read("SELECT reason, COUNT(*) FROM revocations GROUP BY reason")}

    def note_token_refusal(self, token_id: str, *, limit: int, at: datetime, actor: str) -> bool:
        """Count one refused request made with an enrolment token; at ``limit`` refusals the
        token is locked (revoked). True when this call locked it."""
        now = utc_text(at)
        with self._write() as db:
            locked = bool(self._exec(db, "UPDATE tokens SET refusals = refusals + 1, revoked_at = ? WHERE "
                                         "token_id = ? AND refusals + 1 >= ? AND used_at IS NULL AND "
                                         "revoked_at IS NULL", (now, token_id, limit)).rowcount == 1)
            if not locked:
                self._exec(db, "UPDATE tokens SET refusals = refusals + 1 WHERE token_id = ?", (token_id,))
            else:
                self._audit(db, AuditEntry(at=at, actor=actor, action="token.lock",
                                           details={"token_id": token_id, "refusals": limit}))
        return locked

    # -- tokens -----------------------------------------------------------------------------
    def _insert_token(self, db: Any, token: TokenRecord, actor: str) -> None:
        with self._duplicate(db, f"token {token.token_id} already exists"):
            self._exec(db, "INSERT INTO tokens (token_id, kind, secret_hash, name, service_id, created_at, "
                           "expires_at, used_at, revoked_at) VALUES (?,?,?,?,?,?,?,?,?)",
                       (token.token_id, token.kind, token.secret_hash, token.name, token.service_id,
                        utc_text(token.created_at), opt_text(token.expires_at),
                        opt_text(token.used_at), opt_text(token.revoked_at)))
        self._audit(db, AuditEntry(at=token.created_at, actor=actor, action=f"token.create.{token.kind}",
                                   service_id=token.service_id, details={"token_id": token.token_id}))

    def add_token(self, token: TokenRecord, *, actor: str) -> None:
        with self._write() as db:
            self._insert_token(db, token, actor)

    def get_token(self, token_id: str) -> TokenRecord | None:
        rows = self._read(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id=?", (token_id,))
        return self._token(rows[0]) if rows else None

    def list_tokens(self, kind: str | None = None) -> list[TokenRecord]:
        where, params = ("WHERE kind=?", (kind,)) if kind else ("", ())
        rows = self._read(f"SELECT {TOKEN_COLUMNS} FROM tokens {where} ORDER BY created_at", params)
        return [self._token(r) for r in rows]

    def revoke_token(self, token_id: str, *, at: datetime, actor: str) -> TokenRecord:
        with self._write() as db:
            cur = self._exec(db, "UPDATE tokens SET revoked_at=? WHERE token_id=? AND revoked_at IS NULL",
                             (utc_text(at), token_id))
            row = self._exec(db, f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id=?", (token_id,)).fetchone()
            if row is None:
                raise NotFound(f"unknown token '{token_id}'")
            if cur.rowcount != 1:
                raise Conflict(f"token {token_id} is already revoked")
            token = self._token(row)
            self._audit(db, AuditEntry(at=at, actor=actor, action=f"token.revoke.{token.kind}",
                                       service_id=token.service_id, details={"token_id": token_id}))
        return token
