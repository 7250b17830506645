"""Certificate requests reach the one issuance handler by the edge's direct dispatch; through
the router (the same route in the table) every answer is the same. The inputs themselves are
tried against the real server in tests/e2e/test_api_bad_input.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from support import make_csr
from vcc_pki_server.api.edge import Edge
from vcc_pki_server.app import create_app
from vcc_pki_server.authority import Actor, Authority

URL = "http://pki.test/api/v1/certificates/request"


def _cases(service_id: str, admin: str) -> dict[str, dict[str, Any]]:
    good_csr = make_csr(service_id)[0].decode()
    outside_csr = make_csr(service_id, dns=["elsewhere.example"])[0].decode()
    auth = {"authorization": f"Bearer {admin}"}
    js = {"content-type": "application/json", **auth}
    body = lambda **kw: json.dumps({"service_id": service_id, "csr": good_csr, **kw})  # noqa: E731
    return {
        "issued": {"headers": js, "content": body()},
        "no credentials": {"headers": {"content-type": "application/json"}, "content": body()},
        "bad token": {"headers": {**js, "authorization": "Bearer nope"}, "content": body()},
        "malformed json": {"headers": js, "content": "{not json"},
        "not an object": {"headers": js, "content": "[1, 2]"},
        "wrong content type": {"headers": {**auth, "content-type": "text/plain"}, "content": body()},
        "too large": {"headers": js, "content": "x" * (64 * 1024 + 1)},
        "missing csr": {"headers": js, "content": json.dumps({"service_id": service_id})},
        "bad service id": {"headers": js, "content": json.dumps({"service_id": "../../etc", "csr": good_csr})},
        "garbage csr": {"headers": js, "content": json.dumps({"service_id": service_id, "csr": "garbage"})},
        "outside allow-list": {"headers": js, "content": json.dumps({"service_id": service_id,
                                                                       "csr": outside_csr})},
        "validity too long": {"headers": js, "content": body(validity_days=4000)},
        "empty body": {"headers": js, "content": ""},
    }


async def _answer(authority: Authority, fast: bool, request: dict[str, Any]) -> httpx.Response:
    app = create_app(authority)
    if not fast:
        app = Edge(app.app, state=app.state, metrics=app.metrics)  # no direct dispatch: the router finds the route
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        return await client.post(URL, **request)


def _shape(response: httpx.Response) -> tuple[int, str, Any]:
    body = response.json()
    if response.status_code == 201:
        return 201, response.headers["content-type"], sorted(body)  # serials differ; members must not
    return response.status_code, response.headers["content-type"], body


@pytest.mark.parametrize("case", list(_cases("x", "y")))
def test_direct_dispatch_and_router_answer_alike(authority: Authority, admin_token: str,
                                                    service_id: str, case: str) -> None:
    authority.register_service(service_id, san_dns=[service_id], actor=Actor.operator())
    request = _cases(service_id, admin_token)[case]
    fast = asyncio.run(_answer(authority, True, request))
    routed = asyncio.run(_answer(authority, False, request))
    assert _shape(fast) == _shape(routed)
    assert fast.headers.get("www-authenticate") == routed.headers.get("www-authenticate")
    if case == "issued":
        assert fast.status_code == 201
        assert authority.store.get_certificate(fast.json()["serial_number"]) is not None
    else:
        assert fast.status_code >= 400 and fast.headers["content-type"] == "application/problem+json"


def test_certificate_requests_bypass_the_router(authority: Authority, monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct dispatch is really taken: with the router broken, requests still reach the handler."""
    app = create_app(authority)

    async def broken_router(*_: Any) -> None:
        raise AssertionError("the router was asked")

    monkeypatch.setattr(app, "app", broken_router)

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
            return await client.post(URL, content="{}", headers={"content-type": "application/json"})

    answer = asyncio.run(post())
    assert answer.status_code == 422 and answer.json()["code"] == "invalid_field"  # the handler's own check
