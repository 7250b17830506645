"""The testing kit: a real CA in your pytest suite, two services talking mTLS in ten lines.

With ``pip install "vcc-pki[testing]"`` the ``vcc_pki`` and ``vcc_pki_service`` fixtures are in
every pytest run (docs/testing.md): no server to start by hand, nothing to mock. This file is a
test module; run it with pytest, or as a script (which runs pytest on it)::

    python -m pytest examples/testing_kit.py
    python examples/testing_kit.py
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from vcc_pki_client.asgi import caller_service_id


async def items(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"apples for {caller_service_id(request.scope)}")


def test_billing_calls_inventory(vcc_pki_service):  # type: ignore[no-untyped-def]
    inventory, billing = vcc_pki_service("inventory"), vcc_pki_service("billing")
    with inventory.serve(Starlette(routes=[Route("/items", items)])) as url, billing.httpx_client() as http:
        assert http.get(f"{url}/items").text == "apples for billing"


def test_a_revoked_caller_is_refused(vcc_pki, vcc_pki_service):  # type: ignore[no-untyped-def]
    inventory, reports = vcc_pki_service("inventory-2"), vcc_pki_service("reports")
    with inventory.serve(Starlette(routes=[Route("/items", items)])) as url:
        assert reports.discover("inventory-2").endpoints == [url]  # serve() registered the endpoint
        with reports.httpx_client() as http:
            assert http.get(f"{url}/items").status_code == 200
        vcc_pki.revoke("reports")  # every kit client has the new CRL when this returns
        with reports.httpx_client() as http, pytest.raises(httpx.HTTPError):
            http.get(f"{url}/items")


if __name__ == "__main__":  # pytest in a process of its own: this one has imported the app already
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]))
