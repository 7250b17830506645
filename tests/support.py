"""Test helpers: external judges (openssl, pkilint), CSRs, free ports. Imported as ``support``."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BIN = Path(sys.executable).parent
# SPEC §3: the one pkilint finding we accept, on single-label names such as `localhost`.
# SPEC §3 and §10: single-label DNS names, and the spiffe:// URI SAN (pkilint knows no such scheme).
ACCEPTED_FINDINGS = {"pkix.invalid_domain_name_syntax", "pkix.invalid_uri_syntax"}


def openssl_verify(root: Path, intermediate: Path, leaf: Path, *, crl: Path | None = None,
                   purpose: str | None = None) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of ``leaf`` against root + intermediate (and ``-crl_check`` with ``crl``)."""
    cmd = ["openssl", "verify", "-x509_strict", "-CAfile", str(root), "-untrusted", str(intermediate)]
    if crl is not None:
        cmd += ["-crl_check", "-CRLfile", str(crl)]
    if purpose:
        cmd += ["-purpose", purpose]
    return subprocess.run([*cmd, str(leaf)], capture_output=True, text=True, check=False)


def _pkilint(program: str, args: Sequence[str], path: Path) -> list[str]:
    exe = BIN / program
    proc = subprocess.run([str(exe), "lint", *args, "-s", "ERROR", "-f", "JSON", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 and not proc.stdout.strip():
        raise AssertionError(f"{program} failed: {proc.stderr}")
    findings: list[str] = []
    data: Any = json.loads(proc.stdout or "{}")
    for result in data.get("results", []):
        for finding in result.get("finding_descriptions", []):
            if finding["code"] not in ACCEPTED_FINDINGS:
                findings.append(f"{finding['severity']} {finding['code']}: {finding.get('message')}")
    return findings


def pkilint_cert(path: Path) -> list[str]:
    """ERROR/FATAL findings of pkilint's RFC 5280 certificate linter, minus the accepted one."""
    return _pkilint("lint_pkix_cert", [], path)


def pkilint_crl(path: Path) -> list[str]:
    return _pkilint("lint_crl", ["-t", "CRL", "-p", "PKIX"], path)


def make_csr(common_name: str | None = None, *, dns: Sequence[str] = (), ips: Sequence[str] = (),
             key: Any = None) -> tuple[bytes, Any]:
    """A PEM CSR (EC P-256 unless ``key`` is given) and its key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, None if _is_ed(key) else hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM), key


def _is_ed(key: Any) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return isinstance(key, ed25519.Ed25519PrivateKey)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def tls_context(ca: Path | str, cert: Path | str | None = None,
                key: Path | str | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca``, presenting ``cert``/``key`` if given (httpx ``verify=``)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def env_without_secrets() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VCC_PKI_")}


class RunningServer:
    """A real ``vcc-pki-server`` subprocess on a free loopback port, over a given home."""

    def __init__(self, home: Any, password: str, *, port: int | None = None,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 nofile: int | None = None, wrap: Sequence[str] = ()) -> None:
        self.home = home
        self.wrap = list(wrap)  # a command the server runs under (e.g. ``unshare`` for a small disk)
        self.password = password
        self.port = port or free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args)
        self.nofile = nofile  # the server's open-file limit (systemd's default is 1024)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(home.root).parent / f"server-{self.port}.log"

    def start(self, timeout: float = 20.0) -> RunningServer:
        import time

        import httpx

        env = {**env_without_secrets(), **(self.env or {})}
        if self.password:  # none for a --dev home: the server finds its kept password
            env["VCC_PKI_CA_PASSWORD"] = self.password
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [*self.wrap, str(BIN / "vcc-pki-server"), "--home", str(self.home.root), "--port", str(self.port),
                 *self.extra_args], stdout=log, stderr=subprocess.STDOUT, env=env,
                preexec_fn=self._limit_files if self.nofile else None)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc.wait()
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", verify=tls_context(self.home.root_cert),
                             timeout=1).status_code == 200:
                    return self
            except (httpx.HTTPError, OSError):  # not listening yet, or --dev still creating the CA
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def _limit_files(self) -> None:
        import resource

        assert self.nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def pid_rss_mb(self) -> float:
        """The server process's resident memory, MB."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_once(self, done: Callable[[str], bool], timeout: float = 5.0) -> str:
        """The log as soon as ``done(log)`` holds: the server writes INFO lines in batches
        (``vcc_pki_server.logs``), a fraction of a second after they happen."""
        import time

        deadline = time.monotonic() + timeout
        while not done(log := self.log()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return log

    def stop(self, sig: int | None = None) -> int | None:
        import signal as _signal

        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig or _signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def presented_serial(server: RunningServer) -> int:
    """The serial of the certificate a running server presents in a new handshake."""
    with socket.create_connection(("127.0.0.1", server.port)) as raw, \
            tls_context(server.home.root_cert).wrap_socket(raw, server_hostname="localhost") as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def replace_server_certificate(home: Any, password: str) -> int:
    """A new server certificate written into ``home`` by another process than the server (as
    a worker that renews it, or an operator, does); its serial."""
    authority = home.authority(password)
    try:
        return int(home.issue_server_certificate(authority, home.config()).certificate.serial_number)
    finally:
        authority.store.close()
