"""Peers enforce the CRL (SPEC §10): a real uvicorn service on ``server_ssl_context()`` and real
clients with their own certificates; the CA revokes one side and new handshakes are refused
within ``crl_refresh`` + 5 s, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from peers import FAST, PeerServer
from support import free_port
from vcc_pki_client import AsyncPKIClient, PKIClient

API = "/api/v1"
REFRESH = 1.0
Make = Callable[..., PKIClient]


@pytest.fixture
def service(sdk_service: Callable[..., PKIClient]) -> Make:
    """``service(**client_kw)``: a new service, registered and enrolled, its CRL refreshed every second."""
    return lambda **kw: sdk_service(**{"crl_refresh": REFRESH, **kw})


def revoke(admin: httpx.Client, pki: PKIClient) -> None:
    response = admin.delete(f"{API}/certificates/{pki.service_id}/revoke", params={"reason": "keyCompromise"})
    assert response.status_code == 200, response.text


def call(client: PKIClient, port: int, **kw: Any) -> int:
    """One request on a new connection (a new handshake) from ``client`` to the peer on ``port``."""
    with client.httpx_client(timeout=5, **kw) as http:
        return http.get(f"https://localhost:{port}/hello").status_code


def refused_within(seconds: float, attempt: Callable[[], int]) -> tuple[float, Exception]:
    """Retry ``attempt`` (200 while accepted) until it raises; how long that took, and the error."""
    start = time.monotonic()
    while True:
        try:
            assert attempt() == 200
        except httpx.TransportError as exc:
            return time.monotonic() - start, exc
        assert time.monotonic() - start < seconds, f"still accepted after {seconds} s"
        time.sleep(0.1)


def test_a_service_refuses_a_client_the_ca_revoked(service: Make, admin: httpx.Client) -> None:
    server, client = service(), service()
    with PeerServer(server) as peer:
        assert call(client, peer.port) == 200
        revoke(admin, client)
        took, _ = refused_within(REFRESH + 5, lambda: call(client, peer.port))
        # The service refuses the revoked client; another client is still served.
        assert call(service(), peer.port) == 200
    assert took < REFRESH + 5


def test_a_client_refuses_a_server_the_ca_revoked(service: Make, admin: httpx.Client) -> None:
    server, client = service(), service()
    with PeerServer(server) as peer:
        assert call(client, peer.port) == 200
        revoke(admin, server)
        _, error = refused_within(REFRESH + 5, lambda: call(client, peer.port))
        assert "revoked" in str(error)
        # Turned off for one client: the revoked server is accepted again.
        assert call(client, peer.port, check_revocation=False) == 200


def test_contexts_handed_out_follow_new_crls(service: Make, admin: httpx.Client) -> None:
    """The context object uvicorn holds is never replaced: its later handshakes follow."""
    server, client, other = service(), service(), service()
    ctx = client.client_ssl_context()
    with PeerServer(server) as peer, httpx.Client(verify=ctx, timeout=5) as kept:
        url = f"https://localhost:{peer.port}/hello"
        assert kept.get(url).status_code == 200
        revoke(admin, other)  # a new CRL that does not concern these two
        time.sleep(REFRESH + 1)
        kept.get(url, headers={"connection": "close"})  # a new handshake on the next request
        assert kept.get(url).status_code == 200
        revoke(admin, server)
        refused_within(REFRESH + 5, lambda: kept.get(url, headers={"connection": "close"}).status_code)


def test_the_crl_is_kept_on_disk_and_enforced_when_the_ca_is_unreachable(
        service: Make, admin: httpx.Client, tmp_path: Path) -> None:
    server, client = service(), service()
    assert client.files is not None and server.files is not None
    revoke(admin, client)
    server.server_ssl_context()  # fetches the CRL (with the revocation) and keeps it on disk
    crl_file = server.files.cert_file.parent / "crl.pem"
    crl = x509.load_pem_x509_crl(crl_file.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(client.certificate.serial_number) is not None

    # The same service restarted while the CA is down: the CRL on disk is enforced.
    offline = PKIClient(f"https://127.0.0.1:{free_port()}", server.service_id, cert_file=server.files.cert_file,
                        key_file=server.files.key_file, crl_refresh=60, retry_policy=FAST)
    with offline, PeerServer(offline) as peer:
        with pytest.raises(httpx.TransportError):
            call(client, peer.port)
        assert call(service(), peer.port) == 200


def test_before_any_crl_contexts_fail_closed_unless_soft_fail(
        service: Make, caplog: pytest.LogCaptureFixture) -> None:
    server, client = service(), service()
    assert server.files is not None
    unreachable = f"https://127.0.0.1:{free_port()}"
    (server.files.cert_file.parent / "crl.pem").unlink(missing_ok=True)

    closed = PKIClient(unreachable, server.service_id, cert_file=server.files.cert_file,
                       key_file=server.files.key_file, retry_policy=FAST)
    with closed, PeerServer(closed) as peer:
        with pytest.raises(httpx.TransportError):
            call(client, peer.port)
    assert "fetching the CRL failed" in caplog.text

    caplog.clear()
    soft = PKIClient(unreachable, server.service_id, cert_file=server.files.cert_file,
                     key_file=server.files.key_file, retry_policy=FAST, crl_soft_fail=True)
    with soft, PeerServer(soft) as peer, caplog.at_level(logging.WARNING, "vcc_pki_client"):
        assert call(client, peer.port) == 200
    assert "without a revocation check" in caplog.text


def test_the_async_client_never_waits_for_an_unreachable_ca(service: Make, tmp_path: Path) -> None:
    server = service()
    assert server.files is not None
    folder = tmp_path / "copy"
    shutil.copytree(server.files.cert_file.parent, folder)

    async def make_contexts() -> float:
        async with AsyncPKIClient(f"https://127.0.0.1:{free_port()}", server.service_id,
                                  cert_file=folder / "cert.pem", key_file=folder / "key.pem",
                                  retry_policy=FAST) as pki:
            start = time.monotonic()
            pki.server_ssl_context()
            pki.client_ssl_context()
            return time.monotonic() - start

    assert asyncio.run(make_contexts()) < 1.0


def test_a_crl_that_fails_its_checks_is_never_installed(service: Make, admin: httpx.Client,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    server, client = service(), service()
    assert server.files is not None
    crl_file = server.files.cert_file.parent / "crl.pem"
    # A CRL naming our intermediate, listing the client, signed by another key.
    intermediate = server.get_ca_bundle()[0]
    now = intermediate.not_valid_before_utc
    forged = (x509.CertificateRevocationListBuilder().issuer_name(intermediate.subject)
              .last_update(now).next_update(now.replace(year=now.year + 5))
              .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                       .serial_number(client.certificate.serial_number).revocation_date(now).build())
              .add_extension(x509.CRLNumber(10**9), critical=False)
              .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()))
    crl_file.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    restarted = PKIClient(server.pki_server_url, server.service_id, cert_file=server.files.cert_file,
                          key_file=server.files.key_file, retry_policy=FAST, crl_refresh=REFRESH)
    with restarted, caplog.at_level(logging.WARNING, "vcc_pki_client"), PeerServer(restarted) as peer:
        assert call(client, peer.port) == 200  # the forged CRL is not in force; the CA's is
    assert f"ignoring {crl_file}" in caplog.text
    assert x509.load_pem_x509_crl(crl_file.read_bytes()) != forged  # replaced by the CA's
