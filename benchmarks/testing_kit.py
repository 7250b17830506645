"""What the testing kit costs a user's suite: the ``vcc_pki`` session fixture's start and stop,
and one more enrolled service (``vcc_pki_service``), beside trustme in the same run.

The kit's figures are for what the fixtures do (vcc_pki_server.testing.running_pki and
LocalPKI.client + register + enroll): a real server in a thread over a new EC CA home, and a
service registered, its key made, its CSR signed over HTTPS, its files written. trustme's are
for what it offers instead: a throwaway CA in memory (``trustme.CA()``) and a leaf for one name
(``ca.issue_cert``) — no server, no renewal, no revocation, no discovery. Each figure is the
median of ``--sessions`` sessions (enrolments: of every enrolment in them). Needs trustme
(``pip install trustme``) for its column; without it, the kit's figures alone.

    python -m benchmarks.testing_kit [--sessions 5] [--services 20]
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from pathlib import Path
from typing import Any

from vcc_pki_server.testing import running_pki

from .common import median, table, write_result


def kit_session(services: int) -> tuple[float, float, list[float]]:
    """Seconds to start the session's server, to stop it, and for each enrolment in it."""
    with tempfile.TemporaryDirectory(prefix="vcc-bench-kit-") as folder:
        started = time.perf_counter()
        session = running_pki(Path(folder))
        pki = session.__enter__()
        start = time.perf_counter() - started
        enrolments = []
        try:
            for i in range(services):
                began = time.perf_counter()
                client = pki.client(f"svc-{i}", Path(folder) / f"svc-{i}")
                client.enroll(pki.register(f"svc-{i}"))
                enrolments.append(time.perf_counter() - began)
        finally:
            stopping = time.perf_counter()
            session.__exit__(None, None, None)
            stop = time.perf_counter() - stopping
    return start, stop, enrolments


def trustme_session(services: int) -> tuple[float, list[float]] | None:
    try:  # not a dependency of the project: installed by hand for the comparison
        trustme: Any = importlib.import_module("trustme")
    except ImportError:
        return None
    started = time.perf_counter()
    ca = trustme.CA()
    start = time.perf_counter() - started
    leaves = []
    for i in range(services):
        began = time.perf_counter()
        ca.issue_cert(f"svc-{i}.example", "localhost")
        leaves.append(time.perf_counter() - began)
    return start, leaves


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.testing_kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=5, help="fixture sessions (and trustme CAs)")
    parser.add_argument("--services", type=int, default=20, help="services enrolled per session")
    args = parser.parse_args(argv)
    starts, stops, enrolments, t_starts, t_leaves = [], [], [], [], []
    for _ in range(args.sessions):  # alternating, so drift hits both alike
        start, stop, each = kit_session(args.services)
        starts.append(start)
        stops.append(stop)
        enrolments += each
        other = trustme_session(args.services)
        if other is not None:
            t_starts.append(other[0])
            t_leaves += other[1]
    ms = 1000.0
    rows = [["session start (CA made, server serving)", median(starts) * ms,
             median(t_starts) * ms if t_starts else "not installed"],
            ["session stop", median(stops) * ms, "-"],
            ["one more enrolled service", median(enrolments) * ms,
             median(t_leaves) * ms if t_leaves else "not installed"]]
    print(table(["median, ms", "vcc_pki fixtures", "trustme"], rows))
    result = {"sessions": args.sessions, "services": args.services, "start_ms": median(starts) * ms,
              "stop_ms": median(stops) * ms, "max_stop_ms": max(stops) * ms,
              "enrol_ms": median(enrolments) * ms,
              "trustme_ca_ms": median(t_starts) * ms if t_starts else None,
              "trustme_leaf_ms": median(t_leaves) * ms if t_leaves else None}
    print(f"written {write_result('testing_kit', result)}")
    return result


if __name__ == "__main__":
    main()
