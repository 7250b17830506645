"""What every benchmark shares: CA homes, real server processes, CPU accounting, tables, results.

Servers are real ``vcc-pki-server`` subprocesses on free loopback ports; nothing here talks to
any other address. CPU time is read from ``/proc/<pid>/stat`` (utime + stime) of the server
process and of every worker it forked.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vcc_pki_server.authority import Actor, Authority
from vcc_pki_server.config import Config
from vcc_pki_server.home import Home

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
BIN = Path(sys.executable).parent
ROOT_PASSWORD = "bench-root-password"
CA_PASSWORD = "bench-intermediate-password"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Services the benchmarks issue for: broad allow-lists, CSRs ask for names inside them.
SERVICES = tuple(f"bench-{i}" for i in range(4))


def san_names(service_id: str) -> list[str]:
    return [f"{service_id}.internal", f"{service_id}.svc.cluster.local", "localhost"]


def build_home(path: Path, *, intermediate: str = "ec-p256") -> Home:
    """A CA home like tests/conftest.build_home (EC P-256 root), with the given intermediate key
    type, a server certificate, a first CRL, and the benchmark services registered."""
    home = Home(path)
    home.ensure()
    home.save_config(Config())
    home.create_root(ROOT_PASSWORD, key_type="ec-p256")
    home.create_intermediate(ROOT_PASSWORD, CA_PASSWORD, key_type=intermediate)
    authority = home.authority(CA_PASSWORD)
    try:
        home.issue_server_certificate(authority, home.config())
        authority.generate_crl(actor=Actor.operator())
        for service_id in SERVICES:
            authority.register_service(service_id, san_dns=san_names(service_id),
                                       san_ip=["127.0.0.1", "10.0.0.1"], actor=Actor.operator())
    finally:
        authority.store.close()
    return home


def admin_token(home: Home) -> str:
    authority = home.authority(None)
    try:
        return authority.create_admin_token(name="bench", expires_days=1, actor=Actor.operator()).value
    finally:
        authority.store.close()


def open_authority(home: Home) -> Authority:
    return home.authority(CA_PASSWORD)


def make_csrs(count: int, *, seed_services: Sequence[str] = SERVICES) -> list[tuple[str, str]]:
    """``count`` ``(service_id, csr_pem)`` pairs, each with its own P-256 key (made here, once)."""
    out = []
    for i in range(count):
        service_id = seed_services[i % len(seed_services)]
        key = ec.generate_private_key(ec.SECP256R1())
        names = san_names(service_id)
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names[:2]]),
                              critical=False)
               .sign(key, hashes.SHA256()))
        out.append((service_id, csr.public_bytes(serialization.Encoding.PEM).decode()))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client_context(home: Home) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(home.root_cert))


class Server:
    """A ``vcc-pki-server`` subprocess on 127.0.0.1:<free port>; its log goes to a file."""

    def __init__(self, home: Home, *, workers: int = 1, log_level: str = "info",
                 extra: Sequence[str] = (), database_url: str | None = None) -> None:
        self.home = home
        self.workers = workers
        self.database_url = database_url  # PostgreSQL (the home's SQLite file without one)
        self.port = free_port()
        self.log_path = Path(home.root).parent / f"server-{self.port}.log"
        self.args = [str(BIN / "vcc-pki-server"), "--home", str(home.root), "--host", "127.0.0.1",
                     "--port", str(self.port), "--workers", str(workers), "--log-level", log_level,
                     *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VCC_PKI_")}
        env["VCC_PKI_CA_PASSWORD"] = CA_PASSWORD
        if self.database_url:
            env["VCC_PKI_DATABASE_URL"] = self.database_url
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        ctx = client_context(self.home)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                status, _ = http_request(self.port, ctx, "GET", "/health")
                if status == 200 and len(self.pids()) >= 1 + (self.workers if self.workers > 1 else 0):
                    time.sleep(0.3)  # let every worker finish its start-up
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def pids(self) -> list[int]:
        """The server process and its workers (forked children)."""
        assert self.proc is not None
        return [self.proc.pid, *children(self.proc.pid)]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) seconds of all server processes."""
        splits = [cpu_split(pid) for pid in self.pids()]
        return sum(u for u, _ in splits), sum(s for _, s in splits)

    def rss_mb(self) -> dict[int, float]:
        """Resident memory of each serving process (the workers, or the one process)."""
        pids = self.pids()
        serving = pids[1:] if len(pids) > 1 else pids
        return {pid: rss_mb(pid) for pid in serving}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def new_postgres_database(admin_url: str) -> str:
    """A new empty database in the PostgreSQL cluster of ``admin_url``; its URL."""
    import uuid

    import psycopg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def postgres_processes(url: str) -> list[int]:
    """The postmaster of ``url``'s cluster (on this machine) and every process it started."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    postmaster = int((Path(row[0]) / "postmaster.pid").read_text().split()[0])
    return [postmaster, *children(postmaster)]


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a live process, in seconds (10 ms resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    # After the command name: state is fields[0]; utime, stime are stat fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, in seconds (10 ms resolution)."""
    return sum(cpu_split(pid))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def http_request(port: int, ctx: ssl.SSLContext, method: str, path: str, *, body: bytes = b"",
                 headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    """One blocking HTTP/1.1 request over a fresh TLS connection (for set-up and slow timings)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(encode_request(method, path, body=body, headers=headers, close=True))
            return read_response(sock.makefile("rb"))


def encode_request(method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None,
                   close: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(stream: Any) -> tuple[int, bytes]:
    status_line = stream.readline()
    if not status_line:
        raise ConnectionError("connection closed before a response")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = stream.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return status, stream.read(length) if length else b""


class KeepAlive:
    """One blocking keep-alive TLS connection: sequential requests with per-request timing."""

    def __init__(self, port: int, ctx: ssl.SSLContext, timeout: float = 60.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.stream = self.sock.makefile("rb")

    def request(self, method: str, path: str, *, body: bytes = b"",
                headers: dict[str, str] | None = None) -> tuple[int, bytes, float]:
        start = time.perf_counter()
        self.sock.sendall(encode_request(method, path, body=body, headers=headers))
        status, data = read_response(self.stream)
        return status, data, time.perf_counter() - start

    def close(self) -> None:
        self.stream.close()
        self.sock.close()

    def __enter__(self) -> KeepAlive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import cryptography
    import starlette
    import uvicorn

    versions: dict[str, str | None] = {"python": platform.python_version(), "cryptography": cryptography.__version__,
                "uvicorn": uvicorn.__version__, "starlette": starlette.__version__}
    for name in ("httptools", "uvloop"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg(), "versions": versions}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (what the benchmarks print and docs/performance.md carries)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.1f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.rjust(w) if isinstance(v, (int, float)) else c.ljust(w)
                              for c, w, v in zip(r, widths, row, strict=True)) + " |"
            for r, row in zip(text, rows, strict=True)]
    return "\n".join(out)


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{name}-{stamp}.json"
    data = {"benchmark": name, "at": stamp, "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def populate(home: Home, count: int, *, validity_spread: bool = True, services: Sequence[str] = SERVICES,
             report: Any = None) -> list[tuple[str, str]]:
    """Sign ``count`` real leaf certificates with the home's CA (in-process, P-256 keys made
    here) for ``services`` (registered) in turn, and record them in chunks of 1,000 per
    transaction. Lifetimes are spread over 1..365 days so that expiry filters select a share.
    Returns ``(service_id, serial)``."""
    from datetime import timedelta

    from vcc_pki_server.ca import LeafTemplate
    from vcc_pki_server.store import CertificateRecord
    from vcc_pki_server.store.sql import SQLStore

    authority = open_authority(home)
    store = authority.store
    assert isinstance(store, SQLStore)
    ca = authority.ca
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(64)]
    now = datetime.now(timezone.utc)
    out: list[tuple[str, str]] = []
    chunk: list[tuple[CertificateRecord, str]] = []
    try:
        for i in range(count):
            service_id = services[i % len(services)]
            names = san_names(service_id)
            days = (i % 365) + 1 if validity_spread else 365
            template = LeafTemplate(common_name=names[0], san_dns=tuple(names[:2]), san_ip=(),
                                    not_before=now - timedelta(minutes=5),
                                    not_after=now + timedelta(days=days))
            cert = ca.sign_leaf(keys[i % len(keys)], template)
            record = CertificateRecord.from_cert(service_id, cert, issued_at=now,
                                                 sans=(template.san_dns, template.san_ip))
            chunk.append((record, "bench-populate"))
            out.append((service_id, record.serial))
            if len(chunk) == 1000:
                store.add_certificates(chunk)
                chunk = []
                if report and (i + 1) % 20000 == 0:
                    report(f"  populated {i + 1:,} certificates")
        if chunk:
            store.add_certificates(chunk)
    finally:
        authority.store.close()
    return out


def revoke_directly(home: Home, serials: Sequence[str], reason: str = "superseded") -> None:
    """Mark ``serials`` revoked in one transaction (benchmark set-up, not the API path: the
    timed revocation goes through the API)."""
    from vcc_pki_server.store import utc_text
    from vcc_pki_server.store.sql import INSERT_REVOCATION
    from vcc_pki_server.store.sqlite import SQLiteStore

    store = SQLiteStore(home.db)
    at = utc_text(datetime.now(timezone.utc))
    try:
        with store._write() as db:
            db.executemany(INSERT_REVOCATION, [(s, at, reason, s) for s in serials])
    finally:
        store.close()
