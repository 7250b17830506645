"""CA rotation with no downtime (SPEC §13, issue 13): two services on the SDK keep handshaking
with each other through ``rotate-intermediate``, ``rotate-root`` and ``retire-root``.

The services' certificates live 5 minutes (the shortest the CA issues) and renew themselves
with auto-renewal. Their clocks run 250 s ahead (the SDK's ``clock=`` seam), so that every
renewal check (each 0.5 s) finds a renewal due: certificates are replaced all the time, before,
during and after each rotation, which is what a fleet of short-lived certificates does over
hours, pressed into a minute.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import CA_PASSWORD, ROOT_PASSWORD, build_home, new_admin_token
from peers import FAST, PeerServer, fingerprint
from support import BIN, RunningServer, env_without_secrets, tls_context
from vcc_pki_client import PKIClient
from vcc_pki_server.home import Home

API = "/api/v1"


def pki_admin(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**env_without_secrets(), "VCC_PKI_CA_PASSWORD": CA_PASSWORD, "VCC_PKI_ROOT_PASSWORD": ROOT_PASSWORD}
    return subprocess.run([str(BIN / "pki-admin"), "--home", str(home.root), *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


def ahead(seconds: float) -> Callable[[], datetime]:
    return lambda: datetime.now(timezone.utc) + timedelta(seconds=seconds)


class Handshakes:
    """A thread that connects to ``port`` every 100 ms with a new TLS connection made from
    ``ctx`` (a full handshake each time: mutual TLS and the CRL check on both sides), asks
    for /hello and counts what worked and what failed."""

    def __init__(self, ctx: ssl.SSLContext, port: int) -> None:
        self.ctx, self.port = ctx, port
        self.done = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, \
                        self.ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := tls.recv(4096):
                        answer += chunk
                if not answer.startswith(b"HTTP/1.1 200"):
                    raise AssertionError(answer[:100])
                self.done += 1
            except Exception as exc:
                self.failures.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
            self._stop.wait(0.1)

    def __enter__(self) -> Handshakes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def issuer_cn(cert: x509.Certificate) -> str:
    return str(cert.issuer.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Home, RunningServer, str]]:
    home = build_home(tmp_path / "home")
    token = new_admin_token(home)
    # Servers look for rotations every second here (5 s by default), so rotations may take
    # effect 3 s after they are made (8 by default): the same order of events, faster.
    server = RunningServer(home, CA_PASSWORD, extra_args=["--ca-check-interval", "1"]).start()
    try:
        yield home, server, token
    finally:
        server.stop()


def test_two_services_keep_handshaking_through_every_rotation(site: tuple[Home, RunningServer, str],
                                                              tmp_path: Path) -> None:
    """The two SDK services, and beside them a ``vcc-pki`` agent's files (for nginx and the like)."""
    home, server, token = site
    folder = tmp_path / "agent"
    old_root = home.root_certificate()
    pid = server.proc.pid if server.proc else None
    clients: list[PKIClient] = []
    with httpx.Client(base_url=server.url, verify=tls_context(home.root_cert),
                      headers={"Authorization": f"Bearer {token}"}) as admin:
        for sid in ("rot-a", "rot-b"):
            r = admin.post(f"{API}/services/register", json={"service_id": sid, "san_dns": [sid, "localhost"],
                                                              "san_ip": ["127.0.0.1"]})
            assert r.status_code == 201, r.text
            pki = PKIClient(server.url, sid, cert_file=tmp_path / sid / "cert.pem",
                            key_file=tmp_path / sid / "key.pem", root_fingerprint=fingerprint(home),
                            retry_policy=FAST, trust_refresh=1, crl_refresh=1, clock=ahead(250))
            clients.append(pki)
            pki.enroll(r.json()["enrolment_token"], validity=timedelta(minutes=5))
        r = admin.post(f"{API}/services/register", json={"service_id": "web", "san_dns": ["web", "localhost"]})
        assert r.status_code == 201, r.text
    done = agent("enroll", "--service-id", "web", "--token", r.json()["enrolment_token"], "--ca-url", server.url,
                 "--fingerprint", fingerprint(home), "--dir", str(folder))
    assert done.returncode == 0, done.stderr
    a, b = clients
    first_of_a = a.certificate
    renewed: list[str] = []
    try:
        for pki in clients:
            pki.enable_auto_renewal(check_interval=0.5, on_renewed=lambda cert: renewed.append(issuer_cn(cert)))
        with PeerServer(a) as serve_a, PeerServer(b) as serve_b, \
                Handshakes(b.client_ssl_context(), serve_a.port) as b_to_a, \
                Handshakes(a.client_ssl_context(), serve_b.port) as a_to_b:
            wait_for("first handshakes", lambda: b_to_a.done >= 5 and a_to_b.done >= 5)

            done = pki_admin(home, "ca", "rotate-intermediate", "--activate-after", "3")
            assert done.returncode == 0, done.stderr
            wait_for("both services renewed under the new intermediate",
                     lambda: all(issuer_cn(p.certificate) == "VCC Intermediate CA G2" for p in clients))
            # A certificate of the retired intermediate can still be revoked, and the SDK
            # judges it by its own issuer's CRL (issue 13: this raised TrustError).
            r = admin_revoke(server.url, home, token, "rot-a", first_of_a)
            assert r.status_code == 200, r.text
            assert b.is_revoked(first_of_a, refresh=True) is True
            assert b.is_revoked(a.certificate) is False

            done = pki_admin(home, "ca", "rotate-root", "--activate-after", "3")
            assert done.returncode == 0, done.stderr
            wait_for("both services renewed under the new root",
                     lambda: all(issuer_cn(p.certificate) == "VCC Intermediate CA G3" for p in clients))
            new_root = home.root_certificate()
            assert new_root.subject != old_root.subject
            agent_during_the_overlap(folder, old_root, new_root, home.intermediate_certificate(), tmp_path)

            done = pki_admin(home, "ca", "retire-root")
            assert done.returncode == 0, done.stderr
            # The server follows within 5 s; each client then drops the old root at its next
            # trust refresh, and renewals after that no longer carry the cross-certificate.
            wait_for("the server to trust the new root only", lambda: roots_served(server.url, new_root) == 1)
            time.sleep(3)
            handshakes = (b_to_a.done, a_to_b.done)
        assert agent("crl", "--dir", str(folder)).returncode == 0
        chain = x509.load_pem_x509_certificates((folder / "ca_chain.pem").read_bytes())
        assert new_root in chain and old_root not in chain and all(c.issuer != old_root.subject for c in chain)
        assert b_to_a.failures == [] and a_to_b.failures == [], (b_to_a.failures[:5], a_to_b.failures[:5])
        assert min(handshakes) >= 50, handshakes  # about 10 a second each way
        # Renewals went on under each intermediate in turn.
        assert {renewed.count(f"VCC Intermediate CA{g}") >= 4 for g in ("", " G2", " G3")} == {True}, renewed
        assert server.proc is not None and server.proc.poll() is None and server.proc.pid == pid  # no restart

        # Both present chains to the new root only: a verifier trusting the new root alone
        # accepts them, one trusting the old root alone refuses them.
        new_root_pem, old_root_pem = tmp_path / "new-root.pem", tmp_path / "old-root.pem"
        new_root_pem.write_bytes(home.root_cert.read_bytes())
        old_root_pem.write_bytes(old_root.public_bytes(serialization.Encoding.PEM))
        with PeerServer(a) as serve_a, PeerServer(b) as serve_b:
            for port, client in ((serve_a.port, b), (serve_b.port, a)):
                assert client.files is not None
                assert hello(port, new_root_pem, client) == 200
                with pytest.raises(ssl.SSLCertVerificationError):
                    hello(port, old_root_pem, client)
        for pki in clients:
            assert pki.files is not None
            for ca in pki.files.load_chain():
                assert ca.issuer != old_root.subject  # no cross-certificate left in what is sent
    finally:
        for pki in clients:
            pki.close()


def admin_revoke(url: str, home: Home, token: str, service_id: str, cert: x509.Certificate) -> httpx.Response:
    with httpx.Client(base_url=url, verify=tls_context(home.root_cert),
                      headers={"Authorization": f"Bearer {token}"}) as admin:
        return admin.delete(f"{API}/certificates/{service_id}/revoke",
                            params={"serial": format(cert.serial_number, "x"), "reason": "superseded"})


def roots_served(url: str, root: x509.Certificate) -> int:
    with httpx.Client(base_url=url, verify=tls_context_of(root)) as anon:
        return len(x509.load_pem_x509_certificates(anon.get(f"{API}/ca/roots").content))


def tls_context_of(root: x509.Certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=root.public_bytes(serialization.Encoding.PEM).decode())


def hello(port: int, root: Path, client: PKIClient) -> int:
    assert client.files is not None
    ctx = ssl.create_default_context(cafile=str(root))
    assert client.files.fullchain_file is not None  # the leaf and its intermediate
    ctx.load_cert_chain(str(client.files.fullchain_file), str(client.files.key_file))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = tls.recv(100)
    return int(answer.split()[1])

def agent(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "vcc-pki"), *argv], capture_output=True, text=True, env=env_without_secrets(),
                          timeout=60, check=False, stdin=subprocess.DEVNULL)


def agent_during_the_overlap(folder: Path, old_root: x509.Certificate, new_root: x509.Certificate,
                             intermediate: x509.Certificate, tmp_path: Path) -> None:
    """The agent's ``crl`` and ``renew`` follow a root rotation: both roots in ``ca_chain.pem``
    while both are trusted, every intermediate's CRL in ``crl.pem``, a renewal under the new root."""
    assert agent("crl", "--dir", str(folder)).returncode == 0
    chain = x509.load_pem_x509_certificates((folder / "ca_chain.pem").read_bytes())
    assert old_root in chain and new_root in chain  # both trusted during the overlap
    crls = (folder / "crl.pem").read_bytes().count(b"BEGIN X509 CRL")
    assert crls >= 3  # the three intermediates' (then the root's)

    done = agent("renew", "--dir", str(folder), "--force")
    assert done.returncode == 0, done.stderr
    leaf = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    assert leaf.issuer == intermediate.subject
    done = subprocess.run(["openssl", "verify", "-CAfile", str(write_pem(tmp_path / "new.pem", new_root)),
                           "-untrusted", str(folder / "ca_chain.pem"), str(folder / "cert.pem")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def write_pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path
