"""The server's own certificate renewed and reloaded while running (SPEC §10), one worker at a time."""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509

from conftest import CA_PASSWORD, build_home
from support import tls_context
from vcc_pki_server.authority import Authority
from vcc_pki_server.server_cert import ServerCertificate, due


def presented(ctx: ssl.SSLContext, root: Path) -> int:
    """The serial ``ctx`` presents in a loopback handshake."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
                tls_context(root).wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
        thread.join(5)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_due_when_a_third_of_the_lifetime_is_left() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    cert = type("C", (), {"not_valid_before_utc": t0, "not_valid_after_utc": t0 + timedelta(days=30)})()
    assert not due(cert, t0 + timedelta(days=19))  # type: ignore[arg-type]
    assert due(cert, t0 + timedelta(days=20))  # type: ignore[arg-type]


def test_a_due_certificate_is_renewed_once_and_every_worker_follows(tmp_path: Path) -> None:
    long_ago = datetime.now(timezone.utc) - timedelta(days=300)
    home = build_home(tmp_path / "h", ca_made=long_ago - timedelta(days=1))
    then = Authority(home.open_store(), home.load_ca(CA_PASSWORD), clock=lambda: long_ago)
    home.issue_server_certificate(then, home.config())  # 365 days from 300 days ago: due
    then.store.close()
    old = x509.load_pem_x509_certificate(home.server_cert.read_bytes())
    workers = [ServerCertificate(home, home.authority(CA_PASSWORD), CA_PASSWORD) for _ in range(2)]
    try:
        contexts = [w.ssl_context() for w in workers]
        assert {presented(ctx, home.root_cert) for ctx in contexts} == {old.serial_number}
        results: list[bool] = []
        threads = [threading.Thread(target=lambda w=w: results.append(w.check())) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == [False, True]  # one renewed; the other found it done
        new = x509.load_pem_x509_certificate(home.server_cert.read_bytes())
        assert new.serial_number != old.serial_number
        # The contexts handed out before (what uvicorn holds) present the new one now.
        assert {presented(ctx, home.root_cert) for ctx in contexts} == {new.serial_number}
        assert [w.check() for w in workers] == [False, False]  # the new one is not due
    finally:
        for w in workers:
            w.authority.store.close()
