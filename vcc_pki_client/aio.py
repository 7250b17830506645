"""AsyncPKIClient: the PKIClient surface for asyncio services, its network calls run in a worker thread."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx
from cryptography import x509

from .client import DEFAULT_RETRY, PKIClient, StrPath, _utc_now
from .files import CertificateFiles
from .retry import Backoff
from .wire import CertificateInfo, IssuedCertificate, ServiceEntry

__all__ = ["AsyncPKIClient"]


class AsyncPKIClient:
    """:class:`~vcc_pki_client.PKIClient` for asyncio code: a thread-offloading facade.

    The constructor takes PKIClient's arguments and makes one (``http_client=`` lends it a
    *sync* ``httpx.Client``, as there). Each network method is the PKIClient method of the
    same name run with :func:`asyncio.to_thread`, so it never blocks the event loop; the
    renewal scheduler, the certificate files and the reloading SSL contexts are the
    PKIClient's own (``.sync`` is that client). A cancelled call stops waiting, but the
    thread finishes the request (a renewal still installs its certificate).

    Example::

        async with AsyncPKIClient(URL, "billing", cert_file="tls/cert.pem", key_file="tls/key.pem",
                                  root_fingerprint="sha256:9f2c...") as pki:
            if not pki.enrolled:
                await pki.enroll(token)
            pki.enable_auto_renewal(renew_before_days=30)
            async with pki.httpx_async_client() as http:
                await http.get("https://inventory:9443/items")
    """

    def __init__(
        self, pki_server_url: str, service_id: str, *, cert_file: StrPath | None = None,
        key_file: StrPath | None = None, ca_bundle: StrPath | None = None, root_fingerprint: str | None = None,
        enrollment_token: str | None = None, key_type: str = "ec-p256", timeout: float = 10.0,
        http_client: httpx.Client | None = None, retry_policy: Backoff = DEFAULT_RETRY,
        crl_max_age: float = 60.0, clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        #: The PKIClient doing the work (for synchronous code sharing this client's state).
        self.sync = PKIClient(
            pki_server_url, service_id, cert_file=cert_file, key_file=key_file, ca_bundle=ca_bundle,
            root_fingerprint=root_fingerprint, enrollment_token=enrollment_token, key_type=key_type,
            timeout=timeout, http_client=http_client, retry_policy=retry_policy, crl_max_age=crl_max_age,
            clock=clock)
        self.pki_server_url: str = self.sync.pki_server_url
        self.service_id: str = self.sync.service_id
        self.files: CertificateFiles | None = self.sync.files

    def __repr__(self) -> str:
        return f"AsyncPKIClient({self.pki_server_url!r}, service_id={self.service_id!r})"

    @property
    def enrolled(self) -> bool:
        """True when the certificate and key files exist (an enrolment happened)."""
        return self.sync.enrolled

    @property
    def certificate(self) -> x509.Certificate:
        """The service's current certificate, read from ``cert_file`` (ConfigurationError if none)."""
        return self.sync.certificate

    # -- network calls, in a worker thread ------------------------------------------------
    async def enroll(self, token: str | None = None, *, san_dns: Sequence[str] = (), san_ip: Sequence[str] = (),
                     validity_days: int | None = None) -> IssuedCertificate:
        """:meth:`PKIClient.enroll <vcc_pki_client.PKIClient.enroll>`, awaitable."""
        return await asyncio.to_thread(self.sync.enroll, token, san_dns=san_dns, san_ip=san_ip,
                                       validity_days=validity_days)

    async def request_certificate(self, *, san_dns: Sequence[str] = (), san_ip: Sequence[str] = (),
                                  validity_days: int | None = None) -> IssuedCertificate:
        """:meth:`PKIClient.request_certificate`, awaitable."""
        return await asyncio.to_thread(self.sync.request_certificate, san_dns=san_dns, san_ip=san_ip,
                                       validity_days=validity_days)

    async def renew(self, rekey: bool = True, *, validity_days: int | None = None) -> IssuedCertificate:
        """:meth:`PKIClient.renew`, awaitable."""
        return await asyncio.to_thread(self.sync.renew, rekey, validity_days=validity_days)

    async def revoke(self, reason: str = "unspecified", serial: int | str | None = None) -> CertificateInfo:
        """:meth:`PKIClient.revoke`, awaitable."""
        return await asyncio.to_thread(self.sync.revoke, reason, serial)

    async def register_service(self, service_name: str, endpoints: Sequence[str], health_check_url: str | None = None,
                               version: str | None = None, owner: str | None = None,
                               metadata: Mapping[str, Any] | None = None) -> ServiceEntry:
        """:meth:`PKIClient.register_service`, awaitable."""
        return await asyncio.to_thread(self.sync.register_service, service_name, endpoints, health_check_url,
                                       version, owner, metadata)

    async def discover(self, service_id: str) -> ServiceEntry:
        """:meth:`PKIClient.discover`, awaitable."""
        return await asyncio.to_thread(self.sync.discover, service_id)

    async def list_services(self, healthy: bool | None = None) -> list[ServiceEntry]:
        """:meth:`PKIClient.list_services`, awaitable."""
        return await asyncio.to_thread(self.sync.list_services, healthy)

    async def get_service_certificate(self, service_id: str) -> x509.Certificate:
        """:meth:`PKIClient.get_service_certificate`, awaitable."""
        return await asyncio.to_thread(self.sync.get_service_certificate, service_id)

    async def get_ca_bundle(self) -> list[x509.Certificate]:
        """:meth:`PKIClient.get_ca_bundle`, awaitable."""
        return await asyncio.to_thread(self.sync.get_ca_bundle)

    async def get_crl(self) -> x509.CertificateRevocationList:
        """:meth:`PKIClient.get_crl`, awaitable."""
        return await asyncio.to_thread(self.sync.get_crl)

    async def is_revoked(self, cert: x509.Certificate | int | str, *, refresh: bool = False) -> bool:
        """:meth:`PKIClient.is_revoked`, awaitable (a thread hop even when the CRL is cached)."""
        return await asyncio.to_thread(self.sync.is_revoked, cert, refresh=refresh)

    async def renew_now(self, *, now: datetime | None = None) -> IssuedCertificate | None:
        """:meth:`PKIClient.renew_now`, awaitable."""
        return await asyncio.to_thread(self.sync.renew_now, now=now)

    # -- local, plain methods ---------------------------------------------------------------
    def enable_auto_renewal(self, renew_before_days: float = 30, *,
                            check_interval: timedelta | float = timedelta(hours=1),
                            on_renewed: Callable[[x509.Certificate], None] | None = None,
                            on_error: Callable[[Exception], None] | None = None, rekey: bool = True,
                            validity_days: int | None = None) -> None:
        """:meth:`PKIClient.enable_auto_renewal`: the checks run in the PKIClient's background
        thread, and so do ``on_renewed``/``on_error`` (use ``loop.call_soon_threadsafe`` to reach the loop)."""
        self.sync.enable_auto_renewal(renew_before_days, check_interval=check_interval, on_renewed=on_renewed,
                                      on_error=on_error, rekey=rekey, validity_days=validity_days)

    def disable_auto_renewal(self) -> None:
        """:meth:`PKIClient.disable_auto_renewal` (waits for a running check: briefly blocks the loop then)."""
        self.sync.disable_auto_renewal()

    def server_ssl_context(self, require_client_cert: bool = True) -> ssl.SSLContext:
        """:meth:`PKIClient.server_ssl_context`, e.g. for ``asyncio.start_server(..., ssl=ctx)``."""
        return self.sync.server_ssl_context(require_client_cert)

    def client_ssl_context(self) -> ssl.SSLContext:
        """:meth:`PKIClient.client_ssl_context`, reloaded in place after each renewal."""
        return self.sync.client_ssl_context()

    def httpx_async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` for mTLS calls to peers (``verify`` is :meth:`client_ssl_context`);
        other keyword arguments go to ``httpx.AsyncClient``. The caller closes it."""
        return httpx.AsyncClient(verify=self.client_ssl_context(), **kwargs)

    # -- lifecycle --------------------------------------------------------------------------
    async def aclose(self) -> None:
        """:meth:`PKIClient.close` in a worker thread (it waits for a running renewal). Idempotent."""
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncPKIClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
