"""Where a loaded server's CPU goes, thread by thread: the event loop and the group commit.

    python -m benchmarks.threads [--workers 2] [--requests 8000] [--runs 2] [--key ec-p256]

A real ``vcc-pki-server`` on a fresh home, P-256 CSRs at concurrency 32 from
:mod:`benchmarks.loadgen` (as in :mod:`benchmarks.issuance`); for every thread of the server
and its workers, user and kernel CPU per certificate and context switches per certificate
(voluntary: it waited; involuntary: it was preempted), from ``/proc/<pid>/task/<tid>``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from . import loadgen
from .common import CLK_TCK, Server, admin_token, build_home, make_csrs
from .issuance import requests_for

Sample = tuple[float, float, int, int]  # user s, system s, voluntary, involuntary switches


def thread_samples(pids: list[int]) -> dict[tuple[int, int, str], Sample]:
    out: dict[tuple[int, int, str], Sample] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    switches = [int(line.split()[1]) for line in f if "ctxt_switches" in line]
            except OSError:
                continue
            name = stat.split("(", 1)[1].rsplit(")", 1)[0]
            fields = stat.rsplit(")", 1)[1].split()
            out[(pid, int(tid), name)] = (int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK,
                                          switches[0], switches[1])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.threads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--key", default="ec-p256")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vcc-bench-threads-"))
    home = build_home(work / "home", intermediate=args.key)
    token = admin_token(home)
    csrs = make_csrs(2000)
    with Server(home, workers=args.workers) as server:
        cafile = str(home.root_cert)
        loadgen.run(server.port, cafile, requests_for(csrs, token, 300, 0), concurrency=8, expected=201)
        for run in range(args.runs):
            before = thread_samples(server.pids())
            result = loadgen.run(server.port, cafile,
                                 requests_for(csrs, token, args.requests, 300 + run * args.requests),
                                 concurrency=32, expected=201)
            after = thread_samples(server.pids())
            n = result["statuses"].get("201", 0)
            total = 0.0
            lines = []
            for key, (user, system, vol, invol) in sorted(after.items()):
                user0, system0, vol0, invol0 = before.get(key, (0.0, 0.0, 0, 0))
                cpu = (user - user0) + (system - system0)
                total += cpu
                if cpu > 0:
                    pid, tid, _ = key
                    role = "event loop" if pid == tid else "other thread (group commit, health)"
                    lines.append(f"  pid {pid} tid {tid:<7} {role:<36} user {(user - user0) / n * 1000:.3f} "
                                 f"kernel {(system - system0) / n * 1000:.3f} ms/cert; switches "
                                 f"{(vol - vol0) / n:.2f} voluntary, {(invol - invol0) / n:.2f} involuntary")
            print(f"run {run + 1}: {n:,} certificates, {n / result['wall']:,.0f}/s, "
                  f"server {total / n * 1000:.3f} ms/cert")
            print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
