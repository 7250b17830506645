"""Processes that share certificate files follow each other's renewals (issue 11, SPEC §11):
`uvicorn --workers 2` serving with the SDK's context, and a third process renewing."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from support import env_without_secrets, free_port

# The service's app and TLS, as a user would write them for `uvicorn --workers 2`: the context
# factory runs in each worker (uvicorn pickles the config into it).
SERVICE = '''
import os, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from vcc_pki_client import PKIClient


async def pid(request):
    return PlainTextResponse(str(os.getpid()))

app = Starlette(routes=[Route("/pid", pid)])


def tls(config, default):
    pki = PKIClient(os.environ["PKI_URL"], os.environ["SERVICE_ID"], cert_file="tls/cert.pem",
                    key_file="tls/key.pem", ca_bundle=os.environ["PKI_ROOT"], reload_interval=1.0)
    return pki.server_ssl_context()


if __name__ == "__main__":
    uvicorn.run("service:app", host="127.0.0.1", port=int(sys.argv[1]), workers=2, log_level="warning",
                ssl_context_factory=tls, timeout_graceful_shutdown=1)
'''


def served(port: int, ctx: ssl.SSLContext) -> tuple[str, int]:
    """(worker pid, serial presented) of one new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as conn:
        serial = x509.load_der_x509_certificate(conn.getpeercert(binary_form=True) or b"").serial_number
        conn.sendall(b"GET /pid HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    return answer.rsplit(b"\r\n\r\n", 1)[1].decode(), serial


def test_every_worker_serves_a_renewal_made_by_another_process(sdk_service: Any, pki_server: Any,
                                                               ca_home: Any, tmp_path: Path) -> None:
    pki = sdk_service()  # this test process is the one that renews
    folder = tmp_path / "svc"
    (folder / "tls").mkdir(parents=True)
    assert pki.files is not None
    for name in ("cert.pem", "key.pem", "ca_chain.pem"):  # the service works on the same files
        (folder / "tls" / name).unlink(missing_ok=True)
        (folder / "tls" / name).symlink_to(pki.files.cert_file.parent / name)
    (folder / "service.py").write_text(SERVICE)
    port = free_port()
    env = {**env_without_secrets(), "PKI_URL": pki_server.url, "SERVICE_ID": pki.service_id,
           "PKI_ROOT": str(ca_home.root_cert), "PYTHONPATH": str(folder)}
    with (folder / "service.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "service.py", str(port)], cwd=folder, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    ctx = pki.client_ssl_context(check_revocation=False)
    try:
        deadline = time.monotonic() + 20
        pids: dict[str, int] = {}
        while len(pids) < 2:  # both workers answering, with the first certificate
            assert time.monotonic() < deadline and proc.poll() is None, (folder / "service.log").read_text()
            try:
                worker, serial = served(port, ctx)
                pids[worker] = serial
            except OSError:
                time.sleep(0.1)
        first = pki.certificate.serial_number
        assert set(pids.values()) == {first}

        renewed = pki.renew()  # a third process swaps the files
        new = int(renewed.serial_number, 16)
        started = time.monotonic()
        latest: dict[str, int] = {}
        while set(latest) != set(pids) or set(latest.values()) != {new}:
            assert time.monotonic() - started < 1.0 + 5, f"workers still serve {latest} (new: {new:x})"
            worker, serial = served(port, ctx)
            latest[worker] = serial
    finally:
        proc.terminate()
        proc.wait(10)
