"""End-to-end helpers: httpx clients against the real ``vcc-pki-server`` subprocess (``pki_server``).

Fixtures:

- ``anon`` / ``admin``: clients trusting the root, without credentials / with the admin token.
- ``clients``: a factory of further clients (any TLS context, any bearer token), all closed at
  teardown (ResourceWarnings are errors).
- ``register``: registers a service as admin and returns its one-time enrolment token.
- ``enrolled``: registers and enrols a service with a CSR and returns an :class:`Enrolled`
  (cert.pem / key.pem paths and an mTLS client).
- ``problem``: asserts that a response is an RFC 9457 problem document of a given status.
- ``sdk_clients``: PKIClients a test made, closed at teardown.
- ``sdk_service``: a service registered and enrolled with the SDK (a PKIClient).
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from support import RunningServer, make_csr, tls_context
from vcc_pki_client import PKIClient
from vcc_pki_server.home import Home, key_pem

API = "/api/v1"
PROBLEM_MEMBERS = ("type", "title", "status", "detail", "code")


def assert_problem(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """``response`` is a problem document with ``status`` (and ``code``); returns its body."""
    assert response.status_code == status, f"{response.status_code} != {status}: {response.text}"
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body: dict[str, Any] = response.json()
    missing = [m for m in PROBLEM_MEMBERS if m not in body]
    assert not missing, f"problem document lacks {missing}: {body}"
    assert body["status"] == status
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.text
    if code is not None:
        assert body["code"] == code, body
    return body


Problem = Callable[..., dict[str, Any]]


@pytest.fixture
def problem() -> Problem:
    """``problem(response, status, code=None)``: see :func:`assert_problem`."""
    return assert_problem


@attrs.define
class Enrolled:
    """A service enrolled over the API: its files and an mTLS client presenting its certificate."""

    service_id: str
    cert: Path
    key: Path
    issued: dict[str, Any]  # the 201 body of POST /certificates/request
    client: httpx.Client

    @property
    def serial(self) -> str:
        return str(self.issued["serial_number"])

    @property
    def fingerprint(self) -> str:
        return str(self.issued["fingerprint_sha256"])


class Clients:
    """Makes httpx clients for the running server and closes every one of them at teardown."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.root_ctx = tls_context(server.home.root_cert)
        self._open: list[httpx.Client] = []

    def new(self, *, ctx: ssl.SSLContext | None = None, token: str | None = None,
            **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=self.server.url, verify=ctx or self.root_ctx,
                              headers=headers, timeout=30, **kw)
        self._open.append(client)
        return client

    def mtls(self, cert: Path, key: Path, **kw: Any) -> httpx.Client:
        return self.new(ctx=tls_context(self.server.home.root_cert, cert, key), **kw)

    def close(self) -> None:
        for client in self._open:
            client.close()
        self._open.clear()


@pytest.fixture
def clients(pki_server: RunningServer) -> Iterator[Clients]:
    made = Clients(pki_server)
    yield made
    made.close()


@pytest.fixture
def anon(clients: Clients) -> httpx.Client:
    return clients.new()


@pytest.fixture
def admin(clients: Clients, admin_token: str) -> httpx.Client:
    return clients.new(token=admin_token)


def new_service_id() -> str:
    return f"e2e-{uuid.uuid4().hex[:10]}"


Register = Callable[..., str]


@pytest.fixture
def register(admin: httpx.Client) -> Register:
    """``register(service_id, san_dns=(), san_ip=(), **fields) -> enrolment token`` (as admin)."""

    def run(service_id: str, *, san_dns: Sequence[str] = (), san_ip: Sequence[str] = (),
            **fields: Any) -> str:
        body: dict[str, Any] = {"service_id": service_id, **fields}
        if san_dns:
            body["san_dns"] = list(san_dns)
        if san_ip:
            body["san_ip"] = list(san_ip)
        r = admin.post(f"{API}/services/register", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["enrolment_token"])

    return run


Enrol = Callable[..., Enrolled]


@pytest.fixture
def enrolled(clients: Clients, register: Register, tmp_path: Path) -> Enrol:
    """``enrolled(service_id=None, san_dns=(), san_ip=())``: register as admin, enrol with the
    enrolment token (a CSR without SANs: the whole allow-list) and return an :class:`Enrolled`."""

    def run(service_id: str | None = None, *, san_dns: Sequence[str] = (),
            san_ip: Sequence[str] = ()) -> Enrolled:
        sid = service_id or new_service_id()
        token = register(sid, san_dns=san_dns, san_ip=san_ip)
        csr, key = make_csr(sid)
        with httpx.Client(base_url=clients.server.url, verify=clients.root_ctx, timeout=30) as c:
            r = c.post(f"{API}/certificates/request", json={"service_id": sid, "csr": csr.decode()},
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 201, r.text
        folder = tmp_path / sid
        folder.mkdir()
        (folder / "cert.pem").write_text(r.json()["certificate"])
        (folder / "key.pem").write_bytes(key_pem(key, None))
        client = clients.mtls(folder / "cert.pem", folder / "key.pem")
        return Enrolled(sid, folder / "cert.pem", folder / "key.pem", r.json(), client)

    return run


@pytest.fixture
def sdk_clients() -> Iterator[list[PKIClient]]:
    """PKIClients made by a test, closed at teardown."""
    made: list[PKIClient] = []
    yield made
    for pki in made:
        pki.close()


SDKService = Callable[..., PKIClient]


@pytest.fixture
def sdk_service(pki_server: RunningServer, register: Register, tmp_path: Path, sdk_clients: list[PKIClient],
                ca_root_fingerprint: str) -> SDKService:
    """``sdk_service(enroll={...}, **client_kw)``: a new service registered by the admin (SANs:
    its id, localhost, 127.0.0.1) and enrolled with a PKIClient made with ``client_kw``."""

    def make(*, enroll: dict[str, Any] | None = None, **client_kw: Any) -> PKIClient:
        from peers import FAST, new_id

        sid = new_id()
        token = register(sid, san_dns=[sid, "localhost"], san_ip=["127.0.0.1"])
        client_kw.setdefault("retry_policy", FAST)
        pki = PKIClient(pki_server.url, sid, cert_file=tmp_path / sid / "cert.pem",
                        key_file=tmp_path / sid / "key.pem", root_fingerprint=ca_root_fingerprint, **client_kw)
        sdk_clients.append(pki)
        pki.enroll(token, **(enroll or {}))
        return pki

    return make


@pytest.fixture(scope="session")
def ca_root_fingerprint(ca_home: Home) -> str:
    from peers import fingerprint

    return fingerprint(ca_home)
