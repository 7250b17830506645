"""The database deadline of store calls made for HTTP requests (api/store_calls.py, issue 15)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from vcc_pki_server.api.store_calls import StoreCalls
from vcc_pki_server.errors import CAUnavailable


def test_a_hung_call_gives_503_at_the_deadline_then_refuses_at_once_until_it_returns() -> None:
    calls = StoreCalls(0.2)
    release = threading.Event()

    async def scenario() -> None:
        start = time.monotonic()
        with pytest.raises(CAUnavailable, match="did not answer within 0.2 s"):
            await calls.run(release.wait)
        assert 0.2 <= time.monotonic() - start < 1.0
        await asyncio.sleep(0.1)  # the hung call is now past its deadline
        start = time.monotonic()
        with pytest.raises(CAUnavailable, match="has not answered a query for"):
            await calls.run(lambda: "never asked")
        assert time.monotonic() - start < 0.05  # refused without waiting
        release.set()
        await asyncio.sleep(0.05)
        assert await calls.run(lambda: "answered") == "answered"  # admitted again

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        calls.close()


def test_a_call_still_queued_at_its_deadline_never_runs() -> None:
    calls = StoreCalls(0.2, threads=1)
    release = threading.Event()
    ran: list[str] = []

    async def scenario() -> None:
        first = asyncio.ensure_future(calls.run(release.wait))
        await asyncio.sleep(0.01)
        with pytest.raises(CAUnavailable):
            await calls.run(lambda: ran.append("queued"))  # behind the hung one, in the one thread
        release.set()
        with pytest.raises(CAUnavailable):
            await first
        await asyncio.sleep(0.1)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        calls.close()
    assert ran == []
