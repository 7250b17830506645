"""A light HTTP/1.1 load generator over TLS with keep-alive, run in its own process.

No HTTP client library: prepared request bytes are written as they are, responses are read by
status line + headers + Content-Length. One TLS connection per concurrency slot; each slot sends
its next request as soon as the previous answer is in (closed loop). Loopback only.

As a subprocess (what :func:`run` does)::

    python -m benchmarks.loadgen SPEC.json

reads the spec (port, cafile, concurrency, requests file, expected status, deadline), opens the
connections, prints ``ready`` and waits for one line on stdin, sends every request, and prints
one JSON line: wall time, latencies, status counts and its own CPU time. The parent reads the
server's CPU counters between ``go`` and the result, so set-up and handshakes stay outside
the measured window.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HEADER_END = b"\r\n\r\n"


async def _connection(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="localhost", limit=2**22)
    return reader, writer


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(HEADER_END)
    status = int(head[9:12])
    length = 0
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.find(b"\r\n", at + 2)
        length = int(lower[at + 17:end])
    body = await reader.readexactly(length) if length else b""
    return status, body


async def _drive(port: int, cafile: str, requests: Sequence[bytes], concurrency: int,
                 expected: int, deadline: float, ready: Callable[[], Any]) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=cafile)
    conns = [await _connection(port, ctx) for _ in range(concurrency)]
    await ready()
    latencies: list[float] = [0.0] * len(requests)
    statuses: Counter[int] = Counter()
    bad: list[str] = []
    next_index = 0
    clock = time.perf_counter

    async def slot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal next_index
        while next_index < len(requests):
            i = next_index
            next_index += 1
            start = clock()
            writer.write(requests[i])
            status, body = await _read_response(reader)
            latencies[i] = clock() - start
            statuses[status] += 1
            if status != expected and len(bad) < 3:
                bad.append(f"{status}: {body[:300]!r}")

    cpu0 = os.times()
    start = clock()
    await asyncio.wait_for(asyncio.gather(*(slot(r, w) for r, w in conns)), timeout=deadline)
    wall = clock() - start
    cpu1 = os.times()
    for _, writer in conns:
        writer.close()
    return {"wall": wall, "latencies": latencies, "statuses": dict(statuses), "bad": bad,
            "client_cpu": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
            "requests": len(requests), "concurrency": concurrency}


def _main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    with open(spec["requests_file"], "rb") as f:
        requests: list[bytes] = pickle.load(f)
    try:
        import uvloop  # the client's own overhead is smaller with it; measured either way
        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    if spec.get("cpu") is not None:
        os.sched_setaffinity(0, {spec["cpu"]})

    async def ready() -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    loop = loop_factory()
    try:
        result = loop.run_until_complete(_drive(spec["port"], spec["cafile"], requests,
                                                spec["concurrency"], spec["expected"],
                                                spec["deadline"], ready))
    finally:
        loop.close()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def run(port: int, cafile: str, requests: Sequence[bytes], *, concurrency: int, expected: int = 200,
        deadline: float = 300.0, cpu: int | None = None,
        measure: Callable[[], float | tuple[float, ...]] | None = None) -> dict[str, Any]:
    """Send ``requests`` from a separate process; with ``measure`` (e.g. the server's CPU
    seconds, or a tuple such as (user, system)), also report its increase over exactly the
    measured window as ``server_cpu`` (a float, or a list for a tuple)."""
    with tempfile.TemporaryDirectory(prefix="vcc-loadgen-") as tmp:
        req_file = Path(tmp) / "requests.pickle"
        with open(req_file, "wb") as f:
            pickle.dump(list(requests), f)
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"port": port, "cafile": cafile, "requests_file": str(req_file),
                                    "concurrency": concurrency, "expected": expected,
                                    "deadline": deadline, "cpu": cpu}))
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.loadgen", str(spec)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parent.parent)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"load generator failed to start: {line!r}")
            before = measure() if measure else 0.0
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            after = measure() if measure else 0.0
            if not line:
                raise RuntimeError("load generator died")
            result: dict[str, Any] = json.loads(line)
            if isinstance(after, tuple):
                assert isinstance(before, tuple)
                result["server_cpu"] = [a - b for a, b in zip(after, before, strict=True)]
            else:
                assert not isinstance(before, tuple)
                result["server_cpu"] = after - before
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return result


if __name__ == "__main__":
    _main(sys.argv[1])
