"""create_app(): the ASGI application over an Authority. It only assembles: the handlers are in
:mod:`.api.routes` and :mod:`.api.issuance`, what every request goes through in :mod:`.api.edge`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import State
from starlette.routing import Route, Router
from starlette.types import ASGIApp

from .api.edge import Edge
from .api.issuance import ISSUE_PATH, Issuer
from .api.routes import ROUTES, RootCRL, StoreProbe
from .api.store_calls import StoreCalls
from .authority import Authority
from .metrics import Metrics

log = logging.getLogger("vcc_pki_server.api")

# A background job started and stopped with the app (e.g. the health checker).
Lifecycle = tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]


def create_app(authority: Authority, *, background: list[Lifecycle] | None = None,
               crl_refresh_seconds: float = 600.0, root_crl: Path | None = None,
               database_timeout: float = 10.0) -> Edge:
    """The API app. ``background`` jobs start with the app and stop with it; the CRL is
    regenerated before its nextUpdate by a periodic check every ``crl_refresh_seconds``;
    ``root_crl`` is the file of the root's CRL (``<home>/ca/root_crl.pem``) it serves; a
    request that needs the database is answered 503 after ``database_timeout`` seconds."""
    jobs = list(background or [])
    issuer = Issuer(authority, timeout=database_timeout)
    store_calls = StoreCalls(database_timeout)
    probe = StoreProbe(authority.store)

    def refresh_if_leading() -> None:  # one refresher for the cluster: the store's "crl" lead
        if authority.store.lead("crl"):
            authority.refresh_crl_if_due()

    async def refresh_crl() -> None:
        while True:
            try:
                await run_in_threadpool(refresh_if_leading)
            except Exception:
                log.exception("CRL refresh failed")
            await asyncio.sleep(crl_refresh_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: ASGIApp) -> AsyncIterator[None]:
        task = asyncio.create_task(refresh_crl())
        for start, _ in jobs:
            await start()
        try:
            yield
        finally:
            for _, stop in reversed(jobs):
                await stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await run_in_threadpool(issuer.close)
            probe.close()
            store_calls.close()

    direct = [r for r in ROUTES if isinstance(r, Route) and r.path == ISSUE_PATH]
    state = State({"authority": authority, "issuer": issuer, "probe": probe, "root_crl": RootCRL(root_crl),
                   "store_calls": store_calls})
    return Edge(Router(ROUTES, lifespan=lifespan), state=state, direct=direct, metrics=Metrics(authority))
