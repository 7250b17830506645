"""A revocation made with pki-admin while the server runs reaches the served CRL within 10 s (SPEC §3)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from cryptography import x509

from conftest import CA_PASSWORD
from support import RunningServer, tls_context
from vcc_pki_server import cli


def test_cli_revocation_is_served_by_the_running_server_within_ten_seconds(
    pki_server: RunningServer, service_id: str, tmp_path: Path
) -> None:
    home = str(pki_server.home.root)
    password_file = tmp_path / "ca.pw"
    password_file.write_text(CA_PASSWORD + "\n")
    assert cli.main(["--home", home, "cert", "issue", "--service-id", service_id, "--cn", service_id,
                     "--key-type", "ec-p256", "--password-file", str(password_file)]) == 0
    serial = int(x509.load_pem_x509_certificate(
        (pki_server.home.services_dir / service_id / "cert.pem").read_bytes()).serial_number)
    with httpx.Client(verify=tls_context(pki_server.home.root_cert)) as client:
        def served_serials() -> set[int]:
            crl = x509.load_der_x509_crl(client.get(f"{pki_server.url}/api/v1/crl").content)
            return {entry.serial_number for entry in crl}

        assert serial not in served_serials()
        assert cli.main(["--home", home, "cert", "revoke", "--service-id", service_id,
                         "--reason", "superseded", "--password-file", str(password_file)]) == 0
        revoked_at = time.monotonic()
        while serial not in served_serials():
            assert time.monotonic() - revoked_at < 10, "the server still serves a CRL without the revocation"
            time.sleep(0.2)
