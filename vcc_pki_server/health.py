"""HealthChecker: the server probes each registered service's ``health_check_url`` over mTLS (SPEC §5).

Every ``interval`` seconds (``[health] interval_seconds`` in config.toml, 30, or
``vcc-pki-server --health-interval``) the checker pages through the registry and sends one
``GET`` to each service's ``health_check_url``:

- over HTTPS only, trusting only this CA's root, presenting the server's own certificate
  (service id ``pki-server``, EKU serverAuth + clientAuth) as its client certificate;
- only to a host in the service's SAN allow-list: any other host is recorded unhealthy
  without a connection, so a registry entry cannot point the CA at arbitrary hosts on its
  network. Only an admin changes an allow-list, while a service edits its own ``endpoints``;
  and a host outside the allow-list could not pass TLS verification anyway, since the
  service's certificates name only allow-listed hosts;
- no redirects, no proxies from the environment, a hard per-probe deadline
  (``timeout_seconds``, 5) and at most ``concurrency`` (16) probes at once, so a hanging
  service delays nobody else.

A 2xx answer is healthy; anything else is unhealthy with a short reason ("HTTP 503",
"timeout after 5.0s", "connection refused", "certificate verify failed: ... (not issued by
this CA)"). Results go to :meth:`Authority.record_health`, which audits each change between
healthy and unhealthy.

A service whose ``health_check_url`` is set or changed (registered, or updated by itself or an
admin) is probed at once by the worker that stored it, not only at the next round: a new
service shows as healthy within its probe time.

Several workers (``--workers N``) or replicas (on PostgreSQL): each runs a checker, but only
the one holding the store's ``health`` lead (:meth:`Store.lead`: a PostgreSQL advisory lock,
or an ``flock`` beside the SQLite file) probes: one probe per service and round for the
cluster. The others ask for the lead at each round, so probing moves elsewhere within a round
or two when the leader dies. A store that does not answer the question within ``timeout``:
no probes this round.

Usage (what ``vcc-pki-server`` does through :func:`lifecycle`)::

    checker = HealthChecker.from_home(authority, home, interval=10)
    await checker.start()        # inside the running loop, after any fork
    ...
    await checker.stop()

Known limits: the client certificate is read once, at start (restart the server after its
certificate is reissued, as uvicorn needs anyway); host names are compared as names, so a
name in the allow-list is probed wherever DNS sends it (TLS then requires a certificate from
this CA valid for that name). A round lasts
as long as its slowest probe (at most ``timeout`` per ``concurrency`` services) and the next
one waits for it (APScheduler logs a skipped run when a round outlasts the interval). Each
probe is one store write (``last_checked``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
from apscheduler.executors.asyncio import AsyncIOExecutor  # type: ignore[import-untyped]
from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]

from .authority import Authority
from .errors import UnknownService
from .store import ServiceRecord

if TYPE_CHECKING:
    from .app import Lifecycle
    from .home import Home

__all__ = ["HealthChecker", "describe_failure", "lifecycle", "probe_refusal"]

log = logging.getLogger("vcc_pki_server.health")
# APScheduler logs two INFO lines per run of a job; our own lines say what a round found.
logging.getLogger("apscheduler.executors.health").setLevel(logging.WARNING)

PAGE_SIZE = 500
MAX_ERROR_LENGTH = 200
USER_AGENT = "vcc-pki-health-checker"
# OpenSSL verify codes meaning "this chain does not lead to a root we trust".
_FOREIGN_ISSUER = {2, 18, 19, 20, 21}


def _host_key(host: str) -> str:
    """A comparable form of a host: IP addresses normalised, names lower-case without a final dot."""
    host = host.strip().strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def allowed_hosts(service: ServiceRecord) -> set[str]:
    """The hosts a probe of ``service`` may reach: its SAN allow-list (set by an admin only)."""
    return {_host_key(h) for h in (*service.san_dns, *service.san_ip) if h}


def _loopback(host: str) -> bool:
    key = _host_key(host)
    try:
        return ipaddress.ip_address(key).is_loopback
    except ValueError:
        return key == "localhost" or key.endswith(".localhost")


def probe_refusal(service: ServiceRecord, *, allow_loopback: bool = False) -> str | None:
    """Why ``service.health_check_url`` must not be probed, or None when it may be.

    Checked before any connection: the host must be in the service's SAN allow-list, the
    scheme https, and not a loopback address (the CA's own host: its API and anything else
    listening there) unless an admin allowed it (``[health] allow_loopback``).
    """
    url = service.health_check_url or ""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        return "health_check_url is not a valid URL"
    if not host:
        return "health_check_url has no host"
    if _host_key(host) not in allowed_hosts(service):
        return f"health_check_url host {host} is not in the service's SAN allow-list"
    if parts.scheme.lower() != "https":
        return f"health_check_url must use https, not {parts.scheme or 'no scheme'}"
    if not allow_loopback and _loopback(host):
        return (f"health_check_url host {host} is a loopback address of the CA's own host; "
                "not probed (an admin may allow it: [health] allow_loopback)")
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


NO_ANSWER = "no HTTPS answer from the health URL (connection failed, timed out, or TLS failed)"


def describe_failure(exc: BaseException, timeout: float) -> str:
    """A short, secret-free reason for a probe that got no HTTP answer, for the CA's log only.

    The registry (which services read) stores :data:`NO_ANSWER` for all of these: telling
    refused, hanging, plain-TCP and foreign-TLS ports apart would make the prober a port
    scanner. httpx wraps the socket and ssl errors (httpx -> httpcore -> OSError/ssl), so the
    chain of causes is searched for the most telling one.
    """
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return f"timeout after {float(timeout)}s"
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            message = cause.verify_message or cause.reason or "unknown reason"
            hint = " (not issued by this CA)" if cause.verify_code in _FOREIGN_ISSUER else ""
            return f"certificate verify failed: {message}{hint}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake failed: {cause.reason or cause}"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve host: {cause.strerror}"
        if isinstance(cause, OSError) and cause.errno:  # e.g. "No route to host"
            return f"connection failed: {cause.strerror or os.strerror(cause.errno)}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "server disconnected without answering (did it refuse our client certificate?)"
    return f"{type(exc).__name__}: {exc}"


def client_ssl_context(home: Home) -> ssl.SSLContext:
    """TLS for probes: trust only this CA's root, present the server's certificate and key."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(home.root_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(home.server_cert), str(home.server_key))
    return ctx


class HealthChecker:
    """Probe every registered ``health_check_url`` and record the results.

    Takes the authority (registry and results), an ``ssl_context`` for the probes, the
    ``interval`` between rounds, the per-probe ``timeout`` and the ``concurrency`` limit, all
    in seconds / probes; with ``elect`` only the holder of the store's ``health`` lead probes
    (False: always). :meth:`from_home` builds one from a CA home and its config.
    """

    def __init__(self, authority: Authority, *, ssl_context: ssl.SSLContext, interval: float = 30.0,
                 timeout: float = 5.0, concurrency: int = 16, elect: bool = True,
                 allow_loopback: bool = False) -> None:
        if interval <= 0 or timeout <= 0 or concurrency < 1:
            raise ValueError("interval and timeout must be positive, concurrency at least 1")
        self.authority = authority
        self.ssl_context = ssl_context
        self.interval = interval
        self.timeout = timeout
        self.concurrency = concurrency
        self.elect = elect
        self.allow_loopback = allow_loopback
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._round: asyncio.Task[None] | None = None
        self._in_flight: dict[str, asyncio.Task[bool]] = {}
        self._leading = False
        self._asking_lead: Future[bool] | None = None  # one question at a time, in a thread of its own
        self._lead_thread: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._soon: set[asyncio.Task[None]] = set()  # lookups of services whose health URL was just set

    @classmethod
    def from_home(cls, authority: Authority, home: Home, *, interval: float | None = None,
                  timeout: float | None = None, concurrency: int | None = None) -> HealthChecker:
        """A checker with the server's certificate and the settings of ``home``'s config.toml;
        arguments given here override the config."""
        config = home.config()
        return cls(authority, ssl_context=client_ssl_context(home),
                   interval=interval if interval is not None else config.health_interval_seconds,
                   timeout=timeout if timeout is not None else config.health_timeout_seconds,
                   concurrency=concurrency if concurrency is not None else config.health_concurrency,
                   allow_loopback=config.health_allow_loopback)

    # -- one round --------------------------------------------------------------------------
    def _http(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        # Made on first use, inside the loop that uses them (the worker's, after any fork).
        if self._client is None or self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
            self._client = httpx.AsyncClient(
                verify=self.ssl_context, timeout=httpx.Timeout(self.timeout),
                follow_redirects=False, trust_env=False, headers={"User-Agent": USER_AGENT},
                limits=httpx.Limits(max_connections=self.concurrency,
                                    max_keepalive_connections=self.concurrency))
        return self._client, self._semaphore

    async def _services(self) -> list[ServiceRecord]:
        found: list[ServiceRecord] = []
        after: str | None = None
        while True:
            page = await asyncio.to_thread(self.authority.list_services, limit=PAGE_SIZE, after=after)
            found += [s for s in page if s.health_check_url]
            if len(page) < PAGE_SIZE:
                return found
            after = page[-1].service_id

    async def probe(self, service: ServiceRecord) -> tuple[bool, str | None]:
        """Probe one service: (True, None) for a 2xx answer, else (False, reason)."""
        refusal = probe_refusal(service, allow_loopback=self.allow_loopback)
        if refusal is not None:
            return False, refusal
        assert service.health_check_url is not None
        client, semaphore = self._http()
        async with semaphore:
            try:
                async with asyncio.timeout(self.timeout):  # a hard cap over httpx's per-phase ones
                    async with client.stream("GET", service.health_check_url) as response:
                        status = response.status_code  # the body is not read: status is the answer
            except (TimeoutError, OSError, httpx.HTTPError) as exc:  # ssl.SSLError is an OSError
                log.debug("health probe service_id=%s: %s", service.service_id, describe_failure(exc, self.timeout))
                return False, NO_ANSWER
            except (httpx.InvalidURL, ValueError) as exc:  # e.g. a host httpx cannot encode
                return False, f"health_check_url is not a valid URL: {exc}"
        if 200 <= status < 300:
            return True, None
        if 300 <= status < 400:
            return False, f"HTTP {status} (redirects are not followed)"
        return False, f"HTTP {status}"

    async def _check(self, service: ServiceRecord) -> bool:
        ok, error = await self.probe(service)
        error = error[:MAX_ERROR_LENGTH] if error is not None else None
        try:
            await asyncio.to_thread(self.authority.record_health, service.service_id, ok, error)
        except UnknownService:  # deregistered during the round
            return ok
        before = service.health.status
        status = "healthy" if ok else "unhealthy"
        level = logging.DEBUG if status == before else (logging.INFO if ok else logging.WARNING)
        log.log(level, "health service_id=%s status=%s error=%s", service.service_id, status, error)
        return ok

    async def run_once(self) -> None:
        """One round, waited for: a probe of every service with a ``health_check_url`` whose
        previous probe has ended, and their results recorded."""
        started = time.monotonic()
        probes = await self._start_round()
        if probes:
            await asyncio.wait(probes)
        log.debug("health round services=%d healthy=%d seconds=%.2f", len(probes),
                  sum(not p.cancelled() and p.exception() is None and p.result() for p in probes),
                  time.monotonic() - started)

    async def _start_round(self) -> list[asyncio.Task[bool]]:
        """Start a probe of every service whose previous probe has ended (a hanging endpoint
        never has two at once); return them."""
        started = [self._start_probe(service) for service in await self._services()]
        return [task for task in started if task is not None]

    def _start_probe(self, service: ServiceRecord) -> asyncio.Task[bool] | None:
        if service.service_id in self._in_flight:
            return None
        task = asyncio.create_task(self._check(service))
        self._in_flight[service.service_id] = task
        task.add_done_callback(functools.partial(self._probe_ended, service.service_id))
        return task

    def _health_url_set(self, service_id: str) -> None:
        """A service's health URL was just set (a watcher of the authority, called in the
        thread that stored it): probe it now rather than at the next round."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to probe with
                loop.call_soon_threadsafe(self._look_up_soon, service_id)

    def _look_up_soon(self, service_id: str) -> None:
        task = asyncio.create_task(self._probe_new(service_id))
        self._soon.add(task)
        task.add_done_callback(self._soon.discard)

    async def _probe_new(self, service_id: str) -> None:
        try:
            service = await asyncio.to_thread(self.authority.service, service_id)
        except Exception as exc:  # deregistered since, or the store unavailable: the round will tell
            log.debug("health probe of the new URL of service_id=%s skipped: %s", service_id, exc)
            return
        self._start_probe(service)

    def _probe_ended(self, service_id: str, task: asyncio.Task[bool]) -> None:
        self._in_flight.pop(service_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("health check failed service_id=%s error=%s: %s", service_id,
                      type(task.exception()).__name__, task.exception())

    # -- scheduling -------------------------------------------------------------------------
    async def _is_prober(self) -> bool:
        """Whether this process leads the probing (asked of the store, off the event loop)."""
        if not self.elect:
            return True
        asking = self._asking_lead
        if asking is None or asking.done():
            if self._lead_thread is None:
                self._lead_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-lead")
            asking = self._asking_lead = self._lead_thread.submit(self.authority.store.lead, "health")
        try:
            leading = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(asking)), self.timeout)
        except Exception as exc:  # the store does not answer: nobody should probe on a guess
            log.warning("health: cannot tell whether this process leads the probes (%s); skipping a round",
                        type(exc).__name__)
            return False
        if leading and not self._leading:
            log.info("health checks run in this process pid=%d interval=%ss", os.getpid(), self.interval)
        self._leading = leading
        return leading

    async def _tick(self) -> None:
        """One scheduled round: a probe for every service whose previous probe has ended. The
        round does not wait for them, so a hanging endpoint costs its own probe its timeout
        and never holds back the next round for the other services."""
        # APScheduler only logs a job's exceptions: catch and report them here.
        self._round = asyncio.current_task()
        try:
            if await self._is_prober():
                await self._start_round()  # not waited for: see the docstring
        except asyncio.CancelledError:  # stop() during a round: end quietly
            log.debug("health round cancelled")
        except Exception:
            log.exception("health round failed")
        finally:
            self._round = None

    async def start(self) -> None:
        """Start the schedule in the running loop; the first round runs at once."""
        if self._scheduler is not None:
            return
        self._loop = asyncio.get_running_loop()
        self.authority.health_url_watchers.append(self._health_url_set)
        self._scheduler = AsyncIOScheduler(timezone=timezone.utc, event_loop=asyncio.get_running_loop(),
                                           executors={"health": AsyncIOExecutor()})
        self._scheduler.add_job(self._tick, "interval", seconds=self.interval, id="health-checks",
                                executor="health",
                                next_run_time=datetime.now(timezone.utc), misfire_grace_time=None,
                                coalesce=True, max_instances=1)
        self._scheduler.start()
        log.info("health checker started interval=%ss timeout=%ss concurrency=%d", self.interval,
                 self.timeout, self.concurrency)

    async def stop(self) -> None:
        """Stop the schedule, cancel a round in flight, close connections. Idempotent."""
        scheduler, self._scheduler = self._scheduler, None
        running = self._round
        if self._health_url_set in self.authority.health_url_watchers:
            self.authority.health_url_watchers.remove(self._health_url_set)
        self._loop = None
        for lookup in self._soon:
            lookup.cancel()
        if scheduler is not None:
            scheduler.shutdown(wait=False)  # cancels a running round's task
        if running is not None and not running.done():
            running.cancel()
            await asyncio.wait({running}, timeout=self.timeout)
        probes = list(self._in_flight.values())
        for probe in probes:
            probe.cancel()
        if probes:
            await asyncio.wait(probes, timeout=self.timeout)
        await self.aclose()
        if self._lead_thread is not None:
            self._lead_thread.shutdown(wait=False, cancel_futures=True)
            self._lead_thread, self._asking_lead = None, None

    async def aclose(self) -> None:
        """Close the HTTP client (the checker makes a new one if used again)."""
        client, self._client = self._client, None
        self._semaphore = None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> HealthChecker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def lifecycle(authority: Authority, home: Home, *, interval: float | None = None,
              ssl_context: ssl.SSLContext | None = None) -> Lifecycle:
    """The (start, stop) pair ``create_app(background=...)`` runs with the app's lifespan;
    ``ssl_context``: the probes' (the server's own, following its renewals and the CA's
    rotations), else one made from the home's files as they are now."""
    checker = HealthChecker.from_home(authority, home, interval=interval)
    if ssl_context is not None:
        checker.ssl_context = ssl_context
    return checker.start, checker.stop
