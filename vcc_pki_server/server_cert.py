"""The API server's own certificate: presented through contexts that follow its files, renewed
by the running server when a third of its lifetime is left (SPEC §10), one pair for the whole
cluster.

The pair lives in the store (``shared_state`` "server-certificate": the certificate chain and
the key, the key encrypted with the CA password), so that every replica of a cluster presents
the same certificate instead of each renewing its own copy of the home's files. Each worker
checks every ``interval`` seconds, in a thread (file and store work stay off the event loop),
under an exclusive ``flock`` on ``<home>/server/renew.lock`` (the workers of one home):

* the store holds no pair yet (a new cluster, or one upgraded from before): the home's pair is
  stored (the first server to do so wins; the others adopt it);
* the store's pair differs from the files: the files are rewritten from it (another replica
  renewed it), or, when the files were replaced since the worker's previous check (by hand),
  they become the stored pair (at a process's first check, the newer of the two wins);
* it is due: a new certificate with a new key (the server holds the CA key) is written to the
  files and stored in place of the one it replaces (compare-and-set: if another replica renewed
  first, its pair is adopted instead);
* the files changed: the worker's contexts load the new pair for later handshakes.

The root's CRL is shared the same way (the newest by CRL number), so that ``pki-admin ca
root-crl`` run on one host reaches every replica.

CA rotation (SPEC §13): every ``ca_interval`` seconds (5) each worker looks at the version of the
cluster's CA record (:mod:`.ca_set`); when it changed, or a rotation's new intermediate became
the current one, the worker signs with the new CAs and its contexts trust them; the server
certificate is renewed (once for the cluster) when the current intermediate did not issue it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.concurrency import run_in_threadpool

from vcc_pki_client import CertificateFiles, ReloadingContexts

from .authority import Authority, utc_now
from .ca_set import SHARED_NAME as CA_SET_NAME
from .encoding import issuer_key_id
from .errors import CAError
from .home import Home, key_pem, write_file
from .store import Store

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("vcc_pki_server.server")


def due(cert: x509.Certificate, now: datetime) -> bool:
    """True once a third (or less) of the certificate's lifetime is left."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return now >= cert.not_valid_after_utc - lifetime / 3


class ServerCertificate:
    """The server's certificate in one worker: its TLS context, and keeping it fresh."""

    def __init__(self, home: Home, authority: Authority, password: str, *, interval: float = 60.0,
                 clock: Callable[[], datetime] = utc_now, ca_interval: float = 5.0) -> None:
        self.home = home
        self.authority = authority
        self.password = password  # the CA password: the shared copy of the key is encrypted with it
        self.interval = interval
        self.ca_interval = ca_interval
        self.clock = clock
        self.files = CertificateFiles(home.server_cert, home.server_key)
        # Client certificates are verified against our CAs (roots and intermediates) at the handshake.
        self.contexts = ReloadingContexts(self.files, ca_certs=authority.cas.trusted)
        self._stamp = self._file_stamp()
        # The serial this worker last left in the files: at first, what the server's start-up
        # left there (it synced the home with the cluster's copy); a later change is local.
        self._synced: int = self.files.load()[0].serial_number
        self._task: asyncio.Task[None] | None = None
        self._ca_task: asyncio.Task[None] | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The context uvicorn serves with: client certificates optional (checked per request),
        HTTP/1.1 only (the ASGI TLS extension hook is on the HTTP/1.1 protocols)."""
        return self.contexts.server_context(require_client_cert=False, alpn_protocols=["http/1.1"])

    def check(self) -> bool:
        """One check (blocking): follow the cluster's pair, renew it if due, reload if the files
        changed. True if this call renewed the certificate."""
        with renewal_lock(self.home):
            renewed, self._synced = sync(self.home, self.authority, self.password, self.clock(),
                                         synced=self._synced, renew=self.not_from_current)
            sync_root_crl(self.home, self.authority.store, self.clock())
        stamp = self._file_stamp()
        if stamp != self._stamp:
            cert = self.contexts.reload()
            self._stamp = stamp
            if not renewed:
                log.info("server certificate reloaded serial=%x not_after=%s", cert.serial_number,
                         cert.not_valid_after_utc.isoformat())
        return renewed

    def not_from_current(self, cert: x509.Certificate) -> bool:
        """Whether the server certificate ``cert`` is of an intermediate before the current one
        (a rotation took effect: it is renewed, so that no root can be retired under it)."""
        return issuer_key_id(cert) != self.authority.ca.ski

    def follow_ca(self) -> bool:
        """One look at the cluster's CA record (blocking); when it changed since this worker's
        CAs were loaded: sign with the new ones, trust them, follow the server certificate the
        rotation renewed. True if it changed."""
        stored = self.authority.store.shared_state(CA_SET_NAME)
        held = self.authority.cas
        if stored is None or (stored[0] == held.version and (held.activates_at is None
                                                              or self.clock() < held.activates_at)):
            return False
        with renewal_lock(self.home):
            cas = self.home.load_cas(self.password, self.authority.store)
        self.authority.set_cas(cas)
        self.contexts.set_trust(cas.trusted)
        log.info("CA record version %d: issuing from %s (%s); %d root(s), %d intermediate(s) trusted", cas.version,
                 cas.current.certificate.subject.rfc4514_string(), cas.current.ski, len(cas.roots), len(cas.issuers))
        self.check()
        return True

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        self._ca_task = asyncio.create_task(self._every(self.ca_interval, self.follow_ca, "CA record check"))

    async def stop(self) -> None:
        for task in (self._task, self._ca_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self) -> None:
        await self._every(self.interval, self.check, "server certificate check")

    @staticmethod
    async def _every(interval: float, work: Callable[[], bool], what: str) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await run_in_threadpool(work)
            except CAError as exc:  # e.g. the database is down: the old certificate keeps serving
                log.warning("%s failed (tried again in %gs): %s", what, interval, exc.message)
            except Exception:  # what is in force stays; the next check tries again
                log.exception("%s failed", what)

    def _file_stamp(self) -> tuple[int, int, int]:
        st = self.home.server_cert.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size


@contextlib.contextmanager
def renewal_lock(home: Home) -> Iterator[None]:
    """The home's server pair is changed by one process at a time (``<home>/server/renew.lock``)."""
    path: Path = home.server_dir / "renew.lock"
    if fcntl is None:  # pragma: no cover - not POSIX: one worker only
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


SHARED_NAME = "server-certificate"
_KEY_MARK = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def sync(home: Home, authority: Authority, password: str, now: datetime, *, synced: int | None = None,
         renew: Callable[[x509.Certificate], bool] = lambda cert: False) -> tuple[bool, int]:
    """Make the home's server pair the cluster's (module docstring); renew it if due (or if
    ``renew(cert)`` says so). Call it under the home's renewal lock. ``synced``: the serial this
    process left in the files at its previous call (None at its first). Returns whether this
    call renewed the certificate, and the serial now in the files."""
    store = authority.store
    stored = store.shared_state(SHARED_NAME)
    if stored is None:  # the first server of the cluster to get here shares its pair
        if store.put_shared_state(SHARED_NAME, _pack(home, password), replaces=0, at=now, actor="server"):
            log.info("server certificate shared with the cluster (the store had none)")
        stored = store.shared_state(SHARED_NAME)
        assert stored is not None
    version, value = stored
    shared = x509.load_pem_x509_certificate(value)
    mine = x509.load_pem_x509_certificate(home.server_cert.read_bytes())
    changed_here = synced is not None and mine.serial_number != synced  # since this process's last call
    if mine.serial_number != shared.serial_number and (changed_here if synced is not None
                                                       else _newness(mine) > _newness(shared)):
        # The files were replaced here (by hand, or by a server of an older version), or, at a
        # first call, they are the newer pair: they become the cluster's pair.
        packed = _pack(home, password)
        if store.put_shared_state(SHARED_NAME, packed, replaces=version, at=now, actor="server"):
            log.info("server certificate on disk is newer than the cluster's copy: shared serial=%x",
                     mine.serial_number)
            version, value = version + 1, packed
        else:
            latest = store.shared_state(SHARED_NAME)
            assert latest is not None
            version, value = latest
    _adopt(home, value, password)
    current = x509.load_pem_x509_certificate(home.server_cert.read_bytes())
    if not (due(current, now) or renew(current)):
        return False, current.serial_number
    issued = home.issue_server_certificate(authority, home.config())
    if not store.put_shared_state(SHARED_NAME, _pack(home, password), replaces=version, at=now, actor="server"):
        latest = store.shared_state(SHARED_NAME)  # another replica renewed first: its pair is the one
        assert latest is not None
        _adopt(home, latest[1], password)
        return False, x509.load_pem_x509_certificate(latest[1]).serial_number
    log.info("server certificate renewed serial=%s not_after=%s", issued.record.serial,
             issued.certificate.not_valid_after_utc.isoformat())
    return True, issued.certificate.serial_number


def _newness(cert: x509.Certificate) -> tuple[datetime, int]:
    """Which of two server certificates is the newer, for a process that has not synced yet (a
    replica started from an older copy of the home): the later notAfter (notBefore is clamped
    to the intermediate's), then the higher serial; the same answer on every replica."""
    return cert.not_valid_after_utc, cert.serial_number


def _pack(home: Home, password: str) -> bytes:
    """The home's pair as stored: the certificate chain (PEM), then the key, encrypted."""
    key = serialization.load_pem_private_key(home.server_key.read_bytes(), None)
    return home.server_cert.read_bytes() + key_pem(key, password)


def _adopt(home: Home, value: bytes, password: str) -> None:
    """Write the stored pair to the home's files, unless they hold it already."""
    chain, mark, key = value.partition(_KEY_MARK)
    if chain == home.server_cert.read_bytes():
        return
    plain = key_pem(serialization.load_pem_private_key(mark + key, password.encode()), None)
    write_file(home.server_key, plain, 0o400)  # the key first: a pair read between the two writes
    write_file(home.server_cert, chain, 0o644)  # is refused as a mismatch and read again
    log.info("server certificate taken from the cluster's copy serial=%x",
             x509.load_pem_x509_certificate(chain).serial_number)


ROOT_CRL_NAME = "root-crl"


def sync_root_crl(home: Home, store: Store, now: datetime) -> None:
    """The root's CRL (``pki-admin ca root-crl`` writes it into one home) is the cluster's: the
    one with the higher CRL number, of the store's copy and this home's file, goes to the other."""
    stored = store.shared_state(ROOT_CRL_NAME)
    theirs = _crl_number(stored[1]) if stored else 0
    mine = _crl_number(home.root_crl_file.read_bytes()) if home.root_crl_file.exists() else 0
    if mine > theirs:
        if store.put_shared_state(ROOT_CRL_NAME, home.root_crl_file.read_bytes(), replaces=stored[0] if stored else 0,
                                  at=now, actor="server"):
            log.info("root CRL number %d shared with the cluster", mine)
    elif theirs > mine and stored is not None:
        write_file(home.root_crl_file, stored[1], 0o644)
        log.info("root CRL number %d taken from the cluster's copy", theirs)


def _crl_number(pem: bytes) -> int:
    crl = x509.load_pem_x509_crl(pem)
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
