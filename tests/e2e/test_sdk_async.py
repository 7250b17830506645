"""AsyncPKIClient against the real server: the SDK's calls awaited from an event loop that stays free.

pytest-asyncio is not used: each test drives its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from support import RunningServer
from vcc_pki_client import AsyncPKIClient, ConfigurationError, IssuedCertificate, RetryPolicy
from vcc_pki_server.home import SERVER_SERVICE_ID, Home

FAST = RetryPolicy(max_attempts=3, backoff_initial=0.01, backoff_max=0.05)
Register = Callable[..., str]


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


async def serve_caller_name(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A one-request HTTP/1.1 handler over TLS: answers with the client certificate's CN."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        body = common_name(x509.load_der_x509_certificate(der)).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


async def scenario(pki: AsyncPKIClient, token: str, ca_home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not pki.enrolled
    issued = await pki.enroll(token)
    assert pki.enrolled and pki.certificate == issued.certificate

    # renew() runs in a worker thread: it cannot finish until the loop has run another task.
    loop_ran = threading.Event()
    real_renew = pki.sync.renew

    def renew_after_the_loop_ran(*args: Any, **kwargs: Any) -> IssuedCertificate:
        assert loop_ran.wait(5), "the event loop was blocked while renew() ran"
        return real_renew(*args, **kwargs)

    monkeypatch.setattr(pki.sync, "renew", renew_after_the_loop_ran)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            if ticks == 3:
                loop_ran.set()
            await asyncio.sleep(0.005)

    tick_task = asyncio.create_task(ticker())
    try:
        renewed = await pki.renew()
    finally:
        tick_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await tick_task
    assert ticks >= 3
    assert renewed.certificate.serial_number != issued.certificate.serial_number
    assert pki.certificate == renewed.certificate

    # The PKI server's own certificate, chain-checked; the CA bundle; our registry entry.
    server_cert = await pki.get_service_certificate(SERVER_SERVICE_ID)
    assert server_cert.issuer == ca_home.intermediate_certificate().subject
    assert await pki.get_ca_bundle() == [ca_home.intermediate_certificate(), ca_home.root_certificate()]
    assert (await pki.discover(pki.service_id)).service_id == pki.service_id

    # mTLS with httpx.AsyncClient: to a tiny asyncio server on our server context, and to the PKI server.
    server = await asyncio.start_server(serve_caller_name, "127.0.0.1", 0, ssl=pki.server_ssl_context())
    try:
        port = server.sockets[0].getsockname()[1]
        async with pki.httpx_async_client(timeout=5) as http:
            r = await http.get(f"https://localhost:{port}/whoami")
            assert (r.status_code, r.text) == (200, pki.service_id)
            r = await http.get(f"{pki.pki_server_url}/api/v1/certificates/{pki.service_id}")
            assert r.status_code == 200, r.text
            assert int(r.json()["serial_number"], 16) == renewed.certificate.serial_number
    finally:
        server.close()
        await server.wait_closed()

    # Revocation shows on the (refreshed) CRL.
    current = pki.certificate
    assert await pki.is_revoked(current) is False
    record = await pki.revoke("superseded")
    assert record.status == "revoked"
    assert await pki.is_revoked(current, refresh=True) is True
    crl = await pki.get_crl()
    assert crl.get_revoked_certificate_by_serial_number(current.serial_number) is not None


def test_async_client_end_to_end(pki_server: RunningServer, ca_home: Home, register: Register, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    sid = f"aio-{uuid.uuid4().hex[:10]}"
    token = register(sid, san_dns=[sid, "localhost"], san_ip=["127.0.0.1"])
    pin = ca_home.root_certificate().fingerprint(hashes.SHA256()).hex()

    async def main() -> AsyncPKIClient:
        async with AsyncPKIClient(pki_server.url, sid, cert_file=tmp_path / "tls" / "cert.pem",
                                  key_file=tmp_path / "tls" / "key.pem", root_fingerprint=pin,
                                  retry_policy=FAST) as pki:
            await scenario(pki, token, ca_home, monkeypatch)
        await pki.aclose()  # idempotent
        return pki

    pki = asyncio.run(main())
    with pytest.raises(ConfigurationError, match="closed"):
        asyncio.run(pki.discover(sid))


def test_async_auto_renewal_and_renew_now(pki_server: RunningServer, ca_home: Home, register: Register,
                                          tmp_path: Path) -> None:
    sid = f"aio-{uuid.uuid4().hex[:10]}"
    token = register(sid, san_dns=[sid])
    pin = ca_home.root_certificate().fingerprint(hashes.SHA256()).hex()

    async def main() -> None:
        async with AsyncPKIClient(pki_server.url, sid, cert_file=tmp_path / "cert.pem",
                                  key_file=tmp_path / "key.pem", root_fingerprint=pin, retry_policy=FAST) as pki:
            with pytest.raises(ConfigurationError):
                pki.enable_auto_renewal()  # not enrolled yet
            first = (await pki.enroll(token, validity_days=1)).certificate
            assert common_name(pki.certificate) == sid
            loop = asyncio.get_running_loop()
            renewed: asyncio.Future[x509.Certificate] = loop.create_future()
            # A renew_before window longer than the lifetime: due at two thirds, i.e. not yet.
            pki.enable_auto_renewal(renew_before_days=30, check_interval=3600,
                                    on_renewed=lambda cert: loop.call_soon_threadsafe(renewed.set_result, cert))
            assert await pki.renew_now() is None
            later = first.not_valid_after_utc
            new = await pki.renew_now(now=later)
            assert new is not None and new.certificate.serial_number != first.serial_number
            assert (await asyncio.wait_for(renewed, 5)) == new.certificate
            pki.disable_auto_renewal()
            pki.disable_auto_renewal()

    asyncio.run(main())
