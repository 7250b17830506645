"""Where the server's time goes during issuance: py-spy samples a worker under a concurrency-32 load.

    python -m benchmarks.profile [--key ec-p256] [--requests 6000] [--native]

Needs ``py-spy`` (``pip install py-spy``; root or ptrace permission). Writes the collapsed
stacks and a flame graph to benchmarks/results/ and prints the top functions by own time
and by inclusive time (share of samples).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from . import loadgen
from .common import RESULTS, Server, admin_token, build_home, make_csrs
from .issuance import requests_for

# Where an issuance's time goes, by the function that owns it (first match from the leaf up).
COMPONENTS = (
    ("CSR parse + signature check", ("load_csr_key",)),
    ("policy (CSR names, allow-list)", ("Policy.template",)),
    ("sign the certificate", ("CertificateAuthority.sign_leaf",)),
    ("record + rows for the store", ("Authority._issued", "PendingCertificate.__init__")),
    ("authenticate (token lookup)", ("authenticate", "authenticate_scope")),
    ("service lookup", ("Authority.service",)),
    ("hand over to group commit", ("GroupCommit.submit", "_Mailbox.post", "_Mailbox._deliver", "Issuer.issue")),
    ("logging (access + issuance lines)", ("Logger.info", "Logger._log")),
    ("read + parse the JSON body", ("read_body", "read_json", "parse_json_body")),
    ("render + JSON response", ("issued", "JSONResponse.__init__", "JSONEncoder.encode")),
    ("send the response (TLS + socket)", ("RequestResponseCycle.send", "CoalescingTransport._flush")),
    ("HTTP parsing (httptools callbacks)", ("HttpToolsProtocol.data_received",)),
    ("edge + router + handler glue", ("Edge.__call__", "Router.__call__", "RequestCertificate.__call__",
                                               "RequestResponseCycle.run_asgi")),
)


def breakdown(collapsed: Path) -> str:
    """Shares of the event-loop thread's GIL-holding samples, by component."""
    from collections import Counter

    shares: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "MainThread" not in stack.split(";", 1)[0]:
            continue
        n = int(count)
        total += n
        names = [frame.split(" (")[0] for frame in stack.split(";")]
        for label, owners in COMPONENTS:
            if any(name in owners for name in names):
                shares[label] += n
                break
        else:
            shares["event loop, other"] += n
    lines = [f"event-loop thread, {total} samples:"]
    lines += [f"  {n / total * 100:5.1f} %  {label}" for label, n in shares.most_common()]
    return "\n".join(lines)


def summarize(collapsed: Path, top: int = 25) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"  {n / total * 100:5.1f} %  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {n / total * 100:5.1f} %  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key", default="ec-p256")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--native", action="store_true", help="include native (C/Rust) frames")
    parser.add_argument("--all-threads", action="store_true",
                        help="sample every running thread, not only the one holding the GIL")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="vcc-bench-profile-"))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    collapsed = RESULTS / f"profile-{args.key}-{stamp}.txt"
    try:
        home = build_home(work / "home", intermediate=args.key)
        token = admin_token(home)
        csrs = make_csrs(1000)
        with Server(home) as server:
            cafile = str(home.root_cert)
            assert server.proc is not None
            loadgen.run(server.port, cafile, requests_for(csrs, token, 300, 0), concurrency=8, expected=201)
            cmd = [pyspy, "record", "--pid", str(server.proc.pid), "--rate", str(args.rate),
                   "--format", "raw", "--output", str(collapsed), "--threads"] + ([] if args.all_threads else ["--gil"])
            # --native needs to pause the process for each sample; without it, read it live.
            cmd.append("--native" if args.native else "--nonblocking")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)
            result = loadgen.run(server.port, cafile, requests_for(csrs, token, args.requests, 300),
                                 concurrency=args.concurrency, expected=201, measure=server.cpu_seconds)
            spy.send_signal(2)
            _, err = spy.communicate(timeout=120)
            if not collapsed.exists():
                raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
            n = result["requests"]
            print(f"{n / result['wall']:,.0f} certs/s, server CPU {result['server_cpu'] / n * 1000:.3f} ms/cert "
                  f"(under py-spy), statuses {result['statuses']}")
        print(summarize(collapsed))
        print()
        print(breakdown(collapsed))
        print(f"\ncollapsed stacks: {collapsed}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
