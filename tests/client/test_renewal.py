"""Renewal timing, retries with back-off, and the background renewer (vcc_pki_client.renewal)."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from vcc_pki_client import renewal as renewal_module
from vcc_pki_client.errors import (
    APIError,
    AuthenticationError,
    InvalidResponseError,
    NotFoundError,
    RequestRejectedError,
    ServerError,
    TransportError,
)
from vcc_pki_client.renewal import RenewalPolicy, Renewer, next_renewal_at
from vcc_pki_client.retry import backoff_delays, retry_transient

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
YEAR = timedelta(days=365)


# -- next_renewal_at ------------------------------------------------------------------


def test_renews_renew_before_ahead_of_expiry() -> None:
    at = next_renewal_at(T0, T0 + YEAR, RenewalPolicy(renew_before=timedelta(days=30)), rand=lambda: 0.0)
    assert at == T0 + YEAR - timedelta(days=30)


@pytest.mark.parametrize(("lifetime", "renew_after"), [
    (timedelta(hours=8), timedelta(hours=5, minutes=20)),
    (timedelta(days=90), timedelta(days=60)),
    (timedelta(minutes=6), timedelta(minutes=4)),
])
def test_by_default_renews_when_a_third_of_the_lifetime_is_left(lifetime: timedelta,
                                                                  renew_after: timedelta) -> None:
    assert next_renewal_at(T0, T0 + lifetime, RenewalPolicy(), rand=lambda: 0.0) == T0 + renew_after
    # Jitter (10 % of the window by default) only brings it earlier.
    earliest = next_renewal_at(T0, T0 + lifetime, RenewalPolicy(), rand=lambda: 1.0)
    assert earliest == T0 + renew_after - lifetime / 3 * 0.1


def test_jitter_moves_renewal_earlier_within_bounds() -> None:
    policy = RenewalPolicy(renew_before=timedelta(days=30), jitter=0.1)
    earliest = next_renewal_at(T0, T0 + YEAR, policy, rand=lambda: 1.0)
    assert earliest == T0 + YEAR - timedelta(days=33)
    rng = random.Random(7)
    for _ in range(200):
        at = next_renewal_at(T0, T0 + YEAR, policy, rand=rng.random)
        assert earliest <= at <= T0 + YEAR - timedelta(days=30)


@pytest.mark.parametrize("renew_before", [timedelta(days=1), timedelta(days=2), timedelta(days=90)])
def test_short_lived_certificate_renews_at_two_thirds(renew_before: timedelta) -> None:
    not_after = T0 + timedelta(days=1)
    at = next_renewal_at(T0, not_after, RenewalPolicy(renew_before=renew_before), rand=lambda: 0.0)
    assert at == T0 + timedelta(hours=16)


def test_never_before_not_before() -> None:
    policy = RenewalPolicy(renew_before=timedelta(days=300), jitter=1.0)
    assert next_renewal_at(T0, T0 + YEAR, policy, rand=lambda: 1.0) == T0


def test_result_is_utc_whatever_the_input_zone() -> None:
    tokyo = timezone(timedelta(hours=9))
    at = next_renewal_at(T0.astimezone(tokyo), (T0 + YEAR).astimezone(tokyo), RenewalPolicy(), rand=lambda: 0.0)
    assert at.tzinfo == timezone.utc and at == T0 + YEAR * 2 / 3


def test_next_renewal_at_refuses_naive_and_empty_lifetimes() -> None:
    with pytest.raises(ValueError, match="naive"):
        next_renewal_at(datetime(2026, 1, 1), datetime(2027, 1, 1), RenewalPolicy())
    with pytest.raises(ValueError, match="not after"):
        next_renewal_at(T0, T0, RenewalPolicy())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"renew_before": timedelta(0)},
        {"check_interval": timedelta(seconds=-1)},
        {"jitter": -0.1},
        {"jitter": 1.5},
        {"max_attempts": 0},
        {"backoff_initial": 0.0},
    ],
)
def test_policy_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RenewalPolicy(**kwargs)  # type: ignore[arg-type]


# -- back-off and retries -------------------------------------------------------------


def test_backoff_upper_bounds_double_up_to_the_cap() -> None:
    policy = RenewalPolicy(max_attempts=7, backoff_initial=1.0, backoff_max=10.0)
    assert list(backoff_delays(policy, rand=lambda: 1.0)) == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert list(backoff_delays(policy, rand=lambda: 0.0)) == [0.0] * 6


def test_backoff_full_jitter_stays_within_bounds() -> None:
    policy = RenewalPolicy(max_attempts=10, backoff_initial=0.5, backoff_max=8.0)
    for _ in range(50):
        delays = list(backoff_delays(policy))
        assert len(delays) == 9
        assert all(0.0 <= d <= min(8.0, 0.5 * 2**n) for n, d in enumerate(delays))
    assert list(backoff_delays(RenewalPolicy(max_attempts=1))) == []


class Flaky:
    """Raises the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.fixture
def sleeps() -> list[float]:
    return []


def run(fn: Callable[[], str], sleeps: list[float], **policy: object) -> str:
    return retry_transient(fn, RenewalPolicy(**policy), sleep=sleeps.append, rand=lambda: 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [
        TransportError("connection refused"),
        ServerError(503, "server unavailable"),
        ServerError(500, "boom", code="internal_error"),
        APIError(429, "slow down"),
    ],
)
def test_retries_transient_failures(error: Exception, sleeps: list[float]) -> None:
    fn = Flaky(error, error)
    assert run(fn, sleeps) == "ok"
    assert fn.calls == 3
    assert sleeps == [1.0, 2.0]


@pytest.mark.parametrize(
    "error",
    [
        NotFoundError(404, "unknown service"),
        AuthenticationError(401, "token spent"),
        RequestRejectedError(400, "bad csr"),
        InvalidResponseError("not JSON"),
        ValueError("a bug"),
    ],
)
def test_never_retries_4xx_or_bugs(error: Exception, sleeps: list[float]) -> None:
    fn = Flaky(error)
    with pytest.raises(type(error)):
        run(fn, sleeps)
    assert fn.calls == 1 and sleeps == []


def test_gives_up_after_max_attempts_with_the_last_error(sleeps: list[float]) -> None:
    errors = [ServerError(503, f"attempt {i}") for i in range(5)]
    fn = Flaky(*errors)
    with pytest.raises(ServerError) as info:
        run(fn, sleeps, max_attempts=3, backoff_max=1.5)
    assert info.value is errors[2]
    assert fn.calls == 3 and sleeps == [1.0, 1.5]


def test_custom_transient_predicate(sleeps: list[float]) -> None:
    fn = Flaky(NotFoundError(404, "not yet"))
    result = retry_transient(fn, RenewalPolicy(), sleep=sleeps.append, is_transient=lambda e: True)
    assert result == "ok" and fn.calls == 2


# -- Renewer --------------------------------------------------------------------------


@pytest.fixture
def renewer() -> Iterator[Renewer]:
    r = Renewer(service_id="billing")
    yield r
    r.stop()


HOUR = timedelta(hours=1)  # long enough that no job fires during a test


def scheduler_of(renewer: Renewer) -> Any:
    """The APScheduler instance behind a started renewer (white-box checks)."""
    assert renewer._scheduler is not None
    return renewer._scheduler


def test_start_twice_keeps_one_job(renewer: Renewer) -> None:
    renewer.start(lambda: None, HOUR)
    scheduler = scheduler_of(renewer)
    renewer.start(lambda: None, 2 * HOUR)
    assert scheduler_of(renewer) is scheduler
    jobs = scheduler.get_jobs()
    assert [job.id for job in jobs] == [Renewer.JOB_ID]
    job = jobs[0]
    assert job.trigger.interval == 2 * HOUR
    assert (job.misfire_grace_time, job.coalesce, job.max_instances) == (None, True, 1)
    assert str(scheduler.timezone) in ("UTC", "utc")


def test_stop_is_idempotent(renewer: Renewer) -> None:
    renewer.stop()  # before any start
    renewer.start(lambda: None, HOUR)
    assert renewer._live_scheduler() is not None
    renewer.stop()
    assert renewer._live_scheduler() is None
    renewer.stop()
    renewer.start(lambda: None, HOUR)  # and it starts again
    assert renewer._live_scheduler() is not None


def test_job_failures_go_to_log_and_on_error(caplog: pytest.LogCaptureFixture) -> None:
    reported: list[Exception] = []
    renewer = Renewer(service_id="billing", on_error=reported.append)

    def failing() -> None:
        raise ServerError(503, "server unavailable")

    try:
        renewer.start(failing, HOUR)
        job = scheduler_of(renewer).get_job(Renewer.JOB_ID)
        with caplog.at_level(logging.ERROR, logger="vcc_pki_client.renewal"):
            job.func()  # what APScheduler runs: must not raise
    finally:
        renewer.stop()
    assert [type(e) for e in reported] == [ServerError]
    [record] = caplog.records
    assert record.name == "vcc_pki_client.renewal"
    assert "billing" in record.getMessage() and "server unavailable" in record.getMessage()


def test_on_error_that_raises_is_logged_not_propagated(caplog: pytest.LogCaptureFixture) -> None:
    def bad_callback(exc: Exception) -> None:
        raise RuntimeError("callback bug")

    def buggy_check() -> None:
        _ = 1 / 0  # a bug in the check: its traceback is logged

    renewer = Renewer(service_id="billing", on_error=bad_callback)
    renewer.start(buggy_check, HOUR)
    try:
        with caplog.at_level(logging.ERROR, logger="vcc_pki_client.renewal"):
            scheduler_of(renewer).get_job(Renewer.JOB_ID).func()
    finally:
        renewer.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert any("on_error callback" in m for m in messages)
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


class FakeOs:
    """renewal.py's view of ``os`` in a forked child: another pid."""

    @staticmethod
    def getpid() -> int:
        return -1


def test_after_fork_the_child_makes_its_own_scheduler(renewer: Renewer, monkeypatch: pytest.MonkeyPatch) -> None:
    renewer.start(lambda: None, HOUR)
    inherited = scheduler_of(renewer)
    monkeypatch.setattr(renewal_module, "os", FakeOs())  # as seen from a forked child
    try:
        assert renewer._live_scheduler() is None
        renewer.start(lambda: None, HOUR)
        assert renewer._live_scheduler() is not None and renewer._scheduler is not inherited
    finally:
        inherited.shutdown(wait=True)  # in a real child this thread would not exist


def test_real_scheduler_runs_the_check_and_stops_from_inside_it() -> None:
    """The one test that lets APScheduler fire: a tiny interval, stop() called by the job."""
    calls = 0
    done = threading.Event()
    errors: list[Exception] = []
    renewer = Renewer(service_id="billing", on_error=errors.append)

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            renewer.stop()  # from the job's own thread: must not wait for itself
            done.set()

    renewer.start(check, timedelta(milliseconds=20), immediately=True)
    try:
        assert done.wait(timeout=5), "the scheduler never ran the check three times"
    finally:
        renewer.stop()
    assert errors == [] and calls == 3
    assert renewer._live_scheduler() is None
