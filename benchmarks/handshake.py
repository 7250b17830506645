"""What checking the CRL costs a service: mTLS handshakes on the SDK's server context with and
without ``check_revocation``, against a CRL of 100,000 entries, in the same run.

The server side is :class:`vcc_pki_client.ReloadingContexts` (what ``server_ssl_context()``
hands uvicorn), the client an ``ssl`` context with its own certificate. Each handshake runs
in-process over memory BIOs (no sockets: the TLS work alone, both sides on this thread),
alternating with and without the check so that drift hits both alike. Also timed: loading
the CRL into the contexts (what every new CRL costs, once per refresh).

    python -m benchmarks.handshake [--entries 100000] [--handshakes 400]
"""

from __future__ import annotations

import argparse
import random
import shutil
import ssl
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from vcc_pki_client import CertificateFiles, ReloadingContexts
from vcc_pki_server.authority import Actor

from .common import build_home, median, open_authority, percentile, table, write_result


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> float:
    """Seconds for one full handshake (client certificate verified by the server)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    start = time.perf_counter()
    done = {"server": False, "client": False}
    while not all(done.values()):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
    # TLS 1.3: the server verifies the client's certificate when it reads the client's Finished.
    client.write(b"x")
    s_in.write(c_out.read())
    assert server.read(1) == b"x"
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.handshake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000, help="revoked serials on the CRL")
    parser.add_argument("--handshakes", type=int, default=400, help="handshakes each way")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vcc-bench-handshake-"))
    try:
        home = build_home(work / "home")
        authority = open_authority(home)
        try:
            pairs = {}
            for name in ("server", "client"):
                issued, key = authority.issue_with_key(f"hs-{name}", common_name="localhost", san_dns=["localhost"],
                                                       key_type="ec-p256", actor=Actor.operator())
                folder = home.write_service_files(f"hs-{name}", issued, key)
                pairs[name] = folder
            now = datetime.now(timezone.utc)
            serials = random.Random(1).sample(range(1, 2**63), args.entries)
            crl = authority.ca.build_crl([(s, now, "superseded") for s in serials], number=1,
                                         this_update=now, next_update=now + timedelta(days=7))
        finally:
            authority.store.close()
        crl_file = work / "crl.pem"
        crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        root = home.root_cert

        files = CertificateFiles(pairs["server"] / "cert.pem", pairs["server"] / "key.pem",
                                 pairs["server"] / "ca_chain.pem")
        contexts = ReloadingContexts(files, ca_file=root)
        plain = contexts.server_context(check_revocation=False)
        checking = contexts.server_context(check_revocation=True)
        loads = []
        for _ in range(5):
            start = time.perf_counter()
            contexts.set_crl(crl_file)
            loads.append(time.perf_counter() - start)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(cafile=str(root))
        fullchain = work / "client-fullchain.pem"  # the leaf and the intermediate, as the SDK presents them
        fullchain.write_bytes((pairs["client"] / "cert.pem").read_bytes() + home.intermediate_cert.read_bytes())
        client.load_cert_chain(fullchain, pairs["client"] / "key.pem")

        for _ in range(30):  # warm-up, and the lazy sort of the CRL's entries
            handshake(plain, client)
            handshake(checking, client)
        without: list[float] = []
        with_check: list[float] = []
        for _ in range(args.handshakes):
            without.append(handshake(plain, client))
            with_check.append(handshake(checking, client))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [["without the CRL check", percentile(without, 50) * 1000, percentile(without, 99) * 1000],
            [f"with a {args.entries:,}-entry CRL", percentile(with_check, 50) * 1000,
             percentile(with_check, 99) * 1000]]
    print(f"mTLS handshakes (P-256, TLS 1.3, in-process), {args.handshakes} each way, alternating")
    print(table(["server context", "p50 ms", "p99 ms"], rows))
    der_bytes = len(crl.public_bytes(serialization.Encoding.DER))
    print(f"loading the CRL ({args.entries:,} entries, {der_bytes:,} bytes DER) into the server's contexts: "
          f"median {median(loads) * 1000:.0f} ms of 5")
    data = {"entries": args.entries, "handshakes": args.handshakes,
            "without_p50_ms": percentile(without, 50) * 1000, "with_p50_ms": percentile(with_check, 50) * 1000,
            "without_p99_ms": percentile(without, 99) * 1000, "with_p99_ms": percentile(with_check, 99) * 1000,
            "crl_load_ms": median(loads) * 1000}
    print(f"\nresults: {write_result('handshake', data)}")
    return data


if __name__ == "__main__":
    main()
