"""Unauthenticated attacks on one server worker, with the edge's limits off and on, in one run.

Each configuration is a fresh ``vcc-pki-server`` (one worker, open-file limit 1,024 as under
systemd) on loopback; "limits off" raises every limit of :mod:`vcc_pki_server.limits` out of
reach (what the server was before them). Measured while each attack runs, from another client
address (127.0.0.2): ``GET /health`` (20 requests, each on a new connection, 3 s timeout) and the
server's resident memory.

* **huge headers**: 4 connections each sending a 64 MiB request header (64 KiB writes);
* **idle connections**: 1,100 TLS connections that never send a request (over the fd limit).

    python -m benchmarks.attacks
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from .common import Server, build_home, client_context, median, rss_mb, table, write_result

OFF = ["--max-header-bytes", "1000000000", "--max-headers", "1000000", "--header-timeout", "3599",
       "--max-connections-per-client", "1000000", "--max-connections", "1000000"]


def health(port: int, ctx: ssl.SSLContext, tries: int = 20) -> dict[str, Any]:
    """/health from 127.0.0.2, a new connection each time: answered share and median latency."""
    ok, times = 0, []
    for _ in range(tries):
        start = time.perf_counter()
        try:
            transport = httpx.HTTPTransport(verify=ctx, local_address="127.0.0.2")
            with httpx.Client(transport=transport, timeout=3) as client:
                if client.get(f"https://127.0.0.1:{port}/health").status_code == 200:
                    ok += 1
                    times.append(time.perf_counter() - start)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return {"answered": f"{ok}/{tries}", "p50_ms": median(times) * 1000 if times else None}


def huge_headers(port: int, ctx: ssl.SSLContext, stop: threading.Event) -> None:
    def one() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
                chunk = b"a" * 65536
                for _ in range(1024):  # 64 MiB
                    if stop.is_set():
                        return
                    tls.sendall(chunk)
        except (OSError, ssl.SSLError):
            pass

    threads = [threading.Thread(target=one, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()


def idle(port: int, ctx: ssl.SSLContext, held: list[ssl.SSLSocket]) -> None:
    for _ in range(1100):  # more than the 1,024 files the server may open
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(ctx.wrap_socket(raw, server_hostname="localhost"))
        except (OSError, ssl.SSLError):
            break


def run(home: Any, extra: list[str]) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the server inherits it
    try:
        server = Server(home, extra=extra).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    ctx = client_context(home)
    out: dict[str, Any] = {}
    try:
        out["quiet"] = {**health(server.port, ctx), "rss_mb": rss_mb(server.proc.pid)}  # type: ignore[union-attr]
        stop = threading.Event()
        huge_headers(server.port, ctx, stop)
        time.sleep(1.0)
        out["huge headers"] = {**health(server.port, ctx), "rss_mb": rss_mb(server.proc.pid)}  # type: ignore[union-attr]
        stop.set()
        time.sleep(1.0)
        held: list[ssl.SSLSocket] = []
        idle(server.port, ctx, held)
        out["idle connections"] = {**health(server.port, ctx), "rss_mb": rss_mb(server.proc.pid),  # type: ignore[union-attr]
                                   "held": len(held)}
        for conn in held:
            conn.close()
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vcc-bench-attacks-"))
    try:
        home = build_home(work / "home")
        results = {"limits off": run(home, OFF), "limits on (defaults)": run(home, [])}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for config, measured in results.items():
        for attack, m in measured.items():
            p50 = f"{m['p50_ms']:.1f}" if m["p50_ms"] is not None else "-"
            rows.append([config, attack + (f" ({m['held']} made)" if "held" in m else ""), m["answered"], p50,
                         f"{m['rss_mb']:.0f}"])
    print(table(["server", "during", "/health answered (3 s timeout)", "p50 ms", "server RSS MB"], rows))
    print(f"\nresults: {write_result('attacks', results)}")
    return results


if __name__ == "__main__":
    main()
