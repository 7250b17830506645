"""The SDK talks to the CA server only (issue 18): a fake API holding an ordinary service
certificate of the same CA, for the right host name, is refused before anything is sent; and
an older CRL than one already seen is never taken."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from peers import FAST, serving
from support import free_port
from vcc_pki_client import PKIClient, TrustError

SEEN: list[str] = []


async def anything(request: Request) -> Response:
    SEEN.append(f"{request.method} {request.url.path} {request.headers.get('authorization', '')}")
    return Response(b"-----BEGIN CERTIFICATE-----\nforged\n-----END CERTIFICATE-----\n")


def fake_api(impostor: PKIClient) -> Iterator[int]:
    port = free_port()
    app = Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST", "DELETE"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http="h11", lifespan="off", log_config=None,
                            access_log=False, ssl_context_factory=lambda c, d: impostor.server_ssl_context(
                                require_client_cert=False, check_revocation=False))
    with serving(config):
        yield port


def test_a_service_certificate_cannot_pose_as_the_ca_server(sdk_service: Callable[..., PKIClient]) -> None:
    impostor, victim = sdk_service(), sdk_service()
    assert victim.files is not None
    for port in fake_api(impostor):
        SEEN.clear()
        with PKIClient(f"https://localhost:{port}", victim.service_id, cert_file=victim.files.cert_file,
                       key_file=victim.files.key_file, retry_policy=FAST) as fooled:
            for call in (lambda: fooled.get_service_certificate("inventory"), fooled.get_crl,
                         lambda: fooled.renew()):
                with pytest.raises(TrustError, match="not the PKI server's"):
                    call()
        assert SEEN == []  # refused at the handshake: no request, no credential reached it
    # The real CA server passes the same check.
    assert victim.get_crl() is not None


def test_an_older_crl_than_one_seen_is_not_taken(sdk_service: Callable[..., PKIClient],
                                                 admin: Any, caplog: pytest.LogCaptureFixture) -> None:
    pki, peer = sdk_service(), sdk_service()
    old = pki.get_crl()
    assert admin.delete(f"/api/v1/certificates/{peer.service_id}/revoke").status_code == 200
    new = pki.get_crl()
    cache = pki._crl  # the CRL is served as the server has it; replay the older one
    real_request = pki._session.connection().request

    def replay(method: str, path: str, **kw: Any) -> Any:
        response = real_request(method, path, **kw)
        if path.startswith("/crl/"):  # the current intermediate's, by its key identifier
            response._content = old.public_bytes(serialization.Encoding.DER)
        return response

    pki._session.connection().request = replay  # type: ignore[method-assign]
    assert cache.fetch() == new  # the newer one stays
    assert pki.is_revoked(peer.certificate, refresh=True) is True
    assert "older than number" in caplog.text
