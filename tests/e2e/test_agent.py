"""`vcc-pki`, the renewal agent (issue 11, SPEC §11): its commands against the real server, its
files checked by openssl, and services that are not Python (openssl s_server/s_client) on them."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from peers import fingerprint, new_id
from support import BIN, RunningServer, env_without_secrets, free_port, openssl_verify
from vcc_pki_client.files import CertificateFiles
from vcc_pki_client.keys import key_matches_certificate, load_private_key_pem
from vcc_pki_server.home import Home

Register = Any


def agent(*argv: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "vcc-pki"), *argv], capture_output=True, text=True, cwd=cwd,
                          env=env_without_secrets(), timeout=timeout, check=False)


def enrol(server: RunningServer, home: Home, register: Register, folder: Path, *extra: str,
          san_dns: tuple[str, ...] = ("localhost",)) -> str:
    sid = new_id()
    token = register(sid, san_dns=[sid, *san_dns], san_ip=["127.0.0.1"])
    done = agent("enroll", "--service-id", sid, "--token", token, "--ca-url", server.url,
                 "--fingerprint", fingerprint(home), "--dir", str(folder), *extra)
    assert done.returncode == 0, done.stderr
    return sid


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_enroll_writes_the_files_for_any_language_and_later_commands_need_only_dir(
        pki_server: RunningServer, ca_home: Home, register: Register, tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    sid = enrol(pki_server, ca_home, register, folder, "--validity", "24h")
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    assert {"cert.pem", "key.pem", "fullchain.pem", "ca_chain.pem", "crl.pem", "vcc-pki.toml"} <= names
    assert mode(folder / "key.pem") == 0o600 and mode(folder / "cert.pem") == 0o644
    leaf = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    # 24 hours from now (notBefore is backdated for clock skew, by up to 5 minutes).
    left = leaf.not_valid_after_utc - datetime.now(timezone.utc)
    assert timedelta(hours=23, minutes=59) < left <= timedelta(hours=24)
    full = x509.load_pem_x509_certificates((folder / "fullchain.pem").read_bytes())
    assert full == [leaf, ca_home.intermediate_certificate()]
    assert x509.load_pem_x509_certificates((folder / "ca_chain.pem").read_bytes()) == [
        ca_home.intermediate_certificate(), ca_home.root_certificate()]
    # crl.pem carries both CRLs: openssl's whole-chain check (as nginx does) passes with it.
    crls = (folder / "crl.pem").read_text().count("BEGIN X509 CRL")
    assert crls == 2
    check = subprocess.run(["openssl", "verify", "-crl_check_all", "-CRLfile", str(folder / "crl.pem"),
                            "-CAfile", str(ca_home.root_cert), "-untrusted", str(ca_home.intermediate_cert),
                            str(folder / "cert.pem")], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr

    status = agent("status", "--dir", str(folder), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["service_id"] == sid and json.loads(status.stdout)["valid"] is True

    not_due = agent("renew", "--dir", str(folder))
    assert not_due.returncode == 0 and not_due.stdout.startswith("not due:"), not_due.stdout + not_due.stderr
    before = serial_of(folder / "cert.pem")
    forced = agent("renew", "--dir", str(folder), "--force", "--json", "--exec", "touch hooked", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    answer = json.loads(forced.stdout)
    assert answer["renewed"] is True and int(answer["serial_number"], 16) == serial_of(folder / "cert.pem") != before
    assert (tmp_path / "hooked").exists()
    assert openssl_verify(ca_home.root_cert, ca_home.intermediate_cert, folder / "fullchain.pem").returncode == 0

    revoked = agent("revoke", "--dir", str(folder), "--reason", "superseded", "--json")
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked_serials"] == [answer["serial_number"]]
    refreshed = agent("crl", "--dir", str(folder), "--exec", "touch crl-hooked", cwd=tmp_path)
    assert refreshed.returncode == 0 and "crl.pem: CRL number" in refreshed.stdout, refreshed.stderr
    assert (tmp_path / "crl-hooked").exists()
    check = subprocess.run(["openssl", "verify", "-crl_check_all", "-CRLfile", str(folder / "crl.pem"),
                            "-CAfile", str(ca_home.root_cert), "-untrusted", str(ca_home.intermediate_cert),
                            str(folder / "cert.pem")], capture_output=True, text=True, check=False)
    assert check.returncode != 0 and "certificate revoked" in check.stdout + check.stderr
    assert agent("status", "--dir", str(folder)).returncode == 1  # crl.pem lists it: exit 1 for a monitor


def test_bad_input_and_a_ca_that_is_down_change_nothing(pki_server: RunningServer, ca_home: Home,
                                                        register: Register, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    no_settings = agent("renew", "--dir", str(empty))
    assert no_settings.returncode == 2 and "run `vcc-pki enroll" in no_settings.stderr
    assert "Traceback" not in no_settings.stderr
    assert agent("renew", "--signal", "HUP").returncode == 2  # --signal needs --pid-file

    sid = new_id()
    token = register(sid, san_dns=[sid])
    pinned_wrong = agent("enroll", "--service-id", sid, "--token", token, "--ca-url", pki_server.url,
                         "--fingerprint", "sha256:" + "00" * 32, "--dir", str(tmp_path / "wrong"))
    assert pinned_wrong.returncode == 1 and len(pinned_wrong.stderr.strip().splitlines()) == 1, pinned_wrong.stderr
    assert not (tmp_path / "wrong").exists() or not any((tmp_path / "wrong").iterdir())

    folder = tmp_path / "tls"
    enrol(pki_server, ca_home, register, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    settings = (folder / "vcc-pki.toml").read_text()
    (folder / "vcc-pki.toml").write_text(settings.replace(pki_server.url, f"https://127.0.0.1:{free_port()}"))
    down = agent("renew", "--dir", str(folder), "--force")
    assert down.returncode == 1 and "renew failed" in down.stderr and "Traceback" not in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != "vcc-pki.toml"} == {
        k: v for k, v in before.items() if k != "vcc-pki.toml"}


def test_the_daemon_renews_runs_the_hook_goes_on_when_it_fails_and_stops_on_sigterm(
        pki_server: RunningServer, ca_home: Home, register: Register, tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    enrol(pki_server, ca_home, register, folder)
    before = serial_of(folder / "cert.pem")
    with (tmp_path / "daemon.out").open("wb") as out, (tmp_path / "daemon.err").open("wb") as err:
        daemon = subprocess.Popen([str(BIN / "vcc-pki"), "renew", "--daemon", "--force", "--dir", str(folder),
                                   "--exec", "echo hooked >> hook.log; exit 3"], cwd=tmp_path,
                                  env=env_without_secrets(), stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "hook.log").exists():
            assert time.monotonic() < deadline and daemon.poll() is None, (tmp_path / "daemon.err").read_text()
            time.sleep(0.1)
        time.sleep(0.5)
        assert daemon.poll() is None  # a failing hook is logged, the daemon goes on
        assert serial_of(folder / "cert.pem") != before
        assert "exited 3" in (tmp_path / "daemon.err").read_text()
        assert "renewed: certificate" in (tmp_path / "daemon.out").read_text()
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(15) == 0


def test_openssl_server_and_client_speak_mtls_on_the_agents_files_and_honour_its_crl(
        pki_server: RunningServer, ca_home: Home, register: Register, tmp_path: Path) -> None:
    """No Python on either side: openssl s_server and s_client with what the agent wrote."""
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    enrol(pki_server, ca_home, register, server_dir)
    enrol(pki_server, ca_home, register, client_dir)

    def call(port: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-quiet",
             "-verify_return_error", "-verify_hostname", "localhost", "-CAfile", str(client_dir / "ca_chain.pem"),
             "-cert", str(client_dir / "cert.pem"), "-key", str(client_dir / "key.pem")],
            input="GET / HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=20, check=False)

    def serve() -> tuple[subprocess.Popen[bytes], int]:
        # s_server's -CRL reads one CRL: the trust file carries both (OpenSSL loads CRLs from it too).
        trust = server_dir.parent / "server-trust.pem"
        trust.write_bytes(b"".join((server_dir / name).read_bytes() for name in ("ca_chain.pem", "crl.pem")))
        port = free_port()
        log = (tmp_path / f"s_server-{port}.log").open("wb")
        proc = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-www", "-cert", str(server_dir / "cert.pem"),
             "-key", str(server_dir / "key.pem"), "-cert_chain", str(server_dir / "fullchain.pem"),
             "-CAfile", str(trust), "-Verify", "2", "-verify_return_error", "-crl_check_all"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (tmp_path / f"s_server-{port}.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc, port
            except OSError:
                assert time.monotonic() < deadline, "s_server did not listen"
                time.sleep(0.05)

    proc, port = serve()
    try:
        answered = call(port)
        assert "HTTP/1.0 200 ok" in answered.stdout, answered.stderr
    finally:
        proc.terminate()
        proc.wait(10)
    assert agent("revoke", "--dir", str(client_dir), "--reason", "keyCompromise").returncode == 0
    assert agent("crl", "--dir", str(server_dir)).returncode == 0
    proc, port = serve()
    try:
        refused = call(port)
        assert "HTTP/1.0 200 ok" not in refused.stdout
    finally:
        proc.terminate()
        proc.wait(10)


def test_kill_9_during_renew_always_leaves_a_matching_pair(pki_server: RunningServer, ca_home: Home,
                                                           register: Register, tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    enrol(pki_server, ca_home, register, folder)
    rng = random.Random(11)
    started = time.monotonic()  # one whole run: start, key, CSR, answer, swap
    assert agent("renew", "--dir", str(folder), "--force").returncode == 0
    whole = time.monotonic() - started
    killed = 0
    for _ in range(20):
        proc = subprocess.Popen([str(BIN / "vcc-pki"), "renew", "--dir", str(folder), "--force"],
                                env=env_without_secrets(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * whole)  # anywhere in the run, the swap's end included
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait(30)
        files = CertificateFiles(folder / "cert.pem", folder / "key.pem", folder / "ca_chain.pem")
        files.recover()  # what the next vcc-pki command or SDK start does first
        cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        key = load_private_key_pem((folder / "key.pem").read_bytes())
        assert key_matches_certificate(key, cert)
        assert x509.load_pem_x509_certificates((folder / "fullchain.pem").read_bytes())[0] == cert
        assert openssl_verify(ca_home.root_cert, ca_home.intermediate_cert, folder / "cert.pem").returncode == 0
    assert killed >= 8, f"only {killed} of 20 renewals were killed mid-way: the timing is off"


@pytest.mark.skipif(not Path("/usr/sbin/nginx").exists(), reason="nginx is not installed (apt-get install nginx)")
def test_nginx_serves_the_renewed_certificate_after_the_hook_and_refuses_a_revoked_client(
        pki_server: RunningServer, ca_home: Home, register: Register, tmp_path: Path) -> None:
    import ssl
    import threading

    import httpx

    web, caller = tmp_path / "web", tmp_path / "caller"
    enrol(pki_server, ca_home, register, web)
    enrol(pki_server, ca_home, register, caller)
    port = free_port()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fcgi;
    uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {web}/fullchain.pem;
        ssl_certificate_key {web}/key.pem;
        ssl_client_certificate {web}/ca_chain.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_crl {web}/crl.pem;
        location / {{ return 200 "hello $ssl_client_s_dn\\n"; }}
    }}
}}
""")
    reload_cmd = f"/usr/sbin/nginx -p {prefix} -c {conf} -s reload"
    nginx = subprocess.Popen(["/usr/sbin/nginx", "-p", str(prefix), "-c", str(conf)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = ssl.create_default_context(cafile=str(caller / "ca_chain.pem"))
    ctx.load_cert_chain(str(caller / "fullchain.pem"), str(caller / "key.pem"))

    def served_serial() -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as conn:
            return x509.load_der_x509_certificate(conn.getpeercert(binary_form=True) or b"").serial_number

    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                first = served_serial()
                break
            except OSError:
                assert time.monotonic() < deadline, (prefix / "error.log").read_text()
                time.sleep(0.1)
        assert first == serial_of(web / "cert.pem")
        failures: list[str] = []
        stop = threading.Event()

        def keep_calling() -> None:  # requests all through the reload, each on a new connection
            # (a reload closes idle keep-alive connections; a request sent on one at that instant
            # meets a closed connection, which clients retry: that is not nginx refusing it)
            while not stop.is_set():
                try:
                    with httpx.Client(verify=ctx, timeout=5) as client:
                        r = client.get(f"https://localhost:{port}/")
                    if r.status_code != 200:
                        failures.append(str(r.status_code))
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

        caller_thread = threading.Thread(target=keep_calling)
        caller_thread.start()
        try:
            renewed = agent("renew", "--dir", str(web), "--force", "--exec", reload_cmd)
            assert renewed.returncode == 0, renewed.stderr
            new = serial_of(web / "cert.pem")
            deadline = time.monotonic() + 10
            while served_serial() != new:
                assert time.monotonic() < deadline, "nginx still serves the old certificate"
                time.sleep(0.1)
        finally:
            stop.set()
            caller_thread.join()
        assert not failures, failures[:5]

        assert agent("revoke", "--dir", str(caller), "--reason", "keyCompromise").returncode == 0
        assert agent("crl", "--dir", str(web), "--exec", reload_cmd).returncode == 0
        deadline = time.monotonic() + 10
        while True:
            with httpx.Client(verify=ctx, timeout=5) as client:
                status = client.get(f"https://localhost:{port}/").status_code
            if status == 400:  # nginx: "The SSL certificate error" for a revoked client certificate
                break
            assert time.monotonic() < deadline, f"nginx still accepts the revoked client ({status})"
            time.sleep(0.1)
    finally:
        nginx.terminate()
        nginx.wait(10)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze on this machine")
def test_the_systemd_units_verify(tmp_path: Path) -> None:
    units = sorted((Path(__file__).resolve().parents[2] / "deploy" / "systemd").glob("vcc-pki-*.service"))
    assert len(units) == 3
    for unit in units:  # an instance of each template, with this venv's commands in place of /usr/local/bin's
        text = unit.read_text().replace("/usr/local/bin/", f"{BIN}/")
        (tmp_path / unit.name.replace("@.", "@web.")).write_text(text)
    checked = subprocess.run(["systemd-analyze", "verify", *map(str, sorted(tmp_path.glob("*.service")))],
                             capture_output=True, text=True, check=False, timeout=60)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr
