"""Identity in the certificate (SPEC §10): a service built with the SDK tells its callers apart
by the service id in their certificates, as docs/client.md shows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from peers import serving
from support import free_port
from vcc_pki_client import PKIClient, peer_service_id
from vcc_pki_client.asgi import MTLSH11Protocol, caller_service_id


@pytest.fixture
def service(sdk_service: Callable[..., PKIClient]) -> Callable[[], PKIClient]:
    return lambda: sdk_service()


def serve(pki: PKIClient, allowed: set[str]) -> Iterator[int]:
    """The docs' example: a Starlette service that answers only the services in ``allowed``."""
    async def items(request: Request) -> Response:
        caller = caller_service_id(request.scope)
        if caller not in allowed:
            return PlainTextResponse(f"{caller} may not read items", status_code=403)
        return PlainTextResponse(f"items for {caller}")

    port = free_port()
    config = uvicorn.Config(Starlette(routes=[Route("/items", items)]), host="127.0.0.1", port=port,
                            http=MTLSH11Protocol, lifespan="off", log_config=None, access_log=False,
                            ssl_context_factory=lambda config, default: pki.server_ssl_context())
    with serving(config):
        yield port


def test_a_service_authorises_its_callers_by_service_id(service: Callable[[], PKIClient]) -> None:
    inventory, billing, intruder = service(), service(), service()
    for port in serve(inventory, {billing.service_id}):
        url = f"https://localhost:{port}/items"
        with billing.httpx_client(timeout=5) as http:
            r = http.get(url)
            assert (r.status_code, r.text) == (200, f"items for {billing.service_id}")
        with intruder.httpx_client(timeout=5) as http:
            r = http.get(url)
            assert (r.status_code, r.text) == (403, f"{intruder.service_id} may not read items")


def test_peer_service_id_reads_the_uri_san(service: Callable[[], PKIClient]) -> None:
    pki = service()
    cert = pki.certificate
    assert peer_service_id(cert) == pki.service_id
    assert peer_service_id(cert.public_bytes(serialization.Encoding.DER)) == pki.service_id
    assert peer_service_id(cert, trust_domain="vcc-pki.internal") == pki.service_id
    assert peer_service_id(cert, trust_domain="elsewhere.example") is None
    assert peer_service_id(pki.get_ca_bundle()[0]) is None  # a CA certificate names no service


def test_without_a_client_certificate_there_is_no_caller() -> None:
    scope: dict[str, Any] = {"type": "http", "extensions": {}}
    assert caller_service_id(scope) is None
