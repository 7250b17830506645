"""What every example needs to know: where the PKI server is, how to trust it, who registers.

Not an example itself: the examples import it (``python examples/<name>.py`` puts this folder
on ``sys.path``). After ``make run`` in the repository root no option is needed: the dev home
``./pki-data`` holds the root CA (trusted) and the admin token (used to register services).

Options, else the environment, else the dev home:

    --url URL / --port PORT     VCC_PKI_URL            https://127.0.0.1:8443
    --admin-token TOKEN         VCC_PKI_ADMIN_TOKEN    <home>/secrets/admin_token
    --root-fingerprint SHA256   VCC_PKI_ROOT_FINGERPRINT
    --ca-bundle FILE            VCC_PKI_CA_BUNDLE      <home>/ca/root_ca.pem
    --home DIR                  VCC_PKI_HOME           ./pki-data
    --workdir DIR               VCC_PKI_WORKDIR        example-data   (the services' keys)
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization

from vcc_pki_client import PKIClient


def parser(description: str | None, *, enrolment_token: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the options above (and ``--token`` with ``enrolment_token``)."""
    env = os.environ.get
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=env("VCC_PKI_URL"), help="the PKI server (default https://127.0.0.1:8443)")
    p.add_argument("--port", type=int, help="the PKI server on 127.0.0.1 at this port (instead of --url)")
    p.add_argument("--home", default=env("VCC_PKI_HOME", "pki-data"),
                   help="a dev home made by `make run`: admin token and root CA taken from it (default ./pki-data)")
    p.add_argument("--admin-token", default=env("VCC_PKI_ADMIN_TOKEN"),
                   help="registers the services (default: <home>/secrets/admin_token)")
    if enrolment_token:
        p.add_argument("--token", default=env("VCC_PKI_ENROLMENT_TOKEN"),
                       help="a one-time enrolment token for an already registered --service-id")
    p.add_argument("--root-fingerprint", default=env("VCC_PKI_ROOT_FINGERPRINT"),
                   help="the root CA's SHA-256 (from `pki-admin ca info`)")
    p.add_argument("--ca-bundle", default=env("VCC_PKI_CA_BUNDLE"),
                   help="or: a PEM file with the root CA (default: <home>/ca/root_ca.pem)")
    p.add_argument("--workdir", default=env("VCC_PKI_WORKDIR", "example-data"), help="where the keys go")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, then fill in what was not given from ``--port`` and the dev home."""
    args = p.parse_args(argv)
    if args.port is not None:
        args.url = f"https://127.0.0.1:{args.port}"
    args.url = args.url or "https://127.0.0.1:8443"
    home = Path(args.home)
    if not args.admin_token and (home / "secrets" / "admin_token").is_file():
        args.admin_token = (home / "secrets" / "admin_token").read_text().strip()
    if not (args.root_fingerprint or args.ca_bundle) and (home / "ca" / "root_ca.pem").is_file():
        args.ca_bundle = str(home / "ca" / "root_ca.pem")
    return args


def register_as_admin(pki: PKIClient, url: str, admin_token: str, service_name: str | None = None) -> str:
    """The operator's step (usually `pki-admin service register`) for ``pki``'s service, allowed
    its id, localhost and 127.0.0.1: returns its one-time enrolment token."""
    roots = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in pki.get_ca_bundle())
    with httpx.Client(verify=ssl.create_default_context(cadata=roots),
                      headers={"Authorization": f"Bearer {admin_token}"}) as admin:
        response = admin.post(f"{url}/api/v1/services/register", json={
            "service_id": pki.service_id, "service_name": service_name or pki.service_id,
            "san_dns": [pki.service_id, "localhost"], "san_ip": ["127.0.0.1"]})
        response.raise_for_status()
        return str(response.json()["enrolment_token"])
