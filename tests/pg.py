"""A throwaway PostgreSQL cluster for tests (initdb + pg_ctl, as the ``postgres`` OS user when root).

Imported as ``pg``. PostgreSQL refuses to run as root, so under root every command runs through
``runuser -u postgres``. The cluster trusts local connections, skips fsync (a test database
need not survive a power loss) and lives in a temp folder removed at the end.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support import free_port


def bin_dir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    found = shutil.which("pg_ctl")
    candidates = [str(Path(found).resolve().parent)] if found else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if all(os.access(Path(folder) / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    return None


def unavailable() -> str | None:
    """Why no cluster can be started here (None: it can)."""
    if bin_dir() is None:
        return "PostgreSQL binaries (initdb, pg_ctl, postgres) are not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' OS user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    return None


def _run(args: list[str], *, user: str | None) -> None:
    cmd = ["runuser", "-u", user, "--", *args] if user else args
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")


@contextmanager
def cluster() -> Iterator[str]:
    """Start a fresh cluster on a free loopback port; yield the DSN of its ``postgres`` database."""
    folder = bin_dir()
    assert folder is not None, unavailable()
    user = "postgres" if os.geteuid() == 0 else None
    # Not under pytest's tmp_path: its parents are 0700 root, which the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="vcc-pki-pg-"))
    data = root / "data"
    data.mkdir()
    if user:
        entry = pwd.getpwnam(user)
        for path in (root, data):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = free_port()
    try:
        _run([str(folder / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
              "--no-sync"], user=user)
        options = (f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        _run([str(folder / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"),
              "-w", "-t", "30", "start"], user=user)
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            _run([str(folder / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], user=user)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(admin_dsn: str) -> str:
    """A new empty database in the cluster of ``admin_dsn``; returns its DSN."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_dsn.rsplit("/", 1)[0] + f"/{name}"
