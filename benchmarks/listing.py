"""Listing: ``GET /api/v1/certificates/`` pages (limit 100) with 100k certificates in the store.

Real certificates (signed in-process by the home's CA, lifetimes spread over 1..365 days) are
stored first; then, over one keep-alive TLS connection with an admin token, timed one by one:

- the first page and the pages after it, following ``next_cursor``;
- pages starting at random cursors across the whole table;
- ``?expiring_within_days=30`` (about 8 % of the certificates), following ``next_cursor``;
- ``?service_id=...`` and ``?status=valid`` pages;
- worst cases: ``?status=revoked`` and ``?status=expired`` when nothing matches.

    python -m benchmarks.listing [--quick] [--count 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .common import (
    SERVICES,
    KeepAlive,
    Server,
    admin_token,
    build_home,
    client_context,
    percentile,
    populate,
    table,
    write_result,
)


def walk(conn: KeepAlive, headers: dict[str, str], query: str, pages: int,
         cursors: list[int] | None = None) -> dict[str, Any]:
    """Time ``pages`` page requests: following next_cursor, or at the given cursors."""
    lat: list[float] = []
    items = 0
    cursor: str | None = None
    for i in range(pages):
        q = query
        start_at = cursors[i] if cursors else cursor
        if start_at is not None:
            q += f"&cursor={start_at}"
        status, body, seconds = conn.request("GET", f"/api/v1/certificates/?limit=100{q}", headers=headers)
        if status != 200:
            raise RuntimeError(f"listing answered {status}: {body[:300]!r}")
        page = json.loads(body)
        lat.append(seconds)
        items += len(page["items"])
        cursor = page["next_cursor"]
        if cursor is None and not cursors:
            cursor = None  # wrapped around: start again at the first page
    return {"pages": len(lat), "items": items, "p50_ms": percentile(lat, 50) * 1000,
            "p99_ms": percentile(lat, 99) * 1000, "max_ms": max(lat) * 1000}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.listing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10k certificates, fewer pages")
    parser.add_argument("--count", type=int, default=None, help="certificates in the store (default 100000)")
    args = parser.parse_args(argv)
    count = args.count or (10000 if args.quick else 100000)
    pages = 50 if args.quick else 300
    work = Path(tempfile.mkdtemp(prefix="vcc-bench-listing-"))
    rng = random.Random(7)
    try:
        home = build_home(work / "home")
        token = admin_token(home)
        print(f"listing: signing and storing {count:,} certificates ...", flush=True)
        populate(home, count, report=lambda m: print(m, flush=True))
        headers = {"Authorization": f"Bearer {token}"}
        results: dict[str, Any] = {}
        with Server(home) as server, KeepAlive(server.port, client_context(home)) as conn:
            walk(conn, headers, "", 20)  # warm-up
            cases = [
                ("first pages, following next_cursor", "", None),
                ("pages at random cursors", "", [rng.randrange(1, count) for _ in range(pages)]),
                ("?expiring_within_days=30, following next_cursor", "&expiring_within_days=30", None),
                ("?expiring_within_days=30 at random cursors", "&expiring_within_days=30",
                 [rng.randrange(1, count) for _ in range(pages)]),
                (f"?service_id={SERVICES[1]}", f"&service_id={SERVICES[1]}", None),
                ("?status=valid", "&status=valid", None),
                # Worst cases: nothing matches, so a page scans the whole table to say so.
                ("?status=revoked (none revoked)", "&status=revoked", None),
                ("?status=expired (none expired)", "&status=expired", None),
            ]
            for label, query, cursors in cases:
                r = walk(conn, headers, query, pages, cursors)
                results[label] = r
                print(f"  {label:50s} p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                      f"({r['pages']} pages, {r['items']:,} items)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"GET /api/v1/certificates/?limit=100 with {count:,} certificates (one keep-alive connection)")
    print(table(["query", "pages", "p50 ms", "p99 ms"],
                [[label, r["pages"], r["p50_ms"], r["p99_ms"]] for label, r in results.items()]))
    data = {"count": count, "quick": args.quick, "results": results}
    path = write_result("listing", data)
    print(f"\nresults: {path}")
    return data


if __name__ == "__main__":
    main()
