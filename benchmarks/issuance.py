"""Issuance over HTTPS: certs/s, p50/p99 latency and server CPU per certificate, against the
same work done in-process without HTTP.

For each intermediate key type (EC P-256, RSA-2048) and ``--workers`` 1 and 2, a real
``vcc-pki-server`` is started on a fresh home; pre-generated P-256 CSRs (client key generation
excluded) are sent as ``POST /api/v1/certificates/request`` with an admin bearer token (the
server authenticates every request) by :mod:`benchmarks.loadgen` in its own process, over TLS
with keep-alive, at concurrency 1, 8 and 32, a fixed number of requests each. Every answer
must be 201; after the server stops, the store must hold every certificate answered (each was
committed before its response).

In the same run, the in-process rate of the bare pipeline (parse + verify the CSR, build, sign,
PEM) with the same CA key, on one core, and the ratio HTTPS / in-process.

    python -m benchmarks.issuance [--quick] [--runs 3] [--keys ec-p256,rsa-2048] [--workers 1,2]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres [--backends sqlite,postgres]]

With ``--postgres`` each configuration runs on SQLite and on PostgreSQL in turn (side by side in
one run), and the PostgreSQL processes' CPU per certificate is reported beside the server's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vcc_pki_server.ca import LeafTemplate
from vcc_pki_server.policy import csr_names

from . import loadgen
from .common import (
    Server,
    admin_token,
    build_home,
    cpu_seconds,
    make_csrs,
    median,
    new_postgres_database,
    open_authority,
    percentile,
    postgres_processes,
    table,
    write_result,
)

PATH = "/api/v1/certificates/request"


def inprocess(home: Any, csrs: list[tuple[str, str]], *, repeats: int = 3) -> dict[str, float]:
    """Per-certificate CPU time of parse + verify CSR, build, sign, PEM, in this one thread."""
    authority = open_authority(home)
    ca = authority.ca
    authority.store.close()
    now = datetime.now(timezone.utc)
    raw = [pem.encode() for _, pem in csrs]

    def once() -> float:
        start = time.process_time()
        for data in raw:
            csr = x509.load_pem_x509_csr(data)
            if not csr.is_signature_valid:
                raise AssertionError("CSR signature invalid")
            cn, dns, ips, _ = csr_names(csr)
            template = LeafTemplate(common_name=cn or dns[0], san_dns=tuple(dns), san_ip=tuple(ips),
                                    not_before=now, not_after=now + timedelta(days=365))
            key = csr.public_key()
            assert isinstance(key, ec.EllipticCurvePublicKey)  # make_csrs: P-256
            ca.sign_leaf(key, template).public_bytes(serialization.Encoding.PEM)
        return (time.process_time() - start) / len(raw)

    once()  # warm-up
    per_cert = median(once() for _ in range(repeats))
    return {"ms_per_cert": per_cert * 1000, "certs_per_s": 1 / per_cert}


def requests_for(csrs: list[tuple[str, str]], token: str, count: int, offset: int) -> list[bytes]:
    out = []
    for i in range(count):
        service_id, csr = csrs[(offset + i) % len(csrs)]
        body = json.dumps({"service_id": service_id, "csr": csr}).encode()
        head = (f"POST {PATH} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        out.append(head.encode() + body)
    return out


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    lat = result["latencies"]
    n = result["requests"]
    return {
        "concurrency": result["concurrency"], "requests": n,
        "certs_per_s": n / result["wall"], "wall_s": result["wall"],
        "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
        "server_cpu_ms_per_cert": sum(result["server_cpu"]) / n * 1000,
        "server_user_ms_per_cert": result["server_cpu"][0] / n * 1000,
        "server_sys_ms_per_cert": result["server_cpu"][1] / n * 1000,
        "client_cpu_ms_per_req": result["client_cpu"] / n * 1000,
        "statuses": result["statuses"], "bad": result["bad"],
    }


def run_config(work: Path, key_type: str, workers: int, csrs: list[tuple[str, str]], *,
               counts: dict[int, int], runs: int, memory_target: int,
               postgres: str | None = None) -> dict[str, Any]:
    """One configuration; ``postgres``: the admin URL of a PostgreSQL cluster on this machine
    (a new database in it holds the store; its processes' CPU is measured too), else SQLite."""
    home_dir = work / f"{key_type}-w{workers}-{'pg' if postgres else 'sqlite'}"
    # The previous configuration (the 100,000-issuance memory run above all) leaves the kernel
    # a few hundred MB to write back; write it out before measuring this one.
    os.sync()
    time.sleep(1.0)
    database = new_postgres_database(postgres) if postgres else None
    if database:
        os.environ["VCC_PKI_DATABASE_URL"] = database  # build_home and the tokens: into PostgreSQL
    try:
        home = build_home(home_dir / "home", intermediate=key_type)
        token = admin_token(home)
        proc = inprocess(home, csrs[:min(len(csrs), 1500)])
    finally:
        os.environ.pop("VCC_PKI_DATABASE_URL", None)
    print(f"  in-process ({key_type}): {proc['ms_per_cert']:.3f} ms/cert = {proc['certs_per_s']:,.0f}/s",
          flush=True)
    answered = 0
    samples: dict[int, list[dict[str, Any]]] = {c: [] for c in counts}
    offset = 0
    backend = "postgres" if database else "sqlite"
    with Server(home, workers=workers, database_url=database) as server:
        cafile = str(home.root_cert)
        pg_pids = postgres_processes(database) if database else []
        # Warm-up: first connections, first code paths, SQLite page cache.
        warm = loadgen.run(server.port, cafile, requests_for(csrs, token, 300, offset),
                           concurrency=8, expected=201)
        answered += warm["statuses"].get("201", 0)
        for run in range(runs):
            for concurrency, count in counts.items():
                reqs = requests_for(csrs, token, count, offset)
                offset += count
                pg_before = _cpu_of(pg_pids)
                result = loadgen.run(server.port, cafile, reqs, concurrency=concurrency,
                                     expected=201, measure=server.cpu_split)
                answered += result["statuses"].get("201", 0)
                s = summarize(result)
                s["database_cpu_ms_per_cert"] = (_cpu_of(pg_pids) - pg_before) / count * 1000
                samples[concurrency].append(s)
                print(f"  {key_type} {backend} w{workers} run {run + 1} c{concurrency:<2}: "
                      f"{s['certs_per_s']:7,.0f} certs/s  p50 {s['p50_ms']:6.2f} ms  "
                      f"p99 {s['p99_ms']:6.2f} ms  server {s['server_cpu_ms_per_cert']:.3f} ms/cert "
                      f"(user {s['server_user_ms_per_cert']:.3f} sys {s['server_sys_ms_per_cert']:.3f})  "
                      f"client {s['client_cpu_ms_per_req']:.3f} ms/req  "
                      + (f"PostgreSQL {s['database_cpu_ms_per_cert']:.3f} ms/cert  " if database else "")
                      + f"{s['statuses']}", flush=True)
                if s["bad"]:
                    print(f"    unexpected answers: {s['bad']}", flush=True)
        rss_after_runs = server.rss_mb()
        memory: dict[str, Any] | None = None
        if memory_target and answered < memory_target:
            # Keep issuing (concurrency 32, in bounded chunks) until memory_target issuances.
            while answered < memory_target:
                chunk = min(20000, memory_target - answered)
                result = loadgen.run(server.port, cafile, requests_for(csrs, token, chunk, offset),
                                     concurrency=32, expected=201)
                offset += chunk
                answered += result["statuses"].get("201", 0)
                if result["statuses"].get("201", 0) != chunk:
                    break
            memory = {"issuances": answered, "rss_mb_per_worker": server.rss_mb()}
            print(f"  after {answered:,} issuances: RSS {memory['rss_mb_per_worker']} MB", flush=True)
    # Durability check: everything answered 201 is in the store (plus the server's own cert).
    count_sql = "SELECT COUNT(*) FROM certificates WHERE service_id LIKE 'bench-%'"
    if database:
        import psycopg

        with psycopg.connect(database) as conn:
            stored = conn.execute(count_sql).fetchone()[0]  # type: ignore[index]
    else:
        with sqlite3.connect(home.db) as db:
            stored = db.execute(count_sql).fetchone()[0]
    if stored != answered:
        raise AssertionError(f"{answered} certificates answered 201 but {stored} stored")
    medians = {}
    for concurrency, values in samples.items():
        medians[concurrency] = {k: median(v[k] for v in values) for k in
                                ("certs_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_cert",
                                 "server_user_ms_per_cert", "server_sys_ms_per_cert",
                                 "client_cpu_ms_per_req", "database_cpu_ms_per_cert")}
    shutil.rmtree(home_dir, ignore_errors=True)
    return {"key_type": key_type, "workers": workers, "backend": backend, "inprocess": proc, "samples": samples,
            "medians": medians, "stored": stored, "rss_mb_after_runs": rss_after_runs,
            "memory": memory}


def _cpu_of(pids: list[int]) -> float:
    """CPU seconds of the processes still alive among ``pids``."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # ended since
            total += cpu_seconds(pid)
    return total


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.issuance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer requests, one run")
    parser.add_argument("--runs", type=int, default=None, help="runs per configuration (default 3, quick 1)")
    parser.add_argument("--keys", default="ec-p256,rsa-2048")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--memory", type=int, default=None,
                        help="issue this many certificates on the first configuration and report RSS "
                             "(default 100000, quick 0)")
    parser.add_argument("--postgres", metavar="URL",
                        help="also run each configuration on PostgreSQL: the admin URL of a cluster on this "
                             "machine (a new database per configuration; its CPU is measured too)")
    parser.add_argument("--backends", default=None,
                        help="sqlite, postgres or both, in turn (default: sqlite; both with --postgres)")
    args = parser.parse_args(argv)
    backends = (args.backends or ("sqlite,postgres" if args.postgres else "sqlite")).split(",")
    if "postgres" in backends and not args.postgres:
        parser.error("--backends postgres needs --postgres URL")
    runs = args.runs or (1 if args.quick else 3)
    base = {1: 1000, 8: 4000, 32: 8000} if not args.quick else {1: 200, 8: 800, 32: 1500}
    counts = {int(c): base.get(int(c), base[32]) for c in args.concurrency.split(",")}
    memory = args.memory if args.memory is not None else (0 if args.quick else 100_000)
    work = Path(tempfile.mkdtemp(prefix="vcc-bench-issuance-"))
    print("issuance: generating CSRs ...", flush=True)
    csrs = make_csrs(2000 if not args.quick else 500)
    configs = []
    try:
        first = True
        for key_type in args.keys.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                for backend in backends:
                    print(f"issuance: {key_type} intermediate, {backend}, --workers {workers}", flush=True)
                    configs.append(run_config(work, key_type, workers, csrs, counts=counts, runs=runs,
                                              memory_target=memory if first else 0,
                                              postgres=args.postgres if backend == "postgres" else None))
                    first = False
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The in-process rate is measured once per configuration and moves with what else the
    # machine does; the ratio uses the best (highest) one of each key type: the strict reading.
    best: dict[str, float] = {}
    for cfg in configs:
        best[cfg["key_type"]] = max(best.get(cfg["key_type"], 0.0), cfg["inprocess"]["certs_per_s"])
    rows = []
    for cfg in configs:
        ip = best[cfg["key_type"]]
        for concurrency, m in cfg["medians"].items():
            rows.append([cfg["key_type"], cfg["backend"], cfg["workers"], concurrency, m["certs_per_s"],
                         m["p50_ms"], m["p99_ms"], m["server_cpu_ms_per_cert"],
                         m["database_cpu_ms_per_cert"] if cfg["backend"] == "postgres" else "-",
                         m["client_cpu_ms_per_req"], ip, f"{m['certs_per_s'] / ip * 100:.0f} %"])
    print()
    print(f"issuance over HTTPS (medians of {runs} run(s); server CPU = all server processes)")
    print(table(["CA key", "store", "workers", "conc.", "certs/s", "p50 ms", "p99 ms", "server CPU ms/cert",
                 "PostgreSQL CPU ms/cert", "client CPU ms/req", "in-process certs/s (1 core)",
                 "HTTPS / in-process"], rows))
    for cfg in configs:
        if cfg["memory"]:
            print(f"\nRSS per worker after {cfg['memory']['issuances']:,} issuances "
                  f"({cfg['key_type']}, --workers {cfg['workers']}): "
                  + ", ".join(f"{v:.0f} MB" for v in cfg["memory"]["rss_mb_per_worker"].values()))
    data = {"runs": runs, "quick": args.quick, "counts": counts, "configs": configs, "table": rows,
            "inprocess_best": best}
    path = write_result("issuance", data)
    print(f"\nresults: {path}")
    return data


if __name__ == "__main__":
    main()
