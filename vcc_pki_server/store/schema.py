"""The tables, written once for both SQL backends (each spells a few column types its own way).

Times are RFC 3339 'Z' text and sort as text: in PostgreSQL those columns, and the keys, are
``COLLATE "C"`` (compared as bytes, like SQLite, whatever the database's locale). Lists and
objects are JSON text. Later schema versions are each backend's own migrations.
"""

from __future__ import annotations

from string import Template

_TABLES = Template(
"""
    CREATE TABLE services (
        service_id $key PRIMARY KEY,
        service_name TEXT NOT NULL,
        endpoints TEXT NOT NULL DEFAULT '[]',
        health_check_url TEXT,
        version TEXT,
        owner TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        san_dns TEXT NOT NULL DEFAULT '[]',
        san_ip TEXT NOT NULL DEFAULT '[]',
        created_at $key NOT NULL,
        updated_at $key NOT NULL,
        health_status TEXT NOT NULL DEFAULT 'unknown',
        last_checked $key,
        last_error TEXT,
        consecutive_failures INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE certificates (
        id $serial_id,
        serial $key NOT NULL UNIQUE,
        service_id $key NOT NULL REFERENCES services(service_id),
        subject TEXT NOT NULL,
        san_dns TEXT NOT NULL,
        san_ip TEXT NOT NULL,
        not_before $key NOT NULL,
        not_after $key NOT NULL,
        fingerprint $key NOT NULL UNIQUE,
        pem TEXT NOT NULL,
        issued_at $key NOT NULL
    );
    CREATE INDEX certificates_service ON certificates(service_id, id);
    CREATE INDEX certificates_not_after ON certificates(not_after);
    CREATE TABLE revocations (
        serial $key PRIMARY KEY REFERENCES certificates(serial),
        revoked_at $key NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE TABLE crls (
        number $bigint PRIMARY KEY,
        this_update $key NOT NULL,
        next_update $key NOT NULL,
        entries INTEGER NOT NULL,
        der $blob NOT NULL
    );
    CREATE TABLE tokens (
        token_id $key PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('admin', 'enrolment')),
        secret_hash TEXT NOT NULL,
        name TEXT,
        service_id $key,
        created_at $key NOT NULL,
        expires_at $key,
        used_at $key,
        revoked_at $key
    );
    CREATE TABLE audit_log (
        id $serial_id,
        at $key NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        service_id $key,
        serial $key,
        details TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX audit_service ON audit_log(service_id, id);
    """)

_DIALECTS = {
    "sqlite": {"key": "TEXT", "serial_id": "INTEGER PRIMARY KEY AUTOINCREMENT", "bigint": "INTEGER",
               "blob": "BLOB"},
    "postgres": {"key": 'TEXT COLLATE "C"', "serial_id": "BIGSERIAL PRIMARY KEY", "bigint": "BIGINT",
                 "blob": "BYTEA"},
}


def tables(dialect: str) -> str:
    """Schema version 1 (every table and index) in ``dialect``: ``sqlite`` or ``postgres``."""
    return _TABLES.substitute(_DIALECTS[dialect])
