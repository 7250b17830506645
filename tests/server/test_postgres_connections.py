"""The PostgreSQL store's connections (issue 15): a database that dropped them (a restart, a
failover) costs no failed call, timeouts come from the URL when it has them, leads fail over."""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg

from vcc_pki_server.store import AuditEntry
from vcc_pki_server.store.postgres import PostgresStore, _connection_settings


def drop_connections(dsn: str) -> int:
    """What a database restart does to clients: every other backend of the database ends."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        # The timeout (PostgreSQL 14+) waits until each backend has really gone, as after a restart.
        row = admin.execute("SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
    return int(row[0]) if row else 0


def test_connections_the_database_dropped_cost_no_failed_call(pg_database: str) -> None:
    store = PostgresStore(pg_database)
    try:
        assert store.latest_crl_number() >= 0
        store.audit(AuditEntry(at=datetime.now(timezone.utc), actor="test", action="test.before"))
        assert store.lead("health")
        assert drop_connections(pg_database) >= 3  # reader, writer, the lead's
        # The very next calls work (reads and writes): no "server closed the connection".
        assert store.latest_crl_number() >= 0
        store.audit(AuditEntry(at=datetime.now(timezone.utc), actor="test", action="test.after"))
        assert store.lead("health")  # the lead's connection was lost too: taken again
        other = PostgresStore(pg_database)
        try:
            assert not other.lead("health")  # held by the first store: one leader
        finally:
            other.close()
    finally:
        store.close()


def test_timeouts_default_to_short_ones_and_the_url_wins() -> None:
    plain = _connection_settings("postgresql://u@db/x", 5, 10)
    assert plain["connect_timeout"] == 5 and "statement_timeout=10000" in plain["options"]
    given = _connection_settings("postgresql://u@db/x?connect_timeout=30&options=-c%20statement_timeout%3D2500", 5, 10)
    assert "connect_timeout" not in given and "options" not in given  # libpq takes the URL's own
