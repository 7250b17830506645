"""Limits at the edge (issue 18): no unauthenticated client can take the CA down with huge
headers, idle or slow connections, or by holding every file descriptor."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from pathlib import Path

import httpx

from conftest import CA_PASSWORD
from support import RunningServer, tls_context
from vcc_pki_server.home import Home


def open_tls(server: RunningServer, ctx: ssl.SSLContext, source: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname="localhost")


def health_from(server: RunningServer, ctx: ssl.SSLContext, source: str, timeout: float = 5) -> int:
    """/health over a new connection from another client address (loopback has 127/8)."""
    transport = httpx.HTTPTransport(verify=ctx, local_address=source)
    with httpx.Client(transport=transport, timeout=timeout) as client:
        return client.get(f"{server.url}/health").status_code


def answer_to(conn: ssl.SSLSocket, head: bytes, filler: bytes, total: int) -> tuple[bytes, int]:
    """Send ``head`` then ``filler`` until ``total`` bytes or an answer; the answer and bytes sent."""
    conn.sendall(head)
    sent = len(head)
    while sent < total:
        if select.select([conn], [], [], 0)[0]:
            break
        try:
            conn.sendall(filler)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            break
        sent += len(filler)
    conn.settimeout(5)
    try:
        return conn.recv(65536), sent
    except (ConnectionResetError, ssl.SSLError):
        return b"", sent


def test_a_16_mib_header_is_refused_quickly_and_costs_no_memory(ca_home: Home, tmp_path: Path) -> None:
    ctx = tls_context(ca_home.root_cert)
    with RunningServer(ca_home, CA_PASSWORD) as server:
        before = server.pid_rss_mb()
        start = time.monotonic()
        with open_tls(server, ctx) as conn:
            answer, sent = answer_to(conn, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ", b"a" * 65536,
                                     16 * 1024 * 1024)
        took = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert b"application/problem+json" in answer and b'"status": 431' in answer
        assert sent < 4 * 1024 * 1024 and took < 5  # refused long before 16 MiB were taken
        with open_tls(server, ctx) as conn:  # many small fields instead
            many = b"".join(b"X-F%d: v\r\n" % i for i in range(150))
            answer, _ = answer_to(conn, b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + many + b"\r\n", b"", 0)
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert server.pid_rss_mb() - before < 50
        assert health_from(server, ctx, "127.0.0.1") == 200
        assert "refused (431)" in server.log_once(lambda log: "refused (431)" in log)


def test_idle_connections_under_a_1024_file_limit_leave_others_served(ca_home: Home) -> None:
    ctx = tls_context(ca_home.root_cert)
    with RunningServer(ca_home, CA_PASSWORD, nofile=1024, extra_args=["--header-timeout", "4"]) as server:
        idle = []
        try:
            for _ in range(1100):  # TLS connections that never send a request: over the fd limit
                try:
                    idle.append(open_tls(server, ctx))
                except (OSError, ssl.SSLError):
                    break
            assert len(idle) >= 300
            # Another client is served at once while they are held (not after they time out).
            assert health_from(server, ctx, "127.0.0.2", timeout=2) == 200
            # The connections over the per-client limit were closed at once, the rest after
            # header_timeout: all are gone within 4 s + a margin.
            deadline = time.monotonic() + 8
            for conn in idle:
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                with contextlib.suppress(ConnectionResetError, ssl.SSLError):
                    assert conn.recv(1) == b""
        finally:
            for conn in idle:
                conn.close()
        log = server.log_once(lambda log: "header_timeout" in log and "max_connections_per_client" in log)
        assert "max_connections_per_client" in log and "header_timeout" in log
        assert health_from(server, ctx, "127.0.0.1") == 200


def test_a_connection_that_never_finishes_its_tls_handshake_is_closed_after_the_header_timeout(
        ca_home: Home) -> None:
    with RunningServer(ca_home, CA_PASSWORD, extra_args=["--header-timeout", "1"]) as server:
        silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)  # no ClientHello at all
        partial = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello cut short
        try:
            started = time.monotonic()
            for conn in (silent, partial):
                with contextlib.suppress(ConnectionResetError):
                    assert conn.recv(1024) == b""
            assert time.monotonic() - started < 5  # asyncio's own default would hold them 60 s
        finally:
            silent.close()
            partial.close()
        assert health_from(server, tls_context(ca_home.root_cert), "127.0.0.1") == 200
