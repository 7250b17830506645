"""The API server's own certificate: presented through contexts that follow its files, renewed
by the running server when a third of its lifetime is left (SPEC §10), in every worker.

Each worker process checks every ``interval`` seconds, in a thread (file and store work stay
off the event loop):

* the files changed (another worker, or ``pki-admin``, renewed it): the worker's contexts load
  the new pair for later handshakes;
* the certificate is due: the worker takes an exclusive ``flock`` on ``<home>/server/renew.lock``,
  looks again (another worker may just have renewed it), issues a new certificate with a new key
  (the server holds the CA key), writes the pair and reloads. The other workers see the new
  files at their next check.
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
from starlette.concurrency import run_in_threadpool

from vcc_pki_client import CertificateFiles, ReloadingContexts

from .authority import Authority, utc_now
from .home import Home

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

    def __init__(self, home: Home, authority: Authority, *, interval: float = 60.0,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.home = home
        self.authority = authority
        self.interval = interval
        self.clock = clock
        self.files = CertificateFiles(home.server_cert, home.server_key)
        # Client certificates are verified against our CA (root and intermediate) at the handshake.
        self.contexts = ReloadingContexts(self.files, ca_certs=(home.root_certificate(),
                                                                home.intermediate_certificate()))
        self._stamp = self._file_stamp()
        self._task: asyncio.Task[None] | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The context uvicorn serves with: client certificates optional (checked per request),
        HTTP/1.1 only (the ASGI TLS extension hook is on the HTTP/1.1 protocols)."""
        return self.contexts.server_context(require_client_cert=False, alpn_protocols=["http/1.1"])

    def check(self) -> bool:
        """One check (blocking): reload if the files changed, renew if due. True if this call
        renewed the certificate."""
        renewed = False
        if due(self.files.load()[0], self.clock()):
            with self._renewal_lock():
                current = self.files.load()[0]  # another worker may have renewed meanwhile
                if due(current, self.clock()):
                    issued = self.home.issue_server_certificate(self.authority, self.home.config())
                    log.info("server certificate renewed serial=%s not_after=%s (a third of its lifetime was left)",
                             issued.record.serial, issued.certificate.not_valid_after_utc.isoformat())
                    renewed = True
        stamp = self._file_stamp()
        if stamp != self._stamp:
            cert = self.contexts.reload()
            self._stamp = stamp
            if not renewed:
                log.info("server certificate reloaded serial=%x not_after=%s", cert.serial_number,
                         cert.not_valid_after_utc.isoformat())
        return renewed

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await run_in_threadpool(self.check)
            except Exception:  # the old certificate keeps serving; the next check tries again
                log.exception("server certificate check failed")

    def _file_stamp(self) -> tuple[int, int, int]:
        st = self.home.server_cert.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size

    @contextlib.contextmanager
    def _renewal_lock(self) -> Iterator[None]:
        path: Path = self.home.server_dir / "renew.lock"
        if fcntl is None:  # pragma: no cover - not POSIX: one worker only
            yield
            return
        with open(path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
