"""deploy/haproxy/haproxy.cfg run for real (issue 12): HAProxy in TCP mode in front of two
replicas on one PostgreSQL database; mTLS reaches the replicas through it, and a replica that
stops is taken out of the rotation by the /health check."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import CA_PASSWORD, build_home
from support import RunningServer, free_port, make_csr, tls_context
from vcc_pki_server.authority import Actor
from vcc_pki_server.encoding import cert_pem
from vcc_pki_server.home import Home, key_pem

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@pytest.mark.skipif(not Path(HAPROXY).exists(), reason="haproxy is not installed (apt-get install haproxy)")
def test_mtls_passes_through_haproxy_to_both_replicas_and_a_stopped_one_leaves_the_rotation(
        pg_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VCC_PKI_DATABASE_URL", pg_database)
    first = build_home(tmp_path / "a" / "home")
    second = Home(shutil.copytree(first.root, tmp_path / "b" / "home"))
    authority = first.authority(CA_PASSWORD)
    try:
        issued, key = authority.issue_with_key("through-lb", common_name="through-lb", san_dns=["through-lb"],
                                               key_type="ec-p256", actor=Actor.operator())
    finally:
        authority.store.close()
    (tmp_path / "cert.pem").write_bytes(issued.record.pem.encode() + cert_pem(issued.chain[0]))
    (tmp_path / "key.pem").write_bytes(key_pem(key, None))
    env = {"VCC_PKI_DATABASE_URL": pg_database}
    replicas = [RunningServer(home, CA_PASSWORD, env=env) for home in (first, second)]
    port = free_port()
    text = CONFIG.read_text()
    text = text.replace("bind 0.0.0.0:8443", f"bind 127.0.0.1:{port}")
    text = text.replace("/etc/vcc-pki/root_ca.pem", str(first.root_cert))
    text = text.replace("inter 2s", "inter 300ms")  # the same checks, faster, for the test's sake
    text = re.sub(r"    server replica\d .*\n", "", text)
    text += "".join(f"    server replica{i} 127.0.0.1:{r.port}\n" for i, r in enumerate(replicas, 1))
    (tmp_path / "haproxy.cfg").write_text(text)
    assert subprocess.run([HAPROXY, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True,
                          check=False).returncode == 0
    for replica in replicas:
        replica.start()
    with (tmp_path / "haproxy.log").open("wb") as log:
        proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=log,
                                 stderr=subprocess.STDOUT)
    ctx = tls_context(first.root_cert, tmp_path / "cert.pem", tmp_path / "key.pem")
    url = f"https://127.0.0.1:{port}"
    try:
        with httpx.Client(verify=ctx, timeout=10) as client:
            deadline = time.monotonic() + 15
            while True:  # HAProxy up and both replicas checked healthy
                try:
                    if client.get(f"{url}/api/v1/certificates/through-lb").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
                time.sleep(0.2)
            time.sleep(1.0)  # both replicas past `rise 2` of the checks
            for _ in range(8):  # the client's certificate reaches the replica: this route needs it
                with httpx.Client(verify=ctx, timeout=10) as fresh:  # TCP mode balances connections
                    r = fresh.get(f"{url}/api/v1/certificates/through-lb")
                assert r.status_code == 200 and r.json()["service_id"] == "through-lb", r.text

            def served(replica: RunningServer) -> int:
                return replica.log().count("/api/v1/certificates/through-lb")

            for replica in replicas:  # round robin: both answered (their access lines come in batches)
                replica.log_once(lambda text: text.count("/api/v1/certificates/through-lb") >= 3)
            assert all(served(r) >= 3 for r in replicas), [served(r) for r in replicas]

            replicas[0].stop()
            time.sleep(1.0)  # `fall 2` of the checks
            answers: list[object] = []
            for _ in range(8):
                try:
                    with httpx.Client(verify=ctx, timeout=10) as fresh:
                        answers.append(fresh.post(f"{url}/api/v1/certificates/request", json={
                            "service_id": "through-lb", "csr": make_csr("through-lb")[0].decode()}).status_code)
                except httpx.HTTPError as exc:
                    answers.append(repr(exc))
            assert answers == [201] * 8, answers
    finally:
        proxy.terminate()
        proxy.wait(10)
        for replica in replicas:
            replica.stop()
