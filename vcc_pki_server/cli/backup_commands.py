"""Backup and restore of a CA home: ``pki-admin backup | restore``.

A backup is one ``.tar.gz`` (mode 0600): the home's files as they are — CA certificates, the
keys still encrypted, the server's certificate, ``config.toml``, the root's CRL — and a copy of
the SQLite store made with SQLite's online backup API (consistent while the server writes:
not a file copy). ``secrets/`` (the passwords a ``--dev`` home keeps beside its keys) is left
out: a backup must not hold the keys and their passwords together. With PostgreSQL the archive
holds the home, and ``pki.sql`` from ``pg_dump`` when it is on PATH (else the command says
how to back the database up). ``manifest.json`` says what is inside.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .. import passwords
from ..errors import CAError, InvalidRequest
from ..home import Home
from ..store import utc_text
from .access import existing_home
from .output import print_json, progress

# What a backup leaves out: the store's live files (copied through the backup API instead),
# lock files, the kept passwords of a dev home, a staging folder of an interrupted init.
_SKIPPED_NAMES = ("pki.db", "pki.db-wal", "pki.db-shm", "pki.db-journal")
_SKIPPED_DIRS = ("secrets",)


def _skipped(relative: Path) -> bool:
    return (relative.parts[0] in _SKIPPED_DIRS or relative.name in _SKIPPED_NAMES
            or relative.name.endswith(".lock") or relative.name.endswith(".next"))


def _sqlite_copy(source: Path, target: Path) -> dict[str, int]:
    """A consistent copy of the store (SQLite's backup API) and what it holds."""
    if not source.is_file() or source.stat().st_size == 0:
        raise CAError(f"{source} is missing or empty: there is no store to back up")
    src = sqlite3.connect(f"{source.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        try:
            src.backup(dst, pages=1024)
        except sqlite3.Error as exc:
            raise CAError(f"cannot copy the store {source}: {exc}") from None
        check = dst.execute("PRAGMA integrity_check").fetchone()[0]
        if check != "ok":
            raise CAError(f"the copy of {source} fails SQLite's integrity check: {check}")
        certificates = dst.execute("SELECT count(*) FROM certificates").fetchone()[0]
        crl = dst.execute("SELECT coalesce(max(number), 0) FROM crls").fetchone()[0]
        return {"certificates": int(certificates), "crl_number": int(crl)}
    finally:
        src.close()
        dst.close()


def cmd_backup(args: argparse.Namespace) -> int:
    home = existing_home(args)
    out = Path(args.out)
    if out.exists():
        raise InvalidRequest(f"{out} exists: give a new file name (a backup never overwrites one)")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise InvalidRequest(f"cannot write {out}: {out.parent} is not a writable folder")
    url = home.database_url()
    manifest: dict[str, object] = {"format": 1, "made_at": utc_text(datetime.now(timezone.utc)),
                                   "home": str(home.root), "store": "postgresql" if url else "sqlite"}
    with tempfile.TemporaryDirectory(prefix=".vcc-pki-backup-", dir=out.parent) as tmp:
        extra: list[tuple[Path, str]] = []
        note = None
        if url is None:
            progress(f"copying the store {home.db} (SQLite online backup)...")
            manifest.update(_sqlite_copy(home.db, Path(tmp) / "pki.db"))
            extra.append((Path(tmp) / "pki.db", "pki.db"))
        elif shutil.which("pg_dump"):
            progress("dumping the PostgreSQL database (pg_dump)...")
            done = subprocess.run(["pg_dump", "--no-owner", "--file", str(Path(tmp) / "pki.sql"), url],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                said = done.stderr.strip().splitlines()
                raise CAError(f"pg_dump failed: {said[-1] if said else f'exit {done.returncode}'}")
            extra.append((Path(tmp) / "pki.sql", "pki.sql"))
            manifest["database"] = "pki.sql (pg_dump; restore with psql)"
        else:
            note = ("the database is PostgreSQL and pg_dump is not on PATH: back it up with pg_dump or "
                    "base backups + WAL archiving; this archive holds the home only")
            manifest["database"] = "not included"
        files = sorted(p for p in home.root.rglob("*") if p.is_file() and not _skipped(p.relative_to(home.root)))
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                data = json.dumps(manifest, indent=2).encode()
                info = tarfile.TarInfo("manifest.json")
                info.size, info.mode = len(data), 0o600
                tar.addfile(info, io.BytesIO(data))
                for path in files:
                    tar.add(path, arcname=f"home/{path.relative_to(home.root)}", recursive=False)
                for path, name in extra:
                    tar.add(path, arcname=f"home/{name}" if name == "pki.db" else name, recursive=False)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    if args.json:
        print_json({**manifest, "file": str(out), "files": len(files), "note": note})
    else:
        held = (f"{manifest['certificates']} certificates, CRL number {manifest['crl_number']}; "
                if "certificates" in manifest else "")
        print(f"backup of {home.root} written to {out} ({held}{len(files)} home files; secrets/ left out)")
        if note:
            print(f"note: {note}")
    return 0


def _unpack(archive: Path, staging: Path) -> dict[str, object]:
    """Extract the archive's ``home/`` into ``staging``; return its manifest."""
    not_ours = f"{archive} is not a backup made by `pki-admin backup`"
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            try:
                manifest = json.load(tar.extractfile("manifest.json") or io.BytesIO(b"{}"))
            except (KeyError, ValueError):
                raise InvalidRequest(f"{not_ours}: it has no manifest.json") from None
            members = [m for m in tar.getmembers() if m.name.startswith("home/")]
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: no links out, no device files
                tar.extractall(staging, members=members, filter="data")
            else:  # pragma: no cover
                tar.extractall(staging, members=[m for m in members if m.isfile() or m.isdir()])
    except (OSError, tarfile.TarError) as exc:
        raise InvalidRequest(f"{not_ours}: {exc}") from None
    return dict(manifest)


def cmd_restore(args: argparse.Namespace) -> int:
    archive = Path(args.file)
    target = Home.resolve(args.home)
    if target.root.exists() and any(target.root.iterdir()):
        raise InvalidRequest(f"{target.root} is not empty: restore into a new or empty folder")
    parent = target.root.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.root.name}.restore-", dir=parent))
    try:
        manifest = _unpack(archive, staging)
        restored = Home(staging / "home")
        if not restored.has_intermediate():
            raise InvalidRequest(f"{archive} holds no CA (no intermediate certificate and key)")
        progress("checking the restored home (store integrity, the intermediate key with its password)...")
        password = passwords.resolve(passwords.CA, file=args.password_file, value=args.password)
        restored.load_ca(password)  # a wrong password or a damaged key: one line, nothing restored
        store = restored.open_store()
        try:
            check = getattr(store, "integrity_check", lambda: "ok")()
            if check != "ok":
                raise CAError(f"the restored store fails its integrity check: {check}")
            number = store.latest_crl_number()
        finally:
            store.close()
        if target.root.exists():
            target.root.rmdir()
        os.replace(restored.root, target.root)
        os.chmod(target.root, 0o700)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"restored {archive} into {target.root} (made {manifest.get('made_at', '?')}; CRL number {number}); "
          "start the server on it, then check `pki-admin cert list`")
    if manifest.get("store") == "postgresql":
        print("note: the database is PostgreSQL: restore it first (psql < pki.sql from the archive, or your "
              "database backups), with database_url pointing at it")
    return 0
