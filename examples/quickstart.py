"""Quickstart: enrol a service with a one-time token, register it, fetch a peer's certificate.

Run it against a server (``make run`` prints the admin token; ``pki-admin ca info`` the root's
fingerprint)::

    python examples/quickstart.py --url https://127.0.0.1:8443 \\
        --root-fingerprint sha256:9f2c... --admin-token vcc_adm_...      # registers the service first
    python examples/quickstart.py --service-id billing --token vcc_enr_... # already registered

Settings come from the options or the environment: VCC_PKI_URL, VCC_PKI_ADMIN_TOKEN,
VCC_PKI_ENROLMENT_TOKEN, VCC_PKI_ROOT_FINGERPRINT or VCC_PKI_CA_BUNDLE, VCC_PKI_WORKDIR.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization

from vcc_pki_client import PKIClient, PKIError


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=env("VCC_PKI_URL", "https://127.0.0.1:8443"), help="the PKI server")
    parser.add_argument("--admin-token", default=env("VCC_PKI_ADMIN_TOKEN"),
                        help="register the service first, as an admin (else --token is needed)")
    parser.add_argument("--token", default=env("VCC_PKI_ENROLMENT_TOKEN"), help="a one-time enrolment token")
    parser.add_argument("--root-fingerprint", default=env("VCC_PKI_ROOT_FINGERPRINT"),
                        help="the root CA's SHA-256 (from `pki-admin ca info`)")
    parser.add_argument("--ca-bundle", default=env("VCC_PKI_CA_BUNDLE"), help="or: a PEM file with the root CA")
    parser.add_argument("--workdir", default=env("VCC_PKI_WORKDIR", "example-data"), help="where keys go")
    parser.add_argument("--service-id", default=f"quickstart-{uuid.uuid4().hex[:8]}")
    parser.add_argument("--peer", default="pki-server",
                        help="whose certificate to fetch (default: the PKI server's own, always registered)")
    return parser.parse_args(argv)


def register_as_admin(pki: PKIClient, url: str, admin_token: str, service_id: str) -> str:
    """The operator's step (usually `pki-admin service register`): returns the one-time token."""
    roots = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in pki.get_ca_bundle())
    with httpx.Client(verify=ssl.create_default_context(cadata=roots),
                      headers={"Authorization": f"Bearer {admin_token}"}) as admin:
        response = admin.post(f"{url}/api/v1/services/register", json={
            "service_id": service_id, "service_name": "Quickstart",
            "san_dns": [service_id, "localhost"], "san_ip": ["127.0.0.1"]})
        response.raise_for_status()
        return str(response.json()["enrolment_token"])


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
            token = args.token or register_as_admin(pki, args.url, args.admin_token, args.service_id)
            issued = pki.enroll(token)                       # key made here; only a CSR is sent
            print(f"enrolled {args.service_id}: certificate {issued.serial_number} "
                  f"valid until {issued.not_after:%Y-%m-%d %H:%M} UTC")
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
