"""Automatic renewal: a short-lived certificate renewed by the SDK's background thread.

The service enrols for eight hours. By default a certificate is renewed when one third of
its lifetime is left (here after about 5 h 20 min), so to see it happen in seconds, not
hours, this example gives the client a clock that runs ``--speed`` times faster than real
time. The background check (every ``--interval`` seconds) notices the renewal is due,
renews with a new key, swaps ``cert.pem``/``key.pem`` atomically, reloads the TLS contexts
and calls ``on_renewed``. The new certificate keeps the lifetime of the old one (eight
hours). Finally ``renew_now()`` runs one check in the foreground, at the real time: nothing
is due any more.

After ``make run`` (in the repository root), with nothing else to give::

    python examples/auto_renewal.py                   # or --port 8443, --url https://pki:8443 ...

Options and environment variables: ``_settings.py`` (``--url``/``--port``, ``--admin-token``,
``--token``, ``--root-fingerprint`` or ``--ca-bundle``, ``--workdir``); by default from the dev
home ``./pki-data``.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import _settings
import httpx
from cryptography import x509

from vcc_pki_client import PKIClient, PKIError, RenewalError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _settings.parser(__doc__)
    parser.add_argument("--service-id", default=f"renewing-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--speed", type=float, default=10000.0, help="how much faster the example's clock runs")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between background checks")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the renewal")
    return _settings.parse(parser, argv)


def fast_clock(speed: float) -> Callable[[], datetime]:
    """A clock that starts now and runs ``speed`` times faster than real time."""
    start, t0 = datetime.now(timezone.utc), time.monotonic()
    return lambda: start + timedelta(seconds=(time.monotonic() - t0) * speed)


def presented_serial(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> int:
    """The serial of the certificate ``server_ctx`` presents in a new loopback handshake."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.recv(2)
                der = tls.getpeercert(binary_form=True)
        thread.join(5)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def main(argv: Sequence[str] | None = None) -> int:
    """Enrol for eight hours, watch the background renewal, print each step. Returns the exit status."""
    args = parse_args(argv)
    if not (args.token or args.admin_token):
        print("auto_renewal: give an enrolment token (--token) or an admin token (--admin-token)", file=sys.stderr)
        return 2
    folder = Path(args.workdir) / args.service_id
    renewed: list[x509.Certificate] = []
    failures: list[Exception] = []
    done = threading.Event()

    def on_renewed(cert: x509.Certificate) -> None:   # e.g. tell a worker pool to reconnect
        renewed.append(cert)
        done.set()

    def on_error(exc: Exception) -> None:             # e.g. page someone: renewal gave up for now
        failures.append(exc)

    with PKIClient(args.url, service_id=args.service_id, cert_file=folder / "cert.pem",
                   key_file=folder / "key.pem", root_fingerprint=args.root_fingerprint,
                   ca_bundle=args.ca_bundle, clock=fast_clock(args.speed)) as pki:
        try:
            token = args.token or _settings.register_as_admin(pki, args.url, args.admin_token)
            first = pki.enroll(token, validity=timedelta(hours=8))
            print(f"enrolled {args.service_id}: certificate {first.serial_number} "
                  f"valid until {first.not_after:%Y-%m-%d %H:%M} UTC (8 hours)")
            server_ctx = pki.server_ssl_context()  # would serve uvicorn; follows the renewal below

            # Renews when a third of the lifetime is left (no renew_before_days).
            pki.enable_auto_renewal(check_interval=args.interval, on_renewed=on_renewed, on_error=on_error)
            print(f"auto-renewal on: a check every {args.interval} s, clock running {args.speed:.0f}x")
            if not done.wait(args.timeout):
                print(f"auto_renewal: no renewal within {args.timeout} s; errors: {failures}", file=sys.stderr)
                return 1
            pki.disable_auto_renewal()

            new = renewed[0]
            # Only this client's clock runs fast: the CA signed both seconds apart, for 8 hours each.
            kept = abs((new.not_valid_after_utc - first.not_after).total_seconds()) < 300
            print(f"renewed in the background: {first.serial_number} -> {new.serial_number:x}, "
                  f"valid until {new.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (the same 8-hour lifetime: {kept})")
            assert pki.files is not None
            cert, _ = pki.files.load()        # checked: the key on disk belongs to this certificate
            print(f"files swapped: {pki.files.cert_file.name} and {pki.files.key_file.name} hold the new pair: "
                  f"{cert == new}")
            seen = presented_serial(server_ctx, pki.client_ssl_context())
            print(f"server context made before the renewal now presents: {seen:x} "
                  f"(the new certificate: {seen == new.serial_number})")
            real_now = datetime.now(timezone.utc)  # the fast clock is past the new one's renewal time too
            print(f"check in the foreground: {'renewed' if pki.renew_now(now=real_now) else 'nothing due'}")
        except (PKIError, RenewalError, httpx.HTTPError) as exc:
            print(f"auto_renewal: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print("auto_renewal: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
