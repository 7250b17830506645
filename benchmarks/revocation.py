"""Revocation: CRL generation with 1k / 10k / 100k revoked certificates, one revocation over
the API with 100k already revoked (request to response, CRL regenerated before the answer),
``GET /api/v1/crl`` latency served from the stored copy, and CRL hygiene: the same after
90 % of those revoked certificates have expired (they leave the CRL).

The store is filled with real certificates signed in-process by the home's CA (EC P-256
intermediate); the revocations before the timed ones are written directly in one transaction
(set-up); the timed revocations go through ``DELETE /api/v1/certificates/{id}/revoke``
(reason superseded: the benchmark's certificates share 64 keys, and keyCompromise would
revoke every certificate of the key). Expiry is set-up too: ``not_after`` of 90 % of the
revoked rows is moved into the past in the store, which is what the CRL builder reads.

    python -m benchmarks.revocation [--quick] [--runs 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from vcc_pki_server.authority import Actor
from vcc_pki_server.store.sql import SQLStore

from .common import (
    KeepAlive,
    Server,
    admin_token,
    build_home,
    client_context,
    median,
    open_authority,
    percentile,
    populate,
    revoke_directly,
    table,
    write_result,
)


def crl_generation(home: Any, revoked: int, runs: int) -> dict[str, float]:
    """Seconds to build + sign + DER-encode a CRL of ``revoked`` entries (``build_crl`` alone)
    and to generate and store one through the authority (store read + build + store write)."""
    authority = open_authority(home)
    try:
        now = datetime.now(timezone.utc)
        store = authority.store
        assert isinstance(store, SQLStore)
        entries = [(int(s, 16), at, reason) for s, at, reason in store.revoked()]
        assert len(entries) == revoked, (len(entries), revoked)
        build, generate = [], []
        crl_bytes = 0
        for _ in range(runs):
            start = time.perf_counter()
            authority.ca.build_crl(entries, number=1, this_update=now, next_update=now + timedelta(days=7))
            build.append(time.perf_counter() - start)
            start = time.perf_counter()
            crl = authority.generate_crl(actor=Actor.operator())
            generate.append(time.perf_counter() - start)
            assert crl.entries == revoked
            crl_bytes = len(crl.der)
        return {"entries": revoked, "build_s": median(build), "generate_s": median(generate),
                "crl_bytes": crl_bytes}
    finally:
        authority.store.close()


def hygiene(home: Any, token: str, revoked: list[str], spare: list[tuple[str, str]], revocations: int,
            runs: int) -> dict[str, Any]:
    """90 % of ``revoked`` expire (set-up: their ``not_after`` moves into the past); then the
    CRL is generated (timed) and ``revocations`` more certificates are revoked over the API."""
    from vcc_pki_server.store.sqlite import SQLiteStore

    expired = revoked[: len(revoked) * 9 // 10]
    store = SQLiteStore(home.db)
    try:
        bytes_before = len(store.latest_crl().der)  # type: ignore[union-attr]
        with store._write() as db:
            for table in ("certificates", "revocations"):
                db.executemany(f"UPDATE {table} SET not_after = '2026-01-01T00:00:00Z' WHERE serial = ?",
                               [(s,) for s in expired])
    finally:
        store.close()
    authority = open_authority(home)
    try:
        generate = []
        crl = authority.generate_crl(actor=Actor.operator())  # warm-up (and a CRL whatever runs is)
        for _ in range(runs):
            start = time.perf_counter()
            crl = authority.generate_crl(actor=Actor.operator())
            generate.append(time.perf_counter() - start)
    finally:
        authority.store.close()
    timings = []
    with Server(home) as server, KeepAlive(server.port, client_context(home)) as conn:
        for service_id, serial in spare[:revocations]:
            status, body, seconds = conn.request(
                "DELETE", f"/api/v1/certificates/{service_id}/revoke?reason=superseded&serial={serial}",
                headers={"Authorization": f"Bearer {token}"})
            if status != 200:
                raise RuntimeError(f"revocation answered {status}: {body[:300]!r}")
            timings.append(seconds)
        status, body, _ = conn.request("GET", "/api/v1/crl")
    print(f"  hygiene: {len(expired):,} of {len(revoked):,} revoked expired: CRL of {crl.entries:,} entries, "
          f"{len(crl.der):,} bytes (was {bytes_before:,}); generate+store {median(generate) * 1000:.1f} ms; "
          f"one revocation {median(timings) * 1000:.1f} ms; served CRL {len(body):,} bytes", flush=True)
    return {"revoked": len(revoked), "expired": len(expired), "entries": crl.entries, "crl_bytes": len(crl.der),
            "bytes_before": bytes_before, "generate_s": median(generate), "revocation_s": timings,
            "served_crl_bytes": len(body)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.revocation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10k certificates at most")
    parser.add_argument("--runs", type=int, default=None, help="repetitions per measurement (default 3, quick 1)")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    sizes = [1000, 10000] if args.quick else [1000, 10000, 100000]
    top = sizes[-1]
    revocations = 3 if args.quick else 5
    work = Path(tempfile.mkdtemp(prefix="vcc-bench-revocation-"))
    try:
        home = build_home(work / "home")
        token = admin_token(home)
        print(f"revocation: signing and storing {top + 50:,} certificates ...", flush=True)
        certs = populate(home, top + 50, report=lambda m: print(m, flush=True))
        generation = []
        done = 0
        for size in sizes:
            revoke_directly(home, [serial for _, serial in certs[done:size]])
            done = size
            result = crl_generation(home, size, runs)
            generation.append(result)
            print(f"  CRL of {size:>7,} entries: build+sign {result['build_s'] * 1000:8.1f} ms, "
                  f"generate+store {result['generate_s'] * 1000:8.1f} ms, {result['crl_bytes']:,} bytes",
                  flush=True)
        timings = []
        crl_latency: dict[str, Any] = {}
        with Server(home) as server:
            ctx = client_context(home)
            headers = {"Authorization": f"Bearer {token}"}
            with KeepAlive(server.port, ctx) as conn:
                for service_id, serial in certs[top:top + revocations]:
                    status, body, seconds = conn.request(
                        "DELETE", f"/api/v1/certificates/{service_id}/revoke?reason=superseded&serial={serial}",
                        headers=headers)
                    if status != 200:
                        raise RuntimeError(f"revocation answered {status}: {body[:300]!r}")
                    timings.append(seconds)
                    print(f"  revoke 1 with {top + len(timings) - 1:,} already revoked: {seconds * 1000:7.1f} ms",
                          flush=True)
                # The CRL the last revocation stored, served from the cached copy.
                for fmt, query in (("der", ""), ("pem", "?format=pem")):
                    lat = []
                    size = 0
                    for _ in range(20):  # warm-up
                        conn.request("GET", f"/api/v1/crl{query}")
                    for _ in range(100 if args.quick else 300):
                        status, body, seconds = conn.request("GET", f"/api/v1/crl{query}")
                        assert status == 200
                        size = len(body)
                        lat.append(seconds)
                    crl_latency[fmt] = {"p50_ms": percentile(lat, 50) * 1000,
                                        "p99_ms": percentile(lat, 99) * 1000, "bytes": size,
                                        "requests": len(lat)}
                    print(f"  GET /api/v1/crl{query or ' (DER)'}: p50 {crl_latency[fmt]['p50_ms']:.2f} ms, "
                          f"p99 {crl_latency[fmt]['p99_ms']:.2f} ms, {size:,} bytes", flush=True)
        clean = hygiene(home, token, [serial for _, serial in certs[:top]], certs[top + revocations:],
                        revocations, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("CRL generation (median of %d)" % runs)
    print(table(["revoked entries", "build + sign ms", "generate + store ms", "CRL bytes"],
                [[g["entries"], g["build_s"] * 1000, g["generate_s"] * 1000, g["crl_bytes"]]
                 for g in generation]))
    print()
    der, pem = crl_latency["der"], crl_latency["pem"]
    print(table(["measure", "value"], [
        [f"one revocation, {top:,} already revoked (median of {len(timings)})", f"{median(timings) * 1000:.1f} ms"],
        ["  worst of them", f"{max(timings) * 1000:.1f} ms"],
        ["GET /api/v1/crl (DER) p50 / p99", f"{der['p50_ms']:.2f} / {der['p99_ms']:.2f} ms"],
        ["GET /api/v1/crl?format=pem p50 / p99", f"{pem['p50_ms']:.2f} / {pem['p99_ms']:.2f} ms"],
        [f"after {clean['expired']:,} of {clean['revoked']:,} revoked expired: CRL entries",
         f"{clean['entries']:,} ({clean['crl_bytes']:,} bytes, was {clean['bytes_before']:,})"],
        ["  generate + store that CRL", f"{clean['generate_s'] * 1000:.1f} ms"],
        [f"  one revocation then (median of {len(clean['revocation_s'])})",
         f"{median(clean['revocation_s']) * 1000:.1f} ms"],
    ]))
    data = {"runs": runs, "quick": args.quick, "generation": generation,
            "revocation_s": timings, "revocation_median_s": median(timings), "crl_get": crl_latency,
            "hygiene": clean}
    path = write_result("revocation", data)
    print(f"\nresults: {path}")
    return data


if __name__ == "__main__":
    main()
