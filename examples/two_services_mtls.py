"""Two services on loopback that call each other over mutual TLS, with certificates from the SDK.

``orders`` and ``stock`` each enrol, serve a small Starlette app with uvicorn using
``pki.server_ssl_context()`` (client certificates required, trusted only if issued by our CA),
register their endpoint and health URL, find each other through the registry
(``discover()``), and call each other with ``pki.httpx_client()``. The PKI server probes
a health URL as soon as it is registered; the example waits for ``list_services(healthy=True)``
to show both. A call without a client certificate is refused at the handshake.

After ``make run`` (in the repository root), with nothing else to give::

    python examples/two_services_mtls.py              # or --port 8443, --url https://pki:8443 ...

Options and environment variables: ``_settings.py`` (``--url``/``--port``, ``--admin-token``,
``--root-fingerprint`` or ``--ca-bundle``, ``--workdir``); by default from the dev home ``./pki-data``.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import _settings
import httpx
import uvicorn
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from vcc_pki_client import PKIClient, PKIError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _settings.parser(__doc__, enrolment_token=False)
    parser.add_argument("--health-wait", type=float, default=3.0,
                        help="seconds to wait for the server's first health probes (default 3)")
    return _settings.parse(parser, argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """One service: its PKIClient and a uvicorn server whose TLS comes from ``server_ssl_context()``."""

    def __init__(self, name: str, pki: PKIClient) -> None:
        self.name = name
        self.pki = pki
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/health", self.health), Route("/hello", self.hello)])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, http="h11", lifespan="off", log_config=None,
            access_log=False, timeout_graceful_shutdown=1,
            # The context keeps presenting the newest certificate after each renewal.
            ssl_context_factory=lambda config, default: pki.server_ssl_context(),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    async def hello(self, request: Request) -> Response:
        return PlainTextResponse(f"hello from {self.pki.service_id}")

    def __enter__(self) -> Service:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"{self.name} did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self.thread.join(5)


def run(args: argparse.Namespace) -> None:
    suffix = uuid.uuid4().hex[:6]
    pkis = {}
    for name in ("orders", "stock"):
        service_id = f"{name}-{suffix}"
        folder = Path(args.workdir) / service_id
        pkis[name] = PKIClient(args.url, service_id=service_id, cert_file=folder / "cert.pem",
                               key_file=folder / "key.pem", root_fingerprint=args.root_fingerprint,
                               ca_bundle=args.ca_bundle)
    try:
        for pki in pkis.values():
            pki.enroll(_settings.register_as_admin(pki, args.url, args.admin_token))
            print(f"enrolled {pki.service_id}: certificate {pki.certificate.serial_number:x}")
        with Service("orders", pkis["orders"]) as orders, Service("stock", pkis["stock"]) as stock:
            for service in (orders, stock):
                service.pki.register_service(service_name=service.name.title(), endpoints=[service.url],
                                             health_check_url=f"{service.url}/health")
            for caller, callee in ((orders, stock), (stock, orders)):
                found = caller.pki.discover(callee.pki.service_id)   # the registry says where it lives
                print(f"discovered {found.service_id} at {found.endpoints[0]}")
                with caller.pki.httpx_client(timeout=5) as http:     # presents caller's certificate
                    answer = http.get(f"{found.endpoints[0]}/hello")
                    answer.raise_for_status()
                print(f"{caller.pki.service_id} -> {callee.pki.service_id}: {answer.text}")

            anonymous = httpx.Client(verify=ssl.create_default_context(cadata="".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in orders.pki.get_ca_bundle())))
            with anonymous:
                try:
                    anonymous.get(f"{stock.url}/hello", timeout=5)
                    print("call without a client certificate: accepted (unexpected)")
                except httpx.HTTPError:
                    print("call without a client certificate: refused")

            wanted = {orders.pki.service_id, stock.pki.service_id}
            deadline = time.monotonic() + args.health_wait
            healthy: set[str] = set()
            while time.monotonic() < deadline:
                healthy = {e.service_id for e in orders.pki.list_services(healthy=True)} & wanted
                if healthy == wanted:
                    break
                time.sleep(0.5)
            if healthy == wanted:
                print(f"healthy in the registry: {', '.join(sorted(healthy))}")
            else:
                print(f"health not reported within {args.health_wait:.0f} s; healthy so far: "
                      + (", ".join(sorted(healthy)) or "none"))
    finally:
        for pki in pkis.values():
            pki.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the two services, print each step. Returns the exit status."""
    args = parse_args(argv)
    if not args.admin_token:
        print("two_services_mtls: an admin token is needed to register two services (--admin-token)",
              file=sys.stderr)
        return 2
    try:
        run(args)
    except (PKIError, httpx.HTTPError) as exc:
        print(f"two_services_mtls: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("two_services_mtls: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
