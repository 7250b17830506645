"""Quickstart: enrol a service with a one-time token, register it, fetch a peer's certificate.

After ``make run`` (in the repository root), with nothing else to give::

    python examples/quickstart.py                       # registers a new service as the admin first
    python examples/quickstart.py --port 8443 --service-id billing --token vcc_enr_...  # already registered

A second run with the same ``--service-id`` uses the certificate on disk
(``ensure_enrolled``): the one-time token is spent only once. Options and environment
variables: ``_settings.py`` (``--url``/``--port``, ``--admin-token``, ``--root-fingerprint`` or
``--ca-bundle``, ``--workdir``); by default from the dev home ``./pki-data``.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import _settings
import httpx

from vcc_pki_client import PKIClient, PKIError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _settings.parser(__doc__)
    parser.add_argument("--service-id", default=f"quickstart-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--peer", default="pki-server",
                        help="whose certificate to fetch (default: the PKI server's own, always registered)")
    return _settings.parse(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Enrol, register, fetch a peer; print what happened. Returns the exit status."""
    args = parse_args(argv)
    if not (args.token or args.admin_token):
        print("quickstart: give an enrolment token (--token) or an admin token (--admin-token)", file=sys.stderr)
        return 2
    folder = Path(args.workdir) / args.service_id
    with PKIClient(args.url, service_id=args.service_id,
                   cert_file=folder / "cert.pem", key_file=folder / "key.pem",
                   root_fingerprint=args.root_fingerprint, ca_bundle=args.ca_bundle) as pki:
        try:
            token = args.token
            if not token and not pki.enrolled:
                token = _settings.register_as_admin(pki, args.url, args.admin_token, "Quickstart")
            enrolled_now = pki.ensure_enrolled(token)          # key made here; only a CSR is sent
            cert = pki.certificate
            print(f"{'enrolled' if enrolled_now else 'already enrolled'} {args.service_id}: certificate "
                  f"{cert.serial_number:x} valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
            print(f"files: {folder}/cert.pem, key.pem (mode {os.stat(folder / 'key.pem').st_mode & 0o777:o}), "
                  "ca_chain.pem")

            entry = pki.register_service(service_name="Quickstart service",
                                         endpoints=["https://127.0.0.1:9443"], version="1.0")
            print(f"registered {entry.service_id}: {entry.service_name}, endpoints {', '.join(entry.endpoints)}")

            peer = pki.get_service_certificate(args.peer)    # chain-checked against our CA
            print(f"peer {args.peer}: certificate {peer.serial_number:x}, subject {peer.subject.rfc4514_string()}, "
                  f"revoked: {pki.is_revoked(peer)}")
        except (PKIError, httpx.HTTPError) as exc:
            print(f"quickstart: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print("quickstart: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
