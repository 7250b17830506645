"""AsyncPKIClient: the PKIClient surface for asyncio services, its network calls run in a worker thread.

Every method is made from the PKIClient method of the same name by one of two helpers:
:func:`_in_thread` (network calls: awaitable, run with :func:`asyncio.to_thread`) and
:func:`_direct` (local calls, plain). Signatures and docs are PKIClient's own, so the two
clients cannot drift apart (``tests/client/test_public_api.py`` checks it).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import httpx
from cryptography import x509

from .client import PKIClient
from .files import CertificateFiles

__all__ = ["AsyncPKIClient"]

P = ParamSpec("P")
R = TypeVar("R")


def _in_thread(method: Callable[Concatenate[PKIClient, P], R]) -> Callable[
        Concatenate[AsyncPKIClient, P], Coroutine[Any, Any, R]]:
    """``method`` of PKIClient as a coroutine of AsyncPKIClient, run in a worker thread."""

    name = method.__name__

    async def call(self: AsyncPKIClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        bound: Callable[P, R] = getattr(self.sync, name)  # looked up per call: wrappers set on .sync count
        return await asyncio.to_thread(bound, *args, **kwargs)

    functools.update_wrapper(call, method)  # name, signature (``__wrapped__``) and docs
    call.__doc__ = f":meth:`PKIClient.{method.__name__} <vcc_pki_client.PKIClient.{method.__name__}>`, awaitable."
    return call


def _direct(method: Callable[Concatenate[PKIClient, P], R]) -> Callable[Concatenate[AsyncPKIClient, P], R]:
    """``method`` of PKIClient, called as it is (no network: nothing to wait for)."""

    def call(self: AsyncPKIClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return method(self.sync, *args, **kwargs)

    functools.update_wrapper(call, method)
    return call


def _with_arguments_of(init: Callable[Concatenate[PKIClient, P], None]) -> Callable[
        [Callable[..., None]], Callable[Concatenate[AsyncPKIClient, P], None]]:
    """Give a constructor PKIClient's parameters (for type checkers and ``inspect``)."""

    def decorate(fn: Callable[..., None]) -> Callable[Concatenate[AsyncPKIClient, P], None]:
        return cast(Callable[Concatenate["AsyncPKIClient", P], None], functools.wraps(init)(fn))

    return decorate


class AsyncPKIClient:
    """:class:`~vcc_pki_client.PKIClient` for asyncio code: a thread-offloading facade.

    The constructor takes PKIClient's arguments and makes one (``http_client=`` lends it a
    *sync* ``httpx.Client``, as there). Each network method is the PKIClient method of the
    same name run with :func:`asyncio.to_thread`, so it never blocks the event loop; the
    renewal scheduler, the certificate files and the reloading SSL contexts are the
    PKIClient's own (``.sync`` is that client). A cancelled call stops waiting, but the
    thread finishes the request (a renewal still installs its certificate).
    ``enable_auto_renewal``'s callbacks run in PKIClient's background thread (use
    ``loop.call_soon_threadsafe`` to reach the loop).

    Example::

        async with AsyncPKIClient(URL, "billing", cert_file="tls/cert.pem", key_file="tls/key.pem",
                                  root_fingerprint="sha256:9f2c...") as pki:
            if not pki.enrolled:
                await pki.enroll(token)
            pki.enable_auto_renewal(renew_before_days=30)
            async with pki.httpx_async_client() as http:
                await http.get("https://inventory:9443/items")
    """

    @_with_arguments_of(PKIClient.__init__)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: The PKIClient doing the work (for synchronous code sharing this client's state).
        self.sync = PKIClient(*args, **kwargs)
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
    enroll = _in_thread(PKIClient.enroll)
    ensure_enrolled = _in_thread(PKIClient.ensure_enrolled)
    request_certificate = _in_thread(PKIClient.request_certificate)
    renew = _in_thread(PKIClient.renew)
    revoke = _in_thread(PKIClient.revoke)
    register_service = _in_thread(PKIClient.register_service)
    discover = _in_thread(PKIClient.discover)
    list_services = _in_thread(PKIClient.list_services)
    get_service_certificate = _in_thread(PKIClient.get_service_certificate)
    get_ca_bundle = _in_thread(PKIClient.get_ca_bundle)
    get_crl = _in_thread(PKIClient.get_crl)
    is_revoked = _in_thread(PKIClient.is_revoked)  # a thread hop even when the CRL is cached
    renew_now = _in_thread(PKIClient.renew_now)
    refresh_crl = _in_thread(PKIClient.refresh_crl)

    # -- local, plain methods ---------------------------------------------------------------
    enable_auto_renewal = _direct(PKIClient.enable_auto_renewal)
    disable_auto_renewal = _direct(PKIClient.disable_auto_renewal)  # waits for a running check

    # Contexts: made at once from the files on disk; the CRL's first fetch runs in the
    # background (never on the event loop); until it lands, the CRL a previous run left in
    # crl.pem is enforced, or (no such file) peers are refused unless crl_soft_fail=True.
    def server_ssl_context(self, require_client_cert: bool = True, *, check_revocation: bool = True) -> ssl.SSLContext:
        """:meth:`PKIClient.server_ssl_context <vcc_pki_client.PKIClient.server_ssl_context>`,
        with the CRL's first fetch in the background."""
        return self.sync._server_context(require_client_cert, check_revocation, wait=False)

    def client_ssl_context(self, *, check_revocation: bool = True) -> ssl.SSLContext:
        """:meth:`PKIClient.client_ssl_context <vcc_pki_client.PKIClient.client_ssl_context>`,
        with the CRL's first fetch in the background."""
        return self.sync._client_context(check_revocation, wait=False)

    def httpx_async_client(self, *, check_revocation: bool = True, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` for mTLS calls to peers (``verify`` is :meth:`client_ssl_context`);
        other keyword arguments go to ``httpx.AsyncClient``. The caller closes it."""
        return httpx.AsyncClient(verify=self.client_ssl_context(check_revocation=check_revocation), **kwargs)

    # -- lifecycle --------------------------------------------------------------------------
    async def aclose(self) -> None:
        """:meth:`PKIClient.close` in a worker thread (it waits for a running renewal). Idempotent."""
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncPKIClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
