"""When to renew (pure) and the APScheduler-driven background renewer; retries are :mod:`.retry`."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TypeVar

import attrs

# APScheduler 3 ships no type information.
from apscheduler.executors.pool import ThreadPoolExecutor  # type: ignore[import-untyped]
from apscheduler.schedulers import SchedulerNotRunningError  # type: ignore[import-untyped]
from apscheduler.schedulers.background import BackgroundScheduler  # type: ignore[import-untyped]

from .errors import PKIError

__all__ = [
    "RenewalPolicy",
    "Renewer",
    "next_renewal_at",
]

logger = logging.getLogger("vcc_pki_client.renewal")

T = TypeVar("T")


def _positive(instance: object, attribute: attrs.Attribute[timedelta | None], value: timedelta | None) -> None:
    if value is not None and value <= timedelta(0):
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.frozen(kw_only=True)
class RenewalPolicy:
    """How early to renew, how often to look, and how to retry transient failures.

    ``renew_before``: renew this long before ``not_after``; None (the default): when one
    third of the lifetime is left (see :func:`next_renewal_at`).
    ``check_interval``: how often the background renewer looks at the certificate.
    ``jitter``: fraction of the renewal window by which a renewal may come earlier, so
    a fleet issued at once does not renew at once (0 to 1).
    ``max_attempts``, ``backoff_initial``, ``backoff_max`` (seconds): retries of one
    renewal on transient failures (:func:`~vcc_pki_client.retry.retry_transient`; the same
    fields as :class:`~vcc_pki_client.retry.RetryPolicy`, which sets those of other calls).
    """

    renew_before: timedelta | None = attrs.field(default=None, validator=_positive)
    check_interval: timedelta = attrs.field(default=timedelta(hours=1), validator=_positive)  # type: ignore[arg-type]
    jitter: float = attrs.field(default=0.1, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])
    max_attempts: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    backoff_initial: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    backoff_max: float = attrs.field(default=60.0, validator=attrs.validators.gt(0.0))


def next_renewal_at(
    not_before: datetime,
    not_after: datetime,
    policy: RenewalPolicy,
    *,
    rand: Callable[[], float] = random.random,
) -> datetime:
    """When a certificate valid from ``not_before`` to ``not_after`` should be renewed.

    The renewal window is the last third of the lifetime (renewal at two thirds), or
    ``policy.renew_before`` before ``not_after`` when set and shorter than the lifetime. The
    time is then moved earlier by ``rand() * policy.jitter * window`` (``rand`` in [0, 1)),
    and never before ``not_before``. Call it once per certificate and keep the result: drawing again at
    every check would skew renewals early.

    Raises ValueError for naive datetimes or an empty lifetime.

    >>> t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    >>> next_renewal_at(t0, t0 + timedelta(hours=9), RenewalPolicy(), rand=lambda: 0.0)
    datetime.datetime(2026, 1, 1, 6, 0, tzinfo=datetime.timezone.utc)
    """
    for value in (not_before, not_after):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime: pass aware (UTC) datetimes")
    lifetime = not_after - not_before
    if lifetime <= timedelta(0):
        raise ValueError(f"not_after {not_after} is not after not_before {not_before}")
    before = policy.renew_before
    window = before if before is not None and before < lifetime else lifetime / 3
    at = not_after - window - window * (policy.jitter * rand())
    return max(at, not_before).astimezone(timezone.utc)


class Renewer:
    """Runs a renewal check periodically in a background thread (APScheduler 3).

    One interval job (fixed id, replaced on a second :meth:`start`), with APScheduler's
    defaults made safe: no misfire grace limit (a laptop that slept still renews),
    coalesced missed runs, one instance at a time, UTC. The scheduler is created lazily
    by :meth:`start` in the calling process; after ``os.fork()`` the child's inherited
    scheduler is discarded (its thread did not survive the fork) and ``start`` in the
    child makes a new one.

    The job wrapper never lets an exception escape into APScheduler (which would only
    log it): it logs the failure under ``vcc_pki_client.renewal`` with the service id,
    then calls ``on_error(exc)``. Checks never overlap (``max_instances=1``).

    Example::

        renewer = Renewer(service_id="billing", on_error=alert)
        renewer.start(check_renewal, timedelta(hours=1))
        renewer.stop()
    """

    JOB_ID = "vcc-pki-renewal"

    def __init__(
        self,
        *,
        service_id: str = "",
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self.service_id = service_id
        self.on_error = on_error
        self._state = threading.Lock()  # guards _scheduler, _pid, _check
        self._in_job = threading.local()
        self._scheduler: BackgroundScheduler | None = None
        self._pid = 0
        self._check: Callable[[], None] | None = None

    def start(self, check: Callable[[], None], interval: timedelta, *, immediately: bool = False) -> None:
        """Run ``check`` every ``interval`` from now on (the first run after one interval,
        or at once with ``immediately=True``). Starting again replaces the check and the
        interval; there is never more than one job."""
        if interval <= timedelta(0):
            raise ValueError(f"interval must be positive, got {interval}")
        with self._state:
            self._check = check
            scheduler = self._live_scheduler()
            if scheduler is None:
                scheduler = BackgroundScheduler(
                    timezone=timezone.utc,
                    executors={"default": ThreadPoolExecutor(max_workers=1)},
                    daemon=True,
                )
            extra = {"next_run_time": datetime.now(timezone.utc)} if immediately else {}
            scheduler.add_job(
                self._run_job,
                trigger="interval",
                seconds=interval.total_seconds(),
                id=self.JOB_ID,
                name=f"certificate renewal check for {self.service_id or 'service'}",
                replace_existing=True,
                misfire_grace_time=None,
                coalesce=True,
                max_instances=1,
                **extra,
            )
            if not scheduler.running:
                scheduler.start()
                self._scheduler, self._pid = scheduler, os.getpid()

    def stop(self) -> None:
        """Stop the background job. Idempotent; safe from inside the check itself
        (then it does not wait for the running check, which is the caller)."""
        with self._state:
            scheduler = self._live_scheduler()
            self._scheduler = None
        if scheduler is None:
            return
        # Waiting from inside the job would join the job's own thread; APScheduler
        # raises for that. Outside the job, wait so no check runs after stop() returns.
        with contextlib.suppress(SchedulerNotRunningError):  # stopped behind our back
            scheduler.shutdown(wait=not getattr(self._in_job, "active", False))

    def _run_job(self) -> None:
        check = self._check
        if check is None:
            return
        self._in_job.active = True
        try:
            check()
        except Exception as exc:  # the job must never raise into APScheduler
            self._report(exc)
        finally:
            self._in_job.active = False

    def _report(self, exc: Exception) -> None:
        service = self.service_id or "(unnamed)"
        if isinstance(exc, PKIError):  # expected failures: the message says it all
            logger.error("renewal check for service %s failed: %s", service, exc)
        else:
            logger.error("renewal check for service %s failed", service, exc_info=exc)
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:
                logger.exception("on_error callback for service %s raised", service)

    def _live_scheduler(self) -> BackgroundScheduler | None:
        """The scheduler, if it runs in this process; forgets one inherited over fork()."""
        if self._scheduler is not None and self._pid != os.getpid():
            self._scheduler = None  # its thread is gone; shutting it down could hang
        if self._scheduler is not None and not self._scheduler.running:
            self._scheduler = None
        return self._scheduler
