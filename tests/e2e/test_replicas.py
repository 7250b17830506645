"""Two server replicas over one PostgreSQL database (SPEC §9): what one does, the other sees."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from conftest import CA_PASSWORD, ROOT_PASSWORD, build_home, new_admin_token
from support import (
    BIN,
    RunningServer,
    env_without_secrets,
    make_csr,
    presented_serial,
    replace_server_certificate,
    tls_context,
)
from vcc_pki_server.authority import Actor, Authority
from vcc_pki_server.config import Config
from vcc_pki_server.home import Home

API = "/api/v1"


@pytest.fixture
def replicas(pg_database: str, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RunningServer, RunningServer, str]]:
    """Replicas A and B: two copies of one home (same CA, keys, server certificate), one database
    named by ``$VCC_PKI_DATABASE_URL``; and an admin token made through A's store."""
    with two_replicas(pg_database, tmp_path, monkeypatch) as made:
        yield made


@contextlib.contextmanager
def two_replicas(pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 extra_args: Sequence[str] = ()) -> Iterator[tuple[RunningServer, RunningServer, str]]:
    monkeypatch.setenv("VCC_PKI_DATABASE_URL", pg_database)
    home_a = build_home(tmp_path / "a" / "home")
    (tmp_path / "b").mkdir()
    home_b = Home(shutil.copytree(home_a.root, tmp_path / "b" / "home"))
    assert not home_a.db.exists() and not home_b.db.exists()  # nothing went to SQLite
    admin_token = new_admin_token(home_a, "replicas")
    env = {"VCC_PKI_DATABASE_URL": pg_database}
    a = RunningServer(home_a, CA_PASSWORD, env=env, extra_args=extra_args)
    b = RunningServer(home_b, CA_PASSWORD, env=env, extra_args=extra_args)
    with a, b:
        yield a, b, admin_token


def test_replicas_share_services_tokens_revocations_and_crls(
        replicas: tuple[RunningServer, RunningServer, str]) -> None:
    a, b, admin_token = replicas
    ctx = tls_context(a.home.root_cert)
    bearer = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=a.url, verify=ctx, timeout=30) as on_a, \
            httpx.Client(base_url=b.url, verify=ctx, timeout=30) as on_b:
        r = on_a.post(f"{API}/services/register", json={"service_id": "shared", "san_dns": ["shared.internal"]},
                      headers=bearer)
        assert r.status_code == 201, r.text
        enrolment = {"Authorization": f"Bearer {r.json()['enrolment_token']}"}

        csr, _ = make_csr("shared")
        r = on_b.post(f"{API}/certificates/request", json={"service_id": "shared", "csr": csr.decode()},
                      headers=enrolment)
        assert r.status_code == 201, r.text
        serial = x509.load_pem_x509_certificate(r.json()["certificate"].encode()).serial_number

        again, _ = make_csr("shared")  # the token is spent for the whole cluster
        for replica in (on_a, on_b):
            r = replica.post(f"{API}/certificates/request",
                             json={"service_id": "shared", "csr": again.decode()}, headers=enrolment)
            assert r.status_code == 401 and r.json()["code"] == "invalid_token", r.text

        def served_by_a() -> set[int]:
            return {entry.serial_number for entry in x509.load_der_x509_crl(on_a.get(f"{API}/crl").content)}

        assert serial not in served_by_a()
        r = on_b.delete(f"{API}/certificates/shared/revoke", params={"reason": "keyCompromise"},
                        headers=bearer)
        assert r.status_code == 200, r.text
        revoked_at = time.monotonic()
        while serial not in served_by_a():
            assert time.monotonic() - revoked_at < 10, "replica A still serves a CRL without B's revocation"
            time.sleep(0.2)

        r = on_a.get(f"{API}/services/shared", headers=bearer)
        assert r.status_code == 200, r.text


def test_crl_numbers_never_go_down_through_round_robin_while_revocations_land(
        replicas: tuple[RunningServer, RunningServer, str]) -> None:
    """Issue 15: a balancer alternating between replicas never hands a client a CRL older than
    one it already got, while both replicas publish new ones."""
    import threading

    a, b, admin_token = replicas
    ctx = tls_context(a.home.root_cert)
    bearer = {"Authorization": f"Bearer {admin_token}"}
    stop = threading.Event()
    failures: list[str] = []

    def revoke_in_turns() -> None:
        with httpx.Client(verify=ctx, timeout=30, headers=bearer) as admin:
            for i in range(30):
                replica = (a, b)[i % 2]
                sid = f"rr-{i}"
                token = admin.post(f"{replica.url}{API}/services/register",
                                   json={"service_id": sid}).json()["enrolment_token"]
                csr, _ = make_csr(sid)
                admin.post(f"{replica.url}{API}/certificates/request", json={"service_id": sid, "csr": csr.decode()},
                           headers={"Authorization": f"Bearer {token}"})
                r = admin.delete(f"{(b, a)[i % 2].url}{API}/certificates/{sid}/revoke",
                                 params={"reason": "superseded"})
                if r.status_code != 200:
                    failures.append(r.text)
        stop.set()

    revoker = threading.Thread(target=revoke_in_turns)
    revoker.start()
    numbers: list[int] = []
    with httpx.Client(verify=ctx, timeout=30) as client:
        turn = 0
        while not stop.is_set():  # one fetch after the other, alternating like a round-robin balancer
            crl = x509.load_der_x509_crl(client.get(f"{(a, b)[turn % 2].url}{API}/crl").content)
            numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
            turn += 1
    revoker.join()
    assert not failures, failures[:3]
    assert len(set(numbers)) >= 10, numbers  # the revocations did land while the fetches went on
    went_down = [(x, y) for x, y in itertools.pairwise(numbers) if y < x]
    assert not went_down, f"{len(went_down)} of {len(numbers)} fetches went back, e.g. {went_down[:3]}"


def test_three_replicas_probe_once_per_round_and_a_new_leader_takes_over(
        pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: the prober is elected in the database (not per home): one probe per service and
    round for the cluster, and another replica probes within two intervals of the leader's death."""
    import signal
    import threading

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from peers import serving
    from support import free_port
    from vcc_pki_server.encoding import cert_pem
    from vcc_pki_server.home import key_pem
    from vcc_pki_server.mtls import server_ssl_context, uvicorn_config

    monkeypatch.setenv("VCC_PKI_DATABASE_URL", pg_database)
    first = build_home(tmp_path / "r0" / "home")
    homes = [first] + [Home(shutil.copytree(first.root, tmp_path / f"r{i}" / "home")) for i in (1, 2)]
    authority = first.authority(CA_PASSWORD)
    try:
        issued, key = authority.issue_with_key("failing", common_name="localhost", san_dns=["localhost"],
                                               san_ip=["127.0.0.1"], key_type="ec-p256", actor=Actor.operator())
    finally:
        authority.store.close()
    (tmp_path / "cert.pem").write_bytes(cert_pem(issued.certificate, issued.chain[0]))
    (tmp_path / "key.pem").write_bytes(key_pem(key, None))
    (tmp_path / "ca.pem").write_bytes(cert_pem(first.root_certificate(), first.intermediate_certificate()))
    probes: list[float] = []
    lock = threading.Lock()

    async def health(request: Request) -> PlainTextResponse:
        with lock:
            probes.append(time.monotonic())
        return PlainTextResponse("down", status_code=503)

    port = free_port()
    config = uvicorn_config(Starlette(routes=[Route("/health", health)]), host="127.0.0.1", port=port,
                            ssl_context=server_ssl_context(tmp_path / "cert.pem", tmp_path / "key.pem",
                                                           tmp_path / "ca.pem"),
                            log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=1)
    env = {"VCC_PKI_DATABASE_URL": pg_database}
    servers = [RunningServer(home, CA_PASSWORD, env=env, extra_args=["--health-interval", "1"]) for home in homes]
    with serving(config):
        for server in servers:
            server.start()
        try:
            authority = first.authority()
            try:
                authority.update_service("failing", {"health_check_url": f"https://127.0.0.1:{port}/health"},
                                         actor=Actor.operator())
            finally:
                authority.store.close()
            time.sleep(1.5)  # the rounds settle
            with lock:
                probes.clear()
            time.sleep(6)
            with lock:
                window = list(probes)
            assert 4 <= len(window) <= 8, f"{len(window)} probes in 6 s of 1 s rounds (three probers: ~18)"
            leaders = [s for s in servers if "leads health" in s.log()]
            assert len(leaders) == 1, [s.log()[-500:] for s in servers]
            leaders[0].stop(signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(4)
            with lock:
                after = [t for t in probes if t > killed]
            assert after and after[0] - killed <= 2 * 1.0 + 1.0, f"first probe {after[:1]} after the kill at {killed}"
            assert sum(1 for s in servers if s is not leaders[0] and "leads health" in s.log()) == 1
        finally:
            for server in servers:
                server.stop()


def test_replicas_present_one_server_certificate_and_follow_its_renewal(pg_database: str, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: the server certificate is the cluster's (in the database), not each home copy's.
    A's home copy is due (a third of its life left): A renews it at start; B, started from an
    older copy of the home, takes A's; a certificate replaced on A while both run reaches B."""
    monkeypatch.setenv("VCC_PKI_DATABASE_URL", pg_database)
    issued_nine_days_ago = datetime.now(timezone.utc) - timedelta(days=9)
    home_a = build_home(tmp_path / "a" / "home", ca_made=issued_nine_days_ago - timedelta(days=1))
    ten_days = Config(default_validity_days=10, max_validity_days=10)
    then = Authority(home_a.open_store(), home_a.load_ca(CA_PASSWORD), policy=ten_days.policy(),
                     clock=lambda: issued_nine_days_ago)
    home_a.issue_server_certificate(then, ten_days)  # 10 days from 9 days ago: due
    then.store.close()
    (tmp_path / "b").mkdir()
    home_b = Home(shutil.copytree(home_a.root, tmp_path / "b" / "home"))
    old = x509.load_pem_x509_certificate(home_b.server_cert.read_bytes()).serial_number
    env = {"VCC_PKI_DATABASE_URL": pg_database}
    fast = ["--cert-check-interval", "0.2"]
    with RunningServer(home_a, CA_PASSWORD, env=env, extra_args=fast) as a, \
            RunningServer(home_b, CA_PASSWORD, env=env, extra_args=fast) as b:
        renewed = presented_serial(a)
        assert renewed != old and presented_serial(b) == renewed  # B took A's renewal, not its own copy
        assert "server certificate taken from the cluster's copy" in b.log()
        assert x509.load_pem_x509_certificate(home_b.server_cert.read_bytes()).serial_number == renewed
        # Replaced on A by hand while both run: B presents it too, within a few checks.
        new = replace_server_certificate(home_a, CA_PASSWORD)
        deadline = time.monotonic() + 10
        while {presented_serial(a), presented_serial(b)} != {new}:
            assert time.monotonic() < deadline, "the replicas do not both present the new certificate"
            time.sleep(0.1)
        # The root's CRL made on A's host (`pki-admin ca root-crl`) is served by B too.
        root_ski = home_a.root_certificate().extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value.digest.hex()
        with httpx.Client(base_url=b.url, verify=tls_context(home_b.root_cert), timeout=10) as on_b:
            def number() -> int:
                crl = x509.load_der_x509_crl(on_b.get(f"{API}/crl/{root_ski}").content)
                return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            before = number()
            made = home_a.write_root_crl(ROOT_PASSWORD)
            newer = made.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            assert newer > before
            deadline = time.monotonic() + 10
            while number() != newer:
                assert time.monotonic() < deadline, "B does not serve the root CRL made on A"
                time.sleep(0.1)


def test_a_rotation_made_on_one_replica_is_followed_by_the_other(pg_database: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC §13 on PostgreSQL: `ca rotate-intermediate` run on A's host; B (its own copy of the
    home) lists the new intermediate first, then issues from it, rewrites its files, and still
    revokes and lists on the old intermediate's CRL what that one issued. (Faster settings than
    the defaults: servers look every second, the rotation takes effect after 2 s; with the
    defaults, 5 and 8 s, B issues from it within 15 s.)"""
    with two_replicas(pg_database, tmp_path, monkeypatch, ["--ca-check-interval", "1"]) as (a, b, token):
        rotated_and_followed(a, b, token, pg_database)


def rotated_and_followed(a: RunningServer, b: RunningServer, token: str, pg_database: str) -> None:
    old_ski = b.home.intermediate_certificate().extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest.hex()
    with httpx.Client(base_url=b.url, verify=tls_context(b.home.root_cert), timeout=10,
                      headers={"Authorization": f"Bearer {token}"}) as on_b:
        assert on_b.post(f"{API}/services/register", json={"service_id": "rot", "san_dns": ["rot"]}).status_code == 201

        def issue() -> x509.Certificate:
            csr, _ = make_csr("rot")
            r = on_b.post(f"{API}/certificates/request", json={"service_id": "rot", "csr": csr.decode()})
            assert r.status_code == 201, r.text
            return x509.load_pem_x509_certificate(r.json()["certificate"].encode())

        old_leaf = issue()
        env = {**env_without_secrets(), "VCC_PKI_DATABASE_URL": pg_database, "VCC_PKI_CA_PASSWORD": CA_PASSWORD,
               "VCC_PKI_ROOT_PASSWORD": ROOT_PASSWORD}
        done = subprocess.run([str(BIN / "pki-admin"), "--home", str(a.home.root), "ca", "rotate-intermediate",
                               "--activate-after", "2"],
                              env=env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        rotated = time.monotonic()
        new = x509.load_pem_x509_certificates(
            (a.home.authorities_dir / f"{done.stdout.split('subject key identifier ')[1][:40]}.pem").read_bytes())[0]
        listed_at = issued_at = None
        while issued_at is None:
            assert time.monotonic() - rotated < 15, "B did not issue from the new intermediate within 15 s"
            bundle = x509.load_pem_x509_certificates(on_b.get(f"{API}/ca/bundle").content)
            if listed_at is None and new in bundle:
                listed_at = time.monotonic()
            if issue().issuer == new.subject:
                issued_at = time.monotonic()
            time.sleep(0.2)
        assert listed_at is not None and listed_at < issued_at  # published before it issues
        assert b.home.intermediate_certificate() == new  # B's files follow the record
        r = on_b.delete(f"{API}/certificates/rot/revoke", params={"serial": format(old_leaf.serial_number, "x")})
        assert r.status_code == 200, r.text
        crl = x509.load_der_x509_crl(on_b.get(f"{API}/crl/{old_ski}").content)
        assert crl.get_revoked_certificate_by_serial_number(old_leaf.serial_number) is not None
        assert "CA record version 1" in b.log()
