"""SPEC §4/§5 against the real server: who may call what, with which status, and the read-only views.

The matrix test calls each endpoint as each kind of caller (anonymous, admin token, enrolment
token, the target service's own certificate, another service's certificate); the other tests
prove the rules that need a sequence of calls (tokens spent once, revoked certificates refused on
live and resumed connections, allow-lists) and the shapes of lists, downloads, CA files and CRLs.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from starlette.routing import Route

from support import RunningServer, make_csr, tls_context
from vcc_pki_server import tokens
from vcc_pki_server.api.routes import ROUTES
from vcc_pki_server.authority import Actor, Authority

if TYPE_CHECKING:
    from tests.e2e.conftest import Clients, Enrol, Enrolled, Problem, Register

API = "/api/v1"
PEM = "application/x-pem-file"
CALLERS = ("anonymous", "admin", "enrolment", "own", "other")


# --- the matrix ----------------------------------------------------------------------------
@attrs.define
class World:
    """A target service (the one in the path), another enrolled service, and the callers."""

    target: Enrolled
    other: Enrolled
    callers: dict[str, httpx.Client]
    root_ski: str  # the root's subject key identifier, hex (its CRL's path)
    intermediate_ski: str


@attrs.frozen
class Case:
    method: str
    path: str  # "{sid}" is the target service id
    expect: dict[str, int]  # caller -> status
    body: Callable[[World], Any] | None = None
    params: dict[str, str] | None = None


def _csr_body(world: World) -> dict[str, Any]:
    return {"service_id": world.target.service_id, "csr": make_csr(world.target.service_id)[0].decode()}


def _register_body(world: World) -> dict[str, Any]:
    return {"service_id": world.target.service_id, "version": "2.0"}


def _reads(ok: int = 200) -> dict[str, int]:
    """mTLS (any service) and admin may read; an enrolment token may not."""
    return {"anonymous": 401, "admin": ok, "enrolment": 403, "own": ok, "other": ok}


def _own(ok: int) -> dict[str, int]:
    """Only the service itself and an admin."""
    return {"anonymous": 401, "admin": ok, "enrolment": 403, "own": ok, "other": 403}


PUBLIC = dict.fromkeys(CALLERS, 200)
CASES: dict[str, Case] = {
    "request": Case("POST", "/certificates/request",
                    {"anonymous": 401, "admin": 201, "enrolment": 201, "own": 201, "other": 403},
                    body=_csr_body),
    "list-certificates": Case("GET", "/certificates/", _reads()),
    "get-certificate": Case("GET", "/certificates/{sid}", _reads()),
    "download": Case("GET", "/certificates/{sid}/download", _reads()),
    "renew": Case("POST", "/certificates/{sid}/renew", _own(201)),
    "revoke": Case("DELETE", "/certificates/{sid}/revoke", _own(200), params={"reason": "superseded"}),
    "list-services": Case("GET", "/services/", _reads()),
    "register": Case("POST", "/services/register",
                     {"anonymous": 401, "admin": 409, "enrolment": 403, "own": 200, "other": 403},
                     body=_register_body),
    "get-service": Case("GET", "/services/{sid}", _reads()),
    "patch-service": Case("PATCH", "/services/{sid}", _own(200), body=lambda w: {"version": "3.1"}),
    "decommission": Case("DELETE", "/services/{sid}",
                         {"anonymous": 401, "admin": 200, "enrolment": 403, "own": 403, "other": 403}),
    "enrolment-token": Case("POST", "/services/{sid}/enrolment-token",
                            {"anonymous": 401, "admin": 201, "enrolment": 403, "own": 403, "other": 403}),
    "ca-root": Case("GET", "/ca/root", PUBLIC),
    "ca-intermediate": Case("GET", "/ca/intermediate", PUBLIC),
    "ca-chain": Case("GET", "/ca/chain", PUBLIC),
    "crl": Case("GET", "/crl", PUBLIC),
    "audit": Case("GET", "/audit", {"anonymous": 401, "admin": 200, "enrolment": 403, "own": 403, "other": 403}),
    "crl-of-issuer": Case("GET", "/crl/{root_ski}", PUBLIC),
    "intermediate-by-ski": Case("GET", "/ca/intermediate/{intermediate_ski}", PUBLIC),
    "bundle": Case("GET", "/ca/bundle", PUBLIC),
    "roots": Case("GET", "/ca/roots", PUBLIC),
    "health": Case("GET", "/health", PUBLIC),
    "openapi": Case("GET", "/openapi.json", PUBLIC),
    "docs": Case("GET", "/docs", PUBLIC),
    "liveness": Case("GET", "/health/live", PUBLIC),
    # An admin token or a metrics token (tests/e2e/test_metrics.py); no service certificate.
    "metrics": Case("GET", "/metrics", {"anonymous": 401, "admin": 200, "enrolment": 403, "own": 403,
                                        "other": 403}),
}
CODES = {401: "not_authenticated", 403: "not_permitted", 409: "conflict"}
UNVERSIONED = ("/health", "/openapi.json", "/docs", "/health/live", "/metrics")  # not under /api/v1


@pytest.fixture
def world(enrolled: Enrol, clients: Clients, anon: httpx.Client, admin: httpx.Client) -> World:
    root = x509.load_pem_x509_certificate(admin.get(f"{API}/ca/root").content)
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    intermediate = x509.load_pem_x509_certificate(admin.get(f"{API}/ca/intermediate").content)
    intermediate_ski = intermediate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest.hex()
    target, other = enrolled(), enrolled()
    r = admin.post(f"{API}/services/{target.service_id}/enrolment-token")
    assert r.status_code == 201, r.text
    return World(target, other, {
        "anonymous": anon, "admin": admin, "enrolment": clients.new(token=r.json()["enrolment_token"]),
        "own": target.client, "other": other.client}, root_ski, intermediate_ski)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("endpoint", list(CASES))
def test_endpoint_answers_each_kind_of_caller_as_documented(endpoint: str, caller: str, world: World,
                                                            problem: Problem) -> None:
    case = CASES[endpoint]
    prefix = "" if case.path in UNVERSIONED else API
    url = prefix + case.path.format(sid=world.target.service_id, root_ski=world.root_ski,
                                    intermediate_ski=world.intermediate_ski)
    kwargs: dict[str, Any] = {"params": case.params}
    if case.body is not None:
        kwargs["json"] = case.body(world)
    r = world.callers[caller].request(case.method, url, **kwargs)
    status = case.expect[caller]
    if status >= 400:
        problem(r, status, CODES[status])
        if status == 401:
            assert r.headers["www-authenticate"].startswith("Bearer")
    else:
        assert r.status_code == status, r.text


def test_every_route_is_in_the_matrix() -> None:
    covered = {(c.method, (c.path if c.path in UNVERSIONED else API + c.path)
                .replace("{sid}", "{service_id}").replace("{root_ski}", "{ski}")
                .replace("{intermediate_ski}", "{ski}")) for c in CASES.values()}
    routes = {(m, r.path) for r in ROUTES if isinstance(r, Route) for m in (r.methods or ()) if m != "HEAD"}
    assert routes == covered


# --- registration and updates -------------------------------------------------------------
def test_admin_registration_creates_entry_with_enrolment_token(admin: httpx.Client, service_id: str) -> None:
    sid = service_id
    r = admin.post(f"{API}/services/register", json={
        "service_id": sid, "service_name": "Reg", "endpoints": [f"https://{sid}.internal:8443"],
        "san_dns": [f"{sid}.internal"], "san_ip": ["10.1.2.3"], "owner": "team-a",
        "metadata": {"tier": "gold"}})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["enrolment_token"].startswith("vcc_enr_")
    assert body["enrolment_token_expires_at"].endswith("Z")
    assert body["san_dns"] == [f"{sid}.internal"] and body["san_ip"] == ["10.1.2.3"]
    assert body["health"]["status"] == "unknown"
    again = admin.post(f"{API}/services/register", json={"service_id": sid})
    assert again.status_code == 409


def test_service_updates_own_entry_but_not_its_san_allow_list(enrolled: Enrol, admin: httpx.Client,
                                                              problem: Problem) -> None:
    svc = enrolled(san_dns=["own.internal"])
    r = svc.client.post(f"{API}/services/register", json={"service_id": svc.service_id, "version": "9"})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "9" and "enrolment_token" not in r.json()
    for attempt in (svc.client.patch(f"{API}/services/{svc.service_id}", json={"san_dns": ["evil.example"]}),
                    svc.client.patch(f"{API}/services/{svc.service_id}", json={"san_ip": ["10.9.9.9"]}),
                    svc.client.post(f"{API}/services/register",
                                    json={"service_id": svc.service_id, "san_dns": ["evil.example"]})):
        assert "allow-list" in problem(attempt, 403, "policy_refused")["detail"]
    entry = admin.get(f"{API}/services/{svc.service_id}").json()
    assert entry["san_dns"] == ["own.internal"] and entry["san_ip"] == [] and entry["version"] == "9"
    # Repeating its allow-list is no change, and is fine (SPEC §10).
    again = svc.client.post(f"{API}/services/register",
                            json={"service_id": svc.service_id, "san_dns": ["own.internal"], "version": "10"})
    assert again.status_code == 200, again.text
    assert again.json()["san_dns"] == ["own.internal"] and again.json()["version"] == "10"
    # Lifetimes are the admin's to set.
    problem(svc.client.patch(f"{API}/services/{svc.service_id}", json={"max_validity_seconds": 3600}),
            403, "not_permitted")
    # An admin may change it.
    r = admin.patch(f"{API}/services/{svc.service_id}", json={"san_dns": ["own.internal", "new.internal"]})
    assert r.status_code == 200 and r.json()["san_dns"] == ["own.internal", "new.internal"]


def test_service_cannot_renew_revoke_or_update_another_service(enrolled: Enrol, admin: httpx.Client,
                                                               problem: Problem) -> None:
    a, b = enrolled(), enrolled()
    refusals = [
        a.client.post(f"{API}/certificates/{b.service_id}/renew"),
        a.client.delete(f"{API}/certificates/{b.service_id}/revoke", params={"reason": "keyCompromise"}),
        a.client.delete(f"{API}/certificates/{b.service_id}/revoke", params={"serial": b.serial}),
        a.client.patch(f"{API}/services/{b.service_id}", json={"owner": "mallory"}),
        a.client.post(f"{API}/services/register", json={"service_id": b.service_id, "owner": "mallory"}),
        a.client.post(f"{API}/certificates/request",
                      json={"service_id": b.service_id, "csr": make_csr(b.service_id)[0].decode()}),
    ]
    for r in refusals:
        assert b.service_id in problem(r, 403, "not_permitted")["detail"]
    current = admin.get(f"{API}/certificates/{b.service_id}").json()
    assert current["serial_number"] == b.serial and current["status"] == "valid"
    assert admin.get(f"{API}/services/{b.service_id}").json()["owner"] is None
    # Reading another service's public certificate is allowed.
    assert a.client.get(f"{API}/certificates/{b.service_id}").json()["serial_number"] == b.serial


def test_service_renews_and_rekeys_its_own_certificate(enrolled: Enrol) -> None:
    svc = enrolled()
    renewed = svc.client.post(f"{API}/certificates/{svc.service_id}/renew")
    assert renewed.status_code == 201, renewed.text
    csr, _ = make_csr(svc.service_id)
    rekeyed = svc.client.post(f"{API}/certificates/{svc.service_id}/renew", json={"csr": csr.decode()})
    assert rekeyed.status_code == 201, rekeyed.text
    certs = [x509.load_pem_x509_certificate(b["certificate"].encode())
             for b in (svc.issued, renewed.json(), rekeyed.json())]
    assert len({c.serial_number for c in certs}) == 3
    assert certs[0].public_key() == certs[1].public_key() != certs[2].public_key()


# --- tokens -------------------------------------------------------------------------------
def test_enrolment_token_works_exactly_once(register: Register, clients: Clients, problem: Problem,
                                            service_id: str) -> None:
    client = clients.new(token=register(service_id))
    first = client.post(f"{API}/certificates/request",
                        json={"service_id": service_id, "csr": make_csr(service_id)[0].decode()})
    assert first.status_code == 201, first.text
    second = client.post(f"{API}/certificates/request",
                         json={"service_id": service_id, "csr": make_csr(service_id)[0].decode()})
    assert "already used" in problem(second, 401, "invalid_token")["detail"]


def test_enrolment_token_is_refused_elsewhere_and_stays_unspent(register: Register, clients: Clients,
                                                                enrolled: Enrol, problem: Problem,
                                                                service_id: str) -> None:
    client = clients.new(token=register(service_id))
    other = enrolled()
    refused = [
        client.get(f"{API}/certificates/"),
        client.get(f"{API}/services/{service_id}"),
        client.post(f"{API}/certificates/{service_id}/renew"),
        client.post(f"{API}/services/{service_id}/enrolment-token"),
        client.post(f"{API}/services/register", json={"service_id": service_id, "version": "1"}),
        # Bound to its service: no certificate for another one.
        client.post(f"{API}/certificates/request",
                    json={"service_id": other.service_id, "csr": make_csr(other.service_id)[0].decode()}),
    ]
    for r in refused:
        problem(r, 403, "not_permitted")
    ok = client.post(f"{API}/certificates/request",
                     json={"service_id": service_id, "csr": make_csr(service_id)[0].decode()})
    assert ok.status_code == 201, ok.text


def test_csr_outside_allow_list_is_refused_naming_the_san_and_keeps_the_token(
        register: Register, clients: Clients, problem: Problem, service_id: str) -> None:
    client = clients.new(token=register(service_id, san_dns=[f"{service_id}.internal"], san_ip=["10.0.0.7"]))
    for dns, ips, named in ((["evil.example"], [], "evil.example"),
                            ([f"{service_id}.internal"], ["10.0.0.8"], "10.0.0.8")):
        csr, _ = make_csr(service_id, dns=dns, ips=ips)
        r = client.post(f"{API}/certificates/request", json={"service_id": service_id, "csr": csr.decode()})
        assert named in problem(r, 403, "policy_refused")["detail"]
    csr, _ = make_csr(service_id, dns=[f"{service_id}.internal"], ips=["10.0.0.7"])
    ok = client.post(f"{API}/certificates/request", json={"service_id": service_id, "csr": csr.decode()})
    assert ok.status_code == 201, ok.text
    cert = x509.load_pem_x509_certificate(ok.json()["certificate"].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [f"{service_id}.internal"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]


def test_csr_without_sans_gets_the_whole_allow_list(register: Register, clients: Clients,
                                                    service_id: str) -> None:
    client = clients.new(token=register(service_id, san_dns=["a.internal", "b.internal"], san_ip=["10.0.0.9"]))
    r = client.post(f"{API}/certificates/request",
                    json={"service_id": service_id, "csr": make_csr()[0].decode()})
    assert r.status_code == 201, r.text
    san = x509.load_pem_x509_certificate(r.json()["certificate"].encode()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.internal", "b.internal"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.9"]


def test_validity_days_above_policy_maximum_is_422(admin: httpx.Client, register: Register,
                                                   problem: Problem, service_id: str) -> None:
    register(service_id)
    csr = make_csr(service_id)[0].decode()
    r = admin.post(f"{API}/certificates/request", json={"service_id": service_id, "csr": csr, "validity_days": 366})
    assert "365" in problem(r, 422, "invalid_field")["detail"]
    ok = admin.post(f"{API}/certificates/request", json={"service_id": service_id, "csr": csr, "validity_days": 365})
    assert ok.status_code == 201, ok.text
    lifetime = (datetime.fromisoformat(ok.json()["not_after"].replace("Z", "+00:00"))
                - datetime.now(timezone.utc))
    assert timedelta(days=364) < lifetime <= timedelta(days=365)


def test_expired_and_revoked_admin_tokens_are_rejected(authority: Authority, clients: Clients,
                                                       problem: Problem) -> None:
    past = datetime.now(timezone.utc) - timedelta(days=2)
    expired = tokens.new_token("admin", now=past, name="expired", expires_at=past + timedelta(days=1))
    authority.store.add_token(expired.record, actor="tests")
    r = clients.new(token=expired.value).get(f"{API}/certificates/")
    assert "expired" in problem(r, 401, "invalid_token")["detail"]

    revoked = authority.create_admin_token(name="to-revoke", expires_days=1, actor=Actor.operator())
    client = clients.new(token=revoked.value)
    assert client.get(f"{API}/services/").status_code == 200
    authority.revoke_token(revoked.record.token_id, actor=Actor.operator())
    assert "revoked" in problem(client.get(f"{API}/services/"), 401, "invalid_token")["detail"]
    # Certificate requests too (their issuer looks a token up once per batch of requests).
    r = client.post(f"{API}/certificates/request", json={"service_id": "any", "csr": "-----BEGIN"})
    assert "revoked" in problem(r, 401, "invalid_token")["detail"]


@pytest.mark.parametrize("header", ["Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer not-a-token",
                                    "Bearer vcc_adm_000000000000_" + "0" * 64])
def test_bad_authorization_headers_are_401(header: str, clients: Clients, problem: Problem) -> None:
    r = clients.new().get(f"{API}/certificates/", headers={"Authorization": header})
    problem(r, 401)


# --- revoked client certificates ----------------------------------------------------------
def test_revoked_client_certificate_cannot_renew_on_kept_alive_or_new_connections(
        enrolled: Enrol, clients: Clients, problem: Problem) -> None:
    svc = enrolled()
    assert svc.client.get(f"{API}/certificates/{svc.service_id}").status_code == 200  # connection kept alive
    revoked = svc.client.delete(f"{API}/certificates/{svc.service_id}/revoke",
                                params={"reason": "keyCompromise"})
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["status"] == "revoked" and revoked.json()["revocation_reason"] == "keyCompromise"
    # Same keep-alive connection: the handshake's verdict is not trusted.
    r = svc.client.post(f"{API}/certificates/{svc.service_id}/renew", headers={"Connection": "close"})
    assert "revoked" in problem(r, 401, "not_authenticated")["detail"]
    # The server closed that connection: this is a new handshake with the same client and context.
    problem(svc.client.post(f"{API}/certificates/{svc.service_id}/renew"), 401, "not_authenticated")
    fresh = clients.mtls(svc.cert, svc.key)
    problem(fresh.post(f"{API}/certificates/{svc.service_id}/renew"), 401, "not_authenticated")
    problem(fresh.get(f"{API}/certificates/"), 401, "not_authenticated")


def _raw_request(server: RunningServer, ctx: ssl.SSLContext, method: str, path: str,
                 session: ssl.SSLSession | None = None) -> tuple[int, bool, ssl.SSLSession | None]:
    """One HTTP/1.1 request on its own TLS connection; (status, session reused, session)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
        tls.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        return int(data.split(b" ", 2)[1]), tls.session_reused, tls.session


def test_revoked_client_certificate_is_refused_on_a_resumed_tls_session(
        enrolled: Enrol, admin: httpx.Client, pki_server: RunningServer) -> None:
    """The server's TLS 1.2 session cache resumes the session (``session_reused`` is True on this
    stack): the server then sees the certificate of the first handshake, unverified again."""
    svc = enrolled()
    ctx = tls_context(pki_server.home.root_cert, svc.cert, svc.key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.2 session ids resume whatever tickets do
    status, _, session = _raw_request(pki_server, ctx, "GET", f"{API}/certificates/{svc.service_id}")
    assert status == 200
    r = admin.delete(f"{API}/certificates/{svc.service_id}/revoke", params={"reason": "superseded"})
    assert r.status_code == 200, r.text
    status, reused, _ = _raw_request(pki_server, ctx, "POST", f"{API}/certificates/{svc.service_id}/renew",
                                     session=session)
    assert status == 401, f"resumed={reused}"


# --- lists and downloads ------------------------------------------------------------------
def _issue(admin: httpx.Client, service_id: str, **extra: Any) -> dict[str, Any]:
    r = admin.post(f"{API}/certificates/request",
                   json={"service_id": service_id, "csr": make_csr(service_id)[0].decode(), **extra})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _all_pages(client: httpx.Client, params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    items: list[dict[str, Any]] = []
    pages = 0
    cursor: str | None = None
    while True:
        r = client.get(f"{API}/certificates/", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        pages += 1
        body = r.json()
        assert len(body["items"]) <= params.get("limit", 100)
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages
        assert pages < 50


def test_certificate_list_paginates_with_cursor(admin: httpx.Client, register: Register,
                                                service_id: str) -> None:
    register(service_id)
    serials = [_issue(admin, service_id)["serial_number"] for _ in range(5)]
    first = admin.get(f"{API}/certificates/", params={"service_id": service_id, "limit": 2}).json()
    assert len(first["items"]) == 2 and isinstance(first["next_cursor"], str)
    items, pages = _all_pages(admin, {"service_id": service_id, "limit": 2})
    assert [i["serial_number"] for i in items] == serials  # oldest first, no repeats, none lost
    assert pages == 3
    # A last page that is exactly full says so: no cursor to an empty page (SPEC §10).
    items, pages = _all_pages(admin, {"service_id": service_id, "limit": 5})
    assert len(items) == 5 and pages == 1
    two = admin.get(f"{API}/certificates/", params={"service_id": service_id, "limit": 3}).json()
    last = admin.get(f"{API}/certificates/", params={"service_id": service_id, "limit": 3,
                                                      "cursor": two["next_cursor"]}).json()
    assert len(last["items"]) == 2 and last["next_cursor"] is None
    everything, _ = _all_pages(admin, {"limit": 1000})
    assert set(serials) <= {i["serial_number"] for i in everything}
    assert len({i["serial_number"] for i in everything}) == len(everything)


def test_certificate_list_filters_by_service_status_and_expiry(admin: httpx.Client, enrolled: Enrol,
                                                               register: Register, service_id: str) -> None:
    register(service_id)
    valid = [_issue(admin, service_id)["serial_number"] for _ in range(2)]
    short = _issue(admin, service_id, validity_days=3)["serial_number"]
    gone = _issue(admin, service_id)["serial_number"]
    r = admin.delete(f"{API}/certificates/{service_id}/revoke", params={"serial": gone, "reason": "superseded"})
    assert r.status_code == 200 and r.json()["serial_number"] == gone
    enrolled()  # another service's certificates must not leak into the filtered lists

    def serials(**params: Any) -> list[str]:
        r = admin.get(f"{API}/certificates/", params={"service_id": service_id, **params})
        assert r.status_code == 200, r.text
        assert all(i["service_id"] == service_id for i in r.json()["items"])
        return [i["serial_number"] for i in r.json()["items"]]

    assert serials() == [*valid, short, gone]
    assert serials(status="revoked") == [gone]
    assert serials(status="valid") == [*valid, short]
    assert serials(status="expired") == []
    assert serials(expiring_within_days=10) == [short]
    assert serials(expiring_within_days=10, status="valid") == [short]
    item = admin.get(f"{API}/certificates/", params={"service_id": service_id, "status": "revoked"}).json()["items"][0]
    assert item["status"] == "revoked" and item["revocation_reason"] == "superseded"
    assert set(item) >= {"serial_number", "subject", "san_dns", "san_ip", "not_before", "not_after",
                         "status", "fingerprint_sha256"}


def test_current_certificate_and_download_with_chain(enrolled: Enrol, anon: httpx.Client) -> None:
    svc = enrolled()
    current = svc.client.get(f"{API}/certificates/{svc.service_id}").json()
    assert current["serial_number"] == svc.serial and current["fingerprint_sha256"] == svc.fingerprint
    assert current["san_dns"] == [svc.service_id] and current["not_after"].endswith("Z")
    r = svc.client.get(f"{API}/certificates/{svc.service_id}/download")
    assert r.status_code == 200 and r.headers["content-type"] == PEM
    assert svc.service_id in r.headers["content-disposition"]
    [leaf] = x509.load_pem_x509_certificates(r.content)
    assert leaf.fingerprint(hashes.SHA256()).hex() == svc.fingerprint
    r = svc.client.get(f"{API}/certificates/{svc.service_id}/download", params={"chain": "true"})
    assert r.headers["content-type"] == PEM
    chain = x509.load_pem_x509_certificates(r.content)
    root = x509.load_pem_x509_certificate(anon.get(f"{API}/ca/root").content)
    intermediate = x509.load_pem_x509_certificate(anon.get(f"{API}/ca/intermediate").content)
    assert chain == [leaf, intermediate, root]


def test_service_entry_lists_its_certificates_current_first(enrolled: Enrol) -> None:
    svc = enrolled()
    renewed = svc.client.post(f"{API}/certificates/{svc.service_id}/renew").json()
    entry = svc.client.get(f"{API}/services/{svc.service_id}").json()
    assert [c["serial_number"] for c in entry["certificates"]] == [renewed["serial_number"], svc.serial]
    assert set(entry["health"]) == {"status", "last_checked", "last_error", "consecutive_failures"}
    listed = svc.client.get(f"{API}/services/", params={"limit": 1000}).json()
    assert svc.service_id in {s["service_id"] for s in listed["items"]}


# --- public endpoints ---------------------------------------------------------------------
def test_ca_certificates_in_pem_and_der(anon: httpx.Client, pki_server: RunningServer,
                                        problem: Problem) -> None:
    root_file = x509.load_pem_x509_certificate(pki_server.home.root_cert.read_bytes())
    inter_file = x509.load_pem_x509_certificate(pki_server.home.intermediate_cert.read_bytes())
    for path, expected in (("root", root_file), ("intermediate", inter_file)):
        pem = anon.get(f"{API}/ca/{path}")
        assert pem.status_code == 200 and pem.headers["content-type"] == PEM
        assert x509.load_pem_x509_certificate(pem.content) == expected
        der = anon.get(f"{API}/ca/{path}", params={"format": "der"})
        assert der.status_code == 200 and der.headers["content-type"] == "application/pkix-cert"
        assert x509.load_der_x509_certificate(der.content) == expected
    chain = anon.get(f"{API}/ca/chain")
    assert chain.headers["content-type"] == PEM
    assert x509.load_pem_x509_certificates(chain.content) == [inter_file, root_file]
    # One DER blob holds one certificate: the chain is PEM only, and says so.
    problem(anon.get(f"{API}/ca/chain", params={"format": "der"}), 422, "invalid_field")
    problem(anon.get(f"{API}/ca/root", params={"format": "p7b"}), 422, "invalid_field")


def test_crl_in_der_and_pem_lists_an_api_revocation_at_once(anon: httpx.Client, enrolled: Enrol,
                                                            pki_server: RunningServer) -> None:
    inter = x509.load_pem_x509_certificate(pki_server.home.intermediate_cert.read_bytes())
    svc = enrolled()
    der = anon.get(f"{API}/crl")
    assert der.status_code == 200 and der.headers["content-type"] == "application/pkix-crl"
    before = x509.load_der_x509_crl(der.content)
    assert before.is_signature_valid(inter.public_key())  # type: ignore[arg-type]
    assert before.get_revoked_certificate_by_serial_number(int(svc.serial, 16)) is None
    r = svc.client.delete(f"{API}/certificates/{svc.service_id}/revoke", params={"reason": "keyCompromise"})
    assert r.status_code == 200, r.text
    after = x509.load_der_x509_crl(anon.get(f"{API}/crl").content)
    entry = after.get_revoked_certificate_by_serial_number(int(svc.serial, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    pem = anon.get(f"{API}/crl", params={"format": "pem"})
    assert pem.headers["content-type"] == PEM
    assert x509.load_pem_x509_crl(pem.content).get_revoked_certificate_by_serial_number(int(svc.serial, 16))


def test_health_reports_ready(anon: httpx.Client) -> None:
    r = anon.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["database"] == "ok"


def test_openapi_document_lists_every_route(anon: httpx.Client) -> None:
    r = anon.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    routes = [r for r in ROUTES if isinstance(r, Route)]
    assert set(doc["paths"]) == {r.path for r in routes}
    for route in routes:
        for method in (route.methods or set()) - {"HEAD"}:
            operation = doc["paths"][route.path][method.lower()]
            assert operation["responses"], (method, route.path)
    assert doc["paths"][f"{API}/certificates/request"]["post"]["responses"].keys() >= {"201"}


def test_the_api_is_readable_at_docs(anon: httpx.Client) -> None:
    """Issue 17: the OpenAPI document as a page, every operation and who may call it."""
    r = anon.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "<script" not in page and 'href=/openapi.json' in page
    for route in (r for r in ROUTES if isinstance(r, Route)):
        assert f"<code>{route.path}</code>" in page, route.path
    assert "<code>POST</code></td><td><code>/api/v1/certificates/request</code></td>" in page
    assert "enrolment token, own client certificate, admin token" in page


def test_the_audit_log_pages_newest_first_and_filters(admin: httpx.Client, enrolled: Enrol,
                                                      problem: Problem) -> None:
    """Issue 12: GET /api/v1/audit (admin), the same filters as `pki-admin audit`."""
    target = enrolled()
    r = admin.get(f"{API}/audit", params={"service_id": target.service_id, "limit": 1})
    assert r.status_code == 200, r.text
    first = r.json()
    assert [e["action"] for e in first["items"]] == ["certificate.issue"]
    assert first["items"][0]["serial"] == target.issued["serial_number"] and first["next_cursor"]
    rest = admin.get(f"{API}/audit", params={"service_id": target.service_id, "cursor": first["next_cursor"]}).json()
    actions = [e["action"] for e in rest["items"]]
    assert "service.register" in actions and rest["next_cursor"] is None
    assert all(e["id"] < first["items"][0]["id"] for e in rest["items"])  # older, on the next page
    later = admin.get(f"{API}/audit", params={"since": "2999-01-01T00:00:00Z"}).json()
    assert later == {"items": [], "next_cursor": None}
    problem(admin.get(f"{API}/audit", params={"since": "yesterday"}), 422, "invalid_field")
