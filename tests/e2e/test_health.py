"""Health checks over real TLS: the server probes services with its own certificate and records the result."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
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
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from conftest import CA_PASSWORD, build_home
from support import RunningServer, free_port, tls_context
from vcc_pki_server.authority import Actor, Authority
from vcc_pki_server.encoding import cert_pem
from vcc_pki_server.health import NO_ANSWER, HealthChecker, describe_failure, probe_refusal
from vcc_pki_server.home import Home, key_pem
from vcc_pki_server.mtls import peer_certificate_der, server_ssl_context, uvicorn_config
from vcc_pki_server.store import ServiceRecord
from vcc_pki_server.store.sqlite import SQLiteStore

INTERVAL = 1.0  # the session server runs with --health-interval 1


class ProbeTarget:
    """A service's ``/health`` over TLS on a loopback port, served by uvicorn in a thread.

    ``status`` is what it answers; with ``hang`` seconds it sleeps first (until released at
    exit). ``peers`` collects the client certificate (DER) each probe presented.
    """

    def __init__(self, cert_file: Path, key_file: Path, ca_file: Path, *, port: int | None = None,
                 hang: float = 0.0) -> None:
        self.port = port or free_port()
        self.url = f"https://127.0.0.1:{self.port}/health"
        self.status = 200
        self.hang = hang
        self.peers: list[bytes | None] = []
        self._released = threading.Event()
        app = Starlette(routes=[Route("/health", self._health)])
        config = uvicorn_config(app, host="127.0.0.1", port=self.port,
                                ssl_context=server_ssl_context(cert_file, key_file, ca_file),
                                log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    async def _health(self, request: Request) -> Response:
        self.peers.append(peer_certificate_der(request.scope))
        deadline = time.monotonic() + self.hang
        while time.monotonic() < deadline and not self._released.is_set():
            await asyncio.sleep(0.05)
        return PlainTextResponse("ok" if self.status < 400 else "down", status_code=self.status)

    def __enter__(self) -> ProbeTarget:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"probe target on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._server.should_exit = True
        self._thread.join(10)


def new_id() -> str:
    return f"hc-{uuid.uuid4().hex[:10]}"


def chain_file(home: Home, folder: Path) -> Path:
    """Root then intermediate: what a service trusts for client certificates."""
    path = folder / "ca_chain.pem"
    path.write_bytes(cert_pem(home.root_certificate(), home.intermediate_certificate()))
    return path


def issue_tls(authority: Authority, service_id: str, folder: Path) -> tuple[Path, Path]:
    """A localhost / 127.0.0.1 certificate from our CA for ``service_id`` (registered if new)."""
    issued, key = authority.issue_with_key(service_id, common_name="localhost", san_dns=["localhost"],
                                           san_ip=["127.0.0.1"], key_type="ec-p256",
                                           actor=Actor.operator())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert_pem(issued.certificate, issued.chain[0]))
    (folder / "key.pem").write_bytes(key_pem(key, None))
    return folder / "cert.pem", folder / "key.pem"


def foreign_tls(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway EC CA that is not ours, and a localhost / 127.0.0.1 server certificate from it."""
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert_pem(leaf))
    (folder / "key.pem").write_bytes(key_pem(key, None))
    (folder / "ca.pem").write_bytes(cert_pem(ca))
    return folder / "cert.pem", folder / "key.pem", folder / "ca.pem"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until true; return the seconds it took, fail after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.1)
    return time.monotonic() - start


def server_leaf_der(home: Home) -> bytes:
    leaf = x509.load_pem_x509_certificates(home.server_cert.read_bytes())[0]
    return leaf.public_bytes(serialization.Encoding.DER)


# -- the running server ------------------------------------------------------------------------
def test_server_marks_service_unhealthy_and_healthy_again(pki_server: RunningServer, admin_token: str,
                                                          authority: Authority, ca_home: Home,
                                                          tmp_path: Path) -> None:
    ids = [new_id(), new_id()]
    ca_file = chain_file(ca_home, tmp_path)
    root = tls_context(ca_home.root_cert)
    with ExitStack() as stack, httpx.Client(base_url=f"{pki_server.url}/api/v1", verify=root,
                                            headers={"Authorization": f"Bearer {admin_token}"}) as api:
        targets: list[ProbeTarget] = []
        for sid in ids:
            port = free_port()
            url = f"https://127.0.0.1:{port}/health"
            r = api.post("/services/register", json={
                "service_id": sid, "service_name": f"Health {sid}", "endpoints": [url],
                "san_dns": ["localhost"], "san_ip": ["127.0.0.1"]})
            assert r.status_code == 201, r.text
            cert, key = issue_tls(authority, sid, tmp_path / sid)
            targets.append(stack.enter_context(ProbeTarget(cert, key, ca_file, port=port)))
            # The URL goes in once the service answers, so the audit log starts with "healthy".
            r = api.patch(f"/services/{sid}", json={"health_check_url": url})
            assert r.status_code == 200, r.text
            assert r.json()["health"]["status"] == "unknown"
        for sid in ids:  # afterwards: stop the session server probing closed ports
            stack.callback(authority.update_service, sid, {"health_check_url": None},
                           actor=Actor.operator())

        def health(sid: str) -> dict[str, Any]:
            r = api.get(f"/services/{sid}")
            assert r.status_code == 200, r.text
            return r.json()["health"]  # type: ignore[no-any-return]

        def healthy_ids() -> set[str]:
            r = api.get("/services/", params={"healthy": "true", "limit": 1000})
            assert r.status_code == 200, r.text
            return {item["service_id"] for item in r.json()["items"]}

        flaky, steady = ids
        for sid in ids:
            wait_for(lambda sid=sid: health(sid)["status"] == "healthy", 4 * INTERVAL + 4, f"{sid} healthy")
        assert health(flaky) == {"status": "healthy", "last_checked": health(flaky)["last_checked"],
                                 "last_error": None, "consecutive_failures": 0}
        # The probe presented the server's own certificate, issued by this CA.
        assert targets[0].peers and targets[0].peers[-1] == server_leaf_der(ca_home)

        targets[0].status = 503
        took = wait_for(lambda: health(flaky)["status"] == "unhealthy", 2 * INTERVAL + 3,
                        f"{flaky} unhealthy")
        down = health(flaky)
        assert down["last_error"] == "HTTP 503", (down, took)
        assert down["consecutive_failures"] >= 1
        assert flaky not in healthy_ids() and steady in healthy_ids()
        assert health(steady)["status"] == "healthy"

        targets[0].status = 200
        wait_for(lambda: health(flaky)["status"] == "healthy", 2 * INTERVAL + 3, f"{flaky} recovered")
        assert {flaky, steady} <= healthy_ids()
        assert health(flaky)["consecutive_failures"] == 0

    events = [e for e in reversed(authority.store.audit_log(service_id=flaky, limit=1000))
              if e.action in ("service.healthy", "service.unhealthy")]
    assert [e.action for e in events] == ["service.healthy", "service.unhealthy", "service.healthy"]
    assert events[1].details == {"error": "HTTP 503"}
    assert {e.actor for e in events} == {"health-checker"}


# -- one round, in process (own store, so the session server's probes do not interfere) ---------
@pytest.fixture
def local_authority(authority: Authority, tmp_path: Path) -> Iterator[Authority]:
    """An authority over a fresh store that signs with the session CA."""
    local = Authority(SQLiteStore(tmp_path / "pki.db"), authority.ca, policy=authority.policy)
    yield local
    local.store.close()


def run_round(checker: HealthChecker) -> float:
    """Run one round of ``checker`` in a fresh loop; return its duration in seconds."""
    async def go() -> None:
        async with checker:
            await checker.run_once()

    start = time.monotonic()
    asyncio.run(go())
    return time.monotonic() - start


def register(authority: Authority, url: str, *, endpoints: list[str] | None = None) -> str:
    sid = new_id()
    authority.register_service(sid, san_dns=["localhost"], san_ip=["127.0.0.1"],
                               endpoints=endpoints if endpoints is not None else [url],
                               health_check_url=url, actor=Actor.operator())
    return sid


def test_hanging_service_does_not_delay_others(local_authority: Authority, ca_home: Home,
                                               tmp_path: Path) -> None:
    ca_file = chain_file(ca_home, tmp_path)
    slow_port, fast_port = free_port(), free_port()
    slow = register(local_authority, f"https://127.0.0.1:{slow_port}/health")
    fast = register(local_authority, f"https://127.0.0.1:{fast_port}/health")
    with (ProbeTarget(*issue_tls(local_authority, slow, tmp_path / slow), ca_file, port=slow_port,
                      hang=30),
          ProbeTarget(*issue_tls(local_authority, fast, tmp_path / fast), ca_file, port=fast_port)):
        checker = HealthChecker.from_home(local_authority, ca_home, timeout=0.5, concurrency=4)
        took = run_round(checker)
    assert took < 2.0
    assert local_authority.service(fast).health.status == "healthy"
    hung = local_authority.service(slow).health
    assert (hung.status, hung.last_error, hung.consecutive_failures) == ("unhealthy", NO_ANSWER, 1)


def test_foreign_certificate_and_refused_connection_are_unhealthy(local_authority: Authority,
                                                                  ca_home: Home,
                                                                  tmp_path: Path) -> None:
    port = free_port()
    foreign = register(local_authority, f"https://127.0.0.1:{port}/health")
    closed = register(local_authority, f"https://127.0.0.1:{free_port()}/health")
    with ProbeTarget(*foreign_tls(tmp_path / "foreign"), port=port) as target:
        run_round(HealthChecker.from_home(local_authority, ca_home, timeout=2))
    assert target.peers == []  # the handshake failed: no request reached the service
    # The registry says the same for both (services read it: no port scanning through it).
    bad = local_authority.service(foreign).health
    refused = local_authority.service(closed).health
    assert (bad.status, bad.last_error) == (refused.status, refused.last_error) == ("unhealthy", NO_ANSWER)


def test_describe_failure_keeps_the_detail_for_the_ca_log() -> None:
    import ssl as _ssl

    assert describe_failure(TimeoutError(), 0.5) == "timeout after 0.5s"
    assert describe_failure(ConnectionRefusedError(111, "refused"), 1) == "connection refused"
    error = _ssl.SSLCertVerificationError("bad")
    error.verify_message, error.verify_code = "unable to get local issuer certificate", 20  # type: ignore[attr-defined]
    assert describe_failure(error, 1).startswith("certificate verify failed: ")


def test_loopback_health_urls_are_not_probed_unless_allowed(local_authority: Authority, ca_home: Home) -> None:
    sid = register(local_authority, "https://127.0.0.1:9/health")
    checker = HealthChecker.from_home(local_authority, ca_home, timeout=5)
    checker.allow_loopback = False  # a production config's default
    took = run_round(checker)
    assert took < 1.0
    assert "loopback address of the CA's own host" in (local_authority.service(sid).health.last_error or "")


def test_health_url_outside_the_san_allow_list_is_refused_without_connecting(
        local_authority: Authority, ca_home: Home) -> None:
    own = ["https://127.0.0.1:9443/"]
    link_local = register(local_authority, "https://169.254.1.1/health", endpoints=own)
    plain = register(local_authority, "http://169.254.1.1/health", endpoints=own)
    named = register(local_authority, "https://metadata.internal:8443/health", endpoints=own)
    cleartext = register(local_authority, "http://127.0.0.1:9/health", endpoints=own)
    took = run_round(HealthChecker.from_home(local_authority, ca_home, timeout=5))
    assert took < 1.0  # any connection attempt to 169.254.1.1 would wait for the 5 s timeout
    errors = {sid: local_authority.service(sid).health.last_error
              for sid in (link_local, plain, named, cleartext)}
    assert errors == {
        link_local: "health_check_url host 169.254.1.1 is not in the service's SAN allow-list",
        plain: "health_check_url host 169.254.1.1 is not in the service's SAN allow-list",
        named: "health_check_url host metadata.internal is not in the service's SAN allow-list",
        cleartext: "health_check_url must use https, not http",
    }
    assert all(local_authority.service(sid).health.status == "unhealthy" for sid in errors)


@pytest.mark.parametrize(("url", "allowed"), [
    ("https://billing.internal:9443/health", True),       # a SAN that is also an endpoint
    ("https://endpoint-only.internal/health", False),     # an endpoint the service set itself
    ("https://BILLING.internal./health", True),           # names: any case, final dot
    ("https://b.internal/health", True),                  # a SAN
    ("https://[::1]:8443/health", True),                  # a SAN, IPv6 written another way
    ("https://[0:0:0:0:0:0:0:1]/health", True),
    ("https://10.0.0.7/health", False),
    ("https://billing.internal.evil.example/health", False),
    ("https://user@evil.example/health", False),
])
def test_probe_refusal_allows_only_hosts_in_the_san_allow_list(url: str, allowed: bool) -> None:
    now = datetime.now(timezone.utc)
    service = ServiceRecord(service_id="billing", service_name="Billing", created_at=now,
                            updated_at=now, endpoints=("https://billing.internal:9443", "10.0.0.8:80",
                                                      "https://endpoint-only.internal"),
                            san_dns=("b.internal", "billing.internal"), san_ip=("::1",),
                            health_check_url=url)
    assert (probe_refusal(service, allow_loopback=True) is None) is allowed
    if "[::1]" in url or "[0:0:0:0" in url:
        assert "loopback" in (probe_refusal(service) or "")  # unless an admin allowed it


def test_a_hanging_endpoint_does_not_hold_back_the_next_rounds(local_authority: Authority, ca_home: Home,
                                                               tmp_path: Path) -> None:
    """Issue 18: scheduled rounds do not wait for a probe in flight; the hanging service is not
    probed twice at once, the others are probed every round."""
    ca_file = chain_file(ca_home, tmp_path)
    slow_port, fast_port = free_port(), free_port()
    slow = register(local_authority, f"https://127.0.0.1:{slow_port}/health")
    fast = register(local_authority, f"https://127.0.0.1:{fast_port}/health")
    with (ProbeTarget(*issue_tls(local_authority, slow, tmp_path / slow), ca_file, port=slow_port,
                      hang=30) as hanging,
          ProbeTarget(*issue_tls(local_authority, fast, tmp_path / fast), ca_file, port=fast_port) as quick):
        checker = HealthChecker.from_home(local_authority, ca_home, timeout=3, concurrency=4)
        checker.elect = False  # the session server leads the probes of this home

        async def three_rounds() -> float:
            start = time.monotonic()
            async with checker:
                for _ in range(3):
                    await checker._tick()
                    await asyncio.sleep(0.4)
                took = time.monotonic() - start
                await checker.stop()
            return took

        took = asyncio.run(three_rounds())
    assert took < 2.5  # three rounds while one probe hangs for its 3 s timeout
    assert len(quick.peers) == 3  # probed every round
    assert len(hanging.peers) == 1  # never two probes of it at once


def test_a_new_or_changed_health_url_is_probed_at_once_not_at_the_next_round(tmp_path: Path) -> None:
    """Issue 17: a newly registered service shows as healthy within seconds, whatever the interval."""
    home = build_home(tmp_path / "h")
    authority = home.authority(CA_PASSWORD)
    try:
        token = authority.create_admin_token(name="t", expires_days=None, actor=Actor.operator()).value
        sid = new_id()
        cert, key = issue_tls(authority, sid, tmp_path / sid)
    finally:
        authority.store.close()
    with (RunningServer(home, CA_PASSWORD, extra_args=["--health-interval", "3600"]) as server,
          ProbeTarget(cert, key, chain_file(home, tmp_path)) as target,
          httpx.Client(base_url=f"{server.url}/api/v1", verify=tls_context(home.root_cert),
                       headers={"Authorization": f"Bearer {token}"}) as api):
        def status() -> str:
            return str(api.get(f"/services/{sid}").json()["health"]["status"])

        r = api.patch(f"/services/{sid}", json={"health_check_url": target.url})
        assert r.status_code == 200, r.text
        wait_for(lambda: status() == "healthy", 5, "the new health URL probed")
        target.status = 503
        r = api.patch(f"/services/{sid}", json={"health_check_url": f"{target.url}?changed"})
        assert r.status_code == 200, r.text
        wait_for(lambda: status() == "unhealthy", 5, "the changed health URL probed")
