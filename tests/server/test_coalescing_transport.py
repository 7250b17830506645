"""The response-write coalescing in vcc_pki_server.transport: one send per response, nothing lost."""

from __future__ import annotations

import asyncio
from typing import Any

from vcc_pki_server.transport import CoalescingTransport


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.extra = {"peername": ("127.0.0.1", 1)}

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


def run(body: Any) -> FakeTransport:
    async def main() -> FakeTransport:
        raw = FakeTransport()
        transport = CoalescingTransport(raw, asyncio.get_running_loop())  # type: ignore[arg-type]
        await body(transport, raw)
        return raw

    return asyncio.run(main())


def test_writes_of_one_loop_pass_go_out_as_one() -> None:
    async def body(t: CoalescingTransport, raw: FakeTransport) -> None:
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"body")
        assert raw.writes == []  # held until the next pass
        await asyncio.sleep(0)
        assert raw.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        t.write(b"next")
        await asyncio.sleep(0)

    assert run(body).writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"next"]


def test_large_bodies_are_not_joined_but_written_in_slices_of_themselves() -> None:
    slice_ = CoalescingTransport.SLICE
    big = bytes(range(256)) * (3 * slice_ // 256) + b"t" * 100
    small_enough = b"y" * slice_

    async def body(t: CoalescingTransport, raw: FakeTransport) -> None:
        t.write(b"head")
        t.write(big)
        await asyncio.sleep(0)
        t.write(small_enough)  # alone and not over a slice: written as it is
        await asyncio.sleep(0)

    writes = run(body).writes
    assert writes[0] == b"head" and writes[-1] is small_enough
    slices = writes[1:-1]
    assert [len(w) for w in slices] == [slice_, slice_, slice_, len(big) - 3 * slice_]
    # Views of the body, not copies, and together exactly the body.
    assert all(isinstance(w, memoryview) and w.obj is big for w in slices)
    assert b"".join(slices) == big


def test_close_sends_what_is_held_first_and_other_calls_pass_through() -> None:
    async def body(t: CoalescingTransport, raw: FakeTransport) -> None:
        t.write(b"last words")
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)
        t.close()
        assert raw.closed and raw.writes == [b"last words"]
        await asyncio.sleep(0)  # the scheduled flush finds nothing left

    assert run(body).writes == [b"last words"]


def test_nothing_is_written_to_a_transport_closing_underneath() -> None:
    async def body(t: CoalescingTransport, raw: FakeTransport) -> None:
        t.write(b"too late")
        raw.closed = True  # the peer went away
        await asyncio.sleep(0)

    assert run(body).writes == []
