"""Store calls from the event loop: in threads of their own, each answer awaited for at most a
deadline (``--database-timeout``), so that a database that hangs (a stopped host, a black-holed
network: no error, no answer) gives 503s instead of requests that wait with it.

A call that overran its deadline is still running in its thread (a blocked driver call cannot
be taken back); while one is, new calls are refused at once rather than queued behind it — fast
503s for the whole hang — and they are admitted again as soon as it returns. A request answered
503 this way may still have been carried out (the database may commit it after answering late):
the outcome is unknown, as with any timeout, and a retry says which.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..errors import CAUnavailable

T = TypeVar("T")


class StoreCalls:
    """Runs blocking store work off the event loop with a deadline."""

    def __init__(self, timeout: float, *, threads: int = 32) -> None:
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store")
        self._lock = threading.Lock()
        self._running: dict[object, float] = {}  # a running call -> when it started (monotonic)

    def _hung(self) -> float | None:
        """Seconds the oldest running call has run, if past the deadline; else None."""
        with self._lock:
            if not self._running:
                return None
            oldest = time.monotonic() - min(self._running.values())
        return oldest if oldest > self.timeout else None

    async def run(self, work: Callable[[], T]) -> T:
        """``work()`` in a thread; its result, or CAUnavailable (503) after the deadline."""
        hung = self._hung()
        if hung is not None:
            raise CAUnavailable(f"the database has not answered a query for {hung:.0f} s")

        key = object()

        def timed() -> T:
            with self._lock:
                self._running[key] = time.monotonic()
            try:
                return work()
            finally:
                with self._lock:
                    del self._running[key]

        future: Future[T] = self._pool.submit(timed)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except TimeoutError:  # not started yet: cancelled with the wait; running: it goes on
            raise CAUnavailable(f"the database did not answer within {self.timeout:g} s") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
