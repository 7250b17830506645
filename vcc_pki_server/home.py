"""The CA's home folder: its layout, the CA key files in it, and loading an Authority from it.

The settings in ``config.toml`` are :mod:`.config`; creating a whole home is :mod:`.bootstrap`."""

from __future__ import annotations

import os
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vcc_pki_client.files import write_atomically
from vcc_pki_client.identity import PKI_SERVER_ID

from .authority import Actor, Authority, Issued, utc_now
from .ca import CAPrivateKey, CAs, CertificateAuthority, build_crl, create_intermediate, create_root, generate_key
from .ca_set import SHARED_NAME as CA_SET_NAME
from .ca_set import CASet, IntermediateEntry, RootEntry
from .config import Config
from .encoding import cert_pem, ski_hex
from .errors import CAError, CAUnavailable
from .store import Store
from .store.sqlite import SQLiteStore

ROOT_CRL_VALIDITY = timedelta(days=365)  # SPEC §10: the root's CRL, renewed by `pki-admin ca root-crl`

SERVER_SERVICE_ID = PKI_SERVER_ID  # the SDK requires the CA server's certificate to name it


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename) with ``mode`` from the start."""
    write_atomically(path, data, mode)


def key_pem(key: Any, password: str | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)  # type: ignore[no-any-return]


class Home:
    """Paths and files of one CA home (SPEC §2). Folders 0700, key files 0400."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.ca_dir = self.root / "ca"
        self.root_cert = self.ca_dir / "root_ca.pem"
        self.root_key = self.ca_dir / "root_ca_key.pem"
        self.root_crl_file = self.ca_dir / "root_crl.pem"
        self.intermediate_cert = self.ca_dir / "intermediate_ca.pem"
        self.intermediate_key = self.ca_dir / "intermediate_ca_key.pem"
        # Every CA this home has had (SPEC §13), by SKI: <ski>.pem, <ski>_key.pem, <ski>_cross.pem.
        self.authorities_dir = self.ca_dir / "authorities"
        self.services_dir = self.root / "service_certificates"
        self.server_dir = self.root / "server"
        self.server_cert = self.server_dir / "cert.pem"
        self.server_key = self.server_dir / "key.pem"
        self.secrets_dir = self.root / "secrets"
        self.db = self.root / "pki.db"
        self.config_file = self.root / "config.toml"

    @classmethod
    def resolve(cls, option: str | None) -> Home:
        """``--home``, else ``$VCC_PKI_HOME``, else ``./pki-data``."""
        return cls(option or os.environ.get("VCC_PKI_HOME") or "pki-data")

    def ensure(self) -> None:
        for folder in (self.root, self.ca_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)

    # -- config -----------------------------------------------------------------------------
    def config(self) -> Config:
        if not self.config_file.exists():
            return Config()
        try:
            return Config.from_toml(self.config_file.read_text())
        except (tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
            raise CAError(f"{self.config_file}: {exc}") from None

    def save_config(self, config: Config) -> None:
        write_file(self.config_file, config.to_toml().encode(), 0o600)

    # -- CA files ---------------------------------------------------------------------------
    def has_root(self) -> bool:
        return self.root_cert.exists() or self.root_key.exists()

    def has_intermediate(self) -> bool:
        return self.intermediate_cert.exists()

    def root_certificate(self) -> x509.Certificate:
        return _load_cert(self.root_cert, "root CA")

    def intermediate_certificate(self) -> x509.Certificate:
        return _load_cert(self.intermediate_cert, "intermediate CA")

    def load_root_key(self, root: x509.Certificate, password: str) -> CAPrivateKey:
        """The key of ``root`` (``root_ca_key.pem``, or its copy among the authorities)."""
        for path in (self.root_key, self.authorities_dir / f"{ski_hex(root)}_key.pem"):
            if path.exists():
                key = self._load_key(path, password, "root CA")
                if key.public_key() == root.public_key():
                    return key
        raise CAUnavailable(f"the key of root CA {root.subject.rfc4514_string()} is not in {self.ca_dir}: "
                            "run this where the root key is kept")

    def _load_key(self, path: Path, password: str, what: str) -> CAPrivateKey:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CAUnavailable(f"{what} key {path} is missing; run `pki-admin init`") from None
        try:
            key = serialization.load_pem_private_key(data, password.encode())
        except (ValueError, TypeError):
            raise CAUnavailable(f"wrong password for the {what} key ({path.name})") from None
        return key  # type: ignore[return-value]

    def create_root(self, password: str, *, key_type: str = "rsa-4096", now: datetime | None = None,
                    days: int = 3650) -> x509.Certificate:
        """Create the root CA (key encrypted with ``password``, 0400); refuses to overwrite one."""
        if self.has_root():
            raise CAError(f"{self.root} already has a root CA; refusing to overwrite it")
        self.ensure()
        key = generate_key(key_type)
        cert = create_root(key, now=now or utc_now(), days=days)
        write_file(self.root_key, key_pem(key, password), 0o400)
        write_file(self.root_cert, cert_pem(cert), 0o644)
        if not self.database_url():  # the store is born with the CA (open_store refuses a CA without one)
            SQLiteStore(self.db).close()
        return cert

    def create_intermediate(self, root_password: str, password: str, *, key_type: str = "rsa-2048",
                            now: datetime | None = None, days: int = 1825) -> x509.Certificate:
        """Create the intermediate CA signed by the root; refuses to overwrite one."""
        if self.has_intermediate():
            raise CAError(f"{self.root} already has an intermediate CA; refusing to overwrite it")
        root = self.root_certificate()
        root_key = self._load_key(self.root_key, root_password, "root CA")
        key = generate_key(key_type)
        cert = create_intermediate(root, root_key, key, now=now or utc_now(), days=days)
        write_file(self.intermediate_key, key_pem(key, password), 0o400)
        write_file(self.intermediate_cert, cert_pem(cert), 0o644)
        self._write_root_crl(root, root_key, now or utc_now())
        return cert

    def write_root_crl(self, root_password: str, *, now: datetime | None = None) -> x509.CertificateRevocationList:
        """Sign and write the root's CRL anew (``pki-admin ca root-crl``): the next CRL number,
        valid for a year. Raises CAUnavailable for a wrong root password."""
        root = self.root_certificate()
        return self._write_root_crl(root, self.load_root_key(root, root_password), now or utc_now())

    def root_crl(self) -> x509.CertificateRevocationList | None:
        """The root's CRL (SPEC §10: the intermediates it revoked), None in a home without one."""
        try:
            return x509.load_pem_x509_crl(self.root_crl_file.read_bytes())
        except FileNotFoundError:
            return None

    def _write_root_crl(self, root: x509.Certificate, root_key: CAPrivateKey,
                        now: datetime) -> x509.CertificateRevocationList:
        previous = self.root_crl()
        number = 1
        if previous is not None:
            number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        # No intermediate is revoked yet: CA rotation (SPEC §13) adds them.
        crl = build_crl(root, root_key, [], number=number, this_update=now,
                        next_update=now + ROOT_CRL_VALIDITY)
        write_file(self.root_crl_file, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return crl

    def load_ca(self, password: str, config: Config | None = None) -> CertificateAuthority:
        """The current intermediate as the home's files hold it (checks the CA password)."""
        config = config or self.config()
        cert = self.intermediate_certificate()
        key = self._load_key(self.intermediate_key, password, "intermediate CA")
        return CertificateAuthority(root=self.root_certificate(), certificate=cert, key=key,
                                    crl_url=config.crl_url(cert), issuer_url=config.issuer_url(cert))

    # -- the CA set (SPEC §13) ------------------------------------------------------------------
    def ca_set(self, store: Store) -> CASet:
        """The cluster's record of its CAs, or (before the first rotation) the home's files as one."""
        stored = store.shared_state(CA_SET_NAME)
        if stored is not None:
            return CASet.from_json(stored[1], stored[0])
        return CASet((RootEntry(self.root_certificate()),),
                     (IntermediateEntry(self.intermediate_certificate(), self.intermediate_key.read_bytes()),))

    def adopt_ca_set(self, cas: CASet) -> bool:
        """Rewrite the home's CA files from ``cas`` where they differ (a rotation made elsewhere,
        or one cut short here). Root keys are never in the record: ``root_ca_key.pem`` is copied
        from the authorities folder where this home has it. True if a file changed."""
        self.authorities_dir.mkdir(mode=0o700, exist_ok=True)
        plan: list[tuple[Path, bytes, int]] = []
        for root in cas.roots:
            plan.append((self.authorities_dir / f"{root.ski}.pem", cert_pem(root.cert), 0o644))
            if root.cross is not None:
                plan.append((self.authorities_dir / f"{root.ski}_cross.pem", cert_pem(root.cross), 0o644))
        for entry in cas.intermediates:
            plan.append((self.authorities_dir / f"{entry.ski}.pem", cert_pem(entry.cert), 0o644))
            plan.append((self.authorities_dir / f"{entry.ski}_key.pem", entry.key_pem, 0o400))
        current = cas.current
        root = cas.root_of(current.cert)
        root_key = self.authorities_dir / f"{root.ski}_key.pem"
        if root_key.exists():
            plan.append((self.root_key, root_key.read_bytes(), 0o400))
        # The key before its certificate: a pair read between the two is a mismatch, refused.
        plan += [(self.intermediate_key, current.key_pem, 0o400),
                 (self.intermediate_cert, cert_pem(current.cert), 0o644),
                 (self.root_cert, cert_pem(root.cert), 0o644)]
        changed = False
        for path, data, mode in plan:
            if not path.exists() or path.read_bytes() != data:
                write_file(path, data, mode)
                changed = True
        return changed

    def load_cas(self, password: str, store: Store, config: Config | None = None,
                 now: datetime | None = None) -> CAs:
        """Every CA the servers sign with; the home's files are first brought in line with the
        cluster's record (a rotation made on another host, one that just took effect, or one cut
        short here)."""
        config = config or self.config()
        now = now or utc_now()
        cas = self.ca_set(store)
        if cas.version:
            self.adopt_ca_set(cas.settled(now))
        return cas.authorities(password, lambda cert: (config.crl_url(cert), config.issuer_url(cert)), now)

    def database_url(self, config: Config | None = None) -> str | None:
        """The PostgreSQL URL: ``$VCC_PKI_DATABASE_URL``, else config.toml's ``database_url``,
        else None (SQLite)."""
        return os.environ.get("VCC_PKI_DATABASE_URL") or (config or self.config()).database_url

    def open_store(self, config: Config | None = None) -> Store:
        """The store: PostgreSQL when a database URL is set (SPEC §9), else ``<home>/pki.db``."""
        url = self.database_url(config)
        if url:
            try:
                from .store.postgres import PostgresStore
            except ImportError as exc:
                raise CAError(f"database_url is set but {exc}") from None
            return self._with_issuers(PostgresStore(url))
        self.ensure()
        if self.has_intermediate() and (not self.db.exists() or self.db.stat().st_size == 0):
            # A store made anew here would start CRL numbers at 1, list no revocation and know
            # no token: refuse rather than serve that as the truth.
            raise CAError(f"{self.db} is missing or empty, but {self.root} has a CA: restore it from a "
                          "backup (docs/operations.md); refusing to start on an empty store")
        return self._with_issuers(SQLiteStore(self.db))

    def _with_issuers(self, store: Store) -> Store:
        """``store``, with its rows from before schema 6 given their issuer: before any rotation
        (no CA record yet), the one intermediate there is."""
        if not self.has_intermediate():
            return store
        try:
            if store.shared_state(CA_SET_NAME) is None:
                store.assign_issuer(ski_hex(self.intermediate_certificate()))
        except BaseException:
            store.close()
            raise
        return store

    def authority(self, password: str | None = None) -> Authority:
        """An Authority over this home; with ``password`` it can sign."""
        config = self.config()
        store = self.open_store(config)
        try:
            cas = self.load_cas(password, store, config) if password is not None else None
        except BaseException:
            store.close()
            raise
        return Authority(store, cas, policy=config.policy(), settings=config.settings())

    # -- issued files -----------------------------------------------------------------------
    def write_service_files(self, service_id: str, issued: Issued, key: Any) -> Path:
        """``service_certificates/<id>/{cert,key,ca_chain}.pem``; key 0400, unencrypted."""
        folder = self.services_dir / service_id
        self.services_dir.mkdir(mode=0o700, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        write_file(folder / "key.pem", key_pem(key, None), 0o400)
        write_file(folder / "cert.pem", cert_pem(issued.certificate), 0o644)
        write_file(folder / "ca_chain.pem", cert_pem(*issued.chain), 0o644)
        return folder

    def issue_server_certificate(self, authority: Authority, config: Config) -> Issued:
        """The API server's own certificate (also its client certificate for health probes)."""
        dns = list(dict.fromkeys(["localhost", *config.server_san_dns]))
        ips = list(dict.fromkeys(["127.0.0.1", *config.server_san_ip]))
        actor = Actor.operator()
        if authority.store.get_service(SERVER_SERVICE_ID) is None:
            authority.register_without_token(SERVER_SERVICE_ID, service_name="VCC PKI server",
                                             san_dns=dns, san_ip=ips, actor=actor)
        issued, key = authority.issue_with_key(SERVER_SERVICE_ID, common_name="localhost",
                                               san_dns=dns, san_ip=ips, key_type="ec-p256",
                                               validity=timedelta(days=config.max_validity_days),
                                               actor=actor)
        self.server_dir.mkdir(mode=0o700, exist_ok=True)
        write_file(self.server_key, key_pem(key, None), 0o400)
        # The leaf and what a peer needs to reach its root: the intermediate (and, while a root
        # rotates, the cross-certificate that leads to the old root).
        write_file(self.server_cert, cert_pem(issued.certificate, *(c for c in issued.chain if c.issuer != c.subject)),
                   0o644)
        return issued


def _load_cert(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CAUnavailable(f"{what} certificate {path} is missing; run `pki-admin init`") from None
    except ValueError:
        raise CAUnavailable(f"{what} certificate {path} is not a PEM certificate: restore it from a "
                            "backup") from None
