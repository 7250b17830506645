"""Retrying transient failures with exponential back-off and full jitter.

:class:`RetryPolicy` sets the attempts and waits of the SDK's calls to the server
(``PKIClient(retry_policy=...)``); :class:`~vcc_pki_client.renewal.RenewalPolicy` carries the
same three fields for each background renewal. Either is a :class:`Backoff`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import attrs

from .errors import APIError, ServerError, TransportError

__all__ = ["Backoff", "RetryPolicy", "backoff_delays", "is_transient", "retry_transient"]

logger = logging.getLogger("vcc_pki_client.renewal")

T = TypeVar("T")


class Backoff(Protocol):
    """How many attempts, and the waits between them (seconds)."""

    @property
    def max_attempts(self) -> int: ...
    @property
    def backoff_initial(self) -> float: ...
    @property
    def backoff_max(self) -> float: ...


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Attempts and back-off of the SDK's calls to the server on transient failures (no
    answer, 5xx, 429): at most ``max_attempts`` calls, waits growing from ``backoff_initial``
    to at most ``backoff_max`` seconds, each drawn at random below its cap."""

    max_attempts: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    backoff_initial: float = attrs.field(default=0.5, validator=attrs.validators.gt(0.0))
    backoff_max: float = attrs.field(default=8.0, validator=attrs.validators.gt(0.0))

    @classmethod
    def of(cls, backoff: Backoff) -> RetryPolicy:
        """The retry fields of any :class:`Backoff` (e.g. a RenewalPolicy, as earlier
        versions took for ``retry_policy``)."""
        if isinstance(backoff, cls):
            return backoff
        return cls(max_attempts=backoff.max_attempts, backoff_initial=backoff.backoff_initial,
                   backoff_max=backoff.backoff_max)


def backoff_delays(policy: Backoff, rand: Callable[[], float] = random.random) -> Iterator[float]:
    """The waits between ``policy.max_attempts`` attempts: exponential, with full jitter.

    Yields ``max_attempts - 1`` delays in seconds; the n-th (from 0) is uniform in
    ``[0, min(backoff_max, backoff_initial * 2**n))``.
    """
    for attempt in range(policy.max_attempts - 1):
        cap = min(policy.backoff_max, policy.backoff_initial * 2.0**attempt)
        yield rand() * cap


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: no usable answer, 5xx, or 429 (too many requests).

    Never for other 4xx answers: the same request would be refused again.
    """
    if isinstance(exc, (TransportError, ServerError)):
        return True
    return isinstance(exc, APIError) and exc.status == 429


def retry_transient(
    fn: Callable[[], T],
    policy: Backoff,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
    is_transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call ``fn``; on a transient failure, wait (:func:`backoff_delays`) and call again.

    At most ``policy.max_attempts`` calls. Returns ``fn``'s result. A failure that is not
    transient is raised at once; after the last attempt the last failure is re-raised as
    it is (so callers keep the typed error; the renewer wraps it in RenewalError).
    Retrying repeats the request: use it for idempotent calls or ones whose repetition
    is harmless (a renewal issues one more certificate, never a second enrolment).
    """
    delays = backoff_delays(policy, rand)
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            delay = next(delays, None) if is_transient(exc) else None
            if delay is None:
                raise
            logger.warning(
                "attempt %d of %d failed (%s); retrying in %.1f s", attempt, policy.max_attempts, exc, delay
            )
        sleep(delay)
        attempt += 1
