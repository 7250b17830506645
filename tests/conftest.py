"""Session-scoped CA fixtures: one EC CA home for the whole run (RSA only where it is the point)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from support import RunningServer
from vcc_pki_server.authority import Actor, Authority
from vcc_pki_server.config import Config
from vcc_pki_server.home import Home

ROOT_PASSWORD = "root-password-for-tests"
CA_PASSWORD = "intermediate-password-for-tests"


def build_home(path: Path, *, config: Config | None = None, ca_made: datetime | None = None) -> Home:
    """A home with an EC P-256 root and intermediate (made at ``ca_made``, default now),
    config.toml and a server certificate."""
    home = Home(path)
    home.ensure()
    home.save_config(config or Config(health_allow_loopback=True))  # test services run on loopback
    home.create_root(ROOT_PASSWORD, key_type="ec-p256", now=ca_made)
    home.create_intermediate(ROOT_PASSWORD, CA_PASSWORD, key_type="ec-p256", now=ca_made)
    authority = home.authority(CA_PASSWORD)
    home.issue_server_certificate(authority, home.config())
    authority.generate_crl(actor=Actor.operator())
    authority.store.close()
    return home


def new_admin_token(home: Home, name: str = "tests") -> str:
    """An admin token made through ``home``'s store (for a server of a test's own)."""
    authority = home.authority()
    try:
        return authority.create_admin_token(name=name, expires_days=None, actor=Actor.operator()).value
    finally:
        authority.store.close()


@pytest.fixture(scope="session")
def ca_home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    return build_home(tmp_path_factory.mktemp("ca") / "home")


@pytest.fixture(scope="session")
def authority(ca_home: Home) -> Iterator[Authority]:
    auth = ca_home.authority(CA_PASSWORD)
    yield auth
    auth.store.close()


@pytest.fixture
def operator() -> Actor:
    return Actor.operator()


@pytest.fixture
def service_id() -> str:
    """A fresh service id, so tests sharing the session CA do not collide."""
    return f"svc-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def admin_token(authority: Authority) -> str:
    return authority.create_admin_token(name="tests", expires_days=None, actor=Actor.operator()).value


@pytest.fixture(scope="session")
def pki_server(ca_home: Home, authority: Authority) -> Iterator[RunningServer]:
    """The real server (subprocess, uvicorn, TLS) over the session CA home."""
    server = RunningServer(ca_home, CA_PASSWORD, extra_args=["--health-interval", "1"])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A throwaway PostgreSQL cluster for the session (started only if a test asks for it): the
    DSN of its ``postgres`` database. Skips where PostgreSQL is not installed (CI has it)."""
    import pg

    reason = pg.unavailable()
    if reason is not None:
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    with pg.cluster() as dsn:
        yield dsn


@pytest.fixture
def pg_database(postgres_dsn: str) -> str:
    """The DSN of a new, empty database in the session's PostgreSQL cluster."""
    import pg

    return pg.create_database(postgres_dsn)
