"""The SDK against the real server (uvicorn over TLS, real client certificates): SPEC §7 end to end."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import CA_PASSWORD, build_home
from peers import FAST, PeerServer, fingerprint, new_id
from support import RunningServer, free_port, openssl_verify
from vcc_pki_client import (
    AuthenticationError,
    NotFoundError,
    PKIClient,
    PolicyRefusedError,
    RenewalError,
    TransportError,
    TrustError,
)
from vcc_pki_client.keys import key_matches_certificate, load_private_key_pem
from vcc_pki_server import cli
from vcc_pki_server.authority import Actor
from vcc_pki_server.home import Home

Register = Callable[..., str]


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def files_of(pki: PKIClient) -> tuple[bytes, bytes, bytes]:
    assert pki.files is not None and pki.files.chain_file is not None
    return (pki.files.cert_file.read_bytes(), pki.files.key_file.read_bytes(),
            pki.files.chain_file.read_bytes())


EnrolledFactory = Callable[..., PKIClient]


@pytest.fixture
def enrolled(sdk_service: Callable[..., PKIClient]) -> EnrolledFactory:
    """``enrolled(**enroll_kw)``: a new service registered by the admin and enrolled with the SDK."""
    return lambda **enroll_kw: sdk_service(enroll=enroll_kw)


# -- (a) the prototype's example, as written ------------------------------------------------------
def test_spec_example_runs_as_written(pki_server: RunningServer, ca_home: Home, tmp_path: Path) -> None:
    password_file = tmp_path / "ca.pw"
    password_file.write_text(CA_PASSWORD + "\n")
    for service in ("veritas-backend", "covina-backend"):
        status = cli.main(["--home", str(ca_home.root), "cert", "issue", "--service-id", service, "--cn", service,
                           "--san-dns", service, "localhost", "--san-ip", "127.0.0.1",
                           "--password-file", str(password_file)])
        assert status == 0
    certs = ca_home.services_dir
    port = pki_server.port

    # SPEC §7 verbatim; only the port and the folder of the files differ.
    from vcc_pki_client import PKIClient
    pki_client = PKIClient(pki_server_url=f"https://localhost:{port}", service_id="veritas-backend",
                           cert_file=f"{certs}/veritas-backend/cert.pem", key_file=f"{certs}/veritas-backend/key.pem")
    pki_client.register_service(service_name="VERITAS Backend API",
                                endpoints=["https://localhost:45678"],
                                health_check_url="https://localhost:45678/health")
    pki_client.enable_auto_renewal(renew_before_days=30)
    covina_cert = pki_client.get_service_certificate("covina-backend")

    try:
        assert isinstance(covina_cert, x509.Certificate)
        assert covina_cert == x509.load_pem_x509_certificate((certs / "covina-backend" / "cert.pem").read_bytes())
        entry = pki_client.discover("veritas-backend")
        assert entry.service_name == "VERITAS Backend API"
        assert entry.endpoints == ["https://localhost:45678"]
        assert entry.health_check_url == "https://localhost:45678/health"
        # Trust came from the ca_chain.pem pki-admin wrote beside the certificate.
        assert pki_client.get_ca_bundle() == [ca_home.intermediate_certificate(), ca_home.root_certificate()]
        # The 0400 RSA key pki-admin wrote is replaced atomically, by a new RSA key, 0600.
        old_serial = pki_client.certificate.serial_number
        issued = pki_client.renew()
        assert issued.certificate.serial_number != old_serial
        key = load_private_key_pem((certs / "veritas-backend" / "key.pem").read_bytes())
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
        assert mode(certs / "veritas-backend" / "key.pem") == 0o600
    finally:
        pki_client.close()


# -- (b) enrolment with a one-time token and a pinned root ----------------------------------------
def test_enrolment_with_token_and_pinned_root(pki_server: RunningServer, ca_home: Home, register: Register,
                                              tmp_path: Path, sdk_clients: list[PKIClient]) -> None:
    sid = new_id()
    token = register(sid, san_dns=[sid, "localhost"], san_ip=["127.0.0.1"])
    folder = tmp_path / "tls"
    pki = PKIClient(pki_server.url, sid, cert_file=folder / "cert.pem", key_file=folder / "key.pem",
                    root_fingerprint=fingerprint(ca_home, style="colons"), retry_policy=FAST)
    sdk_clients.append(pki)
    assert not pki.enrolled

    issued = pki.enroll(token)

    assert pki.enrolled and pki.certificate == issued.certificate
    assert mode(folder / "key.pem") == 0o600
    key = load_private_key_pem((folder / "key.pem").read_bytes())
    assert key_matches_certificate(key, issued.certificate)
    chain = x509.load_pem_x509_certificates((folder / "ca_chain.pem").read_bytes())
    assert chain == [ca_home.intermediate_certificate(), ca_home.root_certificate()]
    assert x509.load_pem_x509_certificate((folder / "ca_root.pem").read_bytes()) == ca_home.root_certificate()
    assert openssl_verify(ca_home.root_cert, ca_home.intermediate_cert, folder / "cert.pem",
                          purpose="sslclient").returncode == 0
    sans = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {sid, "localhost"}

    before = files_of(pki)
    with pytest.raises(AuthenticationError):
        pki.enroll(token)  # one-time: spent
    assert files_of(pki) == before
    # From now on the service is its certificate (mTLS).
    assert pki.discover(sid).service_id == sid


def test_refused_enrolment_leaves_the_token_usable(pki_server: RunningServer, ca_home: Home,
                                                  register: Register, tmp_path: Path,
                                                  sdk_clients: list[PKIClient]) -> None:
    sid = new_id()
    token = register(sid, san_dns=[sid])
    pki = PKIClient(pki_server.url, sid, cert_file=tmp_path / "cert.pem", key_file=tmp_path / "key.pem",
                    ca_bundle=ca_home.root_cert, enrollment_token=token, retry_policy=FAST)
    sdk_clients.append(pki)
    with pytest.raises(PolicyRefusedError, match="not-allowed.example"):
        pki.enroll(san_dns=["not-allowed.example"])
    assert not pki.enrolled
    assert pki.enroll().service_id == sid  # the constructor's token, still unspent


def test_wrong_pin_is_refused_before_anything_is_sent(pki_server: RunningServer, tmp_path: Path) -> None:
    with PKIClient(pki_server.url, "nobody", cert_file=tmp_path / "cert.pem", key_file=tmp_path / "key.pem",
                   root_fingerprint="sha256:" + "00" * 32) as pki:
        with pytest.raises(TrustError, match="not the pinned"):
            pki.enroll("vcc_enr_not_sent")
    assert sorted(tmp_path.glob("*.pem")) == []


def test_system_trust_does_not_trust_a_private_ca(pki_server: RunningServer) -> None:
    with PKIClient(pki_server.url, "nobody", retry_policy=FAST) as pki:
        with pytest.raises(TrustError, match="does not verify"):
            pki.get_ca_bundle()


# -- (c) renewal inside the window ----------------------------------------------------------------
def test_renewal_inside_the_window_swaps_both_files(enrolled: EnrolledFactory) -> None:
    pki = enrolled(validity_days=2)
    old = pki.certificate
    old_files = files_of(pki)
    renewed: list[x509.Certificate] = []
    pki.enable_auto_renewal(renew_before_days=1, check_interval=3600, on_renewed=renewed.append)
    pki.disable_auto_renewal()  # the scheduler's own first check found nothing due; we check below

    assert pki.renew_now() is None  # a day and more before the window
    issued = pki.renew_now(now=old.not_valid_after_utc - timedelta(hours=12))

    assert issued is not None and issued.certificate.serial_number != old.serial_number
    cert_pem, key_pem, _ = files_of(pki)
    assert cert_pem != old_files[0] and key_pem != old_files[1]  # rekeyed: both swapped
    assert key_matches_certificate(load_private_key_pem(key_pem), x509.load_pem_x509_certificate(cert_pem))
    assert renewed == [issued.certificate]
    assert pki.renew_now() is None  # the new certificate (365 days) is not due


def test_renew_without_rekey_keeps_the_key(enrolled: EnrolledFactory) -> None:
    pki = enrolled()
    old = pki.certificate
    _, old_key, _ = files_of(pki)
    issued = pki.renew(rekey=False)
    assert issued.certificate.serial_number != old.serial_number
    assert issued.certificate.public_key() == old.public_key()
    assert files_of(pki)[1] == old_key


def test_request_certificate_over_mtls_may_narrow_the_names(enrolled: EnrolledFactory) -> None:
    pki = enrolled()
    old = pki.certificate
    issued = pki.request_certificate(san_dns=["localhost"])
    sans = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert sans.get_values_for_type(x509.IPAddress) == []  # not asked for this time
    assert pki.certificate == issued.certificate != old
    with pytest.raises(PolicyRefusedError):
        pki.request_certificate(san_dns=["elsewhere.example"])
    assert pki.certificate == issued.certificate


# -- (d) readers never see a mismatched pair ------------------------------------------------------
def test_concurrent_readers_never_see_a_mismatched_pair(enrolled: EnrolledFactory) -> None:
    pki = enrolled()
    files = pki.files
    assert files is not None
    stop = threading.Event()
    problems: list[str] = []
    counts = {"ssl_load": 0, "plain": 0, "plain_retries": 0}

    def through_sdk() -> None:
        while not stop.is_set():
            try:
                files.ssl_load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
                counts["ssl_load"] += 1
            except Exception as exc:  # any failure is a finding
                problems.append(f"ssl_load: {exc!r}")

    def plain() -> None:
        # A reader outside the SDK: OpenSSL refuses a mismatched pair; retry, as files.py documents.
        while not stop.is_set():
            deadline = time.monotonic() + 5  # a swap takes milliseconds, even with slow fsyncs
            while True:
                try:
                    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(files.cert_file, files.key_file)
                    counts["plain"] += 1
                    break
                except ssl.SSLError:  # KEY_VALUES_MISMATCH: caught between the two renames
                    counts["plain_retries"] += 1
                    if time.monotonic() > deadline:
                        problems.append("load_cert_chain: still mismatched after 5 s")
                        break
                    time.sleep(0.002)

    readers = [threading.Thread(target=through_sdk), threading.Thread(target=plain)]
    for reader in readers:
        reader.start()
    serials = set()
    try:
        for _ in range(20):
            serials.add(pki.renew().certificate.serial_number)
    finally:
        stop.set()
        for reader in readers:
            reader.join(10)
    assert not problems, problems[:5]
    assert len(serials) == 20
    assert counts["ssl_load"] > 0 and counts["plain"] > 0


# -- (e) a renewal against a stopped server -------------------------------------------------------
def test_renewal_against_a_stopped_server_keeps_the_old_pair_and_recovers(tmp_path: Path) -> None:
    home = build_home(tmp_path / "home")
    sid = new_id()
    authority = home.authority(CA_PASSWORD)
    try:
        issued, key = authority.issue_with_key(sid, common_name=sid, san_dns=[sid, "localhost"],
                                               san_ip=["127.0.0.1"], key_type="ec-p256", validity=timedelta(days=1),
                                               actor=Actor.operator())
        folder = home.write_service_files(sid, issued, key)
    finally:
        authority.store.close()
    server = RunningServer(home, CA_PASSWORD).start()
    server.stop()
    # A clock 20 hours ahead puts the 1-day certificate inside its renewal window.
    pki = PKIClient(server.url, sid, cert_file=folder / "cert.pem", key_file=folder / "key.pem",
                    retry_policy=FAST, clock=lambda: datetime.now(timezone.utc) + timedelta(hours=20))
    errors: list[Exception] = []
    renewed: list[x509.Certificate] = []
    failed, succeeded = threading.Event(), threading.Event()

    def on_error(exc: Exception) -> None:
        errors.append(exc)
        failed.set()

    def on_renewed(cert: x509.Certificate) -> None:
        renewed.append(cert)
        succeeded.set()

    try:
        before = files_of(pki)
        with pytest.raises(TransportError):
            pki.renew()
        assert files_of(pki) == before

        # The one test with the real scheduler: it reports the failure, then renews.
        pki.enable_auto_renewal(renew_before_days=30, check_interval=0.3,
                                on_error=on_error, on_renewed=on_renewed)
        assert failed.wait(10), "the background renewal reported no failure"
        assert isinstance(errors[0], RenewalError) and isinstance(errors[0].last_error, TransportError)
        assert files_of(pki) == before  # bytes unchanged: the old pair stays usable

        restarted = RunningServer(home, CA_PASSWORD, port=server.port).start()
        try:
            assert succeeded.wait(15), f"no renewal after the restart: {errors[-1]!r}"
            pki.disable_auto_renewal()
            assert renewed == [pki.certificate]
            assert pki.certificate.serial_number != x509.load_pem_x509_certificate(before[0]).serial_number
        finally:
            pki.close()  # first: uvicorn's graceful shutdown waits for our keep-alive connection
            restarted.stop()
    finally:
        pki.close()


# -- (f) revocation -------------------------------------------------------------------------------
def test_revocation_of_a_peer_shows_in_is_revoked(enrolled: EnrolledFactory) -> None:
    alice, bob = enrolled(), enrolled()
    bob_cert = alice.get_service_certificate(bob.service_id)
    assert bob_cert == bob.certificate
    assert alice.is_revoked(bob_cert) is False
    assert bob.is_revoked() is False  # no argument: its own current certificate

    record = bob.revoke("keyCompromise")
    assert record.status == "revoked" and record.revocation_reason == "keyCompromise"

    # alice's CRL is cached for crl_max_age (60 s): ask for a fresh one.
    assert alice.is_revoked(bob_cert, refresh=True) is True
    assert alice.files is not None
    with PKIClient(alice.pki_server_url, alice.service_id, cert_file=alice.files.cert_file,
                   key_file=alice.files.key_file, crl_max_age=0) as fresh:
        assert fresh.is_revoked(bob_cert) is True
        assert fresh.is_revoked(alice.certificate) is False
    crl = alice.get_crl()
    assert crl.get_revoked_certificate_by_serial_number(bob_cert.serial_number) is not None
    with pytest.raises(NotFoundError):
        alice.get_service_certificate(bob.service_id)  # no valid certificate left
    with pytest.raises(AuthenticationError):
        bob.renew()  # a revoked certificate authenticates nobody
    assert bob.is_revoked() is True


# -- (g) contexts that follow renewals ------------------------------------------------------------
def served_serial(port: int, ctx: ssl.SSLContext) -> int:
    """The serial of the certificate the server presents in a new handshake."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_server_context_follows_renewal_and_httpx_client_speaks_mtls(enrolled: EnrolledFactory) -> None:
    server_pki, client_pki = enrolled(), enrolled()
    with PeerServer(server_pki) as peer:
        url = f"https://localhost:{peer.port}/hello"
        with client_pki.httpx_client(timeout=5) as http:
            assert http.get(url).text == "hello over mTLS"
        before = served_serial(peer.port, client_pki.client_ssl_context())
        assert before == server_pki.certificate.serial_number

        server_pki.renew()  # no restart
        after = served_serial(peer.port, client_pki.client_ssl_context())
        assert after == server_pki.certificate.serial_number != before

        client_pki.renew()  # the client side follows too (same context object, reloaded in place)
        ctx = client_pki.client_ssl_context()
        with client_pki.httpx_client(timeout=5) as http:
            assert http.get(url).status_code == 200
        assert served_serial(peer.port, ctx) == after

        # Without a client certificate from our CA the handshake fails.
        anonymous = ssl.create_default_context(cadata=server_pki.get_ca_bundle()[1].public_bytes(
            serialization.Encoding.PEM).decode())
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with socket.create_connection(("127.0.0.1", peer.port), timeout=5) as raw:
                with anonymous.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    if not tls.recv(1):
                        raise ConnectionError("closed without an answer")


def test_ensure_enrolled_enrols_once_and_reuses_the_files_until_they_are_unusable(
        pki_server: RunningServer, ca_home: Home, register: Register, tmp_path: Path, admin: Any,
        sdk_clients: list[PKIClient]) -> None:
    """Issue 17: a script run twice enrols once; a revoked certificate on disk needs a new token."""
    sid = new_id()
    token = register(sid, san_dns=[sid])

    def client() -> PKIClient:
        pki = PKIClient(pki_server.url, sid, cert_file=tmp_path / "cert.pem", key_file=tmp_path / "key.pem",
                        root_fingerprint=fingerprint(ca_home), retry_policy=FAST)
        sdk_clients.append(pki)
        return pki

    assert client().ensure_enrolled(token) is True
    first = files_of(client())
    assert client().ensure_enrolled(token) is False  # the second run: the token is spent, not needed
    assert files_of(client()) == first
    revoked = admin.delete(f"/api/v1/certificates/{sid}/revoke", params={"reason": "superseded"})
    assert revoked.status_code == 200, revoked.text
    with pytest.raises(AuthenticationError):
        client().ensure_enrolled(token)  # unusable on disk, and the old token is spent
    fresh = admin.post(f"/api/v1/services/{sid}/enrolment-token").json()["enrolment_token"]
    assert client().ensure_enrolled(fresh) is True and files_of(client()) != first
    # A restart while the CA is down: the files on disk are used as they are (no token needed).
    offline = PKIClient(f"https://127.0.0.1:{free_port()}", sid, cert_file=tmp_path / "cert.pem",
                        key_file=tmp_path / "key.pem", root_fingerprint=fingerprint(ca_home), retry_policy=FAST)
    sdk_clients.append(offline)
    assert offline.ensure_enrolled(None) is False


def test_after_a_renewal_the_client_presents_the_new_certificate_to_the_ca(
        sdk_service: Callable[..., PKIClient], admin: Any) -> None:
    """A kept-alive connection to the CA would go on presenting the certificate it was opened
    with: once that one is revoked (superseded after a rekey), the next renewal was refused."""
    pki = sdk_service()
    first = pki.certificate
    pki.renew()
    r = admin.delete(f"/api/v1/certificates/{pki.service_id}/revoke",
                     params={"serial": format(first.serial_number, "x"), "reason": "superseded"})
    assert r.status_code == 200, r.text
    assert pki.renew().serial_number != first.serial_number
    assert pki.is_revoked(first, refresh=True) is True and pki.is_revoked() is False
