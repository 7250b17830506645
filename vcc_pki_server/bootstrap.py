"""Creating a CA home: root, intermediate, the server's certificate and the first CRL.

Used by ``pki-admin init`` and by ``vcc-pki-server --dev`` on first start; it knows nothing
of either (progress goes to a ``report`` callable).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs
from cryptography import x509

from vcc_pki_client.keys import fingerprint_sha256

from .authority import Actor, Issued, utc_now
from .config import Config
from .errors import CAError
from .home import Home
from .store import AuditEntry, CRLRecord


def key_type_label(key_type: str) -> str:
    """``rsa-4096`` -> ``RSA-4096``, ``ec-p384`` -> ``EC P-384``."""
    kind, _, size = key_type.partition("-")
    return f"RSA-{size}" if kind == "rsa" else f"EC {size.upper()[0]}-{size[1:]}"


def record_key_creation(home: Home, action: str, cert: x509.Certificate, key_type: str) -> None:
    """Record the creation of a CA key pair (the store records everything else itself)."""
    store = home.open_store()
    try:
        store.audit(AuditEntry(at=utc_now(), actor=Actor.operator().label, action=action,
                               serial=format(cert.serial_number, "x"),
                               details={"key_type": key_type,
                                        "fingerprint_sha256": fingerprint_sha256(cert)}))
    finally:
        store.close()


@attrs.frozen
class Initialised:
    root: x509.Certificate
    intermediate: x509.Certificate
    server: Issued
    crl: CRLRecord


def initialize(home: Home, config: Config, *, root_password: str, ca_password: str,
               root_key_type: str = "rsa-4096", intermediate_key_type: str = "rsa-2048",
               report: Callable[[str], None] = lambda message: None) -> Initialised:
    """Create a complete CA home (config, root, intermediate, server certificate, first CRL).

    Everything is built in a staging folder beside ``home`` and moved into place at the end,
    so a failure (or Ctrl-C) leaves the home as it was. Raises :class:`CAError` if the home
    already has a CA.
    """
    refuse_existing_ca(home)
    parent = home.root.absolute().parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.root.name}.init-", dir=parent))
    try:
        stage = Home(staging)
        stage.ensure()
        stage.save_config(config)
        report(f"generating {key_type_label(root_key_type)} root key...")
        root = stage.create_root(root_password, key_type=root_key_type)
        record_key_creation(stage, "ca.init-root", root, root_key_type)
        report(f"generating {key_type_label(intermediate_key_type)} intermediate key...")
        intermediate = stage.create_intermediate(root_password, ca_password, key_type=intermediate_key_type)
        record_key_creation(stage, "ca.create-intermediate", intermediate, intermediate_key_type)
        authority = stage.authority(ca_password)
        try:
            report("issuing the server certificate...")
            server = stage.issue_server_certificate(authority, config)
            report("publishing the first CRL...")
            crl = authority.generate_crl(actor=Actor.operator())
        finally:
            authority.store.close()
        move_into_place(staging, home)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Initialised(root, intermediate, server, crl)


def refuse_existing_ca(home: Home) -> None:
    if home.has_root() or home.has_intermediate():
        raise CAError(f"{home.root} already has a CA; refusing to touch it")
    for path in (home.db, home.server_dir, home.services_dir):
        if path.exists():
            raise CAError(f"{home.root} already holds {path.name} (from an earlier run?); "
                          "use an empty folder as --home")


def move_into_place(staging: Path, home: Home) -> None:
    """Move a staged home into ``home``: one rename if it does not exist yet, else entry by entry
    with ``ca/`` last (a home without ``ca/`` counts as uninitialised)."""
    target = home.root
    if not target.exists():
        os.rename(staging, target)
        return
    refuse_existing_ca(home)
    names = sorted((p.name for p in staging.iterdir()), key=lambda n: n == "ca")
    moved: list[str] = []
    try:
        for name in names:
            os.replace(staging / name, target / name)
            moved.append(name)
    except OSError:
        for name in reversed(moved):
            if name != "config.toml":
                os.rename(target / name, staging / name)
        raise
    os.chmod(target, 0o700)
    staging.rmdir()
