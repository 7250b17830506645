"""Metrics scrape: ``GET /metrics`` with 100k certificates in the store (issue 12: under 50 ms).

Real certificates (signed in-process by the home's CA) for ``--services`` registered services,
10 % of them revoked, then over one keep-alive TLS connection with a metrics token, scrapes
timed one by one against a ``--workers 2`` server (the figures of both workers summed), and the
exposition's size. Also in-process: the whole exposition, and the store's two queries alone.

    python -m benchmarks.metrics [--quick] [--count 100000] [--services 1000]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vcc_pki_server.authority import Actor
from vcc_pki_server.metrics import Metrics

from .common import (
    KeepAlive,
    Server,
    build_home,
    client_context,
    open_authority,
    percentile,
    populate,
    revoke_directly,
    san_names,
    table,
    write_result,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10k certificates, 100 services")
    parser.add_argument("--count", type=int, default=None, help="certificates in the store (default 100000)")
    parser.add_argument("--services", type=int, default=None, help="registered services (default 1000)")
    parser.add_argument("--scrapes", type=int, default=50, help="timed scrapes (default 50)")
    parser.add_argument("--profile", action="store_true", help="print a profile of the in-process exposition")
    args = parser.parse_args(argv)
    count = args.count or (10000 if args.quick else 100000)
    n_services = args.services or (100 if args.quick else 1000)
    work = Path(tempfile.mkdtemp(prefix="vcc-bench-metrics-"))
    rng = random.Random(7)
    try:
        home = build_home(work / "home")
        services = [f"fleet-{i:05d}" for i in range(n_services)]
        authority = open_authority(home)
        try:
            for sid in services:
                authority.register_service(sid, san_dns=san_names(sid), actor=Actor.operator())
            token = authority.create_admin_token(name="bench", expires_days=1, actor=Actor.operator(),
                                                 scope="metrics").value
        finally:
            authority.store.close()
        print(f"metrics: signing and storing {count:,} certificates for {n_services:,} services ...", flush=True)
        issued = populate(home, count, services=services, report=lambda m: print(m, flush=True))
        revoke_directly(home, [serial for _, serial in rng.sample(issued, count // 10)])

        authority = open_authority(home)
        try:
            store_ms, render_ms = [], []
            metrics = Metrics(authority)
            for _ in range(args.scrapes):
                start = time.perf_counter()
                authority.store.fleet(datetime.now(timezone.utc))
                authority.store.revocation_counts()
                store_ms.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                metrics.exposition()
                render_ms.append((time.perf_counter() - start) * 1000)
            if args.profile:
                import cProfile
                import pstats
                profile = cProfile.Profile()
                profile.runcall(lambda: [metrics.exposition() for _ in range(10)])
                pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
        finally:
            authority.store.close()

        headers = {"Authorization": f"Bearer {token}"}
        with Server(home, workers=2) as server, KeepAlive(server.port, client_context(home)) as conn:
            for _ in range(5):  # warm-up
                conn.request("GET", "/metrics", headers=headers)
            lat: list[float] = []
            body = b""
            for _ in range(args.scrapes):
                status, body, seconds = conn.request("GET", "/metrics", headers=headers)
                if status != 200:
                    raise RuntimeError(f"/metrics answered {status}: {body[:300]!r}")
                lat.append(seconds)
            size, lines = len(body), body.count(b"\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"count": count, "services": n_services, "revoked": count // 10, "scrapes": len(lat),
              "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
              "max_ms": max(lat) * 1000, "store_p50_ms": percentile(store_ms, 50),
              "in_process_p50_ms": percentile(render_ms, 50),
              "bytes": size, "lines": lines, "quick": args.quick}
    print()
    print(f"GET /metrics, {count:,} certificates, {n_services:,} services, {count // 10:,} revoked, --workers 2")
    print(table(["scrapes", "p50 ms", "p99 ms", "max ms", "in-process p50 ms", "of which store queries",
                 "size KB", "lines"],
                [[len(lat), result["p50_ms"], result["p99_ms"], result["max_ms"], result["in_process_p50_ms"],
                  result["store_p50_ms"], size / 1024, lines]]))
    path = write_result("metrics", result)
    print(f"\nresults: {path}")
    return result


if __name__ == "__main__":
    main()
