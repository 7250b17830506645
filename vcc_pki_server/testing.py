"""A real VCC PKI in users' test suites: pytest fixtures (SPEC §14, docs/testing.md).

``pip install "vcc-pki[testing]"`` registers this module as a pytest plugin (entry point
``pytest11``) with two fixtures:

* ``vcc_pki`` (session): the real server — the same app, store and CA code as
  ``vcc-pki-server`` — on 127.0.0.1 at a free port, in a thread of the test process, over a
  temporary home with EC keys. A :class:`LocalPKI`: ``.url``, ``.root_fingerprint``,
  ``.ca_bundle``, ``.admin_token``, ``.register(service_id, **fields)``,
  ``.revoke(service_id, reason)``.
* ``vcc_pki_service`` (function): a factory; ``vcc_pki_service("billing")`` registers the
  service (allowed its id, ``localhost`` and ``127.0.0.1``; once per session) and returns an enrolled
  :class:`LocalService` — a ``PKIClient`` with its files under the test's ``tmp_path``, plus
  ``.serve(app)`` to run an mTLS server for it. All are closed when the test ends.

Two services speaking mTLS::

    def test_billing_calls_inventory(vcc_pki_service):
        inventory, billing = vcc_pki_service("inventory"), vcc_pki_service("billing")
        app = Starlette(routes=[Route("/items", lambda request: PlainTextResponse("apples"))])
        with inventory.serve(app) as url, billing.httpx_client() as http:
            assert http.get(f"{url}/items").text == "apples"

The server runs in a thread (not a subprocess): it starts in about a tenth of a second, its
imports are shared with the tests, and it stops within a second at the end of the session.
Server-side modules are imported only when a fixture is used, so the plugin costs nothing in a
suite that does not use it (or an environment with the SDK alone).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from vcc_pki_client import PKIClient
from vcc_pki_client.errors import PKIError

if TYPE_CHECKING:
    import uvicorn

    from .authority import Authority

__all__ = ["LocalPKI", "LocalService", "vcc_pki", "vcc_pki_service"]

DEFAULT_SANS = {"san_dns": ["localhost"], "san_ip": ["127.0.0.1"]}


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def _uvicorn_in_a_thread(config: uvicorn.Config, sock: socket.socket, what: str) -> Iterator[None]:
    """Serve ``config`` on ``sock`` in a daemon thread until the block ends (then within ~1 s)."""
    import uvicorn

    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=what)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.005)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


class LocalPKI:
    """A VCC PKI server for tests (the ``vcc_pki`` fixture): the real app, over a temporary home."""

    def __init__(self, home: Path, authority: Authority, url: str, admin_token: str) -> None:
        self.home = home
        self.url = url  #: ``https://127.0.0.1:<port>``
        self.admin_token = admin_token  #: an admin token of this CA
        self.ca_bundle = home / "ca" / "root_ca.pem"  #: the root CA (PEM), for clients' ``ca_bundle=``
        self._authority = authority
        self._clients: list[PKIClient] = []
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        root = x509.load_pem_x509_certificate(self.ca_bundle.read_bytes())
        #: ``sha256:<hex>`` of the root, for clients' ``root_fingerprint=``
        self.root_fingerprint = "sha256:" + root.fingerprint(hashes.SHA256()).hex()

    def register(self, service_id: str, **fields: Any) -> str:
        """Register a service as the admin; return its one-time enrolment token. ``fields`` are
        those of ``POST /services/register`` (``san_dns``, ``san_ip``, ``endpoints``...);
        by default the service is allowed its id, ``localhost`` and ``127.0.0.1``."""
        from .authority import Actor

        names = {key: list(fields.pop(key, DEFAULT_SANS[key])) for key in ("san_dns", "san_ip")}
        _, token = self._authority.register(service_id, {**fields, **names}, actor=Actor.system("vcc_pki fixture"))
        assert token is not None
        return token.value

    def enrolment_token(self, service_id: str, **fields: Any) -> str:
        """A one-time enrolment token for ``service_id``: registered with ``fields`` if it is
        new, else a fresh token for the registered service (its fields unchanged)."""
        from .authority import Actor
        from .errors import UnknownService

        try:
            self._authority.service(service_id)
        except UnknownService:
            return self.register(service_id, **fields)
        return self._authority.new_enrolment_token(service_id, actor=Actor.system("vcc_pki fixture")).value

    def revoke(self, service_id: str, reason: str = "keyCompromise") -> list[str]:
        """Revoke the service's current certificate (with keyCompromise, every certificate of its
        key); return the serials revoked (hex). Every client made by ``vcc_pki_service`` fetches
        the new CRL before this returns, so their contexts refuse the certificate at once."""
        from .authority import Actor

        revoked = self._authority.revoke(service_id, reason=reason, actor=Actor.system("vcc_pki fixture"))
        for client in list(self._clients):
            with contextlib.suppress(PKIError):  # a closed client has nothing to refresh
                client.refresh_crl()
        return list(revoked.serials)

    def client(self, service_id: str, folder: Path, **kwargs: Any) -> LocalService:
        """A client of this CA for ``service_id`` with its files in ``folder`` (not enrolled);
        ``kwargs`` go to ``PKIClient`` (``crl_refresh`` is 1 s unless given)."""
        kwargs.setdefault("crl_refresh", 1.0)
        client = LocalService(self.url, service_id, cert_file=folder / "cert.pem", key_file=folder / "key.pem",
                              root_fingerprint=self.root_fingerprint, **kwargs)
        self._clients.append(client)
        return client


class LocalService(PKIClient):
    """An enrolled ``PKIClient`` from ``vcc_pki_service``, with :meth:`serve`."""

    @contextlib.contextmanager
    def serve(self, app: Any, *, register: bool = True) -> Iterator[str]:
        """Run ``app`` (ASGI) over mTLS as this service until the block ends; yields its URL
        (``https://localhost:<port>``). Callers need a certificate of this CA that is not
        revoked; ``vcc_pki_client.asgi.caller_service_id(request.scope)`` names them. With
        ``register`` the URL becomes the service's endpoint, so peers ``discover()`` it."""
        import uvicorn

        from vcc_pki_client.asgi import MTLSH11Protocol

        sock = _loopback_socket()
        url = f"https://localhost:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, http=MTLSH11Protocol, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=1, ssl_context_factory=lambda config, default:
                                self.server_ssl_context())
        with _uvicorn_in_a_thread(config, sock, f"{self.service_id} server"):
            if register:
                self.register_service(self.service_id, endpoints=[url])
            yield url


@contextlib.contextmanager
def running_pki(folder: Path) -> Iterator[LocalPKI]:
    """Create a CA home in ``folder`` and serve it until the block ends (what ``vcc_pki`` does)."""
    from .app import create_app
    from .authority import Actor
    from .bootstrap import initialize
    from .config import Config
    from .health import lifecycle
    from .home import Home
    from .mtls import uvicorn_config
    from .server_cert import ServerCertificate

    sock = _loopback_socket()
    url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    home = Home(folder / "home")
    password = secrets.token_urlsafe(16)
    initialize(home, Config(public_url=url, health_allow_loopback=True, health_interval_seconds=1.0),
               root_password=secrets.token_urlsafe(16), ca_password=password,
               root_key_type="ec-p384", intermediate_key_type="ec-p256")
    authority = home.authority(password)
    try:
        admin_token = authority.create_admin_token(name="tests", expires_days=None, actor=Actor.operator()).value
        app = create_app(authority, background=[lifecycle(authority, home)], root_crl=home.root_crl_file)
        config = uvicorn_config(app, host="127.0.0.1", port=0, log_config=None, access_log=False,
                                timeout_graceful_shutdown=1,
                                ssl_context=ServerCertificate(home, authority, password, interval=3600).ssl_context())
        pki = LocalPKI(home.root, authority, url, admin_token)
        with _uvicorn_in_a_thread(config, sock, "vcc-pki server"):
            try:
                yield pki
            finally:
                for client in pki._clients:
                    client.close()
    finally:
        authority.store.close()


@pytest.fixture(scope="session")
def vcc_pki() -> Iterator[LocalPKI]:
    """A real VCC PKI server for the test session (see :class:`LocalPKI`)."""
    with tempfile.TemporaryDirectory(prefix="vcc-pki-") as folder, running_pki(Path(folder)) as pki:
        yield pki


@pytest.fixture
def vcc_pki_service(vcc_pki: LocalPKI, tmp_path: Path) -> Iterator[Callable[..., LocalService]]:
    """``vcc_pki_service(service_id, *, validity=None, **client_kwargs)``: register the service
    (or, registered by an earlier test, take a new token for it), enrol it (key made here, files
    under ``tmp_path/<service_id>``) and return its client. ``validity`` (a ``timedelta``, at
    least 5 minutes) asks for a short-lived certificate."""
    made: list[LocalService] = []

    def make(service_id: str, *, validity: timedelta | None = None, **client_kwargs: Any) -> LocalService:
        client = vcc_pki.client(service_id, tmp_path / service_id, **client_kwargs)
        made.append(client)
        client.enroll(vcc_pki.enrolment_token(service_id), validity=validity)
        return client

    yield make
    for client in made:
        client.close()
