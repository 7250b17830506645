"""The certificate-request path without HTTP or TLS: what the server's own code costs.

    python -m benchmarks.fastpath [--logging info|off] [--no-commit] [--repeats 7]

Drives the app (its edge, the issuance handler and the issuer's thread that answer
``POST /api/v1/certificates/request``) in-process on uvloop, 32 requests at a time, with the
real authority and store of a fresh home (P-256 CA) and log lines going to a file as the
server writes them. Prints the event-loop thread's CPU per certificate and the whole
process's (with the group-commit thread), medians of ``--repeats`` passes over 1,500 CSRs.
``--no-commit`` replaces the store's group commit with a no-op; ``--logging off`` disables
logging: the differences are what those cost in place, between signing and the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import uvloop

from vcc_pki_server import logs
from vcc_pki_server.api.issuance import ISSUE_PATH
from vcc_pki_server.app import create_app

from .common import admin_token, build_home, make_csrs, median, open_authority


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fastpath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logging", choices=["info", "off"], default="info")
    parser.add_argument("--no-commit", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vcc-bench-fastpath-"))
    home = build_home(work / "home")
    token = admin_token(home)
    authority = open_authority(home)
    logs.configure("info", open(work / "server.log", "w", buffering=1 << 16))  # noqa: SIM115
    if args.logging == "off":
        logging.disable(logging.CRITICAL)
    if args.no_commit:
        def no_commit(batch: Sequence[Any], done: Callable[[list[BaseException | None]], None]) -> None:
            done([None] * len(batch))
        authority.store.submit_certificates = no_commit  # type: ignore[method-assign]
    app = create_app(authority)
    bodies = [json.dumps({"service_id": s, "csr": c}).encode() for s, c in make_csrs(1500)]
    headers = [(b"host", b"localhost"), (b"authorization", f"Bearer {token}".encode()),
               (b"content-type", b"application/json")]

    async def one(body: bytes) -> None:
        scope = {"type": "http", "method": "POST", "path": ISSUE_PATH, "root_path": "",
                 "client": ("127.0.0.1", 50000), "extensions": {"tls": {"client_cert_der": None}},
                 "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        if sent[0]["status"] != 201:
            raise AssertionError(f"answered {sent[0]['status']}: {sent[1]['body'][:300]!r}")

    async def batch(chunk: list[bytes]) -> None:
        for at in range(0, len(chunk), 32):
            await asyncio.gather(*(one(b) for b in chunk[at:at + 32]))

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(batch(bodies[:200]))  # warm-up
        process, thread = [], []
        by_thread: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            p0, t0, threads0 = time.process_time(), time.thread_time(), thread_times()
            loop.run_until_complete(batch(bodies))
            process.append((time.process_time() - p0) / len(bodies) * 1e6)
            thread.append((time.thread_time() - t0) / len(bodies) * 1e6)
            for name, used in thread_times().items():
                by_thread.setdefault(name, []).append((used - threads0.get(name, 0.0)) / len(bodies) * 1e6)
    finally:
        loop.close()
        authority.store.close()
    print(f"logging {args.logging}, commit {'off' if args.no_commit else 'on'}: "
          f"event-loop thread {median(thread):.0f} µs/cert, process {median(process):.0f} µs/cert "
          f"(passes: {' '.join(f'{t:.0f}' for t in thread)})")
    print("by thread: " + ", ".join(f"{name} {median(us):.0f}" for name, us in sorted(by_thread.items())) + " µs/cert")


def thread_times() -> dict[str, float]:
    """CPU seconds (user + system) of each live Python thread, by name, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[t.name] = (int(fields[11]) + int(fields[12])) / tick
    return out


if __name__ == "__main__":
    main()
