"""Real TLS handshakes against uvicorn running with vcc_pki_server.mtls.

These tests are also the tripwire for the uvicorn internals the hook relies on (its default
HTTP protocol class, ``connection_made`` after the handshake, ``self.app`` read per request):
if an upgrade changes them, the app stops seeing the certificate and they fail.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import pickle
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from vcc_pki_server.mtls import (
    MTLSProtocol,
    peer_certificate_der,
    server_ssl_context,
    uvicorn_config,
)

# --- a throwaway PKI ---------------------------------------------------------------------

Issued = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _issue(
    cn: str,
    issuer: Issued | None,
    *,
    ca: bool,
    eku: list[x509.ObjectIdentifier] | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> Issued:
    """Issue a certificate for a fresh P-256 key; self-signed when ``issuer`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )
    if issuer:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key())
        builder = builder.add_extension(aki, critical=False)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _pem(*certs: x509.Certificate) -> bytes:
    """Concatenate certificates as PEM."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class PKI:
    """Paths of the throwaway PKI's files, and the good client certificate's fingerprint."""

    root: Path
    ca_bundle: Path
    server_chain: Path
    server_key: Path
    client_chain: Path
    client_key: Path
    client_fingerprint: str
    foreign_chain: Path
    foreign_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """Root, intermediate, server and client leaves, and a client leaf from a foreign CA."""
    d = tmp_path_factory.mktemp("pki")
    root = _issue("Test Root", None, ca=True)
    inter = _issue("Test Intermediate", root, ca=True)
    server = _issue(
        "localhost", inter, ca=False, eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client = _issue("billing", inter, ca=False, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    foreign_root = _issue("Foreign Root", None, ca=True)
    foreign = _issue("intruder", foreign_root, ca=False, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {
        "root": _pem(root[0]),
        "ca_bundle": _pem(root[0], inter[0]),
        "server_chain": _pem(server[0], inter[0]),
        "server_key": _key_pem(server[1]),
        "client_chain": _pem(client[0], inter[0]),
        "client_key": _key_pem(client[1]),
        "foreign_chain": _pem(foreign[0], foreign_root[0]),
        "foreign_key": _key_pem(foreign[1]),
    }
    for name, data in files.items():
        (d / f"{name}.pem").write_bytes(data)
    fingerprint = client[0].fingerprint(hashes.SHA256()).hex()
    return PKI(**{name: d / f"{name}.pem" for name in files}, client_fingerprint=fingerprint)


# --- a running server --------------------------------------------------------------------


async def echo(request: Request) -> JSONResponse:
    """Answer what the app knows of the peer: its certificate's fingerprint, port and TLS."""
    der = peer_certificate_der(request.scope)
    tls: dict[str, Any] = request.scope["extensions"]["tls"]
    return JSONResponse(
        {
            "fingerprint": hashlib.sha256(der).hexdigest() if der else None,
            "chain_length": len(tls["client_cert_chain"]),
            "client_port": request.scope["client"][1],
            "tls_version": tls["tls_version"],
            "cipher_suite": tls["cipher_suite"],
        }
    )


# 3 MB and a bit, not a multiple of the 64 KiB slices the transport writes large bodies in.
BIG = bytes(range(256)) * (3 * 4096 + 7)


async def big(request: Request) -> Response:
    return Response(BIG, media_type="application/octet-stream")


@pytest.fixture(scope="module")
def base_url(pki: PKI) -> Iterator[str]:
    """Run uvicorn with the mTLS hook on a free port in a thread; stop it afterwards."""
    app = Starlette(routes=[Route("/", echo), Route("/big", big)])
    ctx = server_ssl_context(pki.server_chain, pki.server_key, pki.ca_bundle)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(
        app, host="127.0.0.1", port=port, ssl_context=ctx, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    try:
        thread.start()
        deadline = time.monotonic() + 5
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"https://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
        assert not thread.is_alive()


def _client_context(pki: PKI, chain: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client context trusting the test root, presenting ``chain`` when given."""
    ctx = ssl.create_default_context(cafile=pki.root)
    if chain is not None:
        ctx.load_cert_chain(chain, key)
    return ctx


def _get(url: str, ctx: ssl.SSLContext) -> dict[str, Any]:
    """One request on a fresh connection; the JSON the app answered."""
    with httpx.Client(verify=ctx, timeout=5) as client:
        response = client.get(url)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


# --- tests -------------------------------------------------------------------------------


def test_mtls_protocol_extends_the_protocol_uvicorn_uses_by_default() -> None:
    """If uvicorn changes its default protocol, our subclass would silently be the odd one."""
    assert issubclass(MTLSProtocol, AutoHTTPProtocol)


def test_app_sees_exactly_the_client_certificate(pki: PKI, base_url: str) -> None:
    """The real-handshake check that the hook still works with this uvicorn."""
    seen = _get(base_url, _client_context(pki, pki.client_chain, pki.client_key))
    assert seen["fingerprint"] == pki.client_fingerprint
    assert seen["chain_length"] == 1
    assert seen["tls_version"] in (0x0303, 0x0304)
    assert isinstance(seen["cipher_suite"], int)


def test_app_sees_none_without_a_client_certificate(pki: PKI, base_url: str) -> None:
    seen = _get(base_url, _client_context(pki))
    assert seen["fingerprint"] is None
    assert seen["chain_length"] == 0


def test_foreign_ca_client_certificate_fails_and_server_keeps_serving(
    pki: PKI, base_url: str
) -> None:
    foreign = _client_context(pki, pki.foreign_chain, pki.foreign_key)
    # No TLS alert comes back: "Server disconnected" (TLS 1.3), a failed handshake (1.2), or
    # a reset when the server closes with the request still unread.
    with pytest.raises((httpx.RemoteProtocolError, httpx.ConnectError, httpx.ReadError)):
        _get(base_url, foreign)
    seen = _get(base_url, _client_context(pki, pki.client_chain, pki.client_key))
    assert seen["fingerprint"] == pki.client_fingerprint


def test_every_request_on_a_keep_alive_connection_carries_the_certificate(
    pki: PKI, base_url: str
) -> None:
    ctx = _client_context(pki, pki.client_chain, pki.client_key)
    with httpx.Client(verify=ctx, timeout=5) as client:
        seen = [client.get(base_url).json() for _ in range(4)]
    assert {s["client_port"] for s in seen} == {seen[0]["client_port"]}  # one connection
    assert [s["fingerprint"] for s in seen] == [pki.client_fingerprint] * 4


def test_large_bodies_arrive_whole_and_in_order_on_a_keep_alive_connection(
    pki: PKI, base_url: str
) -> None:
    # Written to TLS in slices (see CoalescingTransport): the bytes must still be the body's.
    ctx = _client_context(pki, pki.client_chain, pki.client_key)
    with httpx.Client(verify=ctx) as client:
        for _ in range(3):
            response = client.get(base_url + "big")
            assert response.status_code == 200
            assert response.headers["content-length"] == str(len(BIG))
            assert hashlib.sha256(response.content).digest() == hashlib.sha256(BIG).digest()
        assert client.get(base_url).json()["fingerprint"] == pki.client_fingerprint


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_version_is_reported_as_its_wire_value(
    pki: PKI, base_url: str, version: ssl.TLSVersion
) -> None:
    ctx = _client_context(pki, pki.client_chain, pki.client_key)
    ctx.minimum_version = ctx.maximum_version = version
    assert _get(base_url, ctx)["tls_version"] == version.value


def test_server_context_disables_session_tickets(pki: PKI) -> None:
    ctx = server_ssl_context(pki.server_chain, pki.server_key, pki.ca_bundle)
    assert ctx.num_tickets == 0
    assert ctx.options & ssl.OP_NO_TICKET
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls13_reconnect_cannot_resume_a_session(pki: PKI, base_url: str) -> None:
    """Without tickets a TLS 1.3 client has nothing to resume with: each connection re-verifies."""
    ctx = _client_context(pki, pki.client_chain, pki.client_key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    port = int(base_url.rsplit(":", 1)[1].strip("/"))
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)
            while tls.recv(4096):  # read to the end: TLS 1.3 tickets come after the handshake
                pass
            session = tls.session
    assert session is not None and not session.has_ticket
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
            assert not tls.session_reused


def test_peer_certificate_der_reads_the_asgi_tls_extension() -> None:
    """PEM-only scopes (servers implementing the extension natively) work too."""
    der = ssl.PEM_cert_to_DER_cert(_pem(_issue("x", None, ca=True)[0]).decode())
    pem = ssl.DER_cert_to_PEM_cert(der)
    assert peer_certificate_der({"type": "http"}) is None
    assert peer_certificate_der({"extensions": {"tls": {"client_cert_chain": []}}}) is None
    assert peer_certificate_der({"extensions": {"tls": {"client_cert_chain": [pem]}}}) == der


def test_uvicorn_config_refuses_its_own_tls_options(pki: PKI) -> None:
    ctx = server_ssl_context(pki.server_chain, pki.server_key, pki.ca_bundle)
    with pytest.raises(TypeError, match="ssl_certfile"):
        uvicorn_config(Starlette(), host="127.0.0.1", port=1, ssl_context=ctx, ssl_certfile="x.pem")


def test_uvicorn_config_pickles_for_workers_with_a_context_factory(pki: PKI) -> None:
    """``workers > 1`` spawns processes and pickles the config; the factory must survive it."""
    factory = functools.partial(server_ssl_context, pki.server_chain, pki.server_key, pki.ca_bundle)
    config = uvicorn_config(
        "starlette.applications:Starlette", host="127.0.0.1", port=1, ssl_context=factory
    )
    copy = pickle.loads(pickle.dumps(config))
    assert copy.http is MTLSProtocol
    assert copy.ssl_context_factory is not None
    ctx = copy.ssl_context_factory(copy, ssl.create_default_context)
    assert ctx.verify_mode == ssl.CERT_OPTIONAL and ctx.num_tickets == 0
